"""CIFAR-10 as one archive that travels with the working tree to a GPU machine, and its unpacking there.

    python recipes/cifar10_gpu/data.py pack --data ../shared/datasets/cifar10      # here, once
    python recipes/cifar10_gpu/data.py unpack --dest out/cifar10_gpu/cifar10 --splits out/cifar10_gpu/splits

``pack`` writes the 60,000 JPEGs of ``<data>/train`` and ``<data>/test`` into a gzipped tar
(``recipes/cifar10_gpu/data/cifar10.tgz``, git-ignored): 55 MB of JPEGs become about 19 MB, since
every 32-px JPEG repeats the same ~600 bytes of tables, which gzip finds within its window. The
archive is deterministic (sorted names, no times or owners), so packing twice gives the same bytes.
``unpack`` extracts it (once: a marker file says the folder is complete) and builds the CPU study's
held-out and 10%-label splits with ``recipes/cifar10_cpu/splits.py``.
"""

import argparse
import gzip
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from util.atomic import atomic_write  # noqa: E402
from util.cli.errors import fail, run_cli  # noqa: E402

# The CPU study's splits, loaded by path: its folder on sys.path would put its results.py first too.
_spec = importlib.util.spec_from_file_location("cifar10_cpu_splits", HERE.parent / "cifar10_cpu" / "splits.py")
splits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(splits)

ARCHIVE = HERE / "data" / "cifar10.tgz"
# The device tool carries at most 64 MiB of working tree; the rest is the code and the encoder.
MAX_MIB = 40
COMPLETE = ".unpacked"  # written last: its presence means the folder holds the whole archive


def image_files(data: Path) -> list[Path]:
    """The JPEGs of ``data``'s train/ and test/ class folders, relative to ``data``, sorted."""
    files = sorted(p.relative_to(data) for split in ("train", "test") for p in (data / split).glob("*/*.jpg"))
    if not any(p.parts[0] == "train" for p in files) or not any(p.parts[0] == "test" for p in files):
        fail(f"--data {data} needs train/<class>/*.jpg and test/<class>/*.jpg (the CIFAR-10 ImageFolder root)")
    return files


def archive_bytes(data: Path, files: list[Path]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            content = (data / name).read_bytes()
            info = tarfile.TarInfo(name.as_posix())  # mtime, owner and mode left at tarfile's fixed defaults
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def pack(data: Path, archive: Path, max_mib: float = MAX_MIB) -> int:
    """Write the archive; returns its size in bytes. Refuses one that would not leave room in the tree."""
    files = image_files(data)
    blob = archive_bytes(data, files)
    if len(blob) > max_mib * 2**20:
        fail(f"--archive {archive} would be {len(blob) / 2**20:.1f} MiB, over --max_mib {max_mib}: it must travel")
    archive.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(archive), lambda f: f.write(blob))
    print(f"wrote {archive}: {len(files)} images, {len(blob) / 2**20:.1f} MiB")
    return len(blob)


def unpack(archive: Path, dest: Path) -> int:
    """Extract the archive into ``dest`` unless a complete copy is there; returns the image count."""
    if (dest / COMPLETE).exists():
        return int((dest / COMPLETE).read_text())
    if not archive.is_file():
        fail(f"--archive {archive} does not exist: run 'data.py pack' and carry it to this machine")
    # Extraction filters came in Python 3.12 and in the security releases 3.10.12 and 3.11.4; before
    # them extractall takes no filter and would end in a TypeError's traceback.
    if not hasattr(tarfile, "data_filter"):
        fail(f"unpacking --archive {archive} needs tarfile's extraction filters: use Python >= 3.10.12 or >= 3.11.4")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            tar.extractall(dest, filter="data")  # refuses links and paths that leave dest
    except (tarfile.TarError, OSError, EOFError) as e:
        fail(f"--archive {archive} cannot be unpacked ({e}); pack it again")
    atomic_write(str(dest / COMPLETE), lambda f: f.write(str(len(members)).encode()))
    return len(members)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="the .tgz (default: data/cifar10.tgz here)")
    parser.add_argument("--data", type=Path, help="pack: the CIFAR-10 ImageFolder root with train/ and test/")
    parser.add_argument("--max_mib", type=float, default=MAX_MIB, help="pack: refuse a larger archive")
    parser.add_argument("--dest", type=Path, help="unpack: where train/ and test/ go")
    parser.add_argument("--splits", type=Path, help="unpack: where the CPU study's splits go (links into --dest)")
    parser.add_argument("--per_class", type=int, default=500, help="unpack: labelled images per class at 10%%")
    args = parser.parse_args(argv)
    if args.action == "pack":
        if args.data is None:
            fail("pack needs --data, the CIFAR-10 ImageFolder root with train/ and test/")
        pack(args.data, args.archive, args.max_mib)
        return
    if args.dest is None or args.splits is None:
        fail("unpack needs --dest (where the images go) and --splits (where the split folders go)")
    count = unpack(args.archive, args.dest)
    print(f"{args.dest}: {count} images")
    for split, images in splits.make_splits(args.dest, args.splits, args.per_class).items():
        print(f"{args.splits / split}: {images} images")


if __name__ == "__main__":
    run_cli(main)
