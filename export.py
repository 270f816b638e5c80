"""Export a checkpoint's weights for use elsewhere: a timm encoder, safetensors, or a Hugging Face
transformers ViTMAEForPreTraining folder; and import such a folder as our checkpoint.

    python export.py --checkpoint output_dir/checkpoint-399.pth --to timm --output mae_vit_base.safetensors
    python export.py --checkpoint mae_pretrain_vit_base.pth --to timm --output encoder.pth
    python export.py --checkpoint output_dir/checkpoint-99.pth --to safetensors --output finetuned.safetensors
    python export.py --checkpoint output_dir/checkpoint-399.pth --to hf --output mae_hf/
    python export.py --from hf --checkpoint vit-mae-base/ --output mae_vit_base_from_hf.pth

``--to timm`` writes the encoder alone, under timm's names, and prints the ``timm.create_model``
call that loads it; ``--from hf`` takes folders of ours or of the Hub. Neither direction needs
transformers. Details: docs/checkpoints.md.

Every output is written whole or not at all (util.interop.files, through util.atomic's writers;
a folder beside its place, then renamed into it): a full disk is a one-line error that leaves an earlier
output as it was. The timm side is util.interop.timm, the HF side util.interop.hf and hf_convert.
"""

import argparse
import os
from argparse import BooleanOptionalAction
from typing import Any

import torch

from util.checkpoint.load import load_checkpoint, model_state
from util.checkpoint.weights import check_float_weights
from util.cli.errors import fail, run_cli
from util.interop import hf, hf_convert
from util.interop.files import write_folder, write_weights
from util.interop.timm import encoder_state, timm_call, vit_name
from util.outputs import check_folder_output, check_not_an_input, check_writable
from util.sizes import image_size


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export MAE / ViT weights for timm, as safetensors or for transformers")
    parser.add_argument("--checkpoint", required=True, help="ours or an official MAE release; --from hf: an HF folder")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("timm", "safetensors", "hf"), help="what to write")
    direction.add_argument("--from", dest="source", choices=("hf",), help="import a ViTMAEForPreTraining folder")
    parser.add_argument("--output", required=True, help=".safetensors, .pth (--to timm, --from hf) or folder (--to hf)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("--model", help="models_vit (--to hf: models_mae) name; default: from the checkpoint")
    parser.add_argument("--mask_ratio", type=float, help="--to hf: config's mask_ratio (default: the run's, else 0.75)")
    parser.add_argument("--norm_pix_loss", action=BooleanOptionalAction, help="--to hf (default: the run's, else off)")
    return parser


def to_timm(args: argparse.Namespace, ckpt: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """--to timm: the encoder alone, and the timm.create_model call that loads it."""
    encoder = encoder_state(state, args.checkpoint)
    name, img_size = vit_name(ckpt, encoder, args.model, args.checkpoint)
    write_weights(args.output, encoder, ckpt.get("args"))  # a .pth: a plain state dict, as timm reads it
    size = "x".join(map(str, image_size(img_size)))
    print(f"wrote the {name} encoder ({len(encoder)} tensors, {size} px) to {args.output}; load it with")
    in_chans = encoder["patch_embed.proj.weight"].shape[1]
    print(f"  {timm_call(name, img_size, 'fc_norm.weight' in encoder, args.output, in_chans)}")


def to_safetensors(args: argparse.Namespace, ckpt: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """--to safetensors: every weight, and the run's args as metadata."""
    write_weights(args.output, state, ckpt.get("args"))
    print(f"wrote {len(state)} tensors and {'the' if ckpt.get('args') else 'no'} args to {args.output}")


def to_hf(args: argparse.Namespace, ckpt: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """--to hf: the MAE as a transformers ViTMAEForPreTraining folder."""
    name, img_size = hf_convert.mae_name(ckpt, state, args.model, args.checkpoint)
    saved = ckpt.get("args")
    # The flags, else the run's (checked when it was loaded; None: not stored), else the defaults.
    mask_ratio = next(v for v in (args.mask_ratio, getattr(saved, "mask_ratio", None), 0.75) if v is not None)
    norm_pix = next(v for v in (args.norm_pix_loss, getattr(saved, "norm_pix_loss", None), False) if v is not None)
    if not 0 <= mask_ratio < 1:
        fail(f"--mask_ratio must be in [0, 1), got {mask_ratio}")
    files = hf_convert.hf_files(name, img_size, state, saved, mask_ratio, norm_pix, args.checkpoint)
    write_folder(args.output, files)
    print(
        f"wrote {name} ({img_size} px, mask_ratio {mask_ratio}, norm_pix_loss {bool(norm_pix)}) as a "
        f"transformers ViTMAEForPreTraining to {args.output}; load it with"
    )
    print(f"  transformers.ViTMAEForPreTraining.from_pretrained({args.output!r})")


def from_hf(args: argparse.Namespace) -> None:
    """--from hf: a ViTMAEForPreTraining folder (ours or the Hub's) as our checkpoint."""
    folder = args.checkpoint
    config, hf_state, run_args = hf.read_hf_folder(folder)
    name, model = hf_convert.mae_for_hf_config(config, folder)
    img_size = config["image_size"]
    processor_norm = hf.read_preprocessor(folder, config["num_channels"])
    state = hf.from_hf_state(hf_state, folder)
    hf_convert.check_weights_fit_config(state, name, img_size, folder)
    check_float_weights(state, f"HF folder {folder}")
    hf_convert.note_layer_norm_eps(config, name, model, folder)
    saved = hf_convert.imported_args(name, config, folder, processor_norm, run_args)
    write_weights(args.output, state, saved, {"model": state, "args": saved})
    print(f"wrote {name} ({img_size} px, {len(state)} tensors) from {folder} to {args.output}; use it with")
    # No --model or --input_size: the checkpoint stores both (``saved``), and both entry points read them from it.
    print(f"  python main_finetune.py --finetune {args.output} ...")
    print(f"  python main_pretrain.py --resume {args.output} ...")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse the flags of another mode than the one asked for: they would go unused without a word."""
    if args.to != "hf" and (args.mask_ratio is not None or args.norm_pix_loss is not None):
        fail(
            "--mask_ratio and --norm_pix_loss set the config of --to hf; the other modes take the checkpoint's: "
            "leave them out"
        )
    if args.model is not None and args.to not in ("timm", "hf"):
        what = "--from hf takes the folder's config.json" if args.source else "--to safetensors copies every weight"
        fail(f"--model names the model of --to timm and --to hf; {what} and the checkpoint's flags: leave it out")


def check_output_kind(args: argparse.Namespace) -> None:
    """--output names what the mode writes: a file of its extension, or (--to hf) a folder."""
    if args.to == "safetensors" and not args.output.endswith(".safetensors"):
        fail(f"--output {args.output}: --to safetensors writes a .safetensors file; name it so")
    if args.to == "timm" and not args.output.endswith((".safetensors", ".pth")):
        fail(f"--output {args.output}: --to timm writes .safetensors or .pth; name it so (timm picks the reader by it)")
    if args.source == "hf" and not args.output.endswith((".safetensors", ".pth")):
        fail(f"--output {args.output}: --from hf writes our checkpoint, .pth or .safetensors; name it so")
    if args.to == "hf" and os.path.isfile(args.output):
        fail(f"--output {args.output} is a file; --to hf writes a folder (a transformers model's files): name one")
    if args.to != "hf" and os.path.isdir(args.output):  # before --force is advised: it cannot replace a folder
        example = os.path.join(args.output, "model.safetensors")
        fail(f"--output {args.output} is a folder; give a file name such as {example}")


def check_output(args: argparse.Namespace) -> None:
    """Fail before any work if --output cannot be written as asked: its kind (``check_output_kind``), then
    its place (not an input; replaced only with --force, and a --to hf folder only if it holds what that
    writes; its folder there and writable)."""
    check_output_kind(args)
    # Even with --force: the export would replace the checkpoint it is made from. An HF folder's own
    # weights are inputs too: --output FOLDER/model.safetensors would put our names in their place.
    inputs = [("--checkpoint", args.checkpoint)]
    if args.source == "hf" and os.path.isdir(args.checkpoint):
        inputs += [("--checkpoint's weight file", path) for path in hf.files_read(args.checkpoint)]
    check_not_an_input(args.output, "--output", inputs)
    if os.path.exists(args.output) and not args.force:
        fail(f"--output {args.output} exists; give --force to overwrite it")
    if args.to == "hf" and os.path.isdir(args.output):
        # The folder is replaced as a whole: files of another kind in it would be lost.
        others = sorted(set(os.listdir(args.output)) - set(hf.WRITTEN_NAMES))
        if others:
            fail(
                f"--output {args.output} holds other files ({', '.join(others[:3])}); --to hf replaces the whole "
                f"folder: remove them or give another folder"
            )
    if not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.output))):
        fail(f"--output {args.output}: the folder {folder} does not exist; create it first")
    # Before the checkpoint is loaded and converted: a name over NAME_MAX, a path near PATH_MAX or a
    # read-only folder failed only at the write.
    if args.to == "hf":
        check_folder_output(args.output, f"--output {args.output}", hf.WRITTEN_NAMES)
    else:
        check_writable(folder, f"--output {args.output}", os.path.basename(args.output))


def main(args: argparse.Namespace) -> None:
    check_flags(args)
    check_output(args)
    if args.source == "hf":
        from_hf(args)
        return
    ckpt = load_checkpoint(args.checkpoint)
    state = model_state(ckpt, args.checkpoint)
    check_float_weights(state, f"checkpoint {args.checkpoint}")
    {"timm": to_timm, "safetensors": to_safetensors, "hf": to_hf}[args.to](args, ckpt, state)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
