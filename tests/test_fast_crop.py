"""The fast pre-training loader draws the same crops and flips as the torchvision recipe and
produces nearly the same pixels, also when it decodes JPEGs at reduced scale."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.data import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, load_rgb, pretrain_transform  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.fast_crop import FastRandomResizedCropFlip, normalize_on_device  # noqa: E402
from util.images import open_lazily  # noqa: E402


def _smooth_photo(path: Path, width: int, height: int, fmt: str) -> Path:
    """Smooth gradients plus a few soft blobs: JPEG and rescaling keep it close to itself."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / width
    g = 255 * y / height
    b = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    img = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format=fmt, quality=95)
    return path


def _reference_uint8(path: Path, size: int) -> torch.Tensor:
    normalised = pretrain_transform(size)(load_rgb(str(path)))
    return normalized_to_uint8(normalised)


def normalized_to_uint8(t: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((t * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("width,height,fmt", [(500, 375, "JPEG"), (1200, 900, "JPEG"), (640, 480, "PNG")])
def test_same_crops_and_flips_as_the_recipe(tmp_path, width, height, fmt):
    path = _smooth_photo(tmp_path / f"img.{fmt.lower()}", width, height, fmt)
    fast = FastRandomResizedCropFlip(224)
    diffs, flips = [], 0
    for seed in range(40):
        torch.manual_seed(seed)
        ref = _reference_uint8(path, 224)
        torch.manual_seed(seed)
        out = fast(open_lazily(str(path)))
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
        # The red channel grows with x: its direction tells a flip, and both pipelines must agree.
        ref_flipped = ref[0, :, -1].float().mean() < ref[0, :, 0].float().mean()
        out_flipped = out[0, :, -1].float().mean() < out[0, :, 0].float().mean()
        assert ref_flipped == out_flipped, f"seed {seed}: flip differs"
        flips += int(out_flipped)
        diffs.append((out.float() - ref.float()).abs().mean().item())
    assert 8 <= flips <= 32  # p = 0.5 over 40 draws
    # Same box: pixels nearly equal (reduced-scale decoding of large JPEGs blurs a little).
    assert np.mean(diffs) < (3.0 if width > 1000 else 1.0), np.mean(diffs)


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
        torch.manual_seed(seed)
        fast(open_lazily(str(path)))
    # Boxes of 2000x1500 photos are at least ~600 px: always at least 1/2 reduction.
    assert len(requested) == 20
    assert all(w <= 1000 for w, _ in requested)


def test_crop_geometry_distribution(tmp_path):
    """Area fraction in [0.2, 1] and aspect ratio in [3/4, 4/3], read back from the pixels."""
    path = _smooth_photo(tmp_path / "g.png", 800, 600, "PNG")
    fast = FastRandomResizedCropFlip(224)
    areas, ratios = [], []
    for seed in range(200):
        torch.manual_seed(seed)
        out = fast(open_lazily(str(path))).float()
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
        assert fast(open_lazily(str(path))).shape == (3, 32, 32)


def test_truncated_jpeg_is_named(tmp_path):
    good = _smooth_photo(tmp_path / "a.jpg", 300, 200, "JPEG")
    data = good.read_bytes()
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "broken.jpg"
    bad.write_bytes(data[: len(data) // 3])
    dataset = ImageFiles(str(tmp_path / "sub"), FastRandomResizedCropFlip(32), lazy=True)
    with pytest.raises(UserError, match="broken.jpg"):
        dataset[0]
