"""--loader memory: the data set decoded once onto the device, cropped there per batch. Its boxes
follow torchvision's RandomResizedCrop, its pixels the torchvision pipeline's, its order the
seeded sampler's (exact resume, each image once per epoch over the ranks); what cannot be held
is refused in one line."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    assert_crop_boxes_follow_torchvision,
    assert_same,
    demo_files,
    isolated_interrupts,
    load,
    make_dataset,
    noisy_photo,
    one_line_error,
    pretrain_args,
    run_pretrain,
    run_ranks,
)
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from util import memory
from util.cli.errors import UserError
from util.data import memory_loader
from util.data.loaders import pretrain_data
from util.data.memory_loader import RATIO, draw_crops, resized_crops, to_uint8
from util.data.sampling import sample_seeds
from util.train import distributed, interrupt
from util.train.checkpointer import EpochProgress


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), 16)  # 48 CIFAR images


def memory_args(data: Path, out: Path, *extra: str):
    args = pretrain_args(data, out, "--loader", "memory", *extra)
    args.in_chans = 3  # what run.start settles when no checkpoint decides it
    return args


@pytest.mark.parametrize("width,height", [(32, 32), (500, 375), (300, 1200), (2000, 300)])
def test_crop_boxes_and_flips_follow_torchvision(width, height):
    """Area, aspect ratio and position against RandomResizedCrop.get_params, also for images so
    elongated that its central fallback is common; flips with p = 0.5."""
    n = 4000
    ours = draw_crops(sample_seeds(0, 3, np.arange(n)), height, width)
    assert_crop_boxes_follow_torchvision(ours, width, height)
    top, left, h, w, flip = ours.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
    assert abs(flip.mean() - 0.5) < 0.035  # 4.4 standard deviations of 4000 draws


@pytest.mark.parametrize(
    "width,height,scale,ratio",
    [(2000, 300, (1.0, 1.0), RATIO), (300, 1200, (1.0, 1.0), RATIO), (32, 32, (1.0, 1.0), (2.0, 3.0))],
)
def test_boxes_that_never_fit_take_get_params_central_fallback(width, height, scale, ratio):
    """Scales and ratios whose boxes never fit: every draw is get_params' deterministic fallback,
    the central box of the nearest allowed aspect ratio (rounded as it rounds); flips are still drawn."""
    expected = transforms.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), list(scale), list(ratio))
    ours = draw_crops(sample_seeds(0, 0, np.arange(200)), height, width, scale, ratio)
    assert {tuple(row) for row in ours[:, :4].tolist()} == {expected}
    assert 0 < ours[:, 4].sum() < 200


def test_a_samples_crop_depends_on_its_seed_alone():
    seeds = sample_seeds(1, 0, np.arange(64))
    together = draw_crops(seeds, 32, 32)
    order = np.random.default_rng(0).permutation(64)
    assert np.array_equal(draw_crops(seeds[order], 32, 32), together[order])  # another batch, another place
    assert np.array_equal(draw_crops(seeds[5:6], 32, 32), together[5:6])
    assert len({tuple(row) for row in together}) > 50  # different seeds, different crops


def pixel_differences(pils: list[Image.Image], out: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """|ours - torchvision's| per value for the crops drawn for ``pils`` at ``out`` (height, width),
    and those crops; torchvision's RandomResizedCrop + RandomHorizontalFlip on PIL images."""
    images = torch.stack([to_uint8(p) for p in pils])
    height, width = images.shape[2:]
    crops = draw_crops(sample_seeds(0, 0, np.arange(len(pils))), height, width)
    made = resized_crops(images, torch.arange(len(pils)), torch.from_numpy(crops), out)
    assert made.dtype == torch.uint8 and made.shape == (len(pils), 3, *out)
    expected = []
    for pil, (top, left, h, w, flip) in zip(pils, crops.tolist(), strict=True):
        crop = TF.resized_crop(pil, top, left, h, w, list(out), transforms.InterpolationMode.BICUBIC)
        expected.append(to_uint8(TF.hflip(crop) if flip else crop))
    assert 0 < crops[:, 4].sum() < len(pils)  # both flipped and unflipped crops are compared
    return (made.int() - torch.stack(expected).int()).abs().double(), crops


@pytest.mark.parametrize("kind,out", [("cifar", 32), ("cifar", 24), ("cifar", 48), ("photo", 32)])
def test_pixels_are_the_torchvision_pipelines(tmp_path, kind, out):
    """For the same box and flip, torchvision's RandomResizedCrop + RandomHorizontalFlip on PIL
    images (Pillow's antialiased bicubic) gives the same pixels within one level in >= 99.9% of
    values. Pillow rounds to 8 bits between its two passes and Pillow 13 does some shapes vertically
    first (we always go horizontally first, as Pillow up to 12): where that intermediate clips, a
    value can differ by more."""
    if kind == "cifar":
        pils = [Image.open(f).convert("RGB") for f in demo_files(8)]  # 24 photos of 32 x 32
    else:  # larger than the output: boxes are reduced, the filter widened (antialiasing)
        pils = [Image.open(noisy_photo(tmp_path / "photo.jpg", 80, 60)).convert("RGB")] * 24
    diff, _ = pixel_differences(pils, (out, out))
    assert (diff <= 1).double().mean() >= 0.999 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("out", [(24, 40), (40, 24)])
def test_non_square_sizes_keep_height_and_width_apart(out):
    """--input_size HEIGHT WIDTH: rows resized to the height, columns to the width (a swap would
    differ everywhere). Pillow 13 takes the vertical pass first for some of these shapes, rounding
    in between in the other order: about 10% of values then differ by one level, very few by more."""
    diff, _ = pixel_differences([Image.open(f).convert("RGB") for f in demo_files(8)], out)
    assert (diff <= 1).double().mean() >= 0.999 and diff.mean() < 0.15, (diff.max(), diff.mean())


def test_loader_batches_epochs_and_skips(data, tmp_path):
    dataset, loader = pretrain_data(memory_args(data, tmp_path))
    assert len(dataset) == 48 and len(loader) == 3  # 48 images, batches of 16, the last incomplete dropped
    assert loader.images.shape == (48, 3, 32, 32) and loader.images.dtype == torch.uint8
    loader.sampler.set_epoch(1)
    epoch1 = list(loader)
    imgs, labels = epoch1[0]
    assert imgs.dtype == torch.uint8 and imgs.shape == (16, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 16
    assert not torch.equal(imgs, epoch1[1][0])
    loader.sampler.set_epoch(1, skip=16)  # a run resumed after the first iteration
    assert len(loader) == 2
    assert_same(list(loader), epoch1[1:])
    loader.sampler.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], imgs)  # another epoch, another order and other crops


def test_resume_inside_an_epoch_is_bitwise(tmp_path, monkeypatch):
    """A run stopped after iteration 0 of epoch 1 and resumed ends with the straight run's weights.
    The smallest model on 16 px crops (boxes reduced, not only enlarged), 3 iterations an epoch."""
    data = make_dataset(tmp_path / "data", 8)
    small = ["--model", "mae_vit_mini_patch4", "--input_size", "16", "--batch_size", "8", "--loader", "memory"]
    run = [*small, "--epochs", "2", "--warmup_epochs", "1", "--vis_freq", "0", "--print_freq", "1"]
    with isolated_interrupts():
        run_pretrain(data, tmp_path / "straight", *run)
        original = EpochProgress.after_step

        def stop_there(self, step, loss, lr):
            if (self.epoch, step) == (1, 0):
                os.kill(os.getpid(), signal.SIGTERM)
            original(self, step, loss, lr)

        with monkeypatch.context() as patch:
            patch.setattr(EpochProgress, "after_step", stop_there)
            with pytest.raises(interrupt.Interrupted):
                run_pretrain(data, tmp_path / "stopped", *run)
        middle = tmp_path / "stopped" / "checkpoint-1-step1.pth"
        run_pretrain(data, tmp_path / "resumed", *run, "--resume", str(middle), init_seed=12345)
    straight, resumed = (load(tmp_path / name / "checkpoint-1.pth") for name in ("straight", "resumed"))
    assert_same(resumed["model"], straight["model"])
    assert_same(resumed["optimizer"], straight["optimizer"])


def test_two_ranks_see_each_image_once_per_epoch(tmp_path):
    """Image k is one colour, 7k: every crop of it too, so a batch's pixels name its images."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for k in range(32):
        Image.new("RGB", (32, 32), (7 * k,) * 3).save(folder / f"{k:02d}.png")
    seen = tmp_path / "seen"

    def rank_main() -> None:
        args = memory_args(folder, tmp_path / "out", "--batch_size", "4")
        distributed.init_distributed_mode(args)
        _, loader = pretrain_data(args)
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            epochs.append([int(v) // 7 for imgs, _ in loader for v in imgs[:, 0, 0, 0]])
        (seen.parent / f"seen{distributed.rank()}.json").write_text(json.dumps(epochs))
        distributed.cleanup()

    run_ranks(rank_main, tmp_path / "ranks")
    ranks = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        shares = [ranks[r][epoch] for r in range(2)]
        assert sorted(shares[0] + shares[1]) == list(range(32)), f"epoch {epoch}: {shares}"
    assert ranks[0][0] != ranks[0][1]  # each epoch in another order


def test_refusals_in_one_line(data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(memory, "available_bytes", lambda device="cpu": 100_000)  # 48 x 3 x 32 x 32 = 147,456
        message = one_line_error(pretrain_data, memory_args(data, tmp_path))
    assert "48 images" in message and "32 x 32 px" in message and "--loader fast" in message, message

    mixed = make_dataset(tmp_path / "mixed", 2)
    odd = sorted(mixed.rglob("*.jpg"))[-1]  # the first file sets the size
    Image.new("RGB", (40, 30)).save(odd)
    message = one_line_error(pretrain_data, memory_args(mixed, tmp_path, "--batch_size", "2"))
    assert str(odd) in message and "40 x 30 px" in message and "--loader fast" in message, message

    args = memory_args(data, tmp_path)
    args.in_chans = 1
    message = one_line_error(pretrain_data, args)
    assert "--in_chans 1" in message and "--loader fast" in message, message
    with pytest.raises(UserError, match="--batch_size 64"):
        pretrain_data(memory_args(data, tmp_path, "--batch_size", "64"))


def test_crops_too_large_for_the_device_advise_a_smaller_batch(data, tmp_path, monkeypatch):
    """48 images of 32 px hold 147,456 bytes; cropped to 224 px, 16 a batch, they need about 50 MB
    more: a smaller --batch_size or --input_size fits, which the line says, not only another loader."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1_000_000)
    message = one_line_error(pretrain_data, memory_args(data, tmp_path, "--input_size", "224"))
    assert "lower --batch_size or --input_size, or use --loader fast" in message, message


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_corrupt_image_is_the_other_loaders_one_line_error(tmp_path, workers):
    """A truncated JPEG in the folder stops the decoding with the line the other loaders give:
    the file named, remove or replace it (from a worker, the last line run_cli prints)."""
    data = make_dataset(tmp_path / "data", 2)
    bad = sorted(data.rglob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(UserError) as refused:
        pretrain_data(memory_args(data, tmp_path / "out", "--batch_size", "2", "--num_workers", workers))
    line = str(refused.value).splitlines()[-1]
    assert f"cannot read image {bad} (" in line and line.endswith("; remove or replace the file"), line
    # With the error still held (as run_cli holds it while it exits), the decoding workers are gone:
    # they ignore SIGTERM, so workers left to the interpreter's exit would keep it from ever ending.
    assert multiprocessing.active_children() == []


# 2,048 images of 8 px decoded by 2 workers under a limit of 256 open files (and the check that each
# image lands in its place): the workers hand over batches of DECODE_BATCH (256) images.
DECODE_UNDER_A_FILE_LIMIT = """
import resource, sys
import torch
sys.path.insert(0, sys.argv[1])
from util.data import memory_loader

class Numbered(torch.utils.data.Dataset):
    def __len__(self):
        return 2048

    def __getitem__(self, index):
        return torch.full((3, 8, 8), index % 251, dtype=torch.uint8), 0

resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
images = memory_loader.decode(Numbered(), [f"{i}.png" for i in range(2048)], torch.device("cpu"), 2, 8, (8, 8))
assert images[:, :, 7, 7].tolist() == [[i % 251] * 3 for i in range(2048)], "misplaced images"
"""


def test_decoding_workers_stay_under_a_limit_of_open_files():
    """A worker's batch crosses to the main process as one tensor, in one shared-memory file. As a
    list of 256 tensors it took a file descriptor each, and 2 workers with their batches in flight went
    over a limit of 256 open files ('received 0 items of ancdata'): the GPU study's 15 workers went
    over the usual 1024 (its device command would have ended in that traceback)."""
    try:  # a second at most; over the limit it failed, or hung (a worker's file could not be passed)
        done = subprocess.run(
            [sys.executable, "-c", DECODE_UNDER_A_FILE_LIMIT, str(REPO)], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"decoding hung: {hung.stderr!r:.3000}")
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_batch_of_another_size_than_the_first_image_is_named(tmp_path, monkeypatch):
    """Whole decoding batches of one size, the first image's batch of another: the first file of the
    odd batch is named."""
    monkeypatch.setattr(memory_loader, "DECODE_BATCH", 2)
    mixed = make_dataset(tmp_path / "mixed", 2)
    files = sorted(mixed.rglob("*.jpg"))
    for odd in files[2:4]:  # the second batch
        Image.new("RGB", (40, 30)).save(odd)
    message = one_line_error(pretrain_data, memory_args(mixed, tmp_path, "--batch_size", "2"))
    assert str(files[2]) in message and "40 x 30 px" in message, message


def test_one_image_makes_one_batch_an_epoch(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (32, 32), (40, 80, 120)).save(folder / "only.png")
    _, loader = pretrain_data(memory_args(folder, tmp_path / "out", "--batch_size", "1"))
    batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (1, 3, 32, 32)
    assert batches[0][0][0, :, 5, 5].tolist() == [40, 80, 120]  # a plain image stays plain under any crop
