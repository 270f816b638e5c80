"""Compact sequences of file paths and (path, label) pairs: one byte string and arrays, no Python
object per item, so that loader workers do not copy them page by page (``PathList`` says why)."""

import array
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

# How the file system's names are bytes: a name that is not UTF-8 comes back as it was (os.fsencode).
_FILE_NAMES = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


class _ListLike(Sequence):
    """A read-only sequence that indexes, slices and compares as a list of its items does (equal to
    such a list); subclasses give ``__len__``, ``__iter__`` and ``_item`` of an index in range."""

    def _item(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._item(i) for i in range(len(self))[index]]
        return self._item(range(len(self))[index])  # negative indices; IndexError past the end

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # (equal to lists, which have none)


class PathList(_ListLike, Sequence[str]):
    """File paths held in one byte string and an array of their ends: no Python object per path.
    In a list, each path is an object whose reference count every loader worker writes as it reads
    the path, so fork's shared pages holding them are copied into each worker in turn: a worker
    held 17 MB of its own after 60 batches of 200,000 images, 32 MB after 1,500 (half an epoch),
    and in time all of ImageNet-21k's 14M paths (GBs) each. Workers started otherwise (spawn,
    forkserver) receive the two buffers, not a pickle of every path."""

    def __init__(self, paths: Iterable[str]):
        data, ends = bytearray(), array.array("q")
        for path in paths:
            data += path.encode(*_FILE_NAMES)
            ends.append(len(data))
        self._data, self._ends = bytes(data), ends

    def __len__(self) -> int:
        return len(self._ends)

    def _item(self, index: int) -> str:
        start = self._ends[index - 1] if index else 0
        return self._data[start : self._ends[index]].decode(*_FILE_NAMES)

    def __iter__(self) -> Iterator[str]:
        data, start = self._data, 0
        for end in self._ends:
            yield data[start:end].decode(*_FILE_NAMES)
            start = end

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


class LabelledPaths(_ListLike, Sequence[tuple[str, int]]):
    """(path, label) pairs held as a ``PathList`` and an array of labels: the ``samples`` of the
    classification data sets, without the tuple, path and label objects per image that every loader
    worker would copy in turn (``PathList`` says why)."""

    def __init__(self, samples: Iterable[tuple[str, int]]):
        pairs = list(samples)
        self.paths = PathList(path for path, _ in pairs)
        self.labels = array.array("q", (label for _, label in pairs))

    def __len__(self) -> int:
        return len(self.labels)

    def _item(self, index: int) -> tuple[str, int]:
        return self.paths[index], self.labels[index]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return zip(self.paths, self.labels, strict=True)

    def __repr__(self) -> str:
        return f"LabelledPaths({len(self)} images)"
