"""List files of images: one image per line, '<path>' or '<path> <class index>'; reading them, every
file checked to exist, and the class names they imply."""

import array
import os
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from util.cli.errors import UserError, fail

# The list files a data folder may hold, by split.
LIST_FILES = {"train": ("train.txt",), "val": ("val.txt", "test.txt")}


def read_image_list(
    list_path: str, labelled: bool, nb_classes: int | None = None, resumed_from: str = ""
) -> list[tuple[str, int]]:
    """(file, label) for every line of a list file, in its order; label 0 when unlabelled.

    A line is ``<path>`` or ``<path> <label>``, the label the last field (so paths may contain
    spaces): a class index below ``nb_classes`` when given (``resumed_from``: the checkpoint whose head has
    that many rows, which a label beyond them is told of). Paths are relative to the list's folder;
    blank lines and ``#`` lines are skipped. Unlabelled, a class index after the path is ignored
    (unless the whole line names a file), so a classification list serves pre-training as it is.
    Every file is checked here: a bad line stops the run before training, not hours into an epoch.
    The files are found in one listing of each folder (``shown_as_files``), not looked up one by one.
    """
    lines = _list_lines(list_path)
    parsed = _ParsedList(list_path, lines, labelled)
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parsed.add(number, *_parse_line(line, f"{list_path} line {number}", labelled, nb_classes, resumed_from))
        except UserError:
            parsed.resolve()  # a missing file on an earlier line is said first, as the lines come
            raise
    if not parsed.paths:
        fail(f"the list file {list_path} names no images; write one image path per line")
    return parsed.resolve()


def _list_lines(list_path: str) -> list[str]:
    """The lines of a list file, refused in one line if it cannot be read or is not UTF-8 text."""
    try:
        with open(list_path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"cannot read the list file {list_path} ({e.strerror or e}); make it readable")
    if b"\0" in data:  # an image, say, even one whose bytes happen to be UTF-8: text holds no NUL bytes
        fail(f"{list_path} is not a text file; a list file holds one image path per line")
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the first path
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1  # text in another encoding (Latin-1, ...)
        fail(f"{list_path} line {line} is not UTF-8 text; save the list file as UTF-8")
    # Lines end as on Unix, Windows or old Macs; not at what str.splitlines also takes for a line break
    # (U+2028, U+0085, a form feed...), which a file name may hold.
    return LINE_END.split(text)


LINE_END = re.compile(r"\r\n|\r|\n")


def _parse_line(
    line: str, where: str, labelled: bool, nb_classes: int | None, resumed_from: str = ""
) -> tuple[str, str | None, int]:
    """(name, the name without a trailing class index or None, label) of a list line; labelled, a
    bad label is a one-line error naming ``where``. Unlabelled, a line that ends in a number may
    name a file as a whole or be a file and its label: ``_ParsedList.resolve`` decides, by what exists."""
    fields = line.rsplit(None, 1)
    if not labelled:
        labelled_line = len(fields) == 2 and fields[1].isascii() and fields[1].isdigit()
        return line, fields[0] if labelled_line else None, 0
    if len(fields) < 2:
        fail(f"{where}: no label after {line!r}; each line is '<path> <class index>'")
    name, text = fields
    if not (text.isascii() and text.isdigit()):
        fail(f"{where}: the label {text!r} is not a class index (0, 1, 2, ...)")
    label = int(text)
    if nb_classes is not None and label >= nb_classes and resumed_from:  # its head fits no other --nb_classes
        fail(
            f"{where}: the label {label} is not below the {nb_classes} classes {resumed_from}, which this run "
            f"resumes, was trained on; give the data it was trained on, or correct the label"
        )
    if nb_classes is not None and label >= nb_classes:
        fail(
            f"{where}: the label {label} is not below --nb_classes {nb_classes}; give --nb_classes "
            f"{label + 1} or more, or correct the label"
        )
    return name, None, label


class _ParsedList:
    """The lines of a list file parsed so far, their files not yet checked: paths and labels in
    compact arrays (a list of 14M files must not hold a tuple per line twice)."""

    def __init__(self, list_path: str, lines: list[str], labelled: bool):
        self.list_path, self.lines, self.labelled = list_path, lines, labelled
        self.folder = os.path.dirname(os.path.abspath(list_path))
        self.numbers, self.labels, self.paths = array.array("q"), array.array("q"), []
        self.stripped: list[str | None] = []  # the path without its trailing number, where it ends in one

    def add(self, number: int, name: str, stripped: str | None, label: int) -> None:
        self.stripped.append(None if stripped is None else os.path.join(self.folder, stripped))
        self.numbers.append(number)
        self.labels.append(label)
        self.paths.append(os.path.join(self.folder, name))

    def resolve(self) -> list[tuple[str, int]]:
        """(path, label) of each line, every file checked to exist: the first missing one, in the
        list's order, is a one-line error naming its line. Files are looked for in the listings of
        their folders (``shown_as_files``), looked up one by one only where a listing does not show them."""
        shorts = [p for p in self.stripped if p is not None]
        shown = shown_as_files(self.paths + shorts)
        short_shown = iter(shown[len(self.paths) :])
        samples = []
        for i, (path, short, label) in enumerate(zip(self.paths, self.stripped, self.labels, strict=True)):
            exists = shown[i]
            if short is not None:  # '<path> <number>' unlabelled: the whole line if it names a file
                short_exists = next(short_shown)
                if not exists and (short_exists or not os.path.isfile(path)):
                    path, exists = short, short_exists
            if not (exists or os.path.isfile(path)):
                self.missing(i)
            samples.append((path, label))
        return samples

    def missing(self, i: int) -> NoReturn:
        number = self.numbers[i]
        name, stripped, _ = _parse_line(self.lines[number - 1].strip(), "", self.labelled, None)
        if self.stripped[i] is not None:  # neither the whole line nor its path without the number names a file
            name = stripped
        where = f"{self.list_path} line {number}"
        fail(f"{where}: no file {name} (paths are relative to the list's folder {self.folder})")


# A folder is listed when a list names at least this many of its files; fewer are looked up one
# by one, so that a short list of files in a huge folder does not read the whole folder.
LIST_FOLDER_FROM = 8


def shown_as_files(paths: Sequence[str]) -> bytearray:
    """1 where one listing of each folder that holds many of ``paths`` shows it as a file (a link
    to a file included); 0 where it does not, or where its folder is not listed: the caller
    looks those up with ``os.path.isfile`` (a name spelled otherwise on a case-insensitive disk, a
    folder one may enter but not read). One look-up per file is a round trip to the server on a
    network file system: a list of ImageNet's 1.28M files made that many on every rank."""
    by_folder: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        by_folder.setdefault(os.path.dirname(path), []).append(index)
    shown = bytearray(len(paths))
    for folder, indices in by_folder.items():
        if len(indices) < LIST_FOLDER_FROM:
            continue
        listed = _files_named(folder, {os.path.basename(paths[i]) for i in indices})
        for i in indices:
            shown[i] = os.path.basename(paths[i]) in listed
    return shown


def _files_named(folder: str, names: set[str]) -> set[str]:
    """Those of ``names`` that a listing of ``folder`` shows as files (links to files included);
    none when it cannot be listed (a folder one may enter but not read: its files are looked up)."""
    try:
        with os.scandir(folder or os.curdir) as entries:
            return {e.name for e in entries if e.name in names and e.is_file()}
    except OSError:
        return set()


class ClassIndices(Sequence[str]):
    """The class names of a list file, ``'0'``, ``'1'``, ... up to the largest label, made when asked
    for: a label of 10**8 must not make 10**8 strings before anything can size the run."""

    def __init__(self, count: int):
        self.names = range(count)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [str(i) for i in self.names[index]]
        return str(self.names[index])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClassIndices):
            return self.names == other.names
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash(self.names)

    def __repr__(self) -> str:
        return f"ClassIndices({len(self)})"


def list_file_in(folder: str, split: str) -> str | None:
    """The list file of ``split`` in ``folder`` (train.txt; val.txt or test.txt), if any."""
    return next((os.path.join(folder, n) for n in LIST_FILES[split] if os.path.isfile(os.path.join(folder, n))), None)
