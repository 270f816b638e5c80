"""The fast pre-training loader draws crops and flips from the recipe's distribution and, for a
given box, produces nearly the recipe's pixels, also when it decodes JPEGs at reduced scale."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_crop_boxes_follow_torchvision
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.cli.errors import UserError  # noqa: E402
from util.data.datasets import ImageFiles, load_rgb  # noqa: E402
from util.data.fast_crop import FastRandomResizedCropFlip, random_crop_box  # noqa: E402
from util.data.images import plain_jpeg_size  # noqa: E402
from util.data.normalization import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize_on_device,  # noqa: E402
)


def _smooth_photo(path: Path, width: int, height: int, fmt: str, **save: object) -> Path:
    """Smooth gradients plus a few soft blobs: JPEG and rescaling keep it close to itself."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / width
    g = 255 * y / height
    b = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    img = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format=fmt, quality=95, **save)
    return path


def _recipe_uint8(path: Path, box: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
    """What torchvision's RandomResizedCrop + RandomHorizontalFlip make of ``box`` and ``flip``."""
    img = TF.resized_crop(load_rgb(str(path)), *box, [size, size], transforms.InterpolationMode.BICUBIC)
    img = TF.hflip(img) if flip else img
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("width,height,fmt", [(500, 375, "JPEG"), (1200, 900, "JPEG"), (640, 480, "PNG")])
def test_recipe_pixels_for_the_same_box_and_flip(tmp_path, width, height, fmt):
    path = _smooth_photo(tmp_path / f"img.{fmt.lower()}", width, height, fmt)
    fast = FastRandomResizedCropFlip(224)
    diffs, flips = [], 0
    for seed in range(40):
        random.seed(seed)  # the transform draws the box, then the flip, from python's generator
        box, flip = random_crop_box(width, height), random.random() < 0.5
        random.seed(seed)
        out = fast(str(path))
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
        ref = _recipe_uint8(path, box, flip, 224)
        # The red channel grows with x: its direction tells a flip.
        assert (out[0, :, -1].float().mean() < out[0, :, 0].float().mean()) == flip, f"seed {seed}"
        flips += flip
        diffs.append((out.float() - ref.float()).abs().mean().item())
    assert 8 <= flips <= 32  # p = 0.5 over 40 draws
    # Pixels nearly equal (reduced-scale decoding of large JPEGs blurs a little).
    assert np.mean(diffs) < (3.0 if width > 1000 else 1.0), np.mean(diffs)


@pytest.mark.parametrize("width,height", [(800, 600), (500, 375), (32, 32), (300, 1200), (2000, 300)])
def test_crop_box_distribution_is_torchvisions(width, height):
    """Area, aspect ratio and position of the boxes against torchvision's own sampler, including
    images so elongated that the fallback (a central crop) is common."""
    n = 4000
    random.seed(0)
    ours = np.array([random_crop_box(width, height) for _ in range(n)], dtype=float)
    assert_crop_boxes_follow_torchvision(ours, width, height)
    assert np.all((ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width))


def test_plain_jpeg_size_reads_the_frame_header(tmp_path):
    cases = {
        "baseline.jpg": _smooth_photo(tmp_path / "baseline.jpg", 123, 45, "JPEG"),
        "progressive.jpg": _smooth_photo(tmp_path / "progressive.jpg", 64, 200, "JPEG", progressive=True),
        "exif.jpg": _smooth_photo(tmp_path / "exif.jpg", 50, 40, "JPEG", exif=Image.Exif().tobytes()),
    }
    Image.new("L", (31, 17)).save(tmp_path / "grey.jpg")
    cases["grey.jpg"] = tmp_path / "grey.jpg"
    for name, path in cases.items():
        assert plain_jpeg_size(path.read_bytes()) == Image.open(path).size, name
    # Files that must go to Pillow: CMYK, not a JPEG, or not a whole header.
    Image.new("CMYK", (20, 10)).save(tmp_path / "cmyk.jpg")
    assert plain_jpeg_size((tmp_path / "cmyk.jpg").read_bytes()) is None
    assert plain_jpeg_size(_smooth_photo(tmp_path / "p.png", 20, 10, "PNG").read_bytes()) is None
    baseline = cases["baseline.jpg"].read_bytes()
    assert plain_jpeg_size(baseline[:40]) is None
    assert plain_jpeg_size(b"\xff\xd8garbage") is None
    assert plain_jpeg_size(b"") is None


def test_reduced_scale_decoding_is_used_for_large_boxes(tmp_path, monkeypatch):
    path = _smooth_photo(tmp_path / "big.jpg", 2000, 1500, "JPEG")
    from PIL import JpegImagePlugin

    requested = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        requested.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = FastRandomResizedCropFlip(224)
    for seed in range(20):
        random.seed(seed)
        fast(str(path))
    # Boxes of 2000x1500 photos are at least ~600 px: always at least 1/2 reduction.
    assert len(requested) == 20
    assert all(w <= 1000 for w, _ in requested)


def test_crop_geometry_distribution(tmp_path):
    """Area fraction in [0.2, 1] and aspect ratio in [3/4, 4/3], read back from the pixels."""
    path = _smooth_photo(tmp_path / "g.png", 800, 600, "PNG")
    fast = FastRandomResizedCropFlip(224)
    areas, ratios = [], []
    for seed in range(200):
        random.seed(seed)
        out = fast(str(path)).float()
        red, green = out[0], out[1]
        # Columns/rows 4 px in from the border: there the resize kernel sees only the (linear)
        # gradient, while the outermost pixels depend on how the border is treated.
        x_span = (red[:, -5].mean() - red[:, 4].mean()).abs().item() / 255 * 800 * 224 / 215
        y_span = (green[-5].mean() - green[4].mean()).item() / 255 * 600 * 224 / 215
        areas.append(x_span * y_span / (800 * 600))
        ratios.append(x_span / y_span)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() > 0.17 and areas.max() < 1.03
    assert ratios.min() > 0.72 and ratios.max() < 1.39
    # The recipe's distribution, from many draws of torchvision's sampler: boxes that do not fit
    # the 4:3 image are redrawn, which pulls the median area below 0.6 and the ratio above 1.
    torch.manual_seed(12345)
    image = Image.new("RGB", (800, 600))
    boxes = [transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(5000)]
    ref_areas = np.array([h * w / (800 * 600) for _, _, h, w in boxes])
    ref_log_ratios = np.log([w / h for _, _, h, w in boxes])
    # Medians of 200 draws: standard errors about 0.015 (area) and 0.02 (log ratio).
    assert abs(np.median(areas) - np.median(ref_areas)) < 0.05
    assert abs(np.median(np.log(ratios)) - np.median(ref_log_ratios)) < 0.07


def test_normalize_on_device_matches_torchvision():
    imgs = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (imgs.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(normalize_on_device(imgs, IMAGENET_MEAN, IMAGENET_STD), expected, atol=1e-5)
    floats = torch.randn(2, 3, 8, 8)
    assert normalize_on_device(floats, IMAGENET_MEAN, IMAGENET_STD) is floats


def test_grayscale_cmyk_palette_become_rgb(tmp_path):
    fast = FastRandomResizedCropFlip(32)
    for mode in ("L", "CMYK", "P", "RGBA"):
        path = tmp_path / f"{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        Image.new(mode, (64, 48)).save(path)
        assert fast(str(path)).shape == (3, 32, 32)


@pytest.mark.parametrize("size, decoder", [(32, "Pillow's reduced decode"), (160, "torchvision's full decode")])
def test_truncated_jpeg_is_named(tmp_path, size, decoder):
    good = _smooth_photo(tmp_path / "a.jpg", 300, 200, "JPEG")
    data = good.read_bytes()
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "broken.jpg"
    bad.write_bytes(data[: len(data) // 3])
    dataset = ImageFiles(str(tmp_path / "sub"), FastRandomResizedCropFlip(size), lazy=True)
    with pytest.raises(UserError, match="broken.jpg") as raised:
        dataset[0]
    # The decoder's words, without the C++ source line torchvision's decoders put first.
    assert "truncated" in str(raised.value) and ".cpp" not in str(raised.value), decoder


@pytest.mark.parametrize("loader", ["fast", "device"])
def test_a_jpeg_claiming_billions_of_pixels_is_refused_by_name(tmp_path, loader):
    """Its header goes to Pillow, whose decompression-bomb check refuses it, instead of a decoder
    that would allocate gigabytes."""
    from util.data.device_decode import RandomResizedCropFlipOnDevice

    data = bytearray(_smooth_photo(tmp_path / "a.jpg", 64, 64, "JPEG").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2  # height, width
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bomb.jpg").write_bytes(bytes(data))
    transform = FastRandomResizedCropFlip(32) if loader == "fast" else RandomResizedCropFlipOnDevice(32)
    with pytest.raises(UserError, match="bomb.jpg"):
        ImageFiles(str(tmp_path / "sub"), transform, lazy=True)[0]


def test_reduced_boxes_stay_inside_the_reduced_image():
    from util.data.fast_crop import _scale_box

    rng = random.Random(0)
    for _ in range(20000):
        scale = rng.choice([2, 4, 8])
        width, height = rng.randint(scale, 3000), rng.randint(scale, 3000)
        random.seed(rng.random())
        box = random_crop_box(width, height)
        rows, cols = -(-height // scale), -(-width // scale)
        top, left, h, w = _scale_box(box, scale, (rows, cols))
        assert 0 <= top and 0 <= left and h >= 1 and w >= 1
        assert top + h <= rows and left + w <= cols, (width, height, scale, box)
        assert abs(top * scale - box[0]) <= scale and abs(h * scale - box[2]) <= 2 * scale
