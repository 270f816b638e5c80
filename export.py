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

Every output is written whole or not at all (util.outputs.atomic_write; a folder beside its place,
then renamed into it): a full disk is a one-line error that leaves an earlier output as it was.
"""

import argparse
import errno
import json
import math
import os
import shutil
from argparse import BooleanOptionalAction
from collections.abc import Mapping
from typing import Any, NoReturn

import torch

import models_mae
import models_vit
from util.checkpoint.files import atomic_save
from util.checkpoint.load import StateDict, check_weight, checksum_metadata, load_checkpoint, model_state
from util.cli.errors import fail, run_cli
from util.cli.redact import redacted, values_without_secrets
from util.data import normalization
from util.interop import hf as hf_interop
from util.memory import require
from util.outputs import atomic_write, check_folder_output, check_not_an_input, check_writable, sync_folder
from util.registry import SHAPES_ONLY
from util.sizes import image_size

# Our classifier architectures as timm registered models (+ the kwargs that make them equal).
TIMM_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_patch16": ("vit_tiny_patch16_224", {}),
    "vit_tiny_patch4": ("vit_tiny_patch16_224", {"patch_size": 4}),
    "vit_tiny_patch2": ("vit_tiny_patch16_224", {"patch_size": 2}),
    "vit_mini_patch4": ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4}),
    "vit_base_patch16": ("vit_base_patch16_224", {}),
    "vit_large_patch16": ("vit_large_patch16_224", {}),
    "vit_huge_patch14": ("vit_huge_patch14_224", {}),
}
# What a timm ViT encoder holds; the rest of an MAE (decoder, mask token) and a head are left out.
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")


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


def encoder_state(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The encoder weights of an MAE or classifier state dict, under timm's ViT names (ours are
    timm's already), or fail naming what is missing or foreign."""
    foreign = sorted(k for k in state if not k.startswith(_ENCODER_PREFIXES + models_vit.NOT_ENCODER))
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


# The one integer tensor our models hold: BatchNorm's step counter (the linear probe's head).
_INTEGER_BUFFERS = ("num_batches_tracked",)


def check_float_weights(state: StateDict, source: str) -> None:
    """Every weight is what loading one requires (``check_weight``: a float, whole, finite), or fail
    naming it after ``source``: an export must not pass on weights the other entry points refuse
    (NaN from a diverged run, a quantized file). Our models and the official ones hold floats, but
    for the counters of ``_INTEGER_BUFFERS``, which must be int64 as torch keeps them."""
    for key, weight in sorted(state.items()):
        dtype = torch.int64 if key.rsplit(".", 1)[-1] in _INTEGER_BUFFERS else torch.float32
        check_weight(key, weight, dtype, source)


def vit_name(
    ckpt: dict[str, Any], encoder: dict[str, torch.Tensor], given: str | None, path: str
) -> tuple[str, int | tuple[int, int]]:
    """(models_vit name, image size) of the encoder: --model, else the checkpoint's args, else the
    architecture whose shapes equal the encoder's (depth, width and patch size tell them apart). The
    size is a square's side, or (height, width) where the checkpoint stores a rectangle that fits."""
    saved = getattr(ckpt.get("args"), "model", None)
    name = given or (models_mae.encoder_name(saved) if isinstance(saved, str) else None)
    if given:
        models_vit.MODELS.factory(given)  # a known name, or one line listing them
    elif name and name not in models_vit.MODELS:
        fail(f"checkpoint {path} stores --model {saved}, which has no models_vit classifier; give --model")
    # The stored rectangle first: one of as many patches as a square (48x12 at patch 4: 12x3, as 24x24's 6x6)
    # fits that square's shapes too, whose grid would place the position embeddings otherwise.
    names = [name] if name else None
    rectangle = _stored_rectangle(ckpt) if name else None
    found = rectangle and models_vit.encoder_for_weights(encoder, names, img_size=rectangle)
    found = found or models_vit.encoder_for_weights(encoder, names)
    if found:
        return found
    if name:
        which, advice = (f"--model {name}", "check") if given else (f"{name}, the model it stores", "give")
        fail(f"checkpoint {path} does not fit {which} (at any square image size); {advice} --model")
    fail(f"checkpoint {path}: no known ViT has its encoder's shapes; give --model")


def _stored_rectangle(ckpt: dict[str, Any]) -> tuple[int, int] | None:
    """The checkpoint's --input_size if (height, width) differ (weights alone cannot tell 8x16 patches from 16x8)."""
    stored = getattr(ckpt.get("args"), "input_size", None)  # checked when the checkpoint was loaded
    if stored is None:
        return None
    height, width = image_size(stored)
    return (height, width) if height != width else None


def timm_call(
    name: str, img_size: int | tuple[int, int], global_pool: bool, output: str, in_chans: int = 3
) -> str:  # printed, tested
    timm_name, kwargs = TIMM_NAMES[name]
    kwargs = dict(kwargs, **({"img_size": img_size} if img_size != 224 else {}))
    if in_chans != 3:  # timm builds 3 channels by default and would refuse the weights
        kwargs["in_chans"] = in_chans
    if global_pool:
        kwargs["global_pool"] = "avg"  # fc_norm after averaging, no final norm
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model({timm_name!r}{extra}, pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay=dict(file={output!r}, custom_load=False))"
    )  # custom_load=False: a plain state dict, not the .npz some default configs name (timm < 1.0.31 keeps that)


def args_metadata(args: Any) -> dict[str, str]:
    """A checkpoint's args (if a Namespace) as safetensors metadata, which holds strings only: JSON
    under 'args', devices and the like as strings."""
    if not isinstance(args, argparse.Namespace):
        return {}
    # Not a URL's secrets (--finetune URL, stored by a checkpoint written before they were left out): redact.py
    return {"args": json.dumps(values_without_secrets(vars(args)), default=str)}


# Writing: each file atomically, a folder as a whole
def safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``state`` as a .safetensors file with ``metadata`` and a CRC-32 of every tensor (which
    ``load_checkpoint`` verifies): the one place where export writes safetensors."""
    from safetensors.torch import save

    nbytes = 2 * sum(v.numel() * v.element_size() for v in state.values())  # the copies below, then the bytes
    require(nbytes, f"serializing the {len(state)} tensors to write", "export on a machine with more free memory")
    # Own, contiguous storage per tensor: safetensors refuses views (the qkv chunks of --to hf)
    # and shared memory.
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    # 'format': what transformers expects
    return save(tensors, metadata={"format": "pt", **metadata, **checksum_metadata(tensors)})


def write_weights(path: str, state: StateDict, args: Any, pth: dict[str, Any] | None = None) -> None:
    """``state`` as the file ``path``: .safetensors with ``args`` as metadata, else what torch.save
    writes of ``pth`` (which holds ``state``; default: ``state`` alone, a plain state dict)."""
    existed = os.path.exists(path)
    try:
        if path.endswith(".safetensors"):
            data = safetensors_bytes(state, args_metadata(args))
            atomic_write(path, lambda f: f.write(data))
        else:
            atomic_save(state if pth is None else pth, path)
    except OSError as e:
        _cannot_write(path, e, existed)


def write_folder(folder: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> content) as the folder ``folder``, complete or not at all: they go
    into a new folder beside it, which then takes its place. An earlier folder is renamed aside
    first and removed last: a crash between the two renames leaves no folder (the old one is
    then the hidden ``.<name>.old<pid>`` beside it), never a mixed one."""
    parent, base = os.path.split(os.path.abspath(folder))
    tmp, old = (os.path.join(parent, f".{base}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    existed = os.path.exists(folder)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had this pid
        os.makedirs(tmp)
        for name, data in files.items():
            atomic_write(os.path.join(tmp, name), lambda f, data=data: f.write(data))
        if existed:
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if existed:
                os.replace(old, folder)
            raise
        sync_folder(parent)
    except OSError as e:
        _cannot_write(folder, e, existed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_aside(old)


def _remove_aside(path: str) -> None:
    """Remove the earlier output renamed aside: a link (an --output that linked to a folder: the link
    is replaced, as atomic_write replaces a linked file) is unlinked, where rmtree refuses it and its
    ignored error left the hidden link beside the new folder; its target stays as it was."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _cannot_write(path: str, error: OSError, existed: bool) -> NoReturn:
    kept = "the old one is kept as it was" if existed else "nothing was written"
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    advice = "free some space or give another --output" if full else "give another --output"
    fail(f"cannot write --output {path}: {error.strerror or error}; {kept}; {advice}")


# Hugging Face transformers
def _square_side(ckpt: dict[str, Any], state: dict[str, torch.Tensor], path: str) -> int:
    """The image side of a square MAE checkpoint; HF's ViTMAEForPreTraining computes its loss on
    square images only (its patchify refuses others), so other shapes cannot be exported."""
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state or state["pos_embed"].dim() != 3:
        fail(f"checkpoint {path} lacks pos_embed or patch_embed.proj.weight; it is not an MAE checkpoint")
    tokens = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(max(tokens, 0))
    saved = getattr(ckpt.get("args"), "input_size", None)
    sides = [int(v) for v in saved] if isinstance(saved, (list, tuple)) else [saved]
    # The token count alone cannot tell 16x16 from 8x32: a stored --input_size can.
    if grid * grid != tokens or len(set(sides)) > 1:
        shown = f"--input_size {saved}" if saved is not None else f"{tokens} patches"
        fail(f"checkpoint {path} is not for square images ({shown}); transformers' ViTMAE takes square ones only")
    return grid * state["patch_embed.proj.weight"].shape[-1]


def mae_name(ckpt: dict[str, Any], state: dict[str, torch.Tensor], given: str | None, path: str) -> tuple[str, int]:
    """(models_mae name, image size) of an MAE with decoder: --model, else the checkpoint's args,
    else the factory whose shapes equal the weights' (official releases carry no args)."""
    if not any(k.startswith("decoder_") for k in state):
        fail(f"checkpoint {path} holds no MAE decoder (a classifier, or an encoder-only release?); give a full MAE")
    img_size = _square_side(ckpt, state, path)
    saved = getattr(ckpt.get("args"), "model", None)
    name = given or (saved if isinstance(saved, str) else None)
    # Errors blame --model only where it was given.
    which = f"--model {given}" if given else f"checkpoint {path} stores --model {saved}, which"
    if name is not None:
        name = f"mae_{name.removeprefix('mae_')}"  # --model may name the encoder
        if name not in models_mae.MODELS:
            advice = "" if given else "give --model, one of the "
            fail(f"{which} is not an MAE; {advice}known models: {', '.join(models_mae.MODELS)}")
    found = models_mae.MODELS.fit(state, names=[name] if name else None)
    if found is None and name:
        which, advice = (name, "check") if given else (f"{name}, the model it stores,", "give")
        fail(f"checkpoint {path} does not fit {which} at {img_size} px; {advice} --model")
    if found is None:
        fail(f"checkpoint {path}: no models_mae model has its shapes; give --model")
    return found


def export_hf(args: argparse.Namespace, ckpt: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    name, img_size = mae_name(ckpt, state, args.model, args.checkpoint)
    saved = ckpt.get("args")
    # The flags, else the run's (checked when it was loaded; None: not stored), else the defaults.
    mask_ratio = next(v for v in (args.mask_ratio, getattr(saved, "mask_ratio", None), 0.75) if v is not None)
    norm_pix = next(v for v in (args.norm_pix_loss, getattr(saved, "norm_pix_loss", None), False) if v is not None)
    if not 0 <= mask_ratio < 1:
        fail(f"--mask_ratio must be in [0, 1), got {mask_ratio}")
    with torch.device("meta"):  # at its default size: the config needs no position embeddings
        model = models_mae.MODELS[name](in_chans=state["patch_embed.proj.weight"].shape[1], **SHAPES_ONLY)
    config = hf_interop.hf_config(model, img_size, mask_ratio, norm_pix)
    files = {
        hf_interop.WEIGHTS_NAME: safetensors_bytes(hf_interop.to_hf_state(state), args_metadata(saved)),
        hf_interop.CONFIG_NAME: _json_bytes(config),
    }
    channels = model.in_chans
    if norm := hf_normalisation(saved, channels, args.checkpoint):
        processor = hf_interop.preprocessor_config(img_size, *norm, rgb=channels == 3)
        files[hf_interop.PREPROCESSOR_NAME] = _json_bytes(processor)
    else:
        print(
            f"note: checkpoint {redacted(args.checkpoint)} stores no --mean/--std and ImageNet's are RGB's, not its "
            f"{channels} channels': no {hf_interop.PREPROCESSOR_NAME} written"
        )
    write_folder(args.output, files)
    print(
        f"wrote {name} ({img_size} px, mask_ratio {mask_ratio}, norm_pix_loss {bool(norm_pix)}) as a "
        f"transformers ViTMAEForPreTraining to {args.output}; load it with"
    )
    print(f"  transformers.ViTMAEForPreTraining.from_pretrained({args.output!r})")


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def hf_normalisation(saved: Any, channels: int, path: str) -> tuple[list[float], list[float]] | None:
    """The (mean, std) the checkpoint was trained with, as the training tools decide them when
    continuing from it (util.data.normalization.resolve): its stored --mean/--std, else ImageNet's;
    None for a checkpoint of other than 3 channels that stores none (ImageNet's are RGB's, and no
    run of ours trains such a model without its own values)."""
    values = normalization.stored(saved)
    if values is None:
        return (list(normalization.IMAGENET_MEAN), list(normalization.IMAGENET_STD)) if channels == 3 else None
    mean, std = values
    # Their type was checked on loading; a count or value no run of this model could have trained with is refused.
    counts = len(mean) == len(std) == channels
    if not counts or not all(map(math.isfinite, mean + std)) or not normalization.finite_in_float32(mean, std):
        shown = f"--mean {normalization.show_values(mean)} --std {normalization.show_values(std)}"
        fail(
            f"checkpoint {path} stores {shown}, not one finite value per channel of its {channels}-channel model "
            f"(std positive, pixels normalised finitely in float32); it was changed or not written by this code: "
            f"give another checkpoint"
        )
    return mean, std


def mae_for_hf_config(config: dict[str, Any], folder: str) -> tuple[str, torch.nn.Module]:
    """(models_mae name, model on the meta device at its default size) whose ViTMAEConfig has the
    folder's architecture; or fail listing it. Nothing is built at the config's image size."""
    for name in models_mae.MODELS:  # the registry lists each factory once (no aliases)
        with torch.device("meta"):
            model = models_mae.MODELS[name](in_chans=config["num_channels"], **SHAPES_ONLY)
        ours = hf_interop.hf_config(model, config["image_size"], 0.75, False)
        if all(ours[k] == config[k] for k in hf_interop.ARCH_KEYS):
            return name, model
    described = ", ".join(f"{k} {config[k]}" for k in hf_interop.ARCH_KEYS)
    fail(f"HF folder {folder}: no models_mae model has its architecture ({described})")


def check_weights_fit_config(state: dict[str, torch.Tensor], name: str, img_size: int, folder: str) -> None:
    """The weights are ``name``'s at ``img_size`` px, as config.json says, or fail saying whose they
    are: settled from their shapes, so that a config's image size is never built."""
    found = models_mae.MODELS.fit(state, names=[name])
    if found == (name, img_size):
        return
    actual = found or models_mae.MODELS.fit(state)
    whose = f"they are {actual[0]}'s at {actual[1]} px" if actual else "they are no models_mae model's"
    fail(f"HF folder {folder}: its weights do not fit its config.json ({name} at {img_size} px); {whose}")


def import_hf(args: argparse.Namespace) -> None:
    folder = args.checkpoint
    config, hf_state, run_args = hf_interop.read_hf_folder(folder)
    name, model = mae_for_hf_config(config, folder)
    img_size = config["image_size"]
    processor_norm = hf_interop.read_preprocessor(folder, config["num_channels"])
    state = hf_interop.from_hf_state(hf_state, folder)
    check_weights_fit_config(state, name, img_size, folder)
    check_float_weights(state, f"HF folder {folder}")
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
        mask_ratio=config["mask_ratio"],
        norm_pix_loss=config["norm_pix_loss"],
        hf_folder=os.path.abspath(folder),
    )
    # The normalisation the model was trained with: preprocessor_config.json's, which transformers
    # users prepare images with, else (a folder of ours without it) the run's --mean/--std from the
    # weights' metadata. Without either the checkpoint is read with ImageNet's, or refused for other
    # channel counts.
    if processor_norm is not None:
        saved.mean, saved.std = processor_norm
    else:
        for flag in ("mean", "std"):
            if getattr(run_args, flag, None) is not None:
                setattr(saved, flag, getattr(run_args, flag))
    write_weights(args.output, state, saved, {"model": state, "args": saved})
    print(f"wrote {name} ({img_size} px, {len(state)} tensors) from {folder} to {args.output}; use it with")
    print(f"  python main_finetune.py --model {name.removeprefix('mae_')} --finetune {args.output} ...")
    print(f"  python main_pretrain.py --model {name} --input_size {img_size} --resume {args.output} ...")


def check_output(args: argparse.Namespace) -> None:
    """Fail before any work if --output cannot be written as asked."""
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
    # Even with --force: the export would replace the checkpoint it is made from. An HF folder's own
    # weights are inputs too: --output FOLDER/model.safetensors would put our names in their place.
    inputs = [("--checkpoint", args.checkpoint)]
    if args.source == "hf" and os.path.isdir(args.checkpoint):
        inputs += [("--checkpoint's weight file", path) for path in hf_interop.files_read(args.checkpoint)]
    check_not_an_input(args.output, "--output", inputs)
    if os.path.exists(args.output) and not args.force:
        fail(f"--output {args.output} exists; give --force to overwrite it")
    if args.to == "hf" and os.path.isdir(args.output):
        # The folder is replaced as a whole: files of another kind in it would be lost.
        others = sorted(set(os.listdir(args.output)) - set(hf_interop.WRITTEN_NAMES))
        if others:
            fail(
                f"--output {args.output} holds other files ({', '.join(others[:3])}); --to hf replaces the whole "
                f"folder: remove them or give another folder"
            )
    if not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.output))):
        fail(f"--output {args.output}: the folder {folder} does not exist; create it first")
    if args.to != "hf" and (args.mask_ratio is not None or args.norm_pix_loss is not None):
        fail(
            "--mask_ratio and --norm_pix_loss set the config of --to hf; the other modes take the checkpoint's: "
            "leave them out"
        )
    # Before the checkpoint is loaded and converted: a name over NAME_MAX, a path near PATH_MAX or a
    # read-only folder failed only at the write.
    if args.to == "hf":
        check_folder_output(args.output, f"--output {args.output}", hf_interop.WRITTEN_NAMES)
    else:
        check_writable(folder, f"--output {args.output}", os.path.basename(args.output))


def main(args: argparse.Namespace) -> None:
    check_output(args)
    if args.source == "hf":
        import_hf(args)
        return
    ckpt = load_checkpoint(args.checkpoint)
    state = model_state(ckpt, args.checkpoint)
    check_float_weights(state, f"checkpoint {args.checkpoint}")
    if args.to == "hf":
        export_hf(args, ckpt, state)
        return
    if args.to == "safetensors":
        write_weights(args.output, state, ckpt.get("args"))
        print(f"wrote {len(state)} tensors and {'the' if ckpt.get('args') else 'no'} args to {args.output}")
        return
    encoder = encoder_state(state, args.checkpoint)
    name, img_size = vit_name(ckpt, encoder, args.model, args.checkpoint)
    write_weights(args.output, encoder, ckpt.get("args"))  # a .pth: a plain state dict, as timm reads it
    size = "x".join(map(str, image_size(img_size)))
    print(f"wrote the {name} encoder ({len(encoder)} tensors, {size} px) to {args.output}; load it with")
    in_chans = encoder["patch_embed.proj.weight"].shape[1]
    print(f"  {timm_call(name, img_size, 'fc_norm.weight' in encoder, args.output, in_chans)}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
