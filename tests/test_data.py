"""util.data.datasets and loaders: folder layouts, image modes, and the seeded, sharded sampling that makes runs
independent of the number of workers and of where a resumed run picks up."""

import gc
import hashlib
import os
import pickle
import random
import re
import tracemalloc
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import CLASSES, make_dataset, make_split, recorded_calls
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms

import main_finetune
import main_linprobe
from util.cli.errors import UserError
from util.data import datasets as datasets_module
from util.data import sampling
from util.data.compact import PathList
from util.data.datasets import ImageFiles, classification_splits, load_rgb, name_digest, pretrain_dataset
from util.data.fast_crop import FastRandomResizedCropFlip
from util.data.loaders import eval_transform, pretrain_transform, train_loader
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from util.data.sampling import SeededDataset, SeededSampler, ShardSampler
from util.train import distributed


# ---------------------------------------------------------------------------------------------
# Layouts
@pytest.mark.parametrize("layout", ["train", "classes", "flat", "nested"])
def test_pretrain_dataset_layouts(tmp_path, layout):
    root = make_dataset(tmp_path / "d", 4, layout=layout)
    (root / "README.txt").write_text("not an image")
    dataset = pretrain_dataset(str(root), pretrain_transform(32))
    assert len(dataset) == 12
    assert dataset.files == sorted(dataset.files)
    assert all(Path(f).suffix == ".jpg" for f in dataset.files)
    img, label = dataset[5]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 0
    if layout == "train":
        assert Path(dataset.root) == root / "train"


def test_pretrain_dataset_prefers_train_split(tmp_path):
    make_dataset(tmp_path / "train", 2)
    make_dataset(tmp_path / "val", 3)
    dataset = pretrain_dataset(str(tmp_path), pretrain_transform(32))
    assert len(dataset) == 6 and all("/train/" in f for f in dataset.files)


def test_pretrain_dataset_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="--data_path .*missing"):
        pretrain_dataset(str(tmp_path / "missing"), pretrain_transform(32))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        pretrain_dataset(str(tmp_path / "empty"), pretrain_transform(32))


def test_pretrain_data_path_that_is_an_image_or_a_device_says_what_to_give(tmp_path):
    """An image was read as a list file ("is not a text file"); /dev/null as a folder that could not
    be listed ("make it readable, or move it out of the data folder")."""
    image = make_dataset(tmp_path / "d", 1, layout="flat") / f"{CLASSES[0]}_0000.jpg"
    with pytest.raises(UserError, match=rf"^--data_path {image} is an image; give the folder that holds the images"):
        pretrain_dataset(str(image), pretrain_transform(32))
    with pytest.raises(UserError, match=r"^--data_path /dev/null is neither a folder nor a list file; give a folder"):
        pretrain_dataset("/dev/null", pretrain_transform(32))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"^--data_path {root}/missing does not exist; give the folder that holds train/ and val/"),
        ("no_classes", r"^{root}/no_classes/train: no class folders in it; put each class's images in a folder"),
        ("empty_class", r"^{root}/empty_class/train: the class folder cat holds no images; add its images, or remove"),
        ("two_classes", r"^{root}/two_classes/train has 2 class folders but --nb_classes is 3; give --nb_classes 2$"),
    ],
)
def test_classification_folder_errors_say_what_to_do(tmp_path, case, message):
    root = tmp_path / "r"
    if case == "no_classes":
        (root / case / "train").mkdir(parents=True)
    elif case == "empty_class":
        make_split(root / case, 1, 1)
        (root / case / "train" / "cat" / "0000.jpg").unlink()
    elif case == "two_classes":
        make_split(root / case, 1, 1)
        for split in ("train", "val"):
            for f in (root / case / split / "ship").iterdir():
                f.unlink()
            (root / case / split / "ship").rmdir()
    with pytest.raises(UserError, match=message.format(root=root)):
        classification_splits(str(root / case), None, None, nb_classes=3)


def test_uppercase_extensions_count(tmp_path):
    make_dataset(tmp_path, 1, layout="flat")
    first = sorted(tmp_path.iterdir())[0]
    first.rename(first.with_suffix(".JPG"))
    assert len(ImageFiles(str(tmp_path))) == 3


def _hide_things_in(split: Path) -> None:
    """What a Mac and a notebook leave in a data folder: AppleDouble '._' files (not images, under an
    image's extension) beside every image, and a hidden folder that holds a real image."""
    for image in list(split.rglob("*.jpg")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (split / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(split / ".ipynb_checkpoints" / "copy.jpg")


def test_hidden_files_and_folders_are_not_data(tmp_path, capsys):
    """Before, a '._x.jpg' stopped pre-training when the loader reached it, and '.ipynb_checkpoints'
    became class 0 of a classification folder, shifting every label by one."""
    root = make_split(tmp_path / "d", 2, 1)  # train/ and val/ of 3 classes
    clean = pretrain_dataset(str(root), None).files
    for split in ("train", "val"):
        _hide_things_in(root / split)
    assert pretrain_dataset(str(root), None).files == clean
    warned = capsys.readouterr().out
    assert f"warning: skipping 7 hidden file(s) and folder(s) in {root / 'train'} " in warned  # 6 '._' files, 1 folder
    train, val = classification_splits(str(root), None, None, nb_classes=3)
    assert train.classes == val.classes == sorted(CLASSES)
    assert [label for _, label in train.samples] == [0, 0, 1, 1, 2, 2]
    assert [path for path, _ in train.samples] == clean


# ---------------------------------------------------------------------------------------------
# Image modes
def _gradient(size: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def _save(tmp: Path, mode: str) -> tuple[Path, np.ndarray]:
    """An image in ``mode`` and the RGB pixels it should read as."""
    g = _gradient()
    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    if mode == "L":
        img, expected, name = Image.fromarray(g, "L"), np.stack([g] * 3, -1), "gray.png"
    elif mode == "LA":
        img = Image.fromarray(np.stack([g, np.full_like(g, 128)], -1), "LA")
        expected, name = np.stack([g] * 3, -1), "gray_alpha.png"
    elif mode == "RGBA":
        img = Image.fromarray(np.concatenate([rgb, np.full_like(g, 77)[..., None]], -1), "RGBA")
        expected, name = rgb, "rgba.png"
    elif mode == "P":
        img = Image.fromarray(rgb, "RGB").quantize(16)
        expected, name = np.asarray(img.convert("RGB")), "palette.png"
    elif mode == "P_transparent":
        img = Image.fromarray(rgb, "RGB").quantize(16)
        img.info["transparency"] = 0
        expected, name = np.asarray(img.convert("RGB")), "palette_transparent.png"
    elif mode == "CMYK":
        img = Image.fromarray(rgb, "RGB").convert("CMYK")
        name = "cmyk.jpg"
        img.save(tmp / name, quality=100)
        with Image.open(tmp / name) as saved:
            assert saved.mode == "CMYK"
            expected = np.asarray(saved.convert("RGB"))
        return tmp / name, expected
    elif mode == "I;16":
        wide = g.astype(np.uint16) * 257  # the same picture at 16 bits
        img, expected, name = Image.fromarray(wide), np.stack([g] * 3, -1), "gray16.png"
    else:
        raise ValueError(mode)
    img.save(tmp / name)
    return tmp / name, expected


MODES = ["L", "LA", "RGBA", "P", "P_transparent", "CMYK", "I;16"]


@pytest.mark.parametrize("mode", MODES)
def test_images_of_any_mode_read_as_rgb(tmp_path, mode):
    path, expected = _save(tmp_path, mode)
    with Image.open(path) as original:
        assert original.mode == mode.split("_")[0], "the test image must really be in that mode"
    img = load_rgb(str(path))
    assert img.mode == "RGB" and img.size == (32, 32)
    error = int(np.abs(np.asarray(img).astype(int) - expected.astype(int)).max())
    assert error <= 1, f"{mode}: pixels changed by up to {error} (of 255)"
    tensor, _ = ImageFiles(str(tmp_path), eval_transform(32))[0]
    assert tensor.shape == (3, 32, 32)


@pytest.mark.parametrize("mode", MODES)
def test_fast_loader_reads_any_mode_as_rgb(tmp_path, mode):
    """--loader fast: the image reaches the transform undecoded; a crop of the whole image
    (scale and ratio 1) must give the image's own RGB pixels, possibly flipped."""
    path, expected = _save(tmp_path, mode)
    dataset = ImageFiles(str(tmp_path), FastRandomResizedCropFlip(32, scale=(1.0, 1.0), ratio=(1.0, 1.0)), lazy=True)
    tensor, _ = dataset[0]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8
    got = tensor.permute(1, 2, 0).numpy().astype(int)
    error = min(int(np.abs(got - e.astype(int)).max()) for e in (expected, expected[:, ::-1]))
    assert error <= 1, f"{mode}: pixels changed by up to {error} (of 255)"
    # The training transform proper, at another size: 3 channels, uint8.
    big, _ = ImageFiles(str(tmp_path), pretrain_transform(16, "fast"), lazy=True)[0]
    assert big.shape == (3, 16, 16) and big.dtype == torch.uint8


@pytest.mark.parametrize("fast", [False, True], ids=["torchvision", "fast"])
def test_corrupt_image_error_names_the_file(tmp_path, fast):
    make_dataset(tmp_path, 1, layout="flat")
    good = sorted(tmp_path.iterdir())[0].read_bytes()
    (tmp_path / "broken.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    dataset = ImageFiles(str(tmp_path), pretrain_transform(32, "fast" if fast else "torchvision"), lazy=fast)
    for name in ("broken.jpg", "garbage.png"):
        with pytest.raises(UserError) as err:
            dataset[dataset.files.index(str(tmp_path / name))]
        assert name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fast", [False, True], ids=["torchvision", "fast"])
def test_an_image_removed_after_the_listing_is_said_to_be_gone(tmp_path, fast):
    """Deleted under a running job (a colleague's cleanup, a data folder moved): the error said "(FileNotFoundError:
    [Errno 2] No such file or directory: '<the path again>'); remove or replace the file", advice for a damaged file
    that no longer applies (found by deleting an image under a running pre-training)."""
    make_dataset(tmp_path, 1, layout="flat")
    dataset = ImageFiles(str(tmp_path), pretrain_transform(32, "fast" if fast else "torchvision"), lazy=fast)
    os.remove(dataset.files[0])
    gone = (
        rf"^image {re.escape(dataset.files[0])} is gone: it was listed when the run started, and removed or moved "
        rf"since; put it back, or start again \(a training run with --resume auto\), which lists the data afresh$"
    )
    with pytest.raises(UserError, match=gone):
        dataset[0]


@pytest.mark.parametrize("fast", [False, True], ids=["torchvision", "fast"])
def test_a_dangling_link_in_the_data_folder_is_named_as_one(tmp_path, fast):
    """A link whose target is missing is listed by the folder's scan: it was said to be 'gone since' the listing,
    with the advice to start again, whose listing took it again (found with a link to a removed file)."""
    make_dataset(tmp_path, 1, layout="flat")
    os.symlink(tmp_path / "removed.jpg", tmp_path / "zz_link.jpg")
    dataset = ImageFiles(str(tmp_path), pretrain_transform(32, "fast" if fast else "torchvision"), lazy=fast)
    link = dataset.files[-1]
    assert link.endswith("zz_link.jpg")
    target = os.path.realpath(tmp_path / "removed.jpg")
    dangling = (
        rf"^image {re.escape(link)} is a link to {re.escape(target)}, which does not exist; "
        rf"remove the link, or put the file it points to back$"
    )
    with pytest.raises(UserError, match=dangling):
        dataset[len(dataset) - 1]


@pytest.mark.parametrize("loader", ["torchvision", "fast"])
def test_the_pretraining_crop_is_the_officials(loader):
    """Random resized crop of 0.2 to 1 of the area, aspect 3/4 to 4/3, bicubic; then flip (the official recipe)."""
    transform = pretrain_transform(32, loader)
    crop = transform if loader == "fast" else transform.transforms[0]
    assert (tuple(crop.scale), tuple(crop.ratio)) == ((0.2, 1.0), (3 / 4, 4 / 3))
    if loader == "torchvision":
        assert crop.interpolation == transforms.InterpolationMode.BICUBIC
        assert isinstance(transform.transforms[1], transforms.RandomHorizontalFlip)


# ---------------------------------------------------------------------------------------------
# Seeded sampling
def _loader_args(workers: int, batch: int = 8, seed: int = 0) -> Namespace:
    return Namespace(batch_size=batch, seed=seed, num_workers=workers, pin_mem=False, device="cpu", input_size=32)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("seeded"), 8)  # 24 images


def _classifier_transform(entry_point: ModuleType) -> Callable:
    """The training augmentation of ``main_finetune`` or ``main_linprobe`` at 32 px, with its defaults: fine-tuning's
    RandAugment draws from numpy's and python's generators and its random erasing from torch's, which the
    pre-training crops (python's or torch's alone) leave untested."""
    args = entry_point.get_args_parser().parse_args(["--input_size", "32"])
    args.in_chans, args.mean, args.std = 3, list(IMAGENET_MEAN), list(IMAGENET_STD)  # what run.start settles
    return entry_point.build_train_transform(args)


@pytest.fixture(scope="module", params=["torchvision", "fast", "finetune", "linprobe"])
def images(request, image_root) -> ImageFiles:
    if request.param in ("finetune", "linprobe"):
        entry_point = main_finetune if request.param == "finetune" else main_linprobe
        return pretrain_dataset(str(image_root), _classifier_transform(entry_point))
    fast = request.param == "fast"
    return pretrain_dataset(str(image_root), pretrain_transform(32, request.param), lazy=fast)


def _epoch(loader, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch, skip=skip)
    return [imgs for imgs, _ in loader]


def test_samples_do_not_depend_on_workers_or_skip(images):
    inline = train_loader(images, _loader_args(0))
    workers = train_loader(images, _loader_args(2))
    first = _epoch(inline, 1)
    assert len(first) == 3
    # Twice with persistent workers too: set_epoch must reach them.
    for _ in range(2):
        for a, b in zip(first, _epoch(workers, 1), strict=True):
            assert torch.equal(a, b)
    # A run resumed after one batch sees exactly the rest.
    for a, b in zip(first[1:], _epoch(workers, 1, skip=8), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first[2:], _epoch(inline, 1, skip=16), strict=True):
        assert torch.equal(a, b)
    # Another epoch: another order and other augmentations; another run seed: other samples.
    assert not torch.equal(torch.cat(first), torch.cat(_epoch(inline, 2)))
    other_seed = train_loader(images, _loader_args(0, seed=1))
    assert not torch.equal(torch.cat(first), torch.cat(_epoch(other_seed, 1)))


def test_augmentation_depends_on_epoch_and_index_only(images):
    dataset = SeededDataset(images)
    sampler = SeededSampler(len(images), seed=0)
    sampler.set_epoch(3)
    pairs = dict(sampler)  # index -> sample seed
    assert sorted(pairs) == list(range(len(images)))
    index = 5
    a, _ = dataset[(index, pairs[index])]
    b, _ = dataset[(index, pairs[index])]
    assert torch.equal(a, b)
    sampler.set_epoch(4)
    c, _ = dataset[(index, dict(sampler)[index])]
    assert not torch.equal(a, c), "the same image must be augmented differently in another epoch"


def test_seeded_dataset_leaves_global_generators_alone(images):
    dataset = SeededDataset(images)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    dataset[(0, 123)]
    dataset[(1, 456)]
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])


def test_seeded_dataset_leaves_accelerator_generators_alone(images, monkeypatch):
    """Per-sample seeding touches the CPU generators only: with num_workers 0 on a GPU, reseeding
    the CUDA generator would tie the masks to the last image's seed (and torch.manual_seed
    records a stack trace per call, which cost milliseconds per image)."""

    def forbidden(seed):
        raise AssertionError("SeededDataset seeded an accelerator generator")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    a, _ = SeededDataset(images)[(3, 99)]
    b, _ = SeededDataset(images)[(3, 99)]
    assert torch.equal(a, b)


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


@pytest.mark.parametrize("world", [2, 3])
def test_seeded_sampler_shards_cover_all_with_rank_independent_seeds(monkeypatch, world):
    n = 10
    whole = SeededSampler(n, seed=7)
    whole.set_epoch(2)
    seeds = dict(whole)
    shards = []
    for r in range(world):
        _as_rank(monkeypatch, r, world)
        sampler = SeededSampler(n, seed=7)
        sampler.set_epoch(2)
        shard = list(sampler)
        assert len(shard) == len(sampler) == -(-n // world)
        assert all(seeds[i] == s for i, s in shard), "a sample's seed must not depend on the rank"
        shards.append([i for i, _ in shard])
    flat = [i for shard in shards for i in shard]
    assert set(flat) == set(range(n))
    assert len(flat) - n < world  # padding only to equal shares
    # Shards are disjoint apart from the padding.
    assert len(set(shards[0]) & set(shards[1])) <= len(flat) - n


@pytest.mark.parametrize("world, rank", [(1, 0), (3, 2)])
def test_seeded_sampler_is_distributed_samplers_order_with_the_seeds_of_its_indices(monkeypatch, world, rank):
    """The pairs are made a few at a time (below, 4): in DistributedSampler's order, from ``skip`` on,
    each with ``sample_seeds`` of its index, across every chunk's boundary."""
    monkeypatch.setattr(sampling, "PAIRS_PER_CHUNK", 4)
    _as_rank(monkeypatch, rank, world)
    for n, skip in ((0, 0), (1, 0), (9, 0), (23, 0), (23, 3), (23, 8)):
        reference = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=5)
        reference.set_epoch(3)
        indices = list(reference)[skip:]
        sampler = SeededSampler(n, seed=5)
        sampler.set_epoch(3, skip=skip)
        seeds = sampling.sample_seeds(5, 3, np.array(indices, dtype=np.int64)).tolist()
        assert list(sampler) == list(zip(indices, seeds, strict=True)) and len(sampler) == len(indices)


def test_seeded_sampler_holds_no_more_than_distributed_sampler_at_an_epoch_start():
    """One process over 14M images (ImageNet-21k) held 1.25 GB at each epoch's start, where
    DistributedSampler alone holds 0.65: four lists of every pair's Python objects at once."""

    def peak(make) -> int:
        sampler = make()
        sampler.set_epoch(1)
        tracemalloc.start()
        try:
            next(iter(sampler))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    n = 300_000
    ours = peak(lambda: SeededSampler(n, seed=0))
    theirs = peak(lambda: DistributedSampler(range(n), num_replicas=1, rank=0, seed=0))
    assert ours < 1.3 * theirs


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_covers_every_index_exactly_once(monkeypatch, n, world):
    seen = []
    for r in range(world):
        _as_rank(monkeypatch, r, world)
        sampler = ShardSampler(n)
        assert len(sampler) == len(list(sampler))
        seen += list(sampler)
    assert sorted(seen) == list(range(n))


def test_train_loader_refuses_batch_larger_than_data(images, monkeypatch):
    with pytest.raises(UserError, match="--batch_size 25"):
        train_loader(images, _loader_args(0, batch=25))
    _as_rank(monkeypatch, 0, 2)
    with pytest.raises(UserError, match="--batch_size 13 x 2"):
        train_loader(images, _loader_args(0, batch=13))


def test_the_names_digest_is_sha1_of_the_joined_names_hashed_a_chunk_at_a_time(monkeypatch):
    """Joined at once, 14M names (ImageNet-21k) held 700 MB of text and bytes on every rank, twice
    at start-up (the ranks' comparison and the checkpoint's record); the digest must not change."""
    names = [f"n{i:08d}_{i}.JPEG {i % 1000}" for i in range(1_000_000)]
    joined = "\n".join(names).encode()
    tracemalloc.start()
    try:
        digest = name_digest(iter(names))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha1(joined).hexdigest()
    assert peak < len(joined) / 4  # a chunk of 65,536 names (1.5 MB), not the 25 MB of all
    monkeypatch.setattr(datasets_module, "NAMES_PER_UPDATE", 2)  # every boundary of small chunks
    for count in range(6):
        few = ["a", "b c", "caf\udce9.jpg", "", "d", "e"][:count]  # a name not UTF-8 on disk, an empty one
        assert name_digest(few) == hashlib.sha1("\n".join(few).encode(errors="surrogateescape")).hexdigest()


def _objects_reachable(root: object) -> int:
    """How many Python objects ``root`` holds, itself included (what gc can see below it)."""
    seen, todo = {id(root)}, [root]
    while todo:
        for referent in gc.get_referents(todo.pop()):
            if id(referent) not in seen and not isinstance(referent, type):
                seen.add(id(referent))
                todo.append(referent)
    return len(seen)


def test_the_pretraining_files_are_held_without_an_object_per_file(tmp_path):
    """A list held an object per path, whose reference count each loader worker writes as it reads
    it: fork's shared pages were copied into every worker (17 MB of a worker's own after 60 batches
    of 200,000 images, 32 MB after 1,500; with a PathList 10-11 MB after either)."""
    names = [f"{i:04d}.jpg" for i in range(300)]
    listed = ImageFiles(str(tmp_path), files=[str(tmp_path / n) for n in names])
    assert _objects_reachable(listed.files) < 10
    assert list(listed.files) == [str(tmp_path / n) for n in names] == listed.files
    assert listed.files[-1] == str(tmp_path / names[-1]) and listed.files[5:8] == [
        str(tmp_path / n) for n in names[5:8]
    ]
    assert pickle.loads(pickle.dumps(listed)).files == listed.files
    with pytest.raises(IndexError):
        listed.files[300]


def test_the_classification_samples_are_held_without_an_object_per_image(tmp_path):
    """Fine-tuning's and probing's workers read ``samples[i]``: a list of (path, label) tuples was
    copied into each worker as for pre-training's paths, up to the whole list per worker."""
    root = make_split(tmp_path / "folders", 8, 1)
    listed = tmp_path / "train.txt"
    expected = [
        (str(root / "train" / cls / p.name), label)
        for label, cls in enumerate(CLASSES)
        for p in sorted((root / "train" / cls).iterdir())
    ]
    lines = [f"{os.path.relpath(path, tmp_path)} {label}" for path, label in expected]
    listed.write_text("\n".join(lines) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(lines[:4]) + "\n")
    folders, _ = classification_splits(str(root), None, None, nb_classes=len(CLASSES))
    from_list, _ = classification_splits(str(tmp_path), None, None, nb_classes=len(CLASSES))
    for dataset in (folders, from_list):
        assert _objects_reachable(dataset.samples) < 10  # a list: over 40
        assert dataset.samples == expected and list(dataset.samples) == expected
        assert [dataset.samples[i] for i in (0, -1)] == [expected[0], expected[-1]] and dataset.samples[
            1:3
        ] == expected[1:3]
        assert dataset.targets == [label for _, label in expected] and len(dataset) == len(expected)
        assert pickle.loads(pickle.dumps(dataset)).samples == expected
        assert dataset[len(expected) - 1][1] == expected[-1][1]
    assert folders.imgs is folders.samples


def test_a_path_list_gives_back_names_that_are_not_utf8_as_they_were():
    odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes on disk: a str with a surrogate
    paths = PathList(["", "a/b.jpg", odd, "é/ü.png"])
    assert (
        list(paths) == ["", "a/b.jpg", odd, "é/ü.png"] and paths[2] == odd and os.fsencode(paths[2]) == b"caf\xe9.jpg"
    )
    assert paths != ["", "a/b.jpg", odd] and paths != "abc" and PathList([]) == []


def test_scanning_class_folders_does_not_resolve_the_data_folder_once_per_class(tmp_path):
    """Each class folder's walk resolved the split's folder (os.path.realpath: a look-up of every
    folder on its path) though only a link needs it: 4 or 5 look-ups per class, 100,000 for
    ImageNet-21k's 21,841 classes on every rank, each a round trip on a network file system."""
    root = make_split(tmp_path / "data", 1, 1)
    with recorded_calls(os, "lstat") as looked_up:
        train, val = classification_splits(str(root), None, None, nb_classes=len(CLASSES))
    assert len(train) == len(val) == len(CLASSES)
    assert sorted(looked_up) == sorted(str(root / split / cls) for split in ("train", "val") for cls in CLASSES)
