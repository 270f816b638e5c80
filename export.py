"""Export a checkpoint's weights for use elsewhere: a timm encoder, or safetensors.

    python export.py --checkpoint output_dir/checkpoint-399.pth --to timm --output mae_vit_base.safetensors
    python export.py --checkpoint mae_pretrain_vit_base.pth --to timm --output encoder.pth
    python export.py --checkpoint output_dir/checkpoint-99.pth --to safetensors --output finetuned.safetensors

Input: main_pretrain's MAE checkpoints (with decoder), main_finetune/main_linprobe's classifier
checkpoints, or an official MAE release (full, or encoder only). ``--to timm`` writes the encoder
(no decoder, mask token or head) under timm's ViT names, as a plain state dict (.pth) or a
.safetensors file; it prints the ``timm.create_model`` call that loads it with strict key matching.
``--to safetensors`` writes every model weight and the checkpoint's args (JSON, as metadata), which
``--finetune``, ``--resume`` (weights only), ``knn_eval.py`` and ``reconstruct.py`` read.
"""

import argparse
import json
import os
from typing import Any

import torch

import models_vit
from util.checkpoint import atomic_save, load_checkpoint, model_state
from util.errors import fail, run_cli

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
    parser = argparse.ArgumentParser("Export MAE / ViT weights for timm or as safetensors", add_help=True)
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or an official MAE release")
    parser.add_argument("--to", required=True, choices=("timm", "safetensors"), help="what to write")
    parser.add_argument("--output", required=True, help="file to write: .safetensors, or .pth for --to timm")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("--model", default=None, help="models_vit name (default: from the checkpoint)")
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


def main(args: argparse.Namespace) -> None:
    if args.to == "safetensors" and not args.output.endswith(".safetensors"):
        fail(f"--output {args.output}: --to safetensors writes a .safetensors file; name it so")
    if args.to == "timm" and not args.output.endswith((".safetensors", ".pth")):
        fail(f"--output {args.output}: --to timm writes .safetensors or .pth; name it so (timm picks the reader by it)")
    if os.path.exists(args.output) and not args.force:
        fail(f"--output {args.output} exists; pass --force to overwrite it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        fail(f"--output {args.output}: its folder does not exist")
    ckpt = load_checkpoint(args.checkpoint)
    state = model_state(ckpt, args.checkpoint)
    if args.to == "safetensors":
        write(state, args.output, args_metadata(ckpt))
        print(f"wrote {len(state)} tensors and {'the' if ckpt.get('args') else 'no'} args to {args.output}")
        return
    encoder = encoder_state(state, args.checkpoint)
    name, img_size = vit_name(ckpt, encoder, args.model, args.checkpoint)
    write(encoder, args.output, args_metadata(ckpt))
    global_pool = "fc_norm.weight" in encoder
    print(f"wrote the {name} encoder ({len(encoder)} tensors, {img_size} px) to {args.output}; load it with")
    print(f"  {timm_call(name, img_size, global_pool, args.output)}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
