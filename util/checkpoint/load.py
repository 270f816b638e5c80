"""Reading checkpoints, which are untrusted input: nothing pickled is executed (``weights_only``
with only what the official format needs allowed), every stored checksum is verified, damaged or
foreign files are one-line errors, and a state dict loads strictly, with weights of a usable dtype
and finite values, or names what does not fit."""

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import re
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from util.cli.errors import UserError, fail
from util.cli.log import log

# What the official checkpoints and ours pickle besides tensors and plain containers.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint (file or URL) without executing pickled code, or fail with one line.

    Every checksum the file stores is verified first: the CRC-32 of each member of a zip
    checkpoint (torch.load does not check them), the per-tensor CRC-32s of a .safetensors export."""
    if not path.startswith(("https://", "http://")):
        return _load_file(path, path)
    local = download(path)
    try:
        return _load_file(local, path)
    except UserError as e:
        with contextlib.suppress(FileNotFoundError):  # another rank may have removed it already
            os.remove(local)  # a damaged or refused download must not be served again from the cache
        fail(f"{e} (its downloaded copy was removed)")


def download(url: str) -> str:
    """The local copy of ``url`` in torch.hub's cache, downloaded if not there yet.

    Each URL has a folder of its own (named by a hash of the whole URL): two hosts serving files
    of the same name must not share a copy, as they do in torch.hub's flat checkpoints folder."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint"
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    local = os.path.join(folder, name)
    if os.path.isfile(local):
        return local
    log.info(f"downloading {url} to {local}")
    try:
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, local, progress=False)  # to a temporary file, then renamed
    except Exception as e:  # network errors, HTTP errors, a cache folder that cannot be written
        fail(
            f"checkpoint {url} could not be downloaded ({type(e).__name__}: {str(e)[:160]}); "
            f"download it yourself and give the file"
        )
    return local


def _load_file(path: str, shown: str) -> dict[str, Any]:
    """Load the local file ``path``; errors name it as ``shown`` (the URL it came from, if any)."""
    if not os.path.isfile(path):
        fail(f"checkpoint {shown} does not exist")
    if path.endswith(".safetensors") or _looks_like_safetensors(path):
        return load_safetensors(path, shown)
    if not _looks_like_torch_file(path):
        fail(
            f"checkpoint {shown} is truncated or not a PyTorch checkpoint; use an earlier checkpoint or write it again"
        )
    if zipfile.is_zipfile(path):
        verify_zip(path, shown)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        fail(
            f"checkpoint {shown} refused: it needs {refused.group(1) if refused else 'a Python object'} to load, "
            f"beyond the tensors and argparse.Namespace a checkpoint holds, and loading it could run code; "
            f"load only checkpoints you trust and re-save their state dict"
        )
    except Exception as e:  # torch reports damaged files with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(
            f"checkpoint {shown} is truncated or not a PyTorch checkpoint ({first[:160]}); "
            f"use an earlier checkpoint or write it again"
        )
    if not isinstance(ckpt, dict):
        fail(f"checkpoint {shown} holds a {type(ckpt).__name__}, not a dict of states; it is not an MAE checkpoint")
    return ckpt


def verify_zip(path: str, shown: str | None = None) -> None:
    """Check every member of the zip checkpoint ``path`` against the CRC-32 the archive stores for
    it, or fail naming the first damaged member. torch.save writes real CRCs; a file written with
    ``torch.serialization.set_crc32_options(False)`` stores 0 for every member, and is not checked."""
    where = "its zip directory"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if all(m.CRC == 0 for m in members if m.file_size):
                log.info(f"checkpoint {shown or path} was written without checksums: its contents are not verified")
                return
            for member in members:
                where = f"its entry {member.filename}"
                with archive.open(member) as f:  # zipfile checks the CRC once the member is read to its end
                    while f.read(1 << 20):
                        pass
    except Exception as e:  # BadZipFile for a wrong CRC or header, OSError, EOFError, zlib.error, ...
        fail(
            f"checkpoint {shown or path} is damaged in {where} ({str(e)[:80]}); "
            f"use an earlier checkpoint or write it again"
        )


def load_safetensors(path: str, shown: str | None = None) -> dict[str, Any]:
    """A .safetensors file as a checkpoint: ``{'model': tensors, 'args': Namespace or None}``.

    Weights only (no optimizer or progress): what ``export.py --to safetensors`` writes, or any
    state dict in the format. The args come back from the JSON that export stores as metadata,
    and the tensors are checked against the CRC-32s stored there (see ``checksum_metadata``).
    Nothing is unpickled. ``safetensors`` is imported here so that training does not need it.
    """
    shown = shown or path
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        fail(f"checkpoint {shown} is a .safetensors file: pip install safetensors to read it")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path, device="cpu")
    except Exception as e:  # SafetensorError for damaged headers, OSError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"checkpoint {shown} is truncated or not a safetensors file ({first[:160]}); write it again")
    if CHECKSUM_KEY in metadata:
        verify_checksums(state, metadata[CHECKSUM_KEY], shown)
    args = None
    if "args" in metadata:
        try:
            args = argparse.Namespace(**json.loads(metadata["args"]))
        except (ValueError, TypeError) as e:
            fail(f"checkpoint {shown}: its 'args' metadata is not a JSON object of flags ({e})")
    return {"model": state, "args": args}


# safetensors metadata entry: JSON {tensor name: CRC-32 of its bytes}. The format has no checksum
# of its own; CRC-32, as in the zip of a .pth file, detects damage and names the damaged tensor.
CHECKSUM_KEY = "crc32"


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in memory order (what safetensors stores), for any dtype."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy())


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The metadata entry that lets ``load_checkpoint`` verify a .safetensors file: add it to the
    metadata of every file written with safetensors' ``save``/``save_file``."""
    return {CHECKSUM_KEY: json.dumps({name: tensor_crc32(t) for name, t in sorted(tensors.items())})}


def verify_checksums(state: dict[str, torch.Tensor], stored: str, shown: str) -> None:
    """Every tensor of ``state`` has the CRC-32 that ``stored`` (``checksum_metadata``'s JSON)
    records for it, and every recorded tensor is there; else fail naming the first one that differs."""
    try:
        expected = json.loads(stored)
        valid = isinstance(expected, dict) and all(isinstance(v, int) for v in expected.values())
    except ValueError:
        valid = False
    if not valid:
        fail(f"checkpoint {shown}: its '{CHECKSUM_KEY}' metadata is not a JSON object of checksums; write it again")
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected or tensor_crc32(state[name]) != expected[name]:
            fail(
                f"checkpoint {shown} is damaged: its tensor {name} does not match its checksum; "
                f"use an earlier copy or export it again"
            )


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
