"""Reading checkpoints, which are untrusted input: nothing pickled is executed, every stored checksum
is verified, damaged or foreign files are one-line errors, and a state dict loads strictly, with
finite weights of a usable dtype, or names what does not fit. What the entries must hold: entries.py."""

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import pickle
import re
import socket
import ssl
import urllib.error
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any, NoReturn

import torch

from util.checkpoint.entries import check_saved_args
from util.cli.errors import UserError, fail, first_line
from util.cli.log import log
from util.cli.redact import shown_url, split_userinfo

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


def check_url(url: str) -> None:
    """Refuse, in one line, a URL that cannot be downloaded as it is given: one with a user name or password,
    which torch.hub cannot send, and one urllib cannot read (an IPv6 address without its closing bracket, a
    port beyond 65535), which ended in a traceback. Every rank of a job decides alike, before any waits."""
    if split_userinfo(url)[1] is not None:
        # urllib takes it for part of the host's name, whose lookup fails ('Name or service not known'), or, with
        # a '/' in the password, for a port ("nonnumeric port: 'PASSWORD'S START'").
        # Shown here, whole: in a line, a quote in the password ends the URL there for ``redacted``.
        fail(
            f"checkpoint {shown_url(url)} holds a user name or password, which torch.hub cannot send: download it "
            f"yourself and give the file"
        )
    try:
        _ = urllib.parse.urlsplit(url).port  # reading the port checks it
    except ValueError as e:
        fail(f"checkpoint {shown_url(url)} is not a URL that can be read ({e}); check it")


def download(url: str) -> tuple[str, bool]:
    """The local copy of ``url`` in torch.hub's cache (``cached_path``), downloaded if not there yet, and
    whether this call downloaded it."""
    check_url(url)
    local = cached_path(url)
    if os.path.isfile(local):
        return local, False
    log.info(f"downloading {url} to {local}")
    try:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with _socket_timeout(STALL_TIMEOUT_S):
            torch.hub.download_url_to_file(url, local, progress=False)  # to a temporary file, then renamed
    except Exception as e:  # network errors, HTTP errors, a cache folder that cannot be written
        if _stalled(e):  # torch.hub has removed its temporary file: nothing is left to take for the checkpoint
            fail(
                f"checkpoint {url} could not be downloaded: no bytes came for {STALL_TIMEOUT_S:g} s (the server or "
                f"the connection stalled); run again, or download it yourself and give the file"
            )
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


# How long a download waits for its next bytes (or for its connection) before it gives up: torch.hub's
# urlopen has none, and a connection that stops sending (a dead link, a proxy that holds it open) blocked
# the process for ever (in a job, the others gave up after 30 min and the downloader hung on). It bounds
# each wait for bytes, not the download: a slow one that keeps sending is never cut. Two minutes: servers
# and proxies that are slow to start sending a large file, and TCP's retransmissions over a lossy link (a
# few seconds, doubling), stay well inside it; and as long as Linux waits for a connection that is never
# answered (its SYN retries, about 2 min). Tests shrink it.
STALL_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Python's default socket timeout set to ``seconds`` inside the block, as before after it: urllib's
    sockets take it when torch.hub opens the URL, as timeouts of their connection and of each read. Sockets
    made in C++ (torch.distributed's store, gloo, NCCL) never read it, nor do Python sockets made before;
    one another thread made meanwhile would, and none of ours makes any (the heartbeat of a job's
    downloader, work_while_others_wait, talks to the C++ store; data-loader workers are processes)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _stalled(error: Exception) -> bool:
    """Whether ``error`` is a socket timeout: while the body is read (raised as it is), or while urllib
    connects or reads the headers (wrapped in a URLError)."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return isinstance(reason, TimeoutError)  # socket.timeout is TimeoutError


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


# The one integer tensor our models hold: BatchNorm's step counter (the linear probe's head).
_INTEGER_BUFFERS = ("num_batches_tracked",)


def check_float_weights(state: StateDict, source: str) -> None:
    """Every weight is what loading one requires (``check_weight``: a float, whole, finite), or fail
    naming it after ``source``, where no model gives the dtypes: an export must not pass on weights the
    other entry points refuse (NaN from a diverged run, a quantized file). Our models and the official
    ones hold floats, but for the counters of ``_INTEGER_BUFFERS``, which must be int64 as torch keeps them."""
    for key, weight in sorted(state.items()):
        dtype = torch.int64 if key.rsplit(".", 1)[-1] in _INTEGER_BUFFERS else torch.float32
        check_weight(key, weight, dtype, source)


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
    at the same width, position embeddings (--input_size) or a head (--nb_classes); the patch embedding
    and an MAE's pixel prediction of other image channels only, --in_chans; any other, --model."""
    flags = set()
    for key in set(own) ^ set(state):
        flags.add(next((flag for prefix, flag in _FLAG_OF_WEIGHT if key.startswith(prefix)), "--model"))
    other_channels = _differ_only_in(own, state, "patch_embed.proj.weight", 1)
    for key in {k for k in set(own) & set(state) if own[k].shape != state[k].shape}:
        ref = "head.weight" if key.startswith("head.") else key  # a head's width: its weight's last side
        same_width = ref in own and ref in state and own[ref].shape[-1] == state[ref].shape[-1]
        if same_width and key.endswith("pos_embed"):
            flags.add("--input_size")
        elif same_width and key.startswith("head."):
            flags.add("--nb_classes")
        elif other_channels and (
            key == "patch_embed.proj.weight" or key in _PIXELS and _differ_only_in(own, state, key, 0)
        ):
            flags.add("--in_chans")  # an MAE predicts patch_size^2 x channels values a patch
        else:
            flags.add("--model")
    known = ("--model", "--input_size", "--in_chans", "--nb_classes", "--global_pool")
    return " and ".join(flag for flag in known if flag in flags)


_PIXELS = ("decoder_pred.weight", "decoder_pred.bias")  # an MAE's pixel prediction: a row per pixel value


def _differ_only_in(own: StateDict, state: StateDict, key: str, dim: int) -> bool:
    """Whether weight ``key`` of ``own`` and ``state`` differ in side ``dim`` alone."""
    if key not in own or key not in state or own[key].dim() != state[key].dim():
        return False
    mine, theirs = list(own[key].shape), list(state[key].shape)
    return mine[dim] != theirs[dim] and mine[:dim] + mine[dim + 1 :] == theirs[:dim] + theirs[dim + 1 :]


def load_model_strict(model: torch.nn.Module, state: StateDict, path: str) -> None:
    """Load ``state`` (names, shapes and weights checked) into ``model``, or fail naming what differs
    and the flags that decide it."""
    own = model.state_dict()
    if diff := state_difference(own, state):
        fail(f"checkpoint {path} does not fit {type(model).__name__}: {diff}; check {flags_behind(own, state)}")
    check_weights(own, state, f"checkpoint {path}")
    model.load_state_dict(state)
