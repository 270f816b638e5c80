"""The files export.py writes: weights as .safetensors (the run's args as metadata, a CRC-32 per
tensor) or .pth, and a folder of files, each whole or not at all through util.atomic's
writers; a failed write (a full disk) is one line naming --output that says what was kept."""

import argparse
import contextlib
import errno
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from util.atomic import atomic_write, atomic_write_folder
from util.checkpoint.files import atomic_save
from util.checkpoint.load import StateDict, checksum_metadata
from util.cli.errors import fail
from util.cli.redact import values_without_secrets
from util.memory import require


def args_metadata(args: Any) -> dict[str, str]:
    """A checkpoint's args (if a Namespace) as safetensors metadata, which holds strings only: JSON
    under 'args', devices and the like as strings."""
    if not isinstance(args, argparse.Namespace):
        return {}
    # Not a URL's secrets (--finetune URL, stored by a checkpoint written before they were left out): redact.py
    return {"args": json.dumps(values_without_secrets(vars(args)), default=str)}


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
    with _written_whole(path):
        if path.endswith(".safetensors"):
            data = safetensors_bytes(state, args_metadata(args))
            atomic_write(path, lambda f: f.write(data))
        else:
            atomic_save(state if pth is None else pth, path)


def write_folder(folder: str, files: dict[str, bytes]) -> None:
    """``files`` (name -> content) as the folder ``folder``, complete or not at all (``atomic_write_folder``)."""
    with _written_whole(folder):
        atomic_write_folder(folder, files)


@contextlib.contextmanager
def _written_whole(path: str) -> Iterator[None]:
    """Turn the ``OSError`` of writing --output ``path`` into one line saying whether an earlier one was kept."""
    existed = os.path.exists(path)
    try:
        yield
    except OSError as e:
        kept = "the old one is kept as it was" if existed else "nothing was written"
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        advice = "free some space or give another --output" if full else "give another --output"
        fail(f"cannot write --output {path}: {e.strerror or e}; {kept}; {advice}")
