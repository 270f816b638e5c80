"""Reading checkpoints, which are untrusted input: nothing pickled is executed (``weights_only``
with only what the official format needs allowed), damaged or foreign files are one-line errors,
and a state dict loads strictly or names what does not fit."""

import argparse
import json
import os
import pickle
import re
import zipfile
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


def load_model_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a state dict whose names and shapes must equal the model's, or fail naming the difference."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        fail(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(parts)}; check --model and --input_size"
        )
    model.load_state_dict(state)
