"""Output folders and files: checked before any work (a run must not train for an epoch only to
find that it cannot write its checkpoint), and written atomically (a crash or a full disk leaves
the old file or the complete new one, never a torn one)."""

import os
import tempfile
from collections.abc import Callable
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


def check_output_file(path: str, flag: str) -> None:
    """``path`` names a picture file (by its extension) that can be written, in an existing folder."""
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'reconstruction.png')}")
    Image.init()
    ext = os.path.splitext(path)[1].lower()
    writable = sorted(e for e, f in Image.registered_extensions().items() if f in PICTURE_FORMATS and f in Image.SAVE)
    if ext not in writable:
        fail(f"{flag} {path}: '{ext}' is not a picture format this can write; use one of {', '.join(writable)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: the folder {folder} does not exist; create it first")
    _check_writable(folder, f"{flag} {path}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path} exists and is read-only; remove it or give another name")


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, flush it to disk, then rename it
    over ``path``: every file this project writes goes through here.

    A failed write (a full disk, a quota) raises its ``OSError`` and leaves ``path`` as it was; the
    temporary file is removed. The folder is synced too, so that the rename survives a power loss.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
