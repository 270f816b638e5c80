"""Export a checkpoint's weights for use elsewhere: a timm encoder, safetensors, or a Hugging Face
transformers ViTMAEForPreTraining folder; and import such a folder as our checkpoint.

    python export.py --checkpoint output_dir/checkpoint-399.pth --to timm --output mae_vit_base.safetensors
    python export.py --checkpoint mae_pretrain_vit_base.pth --to timm --output encoder.pth
    python export.py --checkpoint output_dir/checkpoint-99.pth --to safetensors --output finetuned.safetensors
    python export.py --checkpoint output_dir/checkpoint-399.pth --to hf --output mae_hf/
    python export.py --from hf --checkpoint vit-mae-base/ --output mae_vit_base_from_hf.pth

Input: main_pretrain's MAE checkpoints (with decoder), main_finetune/main_linprobe's classifier
checkpoints, or an official MAE release (full, or encoder only). ``--to timm`` writes the encoder
(no decoder, mask token or head) under timm's ViT names, as a plain state dict (.pth) or a
.safetensors file; it prints the ``timm.create_model`` call that loads it with strict key matching.
``--to safetensors`` writes every model weight and the checkpoint's args (JSON, as metadata), which
``--finetune``, ``--resume`` (weights only), ``knn_eval.py`` and ``reconstruct.py`` read.
``--to hf`` writes an MAE with its decoder as a folder (config.json + model.safetensors) that
``transformers.ViTMAEForPreTraining.from_pretrained`` loads; ``--from hf`` turns such a folder (ours,
or one from the Hub) into a weights-only checkpoint (.pth or .safetensors) whose args name our model,
for ``--finetune``, ``--resume``, ``knn_eval.py`` and ``reconstruct.py``. transformers is not needed
for either direction (util/interop/hf.py reads and writes the files).
"""

import argparse
import json
import os
from typing import Any

import torch

import models_mae
import models_vit
from util.checkpoint.files import atomic_save
from util.checkpoint.load import load_checkpoint, model_state
from util.cli.errors import fail, run_cli
from util.interop import hf as hf_interop

# Our classifier architectures as timm registered models (+ the kwargs that make them equal).
TIMM_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_patch16": ("vit_tiny_patch16_224", {}),
    "vit_tiny_patch4": ("vit_tiny_patch16_224", {"patch_size": 4}),
    "vit_mini_patch4": ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4}),
    "vit_base_patch16": ("vit_base_patch16_224", {}),
    "vit_large_patch16": ("vit_large_patch16_224", {}),
    "vit_huge_patch14": ("vit_huge_patch14_224", {}),
}
# What a timm ViT encoder holds; the rest of an MAE (decoder, mask token) and a head are left out.
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")
_DROPPED_PREFIXES = ("decoder_", "mask_token", "head.")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export MAE / ViT weights for timm, as safetensors or for transformers")
    parser.add_argument(
        "--checkpoint", required=True, help="our checkpoint or an official MAE release; with --from hf, an HF folder"
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("timm", "safetensors", "hf"), help="what to write")
    direction.add_argument(
        "--from", dest="source", choices=("hf",), help="read a transformers ViTMAEForPreTraining folder"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="file to write: .safetensors, or .pth for --to timm and --from hf; a folder for --to hf",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument(
        "--model", default=None, help="models_vit name; models_mae name for --to hf (default: from the checkpoint)"
    )
    parser.add_argument(
        "--mask_ratio", default=None, type=float, help="--to hf: config's mask_ratio (default: the run's, else 0.75)"
    )
    parser.add_argument(
        "--norm_pix_loss",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="--to hf: config's norm_pix_loss (default: the run's, else off)",
    )
    return parser


def encoder_state(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The encoder weights of an MAE or classifier state dict, under timm's ViT names (ours are
    timm's already), or fail naming what is missing or foreign."""
    foreign = sorted(k for k in state if not k.startswith(_ENCODER_PREFIXES + _DROPPED_PREFIXES))
    if foreign:
        fail(f"checkpoint {path} holds weights that are not an MAE or ViT's ({', '.join(foreign[:3])})")
    encoder = {k: v for k, v in state.items() if k.startswith(_ENCODER_PREFIXES)}
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in needed if k not in encoder]
    if "norm.weight" not in encoder and "fc_norm.weight" not in encoder:
        missing.append("norm.weight")
    if missing:
        fail(f"checkpoint {path} lacks encoder weights ({', '.join(missing)}); it is not an MAE or ViT checkpoint")
    return encoder


def vit_name(ckpt: dict[str, Any], encoder: dict[str, torch.Tensor], given: str | None, path: str) -> tuple[str, int]:
    """(models_vit name, image size) of the encoder: --model, else the checkpoint's args, else the
    architecture whose shapes equal the encoder's (depth, width and patch size tell them apart)."""
    patch = encoder["patch_embed.proj.weight"].shape[-1]
    img_size = int(round((encoder["pos_embed"].shape[1] - 1) ** 0.5)) * patch
    saved = getattr(ckpt.get("args"), "model", None)
    name = given or (saved.removeprefix("mae_") if isinstance(saved, str) else None)
    candidates = [name] if name else list(models_vit.MODELS)
    if name and name not in models_vit.MODELS:
        fail(f"--model {name} is unknown; known models: {', '.join(models_vit.MODELS)}")
    global_pool = "fc_norm.weight" in encoder
    shapes = {k: tuple(v.shape) for k, v in encoder.items()}
    for candidate in candidates:
        with torch.device("meta"):
            model = models_vit.MODELS[candidate](img_size=img_size, num_classes=0, global_pool=global_pool)
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return candidate, img_size
    if name:
        fail(f"checkpoint {path} does not fit --model {name} at {img_size} px; check --model")
    fail(f"checkpoint {path}: no known ViT has its encoder's shapes; pass --model")


def timm_call(name: str, img_size: int, global_pool: bool, output: str) -> str:
    """The timm.create_model call that loads the export (printed, and tested)."""
    timm_name, kwargs = TIMM_NAMES[name]
    kwargs = dict(kwargs, **({"img_size": img_size} if img_size != 224 else {}))
    if global_pool:
        kwargs["global_pool"] = "avg"  # fc_norm after averaging, no final norm
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model({timm_name!r}{extra}, pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay=dict(file={output!r}))"
    )


def args_metadata(ckpt: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata (strings only): the checkpoint's args as JSON; 'format' as HF expects."""
    metadata = {"format": "pt"}
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        metadata["args"] = json.dumps(vars(args), default=str)  # devices and the like as strings
    return metadata


def write(state: dict[str, torch.Tensor], output: str, metadata: dict[str, str]) -> None:
    """Write atomically: .safetensors (with metadata) or a plain torch state dict (.pth)."""
    if output.endswith(".safetensors"):
        from safetensors.torch import save

        # Own, contiguous storage per tensor: safetensors refuses views and shared memory.
        data = save({k: v.detach().clone().contiguous() for k, v in state.items()}, metadata=metadata)
        tmp = f"{output}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, output)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        atomic_save(state, output)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
def _meta_mae(name: str, img_size: int, in_chans: int) -> torch.nn.Module | None:
    """The MAE ``name`` built without memory (meta device); None when the image size does not fit
    its patches."""
    try:
        with torch.device("meta"):
            return models_mae.MODELS[name](img_size=img_size, in_chans=in_chans)
    except ValueError:
        return None


def _square_side(ckpt: dict[str, Any], state: dict[str, torch.Tensor], path: str) -> int:
    """The image side of a square MAE checkpoint; HF's ViTMAEForPreTraining computes its loss on
    square images only (its patchify refuses others), so other shapes cannot be exported."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    tokens = state["pos_embed"].shape[1] - 1
    grid = int(round(tokens**0.5))
    saved = getattr(ckpt.get("args"), "input_size", None)
    sides = [int(v) for v in saved] if isinstance(saved, (list, tuple)) else [saved]
    # The token count alone cannot tell 16x16 from 8x32: a stored --input_size can.
    if grid * grid != tokens or (saved is not None and len(set(sides)) > 1):
        shown = f"--input_size {saved}" if saved is not None else f"{tokens} patches"
        fail(f"checkpoint {path} is not for square images ({shown}); transformers' ViTMAE takes square ones only")
    return grid * patch


def mae_name(ckpt: dict[str, Any], state: dict[str, torch.Tensor], given: str | None, path: str) -> tuple[str, int]:
    """(models_mae name, image size) of an MAE with decoder: --model, else the checkpoint's args,
    else the factory whose shapes equal the weights' (official releases carry no args)."""
    from reconstruct import check_has_decoder, infer_model

    check_has_decoder(state, path)
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        fail(f"checkpoint {path} lacks pos_embed or patch_embed.proj.weight; it is not an MAE checkpoint")
    img_size = _square_side(ckpt, state, path)
    in_chans = state["patch_embed.proj.weight"].shape[1]
    saved = getattr(ckpt.get("args"), "model", None)
    name = given or (saved if isinstance(saved, str) else None)
    if name is None:
        inferred = infer_model(state)
        if inferred is None:
            fail(f"checkpoint {path}: no models_mae model has its shapes; pass --model")
        return inferred
    name = name if name.startswith("mae_") else f"mae_{name}"  # --model may name the encoder
    if name not in models_mae.MODELS:
        fail(f"--model {name} is not an MAE; known models: {', '.join(models_mae.MODELS)}")
    built = _meta_mae(name, img_size, in_chans)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if built is None or {k: tuple(v.shape) for k, v in built.state_dict().items()} != shapes:
        fail(f"checkpoint {path} does not fit {name} at {img_size} px; check --model")
    return name, img_size


def export_hf(args: argparse.Namespace, ckpt: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    name, img_size = mae_name(ckpt, state, args.model, args.checkpoint)
    saved = ckpt.get("args")
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else getattr(saved, "mask_ratio", 0.75)
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else getattr(saved, "norm_pix_loss", False)
    if not 0 <= mask_ratio < 1:
        fail(f"--mask_ratio must be in [0, 1), got {mask_ratio}")
    model = _meta_mae(name, img_size, state["patch_embed.proj.weight"].shape[1])
    config = hf_interop.hf_config(model, mask_ratio, norm_pix)
    hf_interop.write_hf_folder(args.output, hf_interop.to_hf_state(state), config, args_metadata(ckpt))
    print(
        f"wrote {name} ({img_size} px, mask_ratio {mask_ratio}, norm_pix_loss {bool(norm_pix)}) as a "
        f"transformers ViTMAEForPreTraining to {args.output}; load it with"
    )
    print(f"  transformers.ViTMAEForPreTraining.from_pretrained({args.output!r})")


def mae_for_hf_config(config: dict[str, Any], folder: str) -> tuple[str, int, torch.nn.Module]:
    """(models_mae name, image size, model on the meta device) whose ViTMAEConfig has the
    folder's architecture; or fail listing it."""
    img_size = hf_interop.square(config["image_size"], "image_size", folder)
    arch = dict(config, image_size=img_size, patch_size=hf_interop.square(config["patch_size"], "patch_size", folder))
    for name in models_mae.MODELS:  # the registry lists each factory once (no aliases)
        model = _meta_mae(name, img_size, config["num_channels"])
        if model is None:
            continue
        ours = hf_interop.hf_config(model, 0.75, False)
        if all(ours[k] == arch[k] for k in hf_interop.ARCH_KEYS):
            return name, img_size, model
    described = ", ".join(f"{k} {arch[k]}" for k in hf_interop.ARCH_KEYS)
    fail(f"HF folder {folder}: no models_mae model has its architecture ({described})")


def import_hf(args: argparse.Namespace) -> None:
    folder = args.checkpoint
    config, hf_state = hf_interop.read_hf_folder(folder)
    name, img_size, model = mae_for_hf_config(config, folder)
    state = hf_interop.from_hf_state(hf_state, folder)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(state[k].shape) != own[k])
    if missing or unexpected or wrong:
        problem = (
            f"lacks {', '.join(missing[:3])}"
            if missing
            else f"has extra {', '.join(unexpected[:3])}"
            if unexpected
            else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {own[wrong[0]]}"
        )
        fail(f"HF folder {folder}: its weights do not fit its config.json ({name} at {img_size} px): {problem}")
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}.pop()
    if config["layer_norm_eps"] != eps:
        # Not an error: configs may carry HF's default (1e-12) while the official MAE trained with
        # 1e-6, as our models compute; outputs then differ a little from transformers' on the folder.
        print(
            f"note: {folder} states layer_norm_eps {config['layer_norm_eps']}; {name} computes with {eps} "
            f"(the official MAE's), so its outputs differ slightly from transformers' on this folder"
        )
    saved = argparse.Namespace(
        model=name,
        input_size=img_size,
        mask_ratio=float(config["mask_ratio"]),
        norm_pix_loss=bool(config["norm_pix_loss"]),
        hf_folder=os.path.abspath(folder),
    )
    if args.output.endswith(".safetensors"):
        write(state, args.output, args_metadata({"args": saved}))
    else:
        atomic_save({"model": state, "args": saved}, args.output)
    print(f"wrote {name} ({img_size} px, {len(state)} tensors) from {folder} to {args.output}; use it with")
    print(f"  python main_finetune.py --model {name.removeprefix('mae_')} --finetune {args.output} ...")
    print(f"  python main_pretrain.py --model {name} --input_size {img_size} --resume {args.output} ...")


# ---------------------------------------------------------------------------------------------
def check_output(args: argparse.Namespace) -> None:
    """Fail before any work if --output cannot be written as asked."""
    if args.to == "safetensors" and not args.output.endswith(".safetensors"):
        fail(f"--output {args.output}: --to safetensors writes a .safetensors file; name it so")
    if args.to == "timm" and not args.output.endswith((".safetensors", ".pth")):
        fail(f"--output {args.output}: --to timm writes .safetensors or .pth; name it so (timm picks the reader by it)")
    if args.source == "hf" and not args.output.endswith((".safetensors", ".pth")):
        fail(f"--output {args.output}: --from hf writes our checkpoint, .pth or .safetensors; name it so")
    if args.to == "hf" and os.path.isfile(args.output):
        fail(f"--output {args.output} is a file; --to hf writes a folder (config.json + model.safetensors)")
    if os.path.exists(args.output) and not args.force:
        fail(f"--output {args.output} exists; pass --force to overwrite it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        fail(f"--output {args.output}: its folder does not exist")
    if args.to != "hf" and (args.mask_ratio is not None or args.norm_pix_loss is not None):
        fail("--mask_ratio and --norm_pix_loss set the config of --to hf; the other modes take the checkpoint's")


def main(args: argparse.Namespace) -> None:
    check_output(args)
    if args.source == "hf":
        import_hf(args)
        return
    ckpt = load_checkpoint(args.checkpoint)
    state = model_state(ckpt, args.checkpoint)
    if args.to == "hf":
        export_hf(args, ckpt, state)
        return
    if args.to == "safetensors":
        write(state, args.output, args_metadata(ckpt))
        print(f"wrote {len(state)} tensors and {'the' if ckpt.get('args') else 'no'} args to {args.output}")
        return
    encoder = encoder_state(state, args.checkpoint)
    name, img_size = vit_name(ckpt, encoder, args.model, args.checkpoint)
    write(encoder, args.output, args_metadata(ckpt))
    print(f"wrote the {name} encoder ({len(encoder)} tensors, {img_size} px) to {args.output}; load it with")
    print(f"  {timm_call(name, img_size, 'fc_norm.weight' in encoder, args.output)}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
