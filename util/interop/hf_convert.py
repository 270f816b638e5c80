"""Our MAE checkpoint <-> a transformers ViTMAEForPreTraining folder, on our side of the format
(hf.py holds the format itself: names, config.json, reading a folder): which models_mae model each
side is, checked against the other, the folder's files built from a checkpoint, and the stored
flags a checkpoint imported from a folder carries. export.py --to hf / --from hf runs them."""

import argparse
import json
import math
import os
from typing import Any

import torch

import models_mae
from util.cli.errors import fail
from util.cli.redact import redacted
from util.data import normalization
from util.interop import hf
from util.interop.files import args_metadata, safetensors_bytes
from util.registry import SHAPES_ONLY


# Export: a checkpoint as a folder
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


def hf_files(
    name: str,
    img_size: int,
    state: dict[str, torch.Tensor],
    saved: Any,
    mask_ratio: float,
    norm_pix_loss: bool,
    path: str,
) -> dict[str, bytes]:
    """The folder of the MAE ``name`` at ``img_size`` px (weights ``state``, stored args ``saved``, of the
    checkpoint ``path``), name -> content: the weights under HF's names, config.json with ``mask_ratio``
    and ``norm_pix_loss`` and, where the normalisation is known, the image processor's config."""
    with torch.device("meta"):  # at its default size: the config needs no position embeddings
        model = models_mae.MODELS[name](in_chans=state["patch_embed.proj.weight"].shape[1], **SHAPES_ONLY)
    config = hf.hf_config(model, img_size, mask_ratio, norm_pix_loss)
    files = {
        hf.WEIGHTS_NAME: safetensors_bytes(hf.to_hf_state(state), args_metadata(saved)),
        hf.CONFIG_NAME: _json_bytes(config),
    }
    channels = model.in_chans
    if norm := hf_normalisation(saved, channels, path):
        processor = hf.preprocessor_config(img_size, *norm, rgb=channels == 3)
        files[hf.PREPROCESSOR_NAME] = _json_bytes(processor)
    else:
        print(
            f"note: checkpoint {redacted(path)} stores no --mean/--std and ImageNet's are RGB's, not its "
            f"{channels} channels': no {hf.PREPROCESSOR_NAME} written"
        )
    return files


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


# Import: a folder as a checkpoint
def mae_for_hf_config(config: dict[str, Any], folder: str) -> tuple[str, torch.nn.Module]:
    """(models_mae name, model on the meta device at its default size) whose ViTMAEConfig has the
    folder's architecture; or fail listing it. Nothing is built at the config's image size."""
    for name in models_mae.MODELS:  # the registry lists each factory once (no aliases)
        with torch.device("meta"):
            model = models_mae.MODELS[name](in_chans=config["num_channels"], **SHAPES_ONLY)
        ours = hf.hf_config(model, config["image_size"], 0.75, False)
        if all(ours[k] == config[k] for k in hf.ARCH_KEYS):
            return name, model
    described = ", ".join(f"{k} {config[k]}" for k in hf.ARCH_KEYS)
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


def note_layer_norm_eps(config: dict[str, Any], name: str, model: torch.nn.Module, folder: str) -> None:
    """Print a note where config.json's layer_norm_eps is not the one ``model`` computes with."""
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}.pop()
    if config["layer_norm_eps"] != eps:
        # Not an error: configs may carry HF's default (1e-12) while the official MAE trained with
        # 1e-6, as our models compute; outputs then differ a little from transformers' on the folder.
        print(
            f"note: {folder} states layer_norm_eps {config['layer_norm_eps']}; {name} computes with {eps} "
            f"(the official MAE's), so its outputs differ slightly from transformers' on this folder"
        )


def imported_args(
    name: str,
    config: dict[str, Any],
    folder: str,
    processor_norm: tuple[list[float], list[float]] | None,
    run_args: Any,
) -> argparse.Namespace:
    """The flags the checkpoint imported from ``folder`` stores, as a run of ours would: the model, its
    image size and channels, config.json's pre-training settings, and the normalisation it was trained with.
    The channels too: a 1-channel import that stored its one --mean but no --in_chans was read as an RGB model
    by knn_eval.py, which then blamed the stored --mean instead of refusing the channels."""
    saved = argparse.Namespace(
        model=name,
        input_size=config["image_size"],
        in_chans=config["num_channels"],
        mask_ratio=config["mask_ratio"],
        norm_pix_loss=config["norm_pix_loss"],
        hf_folder=os.path.abspath(folder),
    )
    # The normalisation: preprocessor_config.json's, which transformers users prepare images with,
    # else (a folder of ours without it) the run's --mean/--std from the weights' metadata. Without
    # either the checkpoint is read with ImageNet's, or refused for other channel counts.
    if processor_norm is not None:
        saved.mean, saved.std = processor_norm
    else:
        for flag in ("mean", "std"):
            if getattr(run_args, flag, None) is not None:
                setattr(saved, flag, getattr(run_args, flag))
    return saved
