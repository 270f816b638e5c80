"""Reading checkpoints, which are untrusted input: nothing pickled is executed (``weights_only``
with only what the official format needs allowed), damaged or foreign files are one-line errors,
and a state dict loads strictly, with weights of a usable dtype and finite values, or names what
does not fit."""

import argparse
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from util.cli.errors import fail

# What the official checkpoints and ours pickle besides tensors and plain containers.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint (file or URL) without executing pickled code, or fail with one line."""
    if path.startswith(("https://", "http://")):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
        except Exception as e:  # network errors, refused pickles, damaged downloads
            fail(
                f"checkpoint {path} could not be downloaded or loaded ({type(e).__name__}: {str(e)[:160]}); "
                f"download it yourself and give the file"
            )
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors") or _looks_like_safetensors(path):
        return load_safetensors(path)
    if not _looks_like_torch_file(path):
        fail(f"checkpoint {path} is truncated or not a PyTorch checkpoint; use an earlier checkpoint or write it again")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        fail(
            f"checkpoint {path} refused: it needs {refused.group(1) if refused else 'a Python object'} to load, "
            f"beyond the tensors and argparse.Namespace a checkpoint holds, and loading it could run code; "
            f"load only checkpoints you trust and re-save their state dict"
        )
    except Exception as e:  # torch reports damaged files with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({first[:160]}); "
            f"use an earlier checkpoint or write it again"
        )
    if not isinstance(ckpt, dict):
        fail(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of states; it is not an MAE checkpoint")
    return ckpt


def load_safetensors(path: str) -> dict[str, Any]:
    """A .safetensors file as a checkpoint: ``{'model': tensors, 'args': Namespace or None}``.

    Weights only (no optimizer or progress): what ``export.py --to safetensors`` writes, or any
    state dict in the format. The args come back from the JSON that export stores as metadata.
    Nothing is unpickled. ``safetensors`` is imported here so that training does not need it.
    """
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        fail(f"checkpoint {path} is a .safetensors file: pip install safetensors to read it")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path, device="cpu")
    except Exception as e:  # SafetensorError for damaged headers, OSError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"checkpoint {path} is truncated or not a safetensors file ({first[:160]}); write it again")
    args = None
    if "args" in metadata:
        try:
            args = argparse.Namespace(**json.loads(metadata["args"]))
        except (ValueError, TypeError) as e:
            fail(f"checkpoint {path}: its 'args' metadata is not a JSON object of flags ({e})")
    return {"model": state, "args": args}


def _looks_like_safetensors(path: str) -> bool:
    """8 bytes of header length (little endian), then the JSON header, which starts with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _looks_like_torch_file(path: str) -> bool:
    """A complete zip archive (torch >= 1.6) or a legacy pickle stream (it starts with PROTO)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def saved_args(path: str) -> argparse.Namespace | None:
    """The flags a checkpoint was written with (None for official releases, which store none),
    read before the run builds anything. A zip checkpoint is memory-mapped, so its tensors are not
    read: a large checkpoint is loaded again, in full, where its weights are needed."""
    ckpt: Any = None
    if not path.startswith(("https://", "http://")) and os.path.isfile(path) and zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # whatever it is, load_checkpoint says it in one line
            ckpt = None
    if ckpt is None:
        ckpt = load_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


def model_state(ckpt: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The model's state dict in a checkpoint: under 'model' (official and ours) or at the top."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"checkpoint {path} has no model state dict (expected a 'model' entry of tensors)")
    return state


# ---------------------------------------------------------------------------------------------
# State dicts against a model
@dataclass
class StateDiff:
    """How a checkpoint's state dict differs from a model's: names and shapes."""

    missing: list[str]  # the model's, not in the checkpoint
    unexpected: list[str]  # the checkpoint's, not in the model
    other_shape: list[str]
    example: str = ""  # the first key of another shape, with both shapes

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.other_shape)

    def __str__(self) -> str:
        named = (("missing", self.missing), ("unexpected", self.unexpected), ("of another shape", self.other_shape))
        text = "; ".join(f"{len(keys)} {what} {keys[:4]}" for what, keys in named if keys)
        return f"{text} (e.g. {self.example})" if self.example else text


def compare_states(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    may_miss: set[str] = frozenset(),
    may_be_left: set[str] | None = frozenset(),
) -> StateDiff:
    """Compare ``state`` with a model's ``own`` state dict: keys of ``may_miss`` may be missing,
    those of ``may_be_left`` (any, if None) may be left over, and no shared key may differ in shape."""
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return StateDiff(
        missing=sorted(set(own) - set(state) - may_miss),
        unexpected=[] if may_be_left is None else sorted(set(state) - set(own) - may_be_left),
        other_shape=wrong,
        example=f"{wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}" if wrong else "",
    )


def check_weights(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Every weight of ``state`` that the model has (``own``) can be loaded as it is: of a dtype
    that converts to the model's without losing meaning (a float for a float; int8, bool or complex
    would be cast silently), holding the data its shape claims (a 2 KB file can describe a huge
    tensor with zero strides), and finite. ``source`` ('checkpoint x.pth', '--finetune x.pth')
    starts the error. No copy is made; call it before anything is computed from the weights."""
    for key in sorted(set(own) & set(state)):
        mine, theirs = own[key], state[key]
        if mine.is_floating_point() != theirs.is_floating_point() or (
            not mine.is_floating_point() and mine.dtype != theirs.dtype
        ):
            fail(
                f"{source}: weight {key} is {theirs.dtype}, the model's is {mine.dtype}; it cannot be loaded "
                f"without changing its values (a quantized or foreign checkpoint?): give one of {mine.dtype} weights"
            )
        if theirs.numel() * theirs.element_size() > theirs.untyped_storage().nbytes():
            fail(
                f"{source}: weight {key} claims shape {tuple(theirs.shape)} but stores only "
                f"{theirs.untyped_storage().nbytes()} bytes; the checkpoint is damaged or forged"
            )
        if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
            bad = int((~torch.isfinite(theirs)).sum())
            fail(
                f"{source}: weight {key} holds {bad} NaN or infinite value(s) of {theirs.numel()}: the file is "
                f"damaged or comes from a diverged run; use an earlier checkpoint"
            )


def load_model_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a state dict whose names and shapes must equal the model's, with weights that
    ``check_weights`` accepts, or fail naming the difference."""
    own = model.state_dict()
    if diff := compare_states(own, state):
        fail(f"checkpoint {path} does not fit {type(model).__name__}: {diff}; check --model and --input_size")
    check_weights(own, state, f"checkpoint {path}")
    model.load_state_dict(state)
