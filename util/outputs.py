"""Output folders and files: checked before any work (a run must not train for an epoch only to
find that it cannot write its checkpoint), and written atomically (a crash or a full disk leaves
the old file or the complete new one, never a torn one)."""

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from util.cli.errors import fail

# Formats PIL writes an RGB picture in without further options.
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


def _first_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable(folder: str, what: str) -> None:
    # os.access alone is not enough: root passes it on read-only folders, and it knows nothing
    # of read-only mounts. An actual file settles it.
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{what}: the folder {folder} is not writable by this user; give a folder you can write to")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        fail(f"{what}: cannot write a file in {folder} ({e.strerror}); give a folder you can write to")


def check_output_dir(path: str, flag: str) -> None:
    """Create the folder ``path`` (of ``flag``) if needed and make sure files can be written in it."""
    existing = _first_existing(path)
    if not os.path.isdir(existing):
        fail(f"{flag} {path}: {existing} is a file, not a folder; give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path} cannot be created ({e.strerror}); give a folder you can write to")
    _check_writable(path, f"{flag} {path}")


def _check_file_target(path: str, flag: str, example: str) -> None:
    """``path`` is not a folder, its folder exists and takes files, and the file is not read-only."""
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, example)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if not os.path.isdir(existing := _first_existing(folder)):  # `x.png/r.png`: no folder to create
            fail(f"{flag} {path}: {existing} is a file, not a folder; give a path in a folder")
        fail(f"{flag} {path}: the folder {folder} does not exist; create it first")
    _check_writable(folder, f"{flag} {path}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path} exists and is read-only; remove it or give another name")


def check_output_file(path: str, flag: str) -> None:
    """``path`` names a picture file (by its extension) that can be written, in an existing folder."""
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'reconstruction.png')}")
    Image.init()
    ext = os.path.splitext(path)[1].lower()
    writable = sorted(e for e, f in Image.registered_extensions().items() if f in PICTURE_FORMATS and f in Image.SAVE)
    if ext not in writable:
        fail(f"{flag} {path}: '{ext}' is not a picture format this can write; use one of {', '.join(writable)}")
    _check_file_target(path, flag, "reconstruction.png")


def check_json_output(path: str, flag: str, append: bool = False) -> None:
    """``path`` can take the JSON file a command writes when its work is done, checked before the
    work. With ``append`` (JSON lines added to the file), the lines already there must be JSON too."""
    _check_file_target(path, flag, "results.json")
    if append and os.path.isfile(path):
        _check_json_lines(path, flag)


def _check_json_lines(path: str, flag: str) -> None:
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        fail(f"{flag} {path} cannot be read ({e.strerror}); it is added to, so it must be readable: give another name")
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
            f"back as training images; choose an {flag} outside the data"
        )


def temporary_path(path: str) -> str:
    """Where ``atomic_write`` writes ``path`` before renaming it: the process id tells a temporary
    file of a writer still at work from one that a killed process left behind."""
    return f"{path}.tmp{os.getpid()}"


_TEMPORARY = re.compile(r"^(.+)\.tmp(\d*)$")


def stale_temporary_of(name: str) -> str | None:
    """The file name that ``name`` is a temporary file of, when a process other than this one left
    it (``checkpoint-3.pth.tmp1234`` -> ``checkpoint-3.pth``, or ``.tmp`` of earlier versions); else None."""
    m = _TEMPORARY.match(name)
    if not m or m.group(2) == str(os.getpid()):
        return None
    return m.group(1)


def remove_stale_temporaries(folder: str, of: Callable[[str], object]) -> None:
    """Delete the temporary files in ``folder`` that killed processes left of the files whose names ``of`` accepts."""
    for name in os.listdir(folder):
        if of(stale_temporary_of(name) or "") and os.path.isfile(path := os.path.join(folder, name)):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                os.remove(path)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, flush it to disk, then rename it
    over ``path``: every file this project writes goes through here. A failed write (a full disk)
    raises its ``OSError`` and leaves ``path`` as it was; the folder is synced so that the rename
    survives a power loss."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    sync_folder(os.path.dirname(os.path.abspath(path)))


def sync_folder(path: str) -> None:
    """Flush the folder ``path`` to disk, so that a rename in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_append(path: str, text: str) -> None:
    """Add ``text`` at the end of ``path`` (created if missing) by writing the whole (small) file
    anew through ``atomic_write``: a full disk leaves the old lines rather than a torn last one."""
    old = Path(path).read_bytes() if os.path.exists(path) else b""
    if old and not old.endswith(b"\n"):  # a line torn by an older version: ours starts on its own line
        old += b"\n"
    data = old + text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def reported(path: str, what: str) -> Iterator[None]:
    """Turn an ``OSError`` of writing ``path`` (named by the flag ``what``) with ``atomic_write`` into one line."""
    try:
        yield
    except OSError as e:
        fail(
            f"{what} {path}: cannot write it ({e.strerror or e}); the file is left as it was: free some space "
            f"or give another path"
        )
