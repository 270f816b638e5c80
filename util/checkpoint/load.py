"""Reading a checkpoint file, which is untrusted input: nothing pickled is executed, every stored checksum
is verified, and damaged or foreign files are one-line errors. A URL's copy: download.py; a state dict
against a model: weights.py; what the entries must hold: entries.py."""

import argparse
import contextlib
import json
import os
import pathlib
import pickle
import re
import zipfile
import zlib
from typing import Any, NoReturn

import torch

from util.checkpoint.download import AFRESH, AFRESH_BY_HAND, download, is_url, remove_download
from util.checkpoint.entries import check_saved_args
from util.cli.errors import UserError, fail, first_line
from util.cli.log import log

# What the official checkpoints and ours pickle besides tensors and plain containers: the official
# submitit launchers store --output_dir, --log_dir and --job_dir in the args as pathlib paths. The
# path is allowed under both names pickles give it: pathlib.PosixPath (Python <= 3.12) and
# pathlib._local.PosixPath (3.13). Each name maps to this Python's class, so a checkpoint
# written on 3.13 loads on 3.11 too, where pathlib._local does not exist.
SAFE_GLOBALS = [
    argparse.Namespace,
    (pathlib.PosixPath, "pathlib.PosixPath"),
    (pathlib.PosixPath, "pathlib._local.PosixPath"),
]
StateDict = dict[str, torch.Tensor]


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint (file or URL) without executing pickled code, or fail with one line. Every
    checksum it stores is verified first (torch.load does not check a zip's CRC-32s)."""
    if not is_url(path):
        return _load_file(path, path)
    local, fresh = download(path)
    try:
        return _load_file(local, path)
    except DamagedFile as e:
        if not fresh:
            fail(f"{e.what} (its copy in torch.hub's cache, {local}); {AFRESH_BY_HAND}")
        remove_download(local)
        fail(f"{e.what}; {AFRESH}")
    except UserError as e:
        if not fresh:
            fail(f"{e} (read from its copy in torch.hub's cache, {local})")
        remove_download(local)
        fail(f"{e} (its downloaded copy was removed)")


class DamagedFile(UserError):
    """A checkpoint file whose bytes are wrong (truncated, not the format it claims, a checksum that
    fails): ``what`` says so, and the advice after it fits a file; a URL's copy says another (``AFRESH``)."""

    def __init__(self, what: str, advice: str):
        super().__init__(f"{what}; {advice}")
        self.what = what


def damaged(what: str, advice: str) -> NoReturn:
    raise DamagedFile(what, advice)


def _load_file(path: str, shown: str) -> dict[str, Any]:
    """Load the local file ``path``; errors name it as ``shown`` (the URL it came from, if any)."""
    if os.path.isdir(path):
        fail(
            f"checkpoint {shown} is a folder, not a checkpoint file: give its .pth or .safetensors file "
            f"(a Hugging Face folder becomes one with export.py --from hf)"
        )
    if not os.path.isfile(path):
        fail(f"checkpoint {shown} does not exist; check its path")
    kind = _file_kind(path)
    if path.endswith(".safetensors") or kind == "safetensors":
        ckpt = load_safetensors(path, shown)
    else:
        ckpt = _load_torch(path, shown, kind)
    # Every reader of the stored flags (flags not given, --mean/--std, reconstruct, export) takes
    # them as checked here, once.
    if isinstance(ckpt.get("args"), argparse.Namespace):
        check_saved_args(ckpt["args"], shown)
    return ckpt


def _load_torch(path: str, shown: str, kind: str) -> dict[str, Any]:
    """A torch.save file as a dict, nothing pickled executed; its zip checksums verified first."""
    if kind != "torch":
        _not_torch(shown)
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
        _not_torch(shown, f" ({first_line(e)[:160]})")
    if not isinstance(ckpt, dict):
        fail(f"checkpoint {shown} holds a {type(ckpt).__name__}, not a dict of states; it is not an MAE checkpoint")
    return ckpt


def _not_torch(shown: str, why: str = "") -> NoReturn:
    damaged(
        f"checkpoint {shown} is truncated or not a PyTorch checkpoint{why}",
        "use an earlier checkpoint or write it again",
    )


def verify_zip(path: str, shown: str) -> None:
    """Check every member of the zip checkpoint ``path`` against the CRC-32 the archive stores for
    it, or fail naming the first damaged member. torch.save writes real CRCs; a file written with
    ``torch.serialization.set_crc32_options(False)`` stores 0 for every member, and is not checked."""
    where = "its zip directory"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if all(m.CRC == 0 for m in members if m.file_size):
                log.info(f"checkpoint {shown} was written without checksums: its contents are not verified")
                return
            for member in members:
                where = f"its entry {member.filename}"
                with archive.open(member) as f:  # zipfile checks the CRC once the member is read to its end
                    while f.read(1 << 20):
                        pass
    except Exception as e:  # BadZipFile for a wrong CRC or header, OSError, EOFError, zlib.error, ...
        damaged(
            f"checkpoint {shown} is damaged in {where} ({str(e)[:80]})", "use an earlier checkpoint or write it again"
        )


def load_safetensors(path: str, shown: str) -> dict[str, Any]:
    """A .safetensors file as a checkpoint, ``{'model': tensors, 'args': Namespace or None}``, args and
    CRC-32s from the metadata ``export.py`` writes. Imported here: training does not need safetensors."""
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
        damaged(f"checkpoint {shown} is truncated or not a safetensors file ({first_line(e)[:160]})", "write it again")
    if CHECKSUM_KEY in metadata:
        verify_checksums(state, metadata[CHECKSUM_KEY], shown)
    try:
        args = argparse.Namespace(**json.loads(metadata["args"])) if "args" in metadata else None
    except (ValueError, TypeError) as e:
        damaged(f"checkpoint {shown}: its 'args' metadata is not a JSON object of flags ({e})", "export it again")
    return {"model": state, "args": args}


# safetensors metadata entry: JSON {tensor name: CRC-32 of its bytes}. The format has no checksum
# of its own; CRC-32, as in a .pth's zip, detects damage and names the damaged tensor.
CHECKSUM_KEY = "crc32"


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in memory order (what safetensors stores), for any dtype."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy())


def checksum_metadata(tensors: StateDict) -> dict[str, str]:
    """The metadata entry that lets ``load_checkpoint`` verify a .safetensors file written with it."""
    return {CHECKSUM_KEY: json.dumps({name: tensor_crc32(t) for name, t in sorted(tensors.items())})}


def verify_checksums(state: StateDict, stored: str, shown: str) -> None:
    """Fail naming the first tensor of ``state`` without the CRC-32 ``stored`` (JSON) has for it, or the reverse."""
    try:
        expected = json.loads(stored)
    except ValueError:
        expected = None
    if not isinstance(expected, dict) or not all(isinstance(v, int) for v in expected.values()):
        damaged(
            f"checkpoint {shown}: its '{CHECKSUM_KEY}' metadata is not a JSON object of checksums", "write it again"
        )
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected or tensor_crc32(state[name]) != expected[name]:
            damaged(
                f"checkpoint {shown} is damaged: its tensor {name} does not match its checksum",
                "use an earlier copy or export it again",
            )


def _file_kind(path: str) -> str:
    """'safetensors' (8 bytes of header length, little endian, then the JSON header: '{'), 'torch' (a
    complete zip archive, torch >= 1.6, or a legacy pickle stream, which starts with PROTO) or ''."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    return "torch" if zipfile.is_zipfile(path) or head[:1] == b"\x80" else ""


def peek_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's entries, read before the run builds anything, its stored flags checked. A zip is
    memory-mapped, so its tensors are not read here (nor verified: that happens where its weights are
    loaded), yet their shapes are known; other files are loaded whole."""
    ckpt: Any = None
    if not is_url(path) and os.path.isfile(path) and zipfile.is_zipfile(path):
        # Whatever fails here, load_checkpoint says it in one line.
        with contextlib.suppress(Exception), torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict):
        return load_checkpoint(path)
    if isinstance(ckpt.get("args"), argparse.Namespace):
        check_saved_args(ckpt["args"], path)
    return ckpt


# What wrappers put before every name of a model's state dict: DataParallel and DistributedDataParallel, and
# torch.compile's OptimizedModule.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def model_state(ckpt: dict[str, Any], path: str) -> StateDict:
    """The model's state dict in a checkpoint: under 'model' (official and ours) or at the top; names that all
    start with a wrapper's prefix (``module.``: DataParallel / DistributedDataParallel; ``_orig_mod.``:
    torch.compile) without it."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"checkpoint {path} has no model state dict (expected a 'model' entry of tensors)")
    # Scripts that save the wrapper's state_dict() (not the model's inside it, as we and the official code do)
    # prefix every name: such a file was refused as "an encoder without decoder" or as "no known encoder".
    # A compiled DDP model's names carry both prefixes.
    while prefix := next((p for p in WRAPPER_PREFIXES if all(str(k).startswith(p) for k in state)), None):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state
