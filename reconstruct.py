"""Render MAE reconstructions of image files from a checkpoint (ours or an official full MAE one).

    python reconstruct.py --checkpoint output_dir/checkpoint-399.pth photo1.jpg photo2.jpg --output recon.png
    python reconstruct.py --checkpoint mae_visualize_vit_large.pth --mask_ratio 0.75 photo.jpg

Each row shows: original | masked | reconstruction | reconstruction with the visible patches.
The model, image size, target normalisation and pixel normalisation (``--mean``/``--std``) are
read from the checkpoint's ``args`` when present, otherwise inferred from its weights (ImageNet's
pixel statistics); flags override them.
"""

import argparse
import os
from argparse import BooleanOptionalAction
from typing import Any

import torch

import models_mae
from util.atomic import reported
from util.checkpoint.consistency import kind_of
from util.checkpoint.load import load_checkpoint, model_state
from util.checkpoint.weights import load_model_strict
from util.cli.args import add_in_chans_arg, add_input_size_arg, check_device, check_seed
from util.cli.errors import fail, run_cli
from util.data import normalization
from util.data.channels import image_loader
from util.data.loaders import eval_transform
from util.data.normalization import add_norm_args
from util.eval.pictures import fixed_noise, load_images, reconstruction_grid, save_png
from util.outputs import check_output_file
from util.sizes import image_size, shown_size


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Render MAE reconstructions")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="MAE checkpoint with decoder (file or URL)")
    parser.add_argument("--output", default="reconstruction.png", help="picture to write, in its extension's format")
    parser.add_argument("--model", default=None, help=f"one of {', '.join(models_mae.MODELS)} (default: inferred)")
    # default: the checkpoint's; it takes 1 or 2 values, so give it after the image files (or end it with --)
    add_input_size_arg(parser)
    add_in_chans_arg(parser)  # default: the checkpoint's patch embedding's
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument(
        "--norm_pix_loss", action=BooleanOptionalAction, help="predicts normalised patches (default: the checkpoint's)"
    )
    parser.add_argument("--seed", default=0, type=int, help="seed of the mask")
    add_norm_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


# The kinds of checkpoint (``kind_of``) that hold a head in place of the decoder, as the refusal names them (a
# probe's head is BatchNorm then the linear layer: it was asked if it was an encoder-only release).
WITH_HEAD = {"classifier": "a classifier (a fine-tuned ViT)", "probe": "a linear probe (main_linprobe.py's)"}


def check_has_decoder(state: dict[str, torch.Tensor], path: str) -> None:
    """Reconstructions need the decoder, which fine-tuned and encoder-only checkpoints lack."""
    kind = kind_of(state)
    if kind == "mae":
        return
    if kind in WITH_HEAD:
        fail(
            f"checkpoint {path} holds {WITH_HEAD[kind]}, not an MAE with decoder; "
            f"give a pre-training checkpoint (main_pretrain.py's checkpoint-<epoch>.pth, mae_visualize_vit_large.pth)"
        )
    fail(f"checkpoint {path} holds no MAE decoder (an encoder-only release?); give a full pre-training checkpoint")


def check_size_is_stored(given: Any, stored: Any, path: str) -> None:
    """--input_size, where given, is the size the checkpoint stores (if any): the model is not resized
    here, and another size of as many patches (24 32 for 32 24, 16 64 for 32) loads the position
    embeddings onto another grid, so that every patch takes another's position without an error."""
    if given and stored and image_size(given) != image_size(stored):
        order = " (height width)" if len(set(image_size(stored))) > 1 else ""
        fail(
            f"--input_size {shown_size(given)}: checkpoint {path} was trained at --input_size {shown_size(stored)}"
            f"{order}, the only size its position embeddings fit here; leave --input_size out"
        )


def main(args: argparse.Namespace) -> None:
    check_args(args)
    ckpt = load_checkpoint(args.checkpoint)
    name, model = checkpoint_model(args, ckpt)  # settles --in_chans and --mean/--std for the pictures too
    model.to(args.device)
    height, width = image_size(model.img_size)
    transform = eval_transform((height, width), args.mean, args.std, args.in_chans)
    # The channels are the weights' (--in_chans may only repeat them): an image of others is told so.
    imgs = load_images(args.images, transform, image_loader(args.in_chans, f"the model of {args.checkpoint}"))
    noise = fixed_noise(len(imgs), model.num_patches, seed=args.seed)
    picture = reconstruction_grid(model, imgs, noise, args.mask_ratio, args.mean, args.std)
    with reported(args.output, "--output"):  # a full disk: one line, and an earlier picture stays whole
        save_png(picture, args.output)
    size = f"{height}" if height == width else f"{height}x{width}"
    print(f"{name} at {size} px, {args.in_chans} channel(s), mask ratio {args.mask_ratio}: wrote {args.output}")


def check_args(args: argparse.Namespace) -> None:
    """The flags and the input files, before the (possibly long) load, as training checks them."""
    # A picture needs no removed patch: 0 shows the model's copy; the model's patch count, known after the
    # load, bounds it above.
    if not 0 <= args.mask_ratio < 1:
        fail(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    check_seed(args.seed)
    check_device(args.device)
    normalization.check_flags(args, args.in_chans, from_checkpoint=True)  # counted again for the model's channels
    if args.model is not None:
        models_mae.MODELS.factory(args.model)  # the name, checked
    for image in args.images:  # an unreadable file is named where it is read
        if os.path.isdir(image):
            fail(f"image {image} is a folder; give image files")
        if not os.path.isfile(image):
            fail(f"image {image} {'is not a file' if os.path.exists(image) else 'does not exist'}; give image files")
    inputs = [("--checkpoint", args.checkpoint), *(("the input image", image) for image in args.images)]
    check_output_file(args.output, "--output", inputs)


def checkpoint_model(args: argparse.Namespace, ckpt: dict[str, Any]) -> tuple[str, models_mae.MaskedAutoencoderViT]:
    """The name and the MAE of ``ckpt``, its weights loaded. Sets ``args.in_chans`` and ``args.mean``/``args.std``
    (given, else stored, else ImageNet's), which the pictures are read with."""
    state = model_state(ckpt, args.checkpoint)
    check_has_decoder(state, args.checkpoint)
    saved = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else {}
    name, input_size, size_source = model_and_size(args, state, saved)
    channels_source = settle_channels(args, state)
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(saved.get("norm_pix_loss", False))
    # The pictures normalise as the model's training did: its stored --mean/--std, else ImageNet's.
    normalization.resolve(args, [(f"checkpoint {args.checkpoint}", ckpt.get("args"))], channels_source)

    model = models_mae.create_model(name, input_size, args.in_chans, norm_pix_loss=norm_pix, size_source=size_source)
    models_mae.check_mask_ratio(args.mask_ratio, model.num_patches, remove_one=False)
    load_model_strict(model, state, args.checkpoint)
    return name, model


def model_and_size(
    args: argparse.Namespace, state: dict[str, torch.Tensor], saved: dict[str, Any]
) -> tuple[str, Any, str]:
    """(name, input size, size source) of the MAE: the model and size the flags name, else those the checkpoint's
    args ``saved`` store, else those its weights fit. The size source is the checkpoint where the size is its
    stored one ('' otherwise): errors about it blame the checkpoint, not a flag that was not given."""
    inferred = None if args.model and args.input_size else models_mae.MODELS.fit(state)
    name = args.model or saved.get("model") or (inferred[0] if inferred else None)
    if name is None:
        fail(f"cannot tell which MAE model {args.checkpoint} holds; give --model")
    if name not in models_mae.MODELS:
        fail(f"checkpoint {args.checkpoint} names the model {name}, which is not an MAE; give --model")
    check_size_is_stored(args.input_size, saved.get("input_size"), args.checkpoint)
    input_size = args.input_size or saved.get("input_size") or (inferred[1] if inferred else 224)
    size_source = "" if args.input_size or not saved.get("input_size") else f"checkpoint {args.checkpoint}"
    return name, input_size, size_source


def settle_channels(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> str:
    """Set ``args.in_chans`` to the channels of the checkpoint's weights, which --in_chans may only repeat: the
    images are read with them (and --mean/--std checked for them). Returns what errors about them name: '' where
    --in_chans was given, else the weights, not a flag the user never gave."""
    in_chans = state["patch_embed.proj.weight"].shape[1] if "patch_embed.proj.weight" in state else 3
    if args.in_chans is not None and args.in_chans != in_chans:
        fail(
            f"checkpoint {args.checkpoint} takes {in_chans}-channel images, not --in_chans {args.in_chans}: "
            f"leave --in_chans out (the checkpoint's is taken)"
        )
    source = "" if args.in_chans is not None else f"the weights of checkpoint {args.checkpoint}"
    args.in_chans = in_chans
    return source


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
