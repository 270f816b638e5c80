"""The one atomic writer, of a file and of a folder: a crash or a full disk leaves the old file (or
folder) or the complete new one, never a torn one; the temporary files a killed process left are
found and removed by name; and a failed write becomes one line."""

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from util.cli.errors import fail


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


def atomic_write_folder(folder: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> content) as the folder ``folder``, complete or not at all: they go
    into a new folder beside it, ``temporary_path('.' + its name)``, which then takes its place. An
    earlier folder is renamed aside first and removed last: a crash between the two renames leaves no
    folder (the old one is then the hidden ``.<name>.old<pid>`` beside it), never a mixed one. A failed
    write raises its ``OSError`` and leaves an earlier folder as it was."""
    parent, base = os.path.split(os.path.abspath(folder))
    tmp = temporary_path(os.path.join(parent, "." + base))  # the name check_folder_output probes
    old = os.path.join(parent, f".{base}.old{os.getpid()}")
    existed = os.path.exists(folder)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had this pid
        os.makedirs(tmp)
        for name, data in files.items():
            atomic_write(os.path.join(tmp, name), lambda f, data=data: f.write(data))
        if existed:
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if existed:
                os.replace(old, folder)
            raise
        sync_folder(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_aside(old)


def _remove_aside(path: str) -> None:
    """Remove the earlier folder renamed aside: a link (a ``folder`` that linked to one: the link is
    replaced, as atomic_write replaces a linked file) is unlinked, where rmtree refuses it and its
    ignored error left the hidden link beside the new folder; its target stays as it was."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
