"""--loader device: workers read files and draw crops, the batch is decoded where it is moved.

On the CPU the same code runs with torchvision's CPU decoder, so it can be checked here against
the fast loader: same boxes and flips, and the same pixels up to the rounding of the resize (the
device resizes in float; the fast loader's uint8 kernel rounds and clips between its two passes,
as Pillow does, which moves a few overshooting pixels by several grey levels)."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_dataset, noisy_photo, read_log, run_pretrain

from util.cli.errors import UserError
from util.data.datasets import ImageFiles
from util.data.device_decode import EncodedBatch, EncodedCrop, RandomResizedCropFlipOnDevice, collate_encoded
from util.data.fast_crop import FastRandomResizedCropFlip
from util.data.loaders import pretrain_data
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD


def assert_close_to_fast(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.int() - want.int()).abs().float()
    assert diff.mean() < 0.3, diff.mean()
    assert (diff > 1).float().mean() < 0.01, (diff > 1).float().mean()


def _decode_one(item: EncodedCrop | torch.Tensor) -> torch.Tensor:
    return EncodedBatch([item]).to("cpu")[0]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_same_images_as_the_fast_loader(tmp_path, mode):
    path = noisy_photo(tmp_path / "p.jpg", 500, 375, mode)
    fast, on_device = FastRandomResizedCropFlip(224), RandomResizedCropFlipOnDevice(224)
    flips = 0
    for seed in range(12):
        random.seed(seed)
        expected = fast(str(path))
        random.seed(seed)
        item = on_device(str(path))
        assert isinstance(item, EncodedCrop), "a baseline JPEG must be left to the device"
        flips += item.flip
        got = _decode_one(item)
        assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
        assert_close_to_fast(got, expected)
    assert 0 < flips < 12


def test_other_files_are_made_in_the_worker_and_batched_with_the_rest(tmp_path):
    files = [
        noisy_photo(tmp_path / "a.jpg", 64, 48),
        noisy_photo(tmp_path / "b.png", 64, 48, fmt="PNG"),
        noisy_photo(tmp_path / "c.jpg", 64, 48, mode="CMYK"),
        noisy_photo(tmp_path / "d.jpg", 50, 40),
    ]
    on_device, fast = RandomResizedCropFlipOnDevice(32), FastRandomResizedCropFlip(32)
    items, expected = [], []
    for seed, path in enumerate(files):
        random.seed(seed)
        items.append((on_device(str(path)), 0))
        random.seed(seed)
        expected.append(fast(str(path)))
    assert [isinstance(item, EncodedCrop) for item, _ in items] == [True, False, False, True]
    batch, labels = collate_encoded(items)
    images = batch.to("cpu")
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 0, 0]
    for got, want in zip(images, expected, strict=True):
        assert_close_to_fast(got, want)


def test_corrupt_jpeg_is_named_when_the_batch_is_decoded(tmp_path):
    good = noisy_photo(tmp_path / "good.jpg", 64, 48)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:-400])  # header intact, scan data cut short
    dataset = ImageFiles(str(tmp_path), RandomResizedCropFlipOnDevice(32), lazy=True)
    batch, _ = collate_encoded([dataset[0], dataset[1]])  # reading and drawing need only the header
    with pytest.raises(UserError, match="broken.jpg"):
        batch.to("cpu")


def _loader_args(data: Path, loader: str, workers: int):
    from argparse import Namespace

    return Namespace(
        data_path=str(data), input_size=32, loader=loader, batch_size=8, num_workers=workers, pin_mem=False,
        device="cpu", seed=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip


def test_loader_gives_the_fast_loaders_batches(tmp_path):
    data = make_dataset(tmp_path / "data", 8)  # 24 CIFAR JPEGs
    _, fast = pretrain_data(_loader_args(data, "fast", 0))
    _, on_device = pretrain_data(_loader_args(data, "device", 2))
    for loader in (fast, on_device):
        loader.sampler.set_epoch(1)
    n = 0
    for (want, _), (got, _) in zip(fast, on_device, strict=True):
        assert isinstance(got, EncodedBatch)
        assert_close_to_fast(got.to("cpu"), want)
        n += 1
    assert n == 3


# 1,024 PNGs of 8 px (made in the worker, the device decodes JPEGs only) loaded by 2 workers in batches of
# 256 under a limit of 256 open files; each batch against the fast loader's, which makes them the same way.
LOAD_PNGS_UNDER_A_FILE_LIMIT = """
import resource, sys
from argparse import Namespace
import numpy as np, torch
from PIL import Image
sys.path.insert(0, sys.argv[1])
from util.data.loaders import pretrain_data

rng = np.random.default_rng(0)
for i in range(1024):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(f"{sys.argv[2]}/{i}.png")
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

def loader(kind):
    args = Namespace(data_path=sys.argv[2], input_size=8, loader=kind, batch_size=256, num_workers=2, pin_mem=False,
                     device="cpu", seed=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    return pretrain_data(args)[1]

batches = 0
for (want, _), (got, _) in zip(loader("fast"), loader("device"), strict=True):
    assert torch.equal(got.to("cpu"), want), "another image than the fast loader's"
    batches += 1
assert batches == 4, batches
"""


def test_images_made_in_the_workers_stay_under_a_limit_of_open_files(tmp_path):
    """Crops made in a worker (files the device does not decode: PNGs, CMYK JPEGs) cross to the main
    process as one tensor a batch. As a list they took a file descriptor each: with 2 workers a limit of
    256 open files was passed ('Too many open files' in a worker, and the loader waited forever), and 8
    workers went over the usual 1024 ('received 0 items of ancdata')."""
    (tmp_path / "pngs").mkdir()
    script = [sys.executable, "-c", LOAD_PNGS_UNDER_A_FILE_LIMIT, str(REPO), str(tmp_path / "pngs")]
    try:  # a few seconds; over the limit it failed, or hung
        done = subprocess.run(script, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"loading hung: {hung.stderr!r:.3000}")
    assert done.returncode == 0, done.stderr[-3000:]


def test_pretraining_with_the_device_loader(tmp_path):
    data = make_dataset(tmp_path / "data", 8)
    flags = ["--epochs", "2", "--batch_size", "8", "--print_freq", "1", "--vis_freq", "0"]
    run_pretrain(data, tmp_path / "fast", *flags, "--loader", "fast")
    run_pretrain(data, tmp_path / "device", *flags, "--loader", "device")
    fast, device = read_log(tmp_path / "fast"), read_log(tmp_path / "device")
    assert len(device) == 2 and (tmp_path / "device" / "checkpoint-1.pth").exists()
    # The same crops, to the resize's rounding: the same training, to rounding.
    for a, b in zip(fast, device, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 * a["train_loss"]


def test_files_the_batch_decoder_refuses_are_decoded_one_by_one(tmp_path, monkeypatch, capsys):
    """nvJPEG refuses some valid JPEGs, and then the whole batch call fails: each file is then
    decoded on its own, on the CPU where the device refuses it too; each such file is counted, and
    the first one warned about, naming it and the decoder's reason."""
    import util.data.device_decode as device_decode

    device_decode.FALLBACKS.reset()
    paths = [noisy_photo(tmp_path / f"{i}.jpg", 80, 60) for i in range(3)]
    transform = RandomResizedCropFlipOnDevice(32)
    random.seed(1)
    batch = EncodedBatch([transform(str(p)) for p in paths])
    expected = batch.to("cpu")
    real, calls = device_decode.decode_jpeg, []

    def picky(data, mode, **on_device):
        """Refuses the batch and every file on "the device"; the CPU decodes them."""
        calls.append("batch" if isinstance(data, list) else "device" if on_device else "cpu")
        if calls[-1] != "cpu":
            raise RuntimeError("decode_jpeg, somewhere.cpp:1, unsupported by this decoder")
        return real(data, mode=mode)

    capsys.readouterr()
    monkeypatch.setattr(device_decode, "decode_jpeg", picky)
    assert torch.equal(batch.to("cpu"), expected)
    assert calls == ["batch"] + ["device", "cpu"] * 3
    assert device_decode.FALLBACKS.count == 3
    batch.to("cpu")
    assert device_decode.FALLBACKS.count == 6
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "0.jpg" in warnings[0] and "unsupported by this decoder" in warnings[0] and ".cpp" not in warnings[0]


def test_files_decoded_where_asked_are_no_fallbacks(tmp_path):
    from util.data.device_decode import FALLBACKS

    FALLBACKS.reset()
    transform = RandomResizedCropFlipOnDevice(32)
    EncodedBatch([transform(str(noisy_photo(tmp_path / f"{i}.jpg", 80, 60))) for i in range(2)]).to("cpu")
    assert FALLBACKS.count == 0 and not FALLBACKS.warned


def test_decode_error_names_the_file_without_torchvisions_source_location(tmp_path):
    good = noisy_photo(tmp_path / "good.jpg", 64, 48)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:-400])
    transform = RandomResizedCropFlipOnDevice(32)
    with pytest.raises(UserError) as error:
        EncodedBatch([transform(str(tmp_path / "cut.jpg"))]).to("cpu")
    message = str(error.value)
    assert "cut.jpg" in message and ".cpp" not in message and "remove or replace" in message
