"""Datasets shared by the entry points: image folders and list files (read: lists.py) for pre-training
and classification, the same on every rank, and the digest of their files. Their transforms and the loaders
over them: loaders.py."""

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, is_image_file

from util.cli.errors import UserError, fail
from util.cli.log import log
from util.data.compact import LabelledPaths, PathList
from util.data.images import load_rgb, unreadable
from util.data.lists import LIST_FILES, ClassIndices, list_file_in, read_image_list
from util.train import distributed


def is_hidden(name: str) -> bool:
    """A name that begins with '.': never data. macOS writes '._<name>' beside every file it copies to
    other disks (its metadata, under an image's extension), notebooks leave '.ipynb_checkpoints'."""
    return name.startswith(".")


def warn_hidden(hidden: Sequence[str], where: str) -> None:
    """One warning for the hidden files and folders a listing of ``where`` skipped, if any."""
    if hidden:
        shown = ", ".join(sorted(hidden)[:3]) + (", ..." if len(hidden) > 3 else "")
        count = f"{len(hidden)} hidden file(s) and folder(s)"
        log.warning(f"skipping {count} in {where} (names beginning with '.'): {shown}")


def image_walk(top: str, inside: str, hidden: list[str] | None = None) -> Iterator[tuple[str, list[str]]]:
    """(folder, image names) for ``top`` and every folder below it, like ``os.walk``, inside the data
    folder ``inside``. Hidden folders and image files (``is_hidden``) are skipped, their paths added
    to ``hidden``. A link to a file is read wherever it points; a link to a folder never is:
    inside ``inside`` its folder is read under its own name already (following it would count its
    images twice, or without end for a link to ``.``), so it is skipped with a warning; outside,
    images from elsewhere would join the data unannounced, so the run stops."""
    hidden = [] if hidden is None else hidden

    def skip_link(path: str) -> None:
        # Resolved only here: the walk runs once per class folder, and resolving the data folder
        # looks up each folder of its path (4 or 5 look-ups per class, 100k for ImageNet-21k's).
        boundary, real = os.path.realpath(inside), os.path.realpath(path)
        if os.path.commonpath([boundary, real]) != boundary:
            fail(
                f"{path} is a link to {real}, outside the data folder {inside}; links are followed only "
                f"inside it: copy the images in, or remove the link"
            )
        log.warning(f"skipping {path}, a link to {real}: that folder is read under its own name")

    if top != inside and os.path.islink(top):
        skip_link(top)
        return
    # Lists links to folders, but does not descend into them; without onerror it would skip a folder
    # it cannot list, and its images, unannounced.
    for folder, dirs, names in os.walk(top, onerror=unlisted_folder):
        hidden += [os.path.join(folder, n) for n in dirs + names if is_hidden(n) and (n in dirs or is_image_file(n))]
        dirs[:] = [d for d in dirs if not is_hidden(d)]  # (os.walk descends into what is left)
        for d in sorted(dirs):
            if os.path.islink(os.path.join(folder, d)):
                skip_link(os.path.join(folder, d))
        yield folder, sorted(n for n in names if is_image_file(n) and not is_hidden(n))


def unlisted_folder(error: OSError) -> NoReturn:
    """A one-line error for a data folder that cannot be listed (no permission, most often)."""
    what = f"cannot list the folder {error.filename} ({error.strerror})"
    fail(f"{what}; make it readable, or move it out of the data folder")


class ImageFiles(Dataset):
    """Every image file below a folder (class folders, nested or flat), sorted, with label 0: for
    pre-training. With ``files``, exactly those files in that order (``root``: their list file).
    With ``lazy`` the transform receives the file's path and reads it itself (util/data/fast_crop.py)."""

    def __init__(
        self,
        root: str,
        transform: Callable | None = None,
        lazy: bool = False,
        files: Sequence[str] | None = None,
        loader: Callable[[str], Any] = load_rgb,
    ):
        self.root, self.transform, self.lazy, self.loader = root, transform, lazy, loader
        if files is not None:
            self.files: Sequence[str] = PathList(files)
        else:
            hidden: list[str] = []
            self.files = PathList(
                sorted(os.path.join(d, n) for d, names in image_walk(root, root, hidden) for n in names)
            )
            warn_hidden(hidden, root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.files[index]
        return transformed(path, path if self.lazy else self.loader(path), self.transform), 0


def transformed(path: str, img: Any, transform: Callable | None) -> Any:
    """``transform(img)`` of the image of file ``path``, every failure a one-line error naming the
    file: the transform's own errors (prefixed with the file), a bad file (Pillow and torchvision
    raise many types), and memory that ran out, which is not the file's fault."""
    if transform is None:
        return img
    try:
        return transform(img)
    except UserError as e:
        fail(str(e) if path in str(e) else f"image {path}: {e}")
    except MemoryError:
        fail(
            f"memory ran out while preparing image {path} (the file is not at fault): other processes or "
            f"this run's loader workers hold the rest; lower --num_workers or --input_size"
        )
    except Exception as e:
        fail(unreadable(path, e))


class ListedImages(Dataset):
    """A labelled list file (``read_image_list``) as an ImageFolder-like data set: ``samples``,
    ``targets`` and ``classes`` (the indices as names, ``'0'``, ``'1'``, ...), in the list's order."""

    def __init__(
        self,
        list_path: str,
        transform: Callable | None,
        nb_classes: int | None,
        loader: Callable[[str], Any] = load_rgb,
        resumed_from: str = "",
    ):
        self.root, self.transform, self.loader = list_path, transform, loader
        self.samples = LabelledPaths(read_image_list(list_path, True, nb_classes, resumed_from))
        self.targets = list(self.samples.labels)
        self.classes = ClassIndices(nb_classes or max(self.targets) + 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return transformed(path, self.loader(path), self.transform), label


def pretrain_dataset(
    data_path: str, transform: Callable, lazy: bool = False, loader: Callable[[str], Any] = load_rgb
) -> ImageFiles:
    """``<data_path>/train`` if it exists (the official layout), else ``<data_path>/train.txt`` if
    that exists, else ``<data_path>`` itself; or ``data_path`` is a list file."""
    if os.path.isfile(data_path) and is_image_file(data_path):  # (read as a list file: "not a text file")
        fail(f"--data_path {data_path} is an image; give the folder that holds the images, or a list file")
    if os.path.exists(data_path) and not (os.path.isfile(data_path) or os.path.isdir(data_path)):  # /dev/null
        fail(f"--data_path {data_path} is neither a folder nor a list file; give a folder of images or a list file")
    train = os.path.join(data_path, "train")
    list_path = data_path if os.path.isfile(data_path) else None
    if os.path.isdir(data_path) and not os.path.isdir(train):
        list_path = list_file_in(data_path, "train")  # None where it has no train.txt: the folder's images
    if list_path is not None:
        files = [path for path, _ in read_image_list(list_path, labelled=False)]
        return same_on_every_rank(ImageFiles(list_path, transform, lazy, files=files, loader=loader), data_path)
    if not os.path.exists(data_path):
        fail(f"--data_path {data_path} does not exist; give a folder of images or a list file")
    root = train if os.path.isdir(train) else data_path
    dataset = ImageFiles(root, transform, lazy, loader=loader)
    if not len(dataset):
        fail(
            f"--data_path {root} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); point it at your image folder"
        )
    return same_on_every_rank(dataset, data_path)


def split_source(data_path: str, split: str, flag: str = "--data_path") -> tuple[bool, str]:
    """Where ``classification_dataset`` reads ``split`` of ``data_path`` (validation: 'val' or 'test'): (True,
    its list file) without a ``train`` folder where ``train.txt`` and ``val.txt`` (or ``test.txt``) are, else
    (False, the folder of its class folders). A layout it cannot read is refused in one line."""
    if os.path.isfile(data_path):
        fail(
            f"{flag} {data_path} is a file; for classification give the folder that holds train.txt and val.txt "
            f"(or train/ and val/ class folders)"
        )
    if not os.path.isdir(data_path):
        what = "is not a folder" if os.path.exists(data_path) else "does not exist"
        fail(f"{flag} {data_path} {what}; give the folder that holds train/ and val/ (or train.txt and val.txt)")
    if not os.path.isdir(os.path.join(data_path, "train")) and list_file_in(data_path, "train"):
        if list_file_in(data_path, "val") is None:  # said before the (long) training list is read
            fail(f"{flag} {data_path} has train.txt but no {' or '.join(LIST_FILES['val'])}; give both lists")
        return True, list_file_in(data_path, split)
    candidates = [split] if split == "train" else ["val", "test"]
    folder = next((os.path.join(data_path, c) for c in candidates if os.path.isdir(os.path.join(data_path, c))), None)
    if folder is None:
        fail(
            f"{flag} {data_path} has no '{'/'.join(candidates)}' folder; "
            f"expected <data_path>/{candidates[0]}/<class>/<image> (or list files train.txt and val.txt)"
        )
    return False, folder


def validation_source(data_path: str, flag: str = "--data_path") -> tuple[bool, str]:
    """Where ``validation_split`` reads the validation images (as ``split_source`` says it): a folder with no
    train/, val/ or test/ folder reads val.txt (or test.txt) alone."""
    split_folders = (os.path.join(data_path, name) for name in ("train", "val", "test"))
    if os.path.isdir(data_path) and not any(map(os.path.isdir, split_folders)):
        if (listed := list_file_in(data_path, "val")) is None:
            fail(
                f"{flag} {data_path} has no val/ or test/ class folders and no val.txt or test.txt list; give the "
                f"folder that holds the validation images"
            )
        return True, listed
    return split_source(data_path, "val", flag)


LISTED = "list files"  # what a rank that reads list files gathers in place of a class folder count


def class_count(data_path: str, evaluating: bool, flag: str = "--data_path") -> tuple[str, int] | None:
    """(where from, how many) of the classes of ``data_path`` for a classifier given no --nb_classes, whose
    resumed head (if any) decides none: the class folders of the training split, or of the validation split
    that --eval reads alone. Only their names are listed (the images are listed once, by the data set), and
    every rank takes the same count. A list file is refused: it cannot tell how many classes exist (a class
    may have no image in it, and the largest label + 1 would then make a head that lacks it). None where the
    data set will refuse the folder: it says why where it is read, after the flags the model checks."""
    count, where = None, data_path
    try:
        listed, where = validation_source(data_path, flag) if evaluating else split_source(data_path, "train", flag)
        if not listed:
            count = len(class_folders(where)[0])
    except (UserError, OSError):  # no such split, no class folder in it, a folder that cannot be listed
        listed = False
    # Compared before a list is refused: a rank that refused alone left the others waiting in the gather.
    seen = distributed.gather(LISTED if listed else count)
    other = next((rank for rank, theirs in enumerate(seen) if theirs != seen[0]), None)
    if other is not None:
        if LISTED in (seen[0], seen[other]):
            theirs, rank_0 = ("list files" if found == LISTED else "class folders" for found in (seen[other], seen[0]))
            differs = f"reads {theirs} there, rank 0 {rank_0}"
        else:  # None: no class folders there
            differs = f"lists {seen[other] or 'no'} class folders in {where}, rank 0 {seen[0] or 'no'}"
        fail(
            f"{flag} {data_path}: rank {other} of {len(seen)} {differs}: every node of the job must see the same "
            f"data; put it on storage every node shares"
        )
    if listed:
        fail(f"{where} cannot tell how many classes there are (a class may have no image in it); give --nb_classes")
    return None if count is None else (f"the class folders of {where}", count)


def class_folders(directory: str) -> tuple[list[str], list[str]]:
    """The class folders of ``directory`` (sorted names) and its hidden folders (paths), which are no classes;
    FileNotFoundError where it has no class folder."""
    with os.scandir(directory) as entries:
        folders = sorted(e.name for e in entries if e.is_dir())
    classes = [f for f in folders if not is_hidden(f)]
    if not classes:
        raise FileNotFoundError("no class folders in it; put each class's images in a folder of its own there")
    return classes, [os.path.join(directory, f) for f in folders if is_hidden(f)]


def classification_dataset(
    data_path: str,
    split: str,
    transform: Callable,
    nb_classes: int | None,
    flag: str = "--data_path",
    loader: Callable[[str], Any] = load_rgb,
    resumed_from: str = "",
) -> datasets.ImageFolder | ListedImages:
    """ImageFolder on ``<data_path>/<split>`` (validation: 'val' or 'test'); without a ``train`` folder,
    the list files ``train.txt`` and ``val.txt`` (or ``test.txt``): ``split_source``. ``nb_classes`` None takes
    any number of classes; ``flag`` names the folder's flag in errors; ``resumed_from``: the checkpoint this
    run resumes, where ``nb_classes`` is the one it was trained on."""
    listed, folder = split_source(data_path, split, flag)
    if listed:
        return ListedImages(folder, transform, nb_classes, loader, resumed_from)
    try:
        dataset = _ImageFolder(folder, transform=transform, loader=loader)
    except PermissionError as e:  # torchvision lists the split's class folders itself
        unlisted_folder(e)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{folder}: {e}")
    if nb_classes is not None and len(dataset.classes) != nb_classes:
        count = len(dataset.classes)
        if resumed_from:  # the folders changed since: its head fits no other --nb_classes
            # Only a training run counts train/ here (its val/ is compared with train/); --eval counts val/ and
            # trains nothing, so it is not told to fine-tune, as ``check_same_classes`` says it.
            afresh = ", or fine-tune afresh into another --output_dir" if split == "train" else ""
            fail(
                f"{folder} has {count} class folders, but {resumed_from}, which this run resumes, was trained on "
                f"{nb_classes}; give the data it was trained on{afresh}"
            )
        fail(f"{folder} has {count} class folders but --nb_classes is {nb_classes}; give --nb_classes {count}")
    return dataset


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, with the files found by ``image_walk`` inside the split's folder
    (torchvision follows every link, so a link loop multiplies the data), and no hidden class
    folders (torchvision makes '.ipynb_checkpoints' a class, shifting every label after it)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, self.hidden = class_folders(directory)
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> LabelledPaths:
        samples = []
        for cls in sorted(class_to_idx):  # torchvision's order: class, then folder, then file
            found = sorted(image_walk(os.path.join(directory, cls), directory, self.hidden))
            files = [os.path.join(folder, n) for folder, names in found for n in names]
            if not files:
                raise FileNotFoundError(f"the class folder {cls} holds no images; add its images, or remove it")
            samples += [(f, class_to_idx[cls]) for f in files]
        warn_hidden(self.hidden, directory)
        return LabelledPaths(samples)  # torchvision keeps it as samples and imgs

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return transformed(path, self.loader(path), self.transform), label


def classification_splits(
    data_path: str,
    train_transform: Callable,
    val_transform: Callable,
    nb_classes: int | None,
    flag: str = "--data_path",
    loader: Callable[[str], Any] = load_rgb,
    resumed_from: str = "",
) -> tuple[datasets.ImageFolder | ListedImages, datasets.ImageFolder | ListedImages]:
    """The training and validation sets of ``data_path``: ImageFolders, or list files. A folder's
    label is its position among the sorted class folders, so both splits must have the same ones (or
    validation images would be scored against the wrong classes); a list's label is the index itself."""
    train = classification_dataset(data_path, "train", train_transform, nb_classes, flag, loader, resumed_from)
    # Class folders: val's are compared with train's below, which were counted against --nb_classes. Counted
    # too, a val split that lacks a class was told to give --nb_classes of its count, which train then refused.
    val_classes = nb_classes if isinstance(train, ListedImages) else None
    val = classification_dataset(data_path, "val", val_transform, val_classes, flag, loader, resumed_from)
    if isinstance(train, ListedImages) and isinstance(val, ListedImages):
        count = max(len(train.classes), len(val.classes))  # without --nb_classes: the largest index + 1
        train.classes = val.classes = ClassIndices(count)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        only_train, only_val = (", ".join(names[:5]) or "none" for names in (only_train, only_val))
        fail(
            f"{flag} {data_path}: train and val have other class folders (only in train: {only_train}; "
            f"only in val: {only_val}); give both the same class folders"
        )
    return same_on_every_rank(train, data_path, flag, "train"), same_on_every_rank(val, data_path, flag, "val")


def validation_split(
    data_path: str,
    transform: Callable,
    nb_classes: int,
    flag: str = "--data_path",
    loader: Callable[[str], Any] = load_rgb,
    resumed_from: str = "",
) -> datasets.ImageFolder | ListedImages:
    """The validation set of ``data_path`` alone, as ``classification_splits`` finds it, for a run that only
    evaluates (--eval): the training split may be absent, so that a machine given the validation images alone
    can score a model. A folder with no train/, val/ or test/ folder then reads val.txt (or test.txt)."""
    listed, where = validation_source(data_path, flag)
    if listed:
        val = ListedImages(where, transform, nb_classes, loader, resumed_from)
    else:
        val = classification_dataset(data_path, "val", transform, nb_classes, flag, loader, resumed_from)
    return same_on_every_rank(val, data_path, flag, "val")


# Names hashed at a time: the digest's memory stays that of a chunk, not of every name joined
# (14M names of ImageNet-21k: 700 MB for the text and its bytes, on every rank).
NAMES_PER_UPDATE = 1 << 16


def name_digest(names: Iterable[str]) -> str:
    """A digest of ``names`` in their order (SHA-1 of the names joined by newlines); a name that is not
    UTF-8 (an old archive's) is hashed as its bytes on disk (surrogateescape)."""
    digest = hashlib.sha1(usedforsecurity=False)
    names, separator = iter(names), ""
    while chunk := list(itertools.islice(names, NAMES_PER_UPDATE)):
        digest.update((separator + "\n".join(chunk)).encode(errors="surrogateescape"))
        separator = "\n"
    return digest.hexdigest()


def listed_files(dataset: Any) -> Sequence[str]:
    """The image files of a data set of this module, in its order."""
    files = getattr(dataset, "files", None)
    if files is not None:
        return files
    samples = dataset.samples
    return samples.paths if isinstance(samples, LabelledPaths) else [path for path, _ in samples]


def paths_inside(files: Sequence[str]) -> Iterator[str]:
    """``files`` as paths inside the folder that holds them all: what names each file in the data, wherever
    the data folder is, and the same for a folder and a list file that names its files. The file's name alone
    is not: CIFAR-10's class folders hold the same names (0000.jpg, ...), so renamed class folders, which
    reorder the files, gave the same names in the same order."""
    if not files:
        return iter(())
    shared = os.path.commonprefix([min(files), max(files)])  # that of all: they sort between these two
    folder = shared[: shared.rfind(os.sep) + 1]
    return (f[len(folder) :] for f in files)


def same_on_every_rank(dataset: Any, data_path: str, flag: str = "--data_path", split: str = "") -> Any:
    """``dataset``, once every rank of a distributed job has listed the same images in it (names in order,
    with their labels): each node lists its own view of the data. Ranks that list different images would
    share out different lists (each image other odds of being trained on) and, with other counts, make
    other numbers of steps: the job hangs at the first collective the longer ones make alone."""
    if not distributed.is_dist():  # one process: nothing to compare with (~1 s of hashing for 1.28M names)
        return dataset
    files = listed_files(dataset)
    labels = getattr(dataset, "targets", None) or [0] * len(files)
    paths = paths_inside(files)  # not the names alone: class folders named otherwise reorder the same names
    mine = (len(files), name_digest(f"{path} {label}" for path, label in zip(paths, labels, strict=True)))
    seen = distributed.gather(mine)
    other = next((rank for rank, listed in enumerate(seen) if listed != seen[0]), None)
    if other is None:
        return dataset
    (count, _), (theirs, _) = seen[0], seen[other]
    differs = f"{theirs} images, rank 0 {count}" if theirs != count else f"other images than rank 0 ({count} each)"
    what = f"{flag} {data_path}" + (f" ({split})" if split else "")
    fail(
        f"{what}: rank {other} of {len(seen)} lists {differs}: every node of the job must see the same data; put it "
        f"on storage every node shares, or the same copy at the same path on each node"
    )
