"""Output folders and files, checked before any work: a run must not train for an epoch only to find
that it cannot write its checkpoint (util.atomic writes them, whole or not at all)."""

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from util.atomic import temporary_path
from util.cli.errors import fail

# Formats PIL writes an RGB picture in without further options.
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


def _first_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


# The longest name a run writes in its folders (before temporary_path's suffix): a mid-epoch checkpoint's at
# epoch 9999, iteration 999999 (longer than reconstruction-9999.png).
_LONGEST_NAME = "checkpoint-9999-step999999.pth"


_PROBE_PREFIX = ".write-test-"


def _probe_affixes(name: str) -> tuple[str, str]:
    """tempfile's prefix and suffix that make a probe (prefix, 8 random characters, suffix) as long as ``name``
    in bytes, as NAME_MAX and PATH_MAX count ('é' is one character and two bytes): the prefix is cut short
    for a name shorter than itself and the random part (a probe longer than the file refused a path it fit)."""
    length = len(os.fsencode(name))
    prefix = _PROBE_PREFIX[: max(1, min(len(_PROBE_PREFIX), length - 8))]  # 1: at least hidden, '.'
    rest = max(0, length - len(prefix) - 8)
    suffix = "." + "x" * (rest - 1) if rest else ""
    return prefix, suffix


@contextlib.contextmanager
def _probing(folder: str, what: str, name: str) -> Iterator[None]:
    """Turn an ``OSError`` of writing a probe named as long as ``name`` in ``folder`` into one line."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            fail(
                f"{what}: the path is too long for the files written in it ({e.strerror}; a name such as "
                f"{name} must fit after it); give a shorter path"
            )
        fail(f"{what}: cannot write a file in {folder} ({e.strerror}); give a folder you can write to")


def check_writable(folder: str, what: str, longest: str = _LONGEST_NAME) -> None:
    """Fail, in one line naming ``what``, unless files named as long as ``longest`` (and its temporary,
    see ``util.atomic.atomic_write``) can be written in ``folder``: checked before the work that writes them."""
    # os.access alone is not enough: root passes it on read-only folders, and it knows nothing
    # of read-only mounts. An actual file settles it.
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{what}: the folder {folder} is not writable by this user; give a folder you can write to")
    # Named as long as the longest name written there, so that a path near PATH_MAX (or a name over
    # NAME_MAX) is refused now rather than at the first checkpoint, an epoch later.
    name = os.path.basename(temporary_path(longest))
    prefix, suffix = _probe_affixes(name)
    with (
        _probing(folder, what, name),
        tempfile.NamedTemporaryFile(dir=folder, prefix=prefix, suffix=suffix),
    ):
        pass


def check_folder_output(path: str, what: str, names: Iterable[str]) -> None:
    """Fail, in one line naming ``what``, unless the folder ``path`` can be written whole, holding files
    named ``names``, the way ``util.atomic.atomic_write_folder`` writes it: first as the folder
    ``temporary_path('.' + its name)`` beside it (and the earlier one renamed aside to a name as long),
    each file through ``atomic_write``. A probe folder as long is made there and written in."""
    parent, base = os.path.split(os.path.abspath(path))
    check_writable(parent, what, "." + base)
    staging = os.path.basename(temporary_path("." + base))
    longest = max(names, key=lambda name: len(os.fsencode(name)))
    prefix, suffix = _probe_affixes(staging)
    with (
        _probing(parent, what, staging),
        tempfile.TemporaryDirectory(dir=parent, prefix=prefix, suffix=suffix) as probe,
    ):
        check_writable(probe, what, longest)


def check_output_dir(path: str, flag: str) -> None:
    """Create the folder ``path`` (of ``flag``) if needed and make sure files can be written in it."""
    existing = _first_existing(path)
    if not os.path.isdir(existing):
        fail(f"{flag} {path}: {existing} is a file, not a folder; give a folder path")
    if os.path.islink(path) and not os.path.exists(path):  # makedirs said only "File exists"
        target = os.readlink(path)
        fail(f"{flag} {path} is a link to {target}, which does not exist; create that folder or give another")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path} cannot be created ({e.strerror}); give a folder you can write to")
    check_writable(path, f"{flag} {path}")


def check_not_an_input(path: str, flag: str, inputs: Iterable[tuple[str, str]]) -> None:
    """Refuse an output ``path`` that is one of the command's ``inputs`` ((what, path) pairs; URLs
    and missing paths are skipped) or, for an output folder, holds one: the output would replace
    what it is made from, whatever ``--force`` says. The same file however it is reached: through
    links, hard links, or another spelling of the path."""
    if not os.path.exists(path):
        return
    for what, source in inputs:
        if not os.path.exists(source):
            continue
        if os.path.samefile(path, source):
            same = "" if os.path.abspath(path) == os.path.abspath(source) else " (the same file)"
            fail(f"{flag} {path} is {what} {source}{same}: writing it would replace it; give another name")
        output, found = os.path.realpath(path), os.path.realpath(source)
        if os.path.isdir(output) and os.path.commonpath([output, found]) == output:
            fail(f"{flag} {path} holds {what} {source}: writing the folder would replace it; give another folder")


def _check_file_target(path: str, flag: str, example: str) -> None:
    """``path`` is not a folder, its folder exists and takes files, and the file is not read-only."""
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, example)}")
    # A device or a pipe (/dev/null, /dev/stdout): atomic_write's rename would put a file in its place
    # (in /dev, which root may write), and a JSON file to add to is read first.
    if os.path.exists(path) and not os.path.isfile(path):
        fail(f"{flag} {path} is not a regular file (a device or a pipe); give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if not os.path.isdir(existing := _first_existing(folder)):  # `x.png/r.png`: no folder to create
            fail(f"{flag} {path}: {existing} is a file, not a folder; give a path in a folder")
        fail(f"{flag} {path}: the folder {folder} does not exist; create it first")
    check_writable(folder, f"{flag} {path}", os.path.basename(path))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path} exists and is read-only; remove it or give another name")


def check_output_file(path: str, flag: str, inputs: Iterable[tuple[str, str]] = ()) -> None:
    """``path`` names a picture file (by its extension) that can be written, in an existing folder,
    and is none of ``inputs`` (see ``check_not_an_input``). A file already there is replaced only
    if it is a picture of that format, as an earlier run of the command left it (reruns work):
    anything else there is not this command's to replace."""
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'reconstruction.png')}")
    Image.init()
    ext = os.path.splitext(path)[1].lower()
    writable = sorted(e for e, f in Image.registered_extensions().items() if f in PICTURE_FORMATS and f in Image.SAVE)
    if ext not in writable:
        fail(f"{flag} {path}: '{ext}' is not a picture format this can write; use one of {', '.join(writable)}")
    _check_file_target(path, flag, "reconstruction.png")
    check_not_an_input(path, flag, inputs)
    picture_format = Image.registered_extensions()[ext]
    if os.path.isfile(path) and os.path.getsize(path) and _picture_format(path) != picture_format:
        fail(
            f"{flag} {path} exists and is not a {picture_format} picture, which is what this writes there; "
            f"remove it or give another name"
        )


def _picture_format(path: str) -> str | None:
    """The format Pillow reads ``path`` in (its header only), or None for a file it cannot read."""
    try:
        with Image.open(path) as img:
            return img.format
    except Exception:  # any reason it is not a picture (UnidentifiedImageError, a bomb, a read error)
        return None


# The JSON a command replaces is a few KiB: a larger file is something else, and is not read whole
# (a data set archive passed by mistake) to find out.
MAX_JSON_BYTES = 16 * 2**20


def check_json_output(path: str, flag: str, append: bool = False, inputs: Iterable[tuple[str, str]] = ()) -> None:
    """``path`` can take the JSON file a command writes when its work is done, checked before the
    work, and is none of ``inputs`` (see ``check_not_an_input``). With ``append`` (JSON lines added
    to the file), the lines already there must be JSON too; else a file already there is replaced
    only if it is JSON, as an earlier run of the command left it (reruns work)."""
    _check_file_target(path, flag, "results.json")
    check_not_an_input(path, flag, inputs)
    if not os.path.isfile(path):
        return
    if append:
        _check_json_lines(path, flag)
    elif (size := os.path.getsize(path)) > MAX_JSON_BYTES:
        fail(
            f"{flag} {path} exists and is {size / 2**20:.1f} MiB, far more than the JSON this writes; give another name"
        )
    elif not _is_json(_read(path, flag, "it is replaced only if it holds JSON")):
        fail(f"{flag} {path} exists and is not JSON, which is what this writes there; remove it or give another name")


def _read(path: str, flag: str, why: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        fail(f"{flag} {path} cannot be read ({e.strerror}); {why}, so it must be readable: give another name")


def _check_json_lines(path: str, flag: str) -> None:
    lines = _read(path, flag, "it is added to").splitlines()
    for number, line in enumerate(lines, 1):
        if not _is_json(line):
            fail(
                f"{flag} {path}: line {number} is not JSON, and one JSON object per line is added to this file; "
                f"repair or remove it, or give another name"
            )


def _is_json(line: bytes) -> bool:
    if not line.strip():
        return True  # a blank line troubles no reader of JSON lines
    try:
        json.loads(line)
    except ValueError:  # JSON's and UTF-8's errors
        return False
    return True


def check_outside_data(output_dir: str, data_path: str, flag: str = "--output_dir") -> None:
    """Refuse an output folder at or below the data folder (links resolved): the pictures a run
    writes there would be read back as training images. (A list file names its images one by one.)"""
    if not output_dir or not os.path.isdir(data_path):
        return
    data, out = os.path.realpath(data_path), os.path.realpath(output_dir)
    if os.path.commonpath([data, out]) == data:
        fail(
            f"{flag} {output_dir} is inside --data_path {data_path}: its reconstruction pictures would be read "
            f"back as training images; give a folder outside the data"
        )
