"""Reading checkpoints, which are untrusted input: nothing pickled is executed, every stored checksum
is verified, damaged or foreign files are one-line errors, and a state dict loads strictly, with
finite weights of a usable dtype, or names what does not fit."""

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import pathlib
import pickle
import re
import ssl
import urllib.error
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from util.checkpoint.rng import capture_rng, restore_rng
from util.cli.errors import UserError, fail, first_line
from util.cli.log import log
from util.sizes import MAX_SIDE

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


def is_url(path: str) -> bool:
    return path.startswith(("https://", "http://"))


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
        _remove_download(local)
        fail(f"{e.what}; {AFRESH}")
    except UserError as e:
        if not fresh:
            fail(f"{e} (read from its copy in torch.hub's cache, {local})")
        _remove_download(local)
        fail(f"{e} (its downloaded copy was removed)")


# What a damaged URL download says to do: every rank of a job ends in this line, the same one.
AFRESH = "its downloaded copy was removed: run again to download it afresh, or download it yourself and give the file"
# A damaged copy that was in the cache already is left there: another process (a rank of a job sharing the
# cache) may be reading it, and one that found it gone would download it again, or say it does not exist.
AFRESH_BY_HAND = "remove that file and run again to download it afresh, or download it yourself and give the file"


def _remove_download(local: str) -> None:
    """Remove a copy this process has just downloaded and that does not load, so that the cache does not
    serve it again. Only its downloader reads it yet (in a job, the other ranks wait: download_on_every_rank)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(local)


def cached_path(url: str) -> str:
    """Where ``url``'s copy lives in torch.hub's cache. Each URL has a folder of its own (a hash of
    it): two hosts' files of the same name must not share a copy."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint"
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    return os.path.join(folder, name)


def download(url: str) -> tuple[str, bool]:
    """The local copy of ``url`` in torch.hub's cache (``cached_path``), downloaded if not there yet, and
    whether this call downloaded it."""
    local = cached_path(url)
    if os.path.isfile(local):
        return local, False
    log.info(f"downloading {url} to {local}")
    try:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        torch.hub.download_url_to_file(url, local, progress=False)  # to a temporary file, then renamed
    except Exception as e:  # network errors, HTTP errors, a cache folder that cannot be written
        if isinstance(e, OSError) and not isinstance(e, _NETWORK_ERRORS) and e.errno in _CACHE_ERRNOS:
            fail(
                f"checkpoint {url} cannot be downloaded into torch.hub's cache {os.path.dirname(local)} "
                f"({e.strerror}): set TORCH_HOME to a folder you can write, or download it yourself and give the file"
            )
        fail(
            f"checkpoint {url} could not be downloaded ({type(e).__name__}: {str(e)[:160]}); "
            f"download it yourself and give the file"
        )
    return local, True


# What a cache folder that cannot be written raises (read-only, full, a file in its path), not the network: the
# advice is another folder, not another download.
_CACHE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST)
# The network's OSErrors: urllib's, and SSL's (raised unwrapped while the body is read), whose SSL error codes
# stand in errno (SSL_ERROR_SSL, a broken record, is 1: EPERM's).
_NETWORK_ERRORS = (urllib.error.URLError, ssl.SSLError)


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


def saved_args(path: str) -> argparse.Namespace | None:
    """The checked flags a checkpoint was written with (None for official releases), read before the
    run builds anything. A zip is memory-mapped, so its tensors are not read here (nor verified:
    that happens where its weights are loaded)."""
    ckpt: Any = None
    if not is_url(path) and os.path.isfile(path) and zipfile.is_zipfile(path):
        # Whatever fails here, load_checkpoint says it in one line.
        with contextlib.suppress(Exception), torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if ckpt is None:
        ckpt = load_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if not isinstance(args, argparse.Namespace):
        return None
    check_saved_args(args, path)
    return args


def model_state(ckpt: dict[str, Any], path: str) -> StateDict:
    """The model's state dict in a checkpoint: under 'model' (official and ours) or at the top."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"checkpoint {path} has no model state dict (expected a 'model' entry of tensors)")
    return state


# State dicts against a model
def state_difference(
    own: StateDict, state: StateDict, may_miss: set[str] = frozenset(), may_be_left: set[str] | None = frozenset()
) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` ('' if nothing):
    keys of ``may_miss`` may be missing, those of ``may_be_left`` (any, if None) left over, and no
    shared key may differ in shape."""
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    named = (
        ("missing", sorted(set(own) - set(state) - may_miss)),
        ("unexpected", [] if may_be_left is None else sorted(set(state) - set(own) - may_be_left)),
        ("of another shape", wrong),
    )
    text = "; ".join(f"{len(keys)} {what} {keys[:4]}" for what, keys in named if keys)
    if not wrong:
        return text
    return f"{text} (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})"


def check_weights(own: StateDict, state: StateDict, source: str) -> None:
    """Every weight of ``state`` that the model has (``own``) loads as it is (``check_weight``), or
    fail naming it after ``source``. Call it before any use."""
    for key in sorted(set(own) & set(state)):
        check_weight(key, state[key], own[key].dtype, source)


def check_weight(key: str, weight: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    """``weight`` (``key`` of ``source``) can stand where the model has a ``dtype`` tensor, or fail
    naming it: a float for a float (int8, bool or complex would be cast silently), holding the data
    its shape claims (zero strides can forge a huge tensor), and finite."""
    if dtype != weight.dtype and not (dtype.is_floating_point and weight.is_floating_point()):
        fail(
            f"{source}: weight {key} is {weight.dtype}, the model's is {dtype}; it cannot be loaded "
            f"without changing its values (a quantized or foreign checkpoint?): give one of {dtype} weights"
        )
    if weight.numel() * weight.element_size() > weight.untyped_storage().nbytes():
        fail(
            f"{source}: weight {key} claims shape {tuple(weight.shape)} but stores only "
            f"{weight.untyped_storage().nbytes()} bytes; the checkpoint is damaged or forged"
        )
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        fail(
            f"{source}: weight {key} holds {bad} NaN or infinite value(s) of {weight.numel()}: the file is "
            f"damaged or comes from a diverged run; use an earlier checkpoint"
        )


# The flags that decide whether a classifier has a weight; the other weights any model of --model has.
_FLAG_OF_WEIGHT = (("head.", "--nb_classes"), ("fc_norm.", "--global_pool"), ("norm.", "--global_pool"))


def flags_behind(own: StateDict, state: StateDict) -> str:
    """The flags to check where ``state`` does not fit a model whose state dict is ``own``: a weight
    present in one only is a head (--nb_classes) or a final norm (--global_pool); one of another shape
    at the same width, position embeddings (--input_size) or a head (--nb_classes); any other, --model."""
    flags = set()
    for key in set(own) ^ set(state):
        flags.add(next((flag for prefix, flag in _FLAG_OF_WEIGHT if key.startswith(prefix)), "--model"))
    for key in {k for k in set(own) & set(state) if own[k].shape != state[k].shape}:
        ref = "head.weight" if key.startswith("head.") else key  # a head's width: its weight's last side
        same_width = ref in own and ref in state and own[ref].shape[-1] == state[ref].shape[-1]
        if same_width and key.endswith("pos_embed"):
            flags.add("--input_size")
        elif same_width and key.startswith("head."):
            flags.add("--nb_classes")
        else:
            flags.add("--model")
    return " and ".join(flag for flag in ("--model", "--input_size", "--nb_classes", "--global_pool") if flag in flags)


def load_model_strict(model: torch.nn.Module, state: StateDict, path: str) -> None:
    """Load ``state`` (names, shapes and weights checked) into ``model``, or fail naming what differs
    and the flags that decide it."""
    own = model.state_dict()
    if diff := state_difference(own, state):
        fail(f"checkpoint {path} does not fit {type(model).__name__}: {diff}; check {flags_behind(own, state)}")
    check_weights(own, state, f"checkpoint {path}")
    model.load_state_dict(state)


# Training entries, checked before a resume uses them
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_count(value) and value > 0


def _is_input_size(value: Any) -> bool:
    sides = value if isinstance(value, (list, tuple)) else [value]
    return 1 <= len(sides) <= 2 and all(_is_positive_int(s) and s <= MAX_SIDE for s in sides)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(map(_is_number, value))


# The stored flags that code reads back from a checkpoint's args (flags not given, --mean/--std,
# reconstruct.py, export.py, the resume warning), each with what it must be, as the flag gives it:
# JSON metadata (.safetensors) turns tuples into lists, which pass. None is "not stored".
_SAVED_FLAGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "input_size": (_is_input_size, f"one or two integers from 1 to {MAX_SIDE}"),
    "in_chans": (_is_positive_int, "a positive integer"),
    "mean": (_is_numbers, "a list of numbers"),
    "std": (_is_numbers, "a list of numbers"),
    "mask_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "norm_pix_loss": (lambda v: isinstance(v, bool), "True or False"),
    "global_pool": (lambda v: isinstance(v, bool), "True or False"),
    "nb_classes": (_is_positive_int, "a positive integer"),
    "crop_pct": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def check_saved_args(args: argparse.Namespace, path: str) -> None:
    """The stored flags that other code reads back from a checkpoint (``_SAVED_FLAGS``) hold values
    the flags could have given (``--mean "abc"`` would be read as three characters, ``--input_size
    "abc"`` fail deep inside a model); fail naming every one that does not, with its stored value."""
    values = vars(args)
    problems = [
        f"--{flag} {values[flag]!r} is not {what}"
        for flag, (valid, what) in _SAVED_FLAGS.items()
        if values.get(flag) is not None and not valid(values[flag])
    ]
    if problems:
        fail(
            f"checkpoint {path} stores flag values this code cannot use: {'; '.join(problems)}; it was not written "
            f"by this code or was changed: give another checkpoint"
        )


def _rng_problem(rng: Any) -> str:
    """Why ``rng`` is not a list of states ``restore_rng`` takes: each is tried, then ours put back."""
    if not isinstance(rng, list) or not all(isinstance(r, dict) for r in rng):
        return f"is a {type(rng).__name__}, not a list of per-process random states"
    mine = capture_rng()
    try:
        for r in rng:
            restore_rng(r)
    except Exception as e:  # any part of any state may be wrong
        return f"is not the random state this code saves ({type(e).__name__}: {str(e)[:60]})"
    finally:
        restore_rng(mine)
    return ""


def _optimizer_problem(opt: Any) -> str:
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
        return f"is a {type(opt).__name__} without a 'state' dict, not an optimizer state"
    groups = opt.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return "has no list of parameter groups with their 'params'"
    for index, slots in opt["state"].items():  # per parameter: step, moments, ...
        if not isinstance(slots, dict) or not all(isinstance(v, torch.Tensor) or _is_number(v) for v in slots.values()):
            return f"holds for parameter {index} something else than tensors and numbers"
        for name, v in slots.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"holds NaN or infinite values in {name} of parameter {index} (a diverged run)"
    return ""


def _meters_problem(meters: Any) -> str:
    sums = meters.get("sums") if isinstance(meters, dict) else None
    per_rank = sums if isinstance(sums, list) and sums else [sums]  # one dict per rank; older checkpoints: rank 0's
    ok = all(map(_is_sums, per_rank)) and _is_count(meters.get("epoch")) and _is_count(meters.get("step"))
    return "" if ok else "is not {'epoch': count, 'step': count, 'sums': [{name: [total, count]} per rank]}"


def _is_sums(sums: Any) -> bool:
    pairs = sums.values() if isinstance(sums, dict) else [None]
    return all(isinstance(s, (list, tuple)) and len(s) == 2 and all(map(_is_number, s)) for s in pairs)


def _log_problem(lines: Any) -> str:
    if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
        return f"is a {type(lines).__name__}, not a list of log.txt lines (dicts)"
    try:
        json.dumps(lines, allow_nan=True)
    except (TypeError, ValueError) as e:
        return f"holds values log.txt cannot take ({e})"
    return ""


def _extra_problem(extra: Any) -> str:
    """The entry-point state: engine_finetune keeps 'max_accuracy' and 'unevaluated' there, and a run that
    extends a finished one the names of the final checkpoints it keeps ('finals')."""
    if not isinstance(extra, dict):
        return f"is a {type(extra).__name__}, not a dict"
    best = extra.get("max_accuracy", 0.0)
    if not _is_number(best) or not math.isfinite(best):
        return f"holds max_accuracy {best!r}, not a number"
    pending = extra.get("unevaluated")
    if pending is not None and not (
        isinstance(pending, dict) and _is_count(pending.get("epoch")) and isinstance(pending.get("train_stats"), dict)
    ):
        return "holds an 'unevaluated' entry that is not {'epoch': count, 'train_stats': dict}"
    finals = extra.get("finals", [])
    if not isinstance(finals, list) or not all(isinstance(name, str) for name in finals):
        return "holds a 'finals' entry that is not a list of checkpoint names"
    return ""


# Each training entry's check: why its value is malformed, '' if it is not.
_ENTRY_CHECKS = {
    "epoch": lambda v: "" if _is_count(v) else f"is {v!r}, not a count of epochs (an integer >= 0)",
    "step": lambda v: "" if v is None or _is_count(v) else f"is {v!r}, not None or an integer >= 0",
    "optimizer": _optimizer_problem,
    "scaler": lambda v: "" if not v or isinstance(v, dict) else f"is a {type(v).__name__}, not a dict",
    "rng": lambda v: "" if v is None else _rng_problem(v),
    "extra": _extra_problem,
    "log": lambda v: "" if v is None else _log_problem(v),
    "meters": lambda v: "" if v is None else _meters_problem(v),
    "args": lambda v: "" if v is None or isinstance(v, argparse.Namespace) else "is not a Namespace of flags",
}


def check_training_entries(ckpt: dict[str, Any], path: str) -> None:
    """Fail in one line naming every malformed entry of a training checkpoint before resume uses any
    of them. Absent entries are not checked: an official release holds only the model (and args)."""
    checked = ((name, check(ckpt[name])) for name, check in _ENTRY_CHECKS.items() if name in ckpt)
    if problems := [f"'{name}' {why}" for name, why in checked if why]:
        fail(
            f"checkpoint {path} has malformed entries: {'; '.join(problems)}; it was not written by this code "
            f"or was changed: resume from another checkpoint"
        )
