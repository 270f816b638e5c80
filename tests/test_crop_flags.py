"""--crop_pct and --scale of fine-tuning and linear probing: the default evaluation pipeline is the
official one, bit for bit; --crop_pct 1.0 leaves an image of --input_size as it is; --scale sets
the range of the training crops' areas on every path (timm's, the tensor one for other channel
counts, the probe's); values out of range are refused in one line."""

import numpy as np
import pytest
import torch
from helpers import noisy_photo, one_line_error
from PIL import Image
from torchvision import transforms

import main_finetune
import main_linprobe
from util.cli.errors import UserError
from util.data.channels import OneDrawResizedCrop
from util.data.loaders import eval_transform
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD

BICUBIC = transforms.InterpolationMode.BICUBIC


def _official_eval(resize: int | tuple[int, int], crop: int | tuple[int, int]) -> transforms.Compose:
    """The official evaluation pipeline, from torchvision alone: resize, center crop, normalise."""
    tail = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose([transforms.Resize(resize, interpolation=BICUBIC), transforms.CenterCrop(crop), *tail])


# (image width, height), --input_size, and what the official code resizes to: int(size / (224 / 256))
# up to 224 px, the size itself above. (16, 24) on 50 x 40: int(16 / 0.875) = 18, int(24 / 0.875) = 27,
# scaled by max(18 / 40, 27 / 50) = 0.54 to cover both: 22 x 27 (height x width).
DEFAULT_CASES = [((50, 40), 32, 36), ((32, 32), 32, 36), ((300, 260), 224, 256), ((300, 260), 232, 232)]


@pytest.mark.parametrize("image_size,input_size,resize", DEFAULT_CASES)
def test_default_evaluation_is_the_official_pipeline(tmp_path, image_size, input_size, resize):
    img = Image.open(noisy_photo(tmp_path / "a.jpg", *image_size))
    assert torch.equal(eval_transform(input_size)(img), _official_eval(resize, input_size)(img))


def test_default_evaluation_of_a_non_square_size(tmp_path):
    img = Image.open(noisy_photo(tmp_path / "a.jpg", 50, 40))
    assert torch.equal(eval_transform((16, 24))(img), _official_eval((22, 27), (16, 24))(img))


def test_crop_pct_one_evaluates_an_image_of_the_input_size_as_it_is(tmp_path):
    img = Image.open(noisy_photo(tmp_path / "a.png", 32, 32, fmt="PNG"))
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).double() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = ((pixels - mean.double()) / std.double()).float()
    assert torch.allclose(eval_transform(32, crop_pct=1.0)(img), expected, atol=1e-6, rtol=0)
    assert torch.equal(eval_transform(32, crop_pct=1.0)(img), _official_eval(32, 32)(img))  # no resize at all


def test_crop_pct_sets_the_resize(tmp_path):
    img = Image.open(noisy_photo(tmp_path / "a.jpg", 50, 40))
    assert torch.equal(eval_transform(32, crop_pct=0.5)(img), _official_eval(64, 32)(img))  # int(32 / 0.5)
    assert torch.equal(eval_transform(232, crop_pct=0.875)(img), _official_eval(265, 232)(img))  # int(232 / 0.875)


def _coordinates(channels: int) -> torch.Tensor:
    """A 256 x 256 image whose first channel is x / 255 and second y / 255 (a third, if any, 0)."""
    ramp = torch.arange(256, dtype=torch.float32) / 255
    planes = [ramp.expand(256, 256), ramp.view(256, 1).expand(256, 256)]
    return torch.stack(planes + [torch.zeros(256, 256)] * (channels - 2))


def _coordinates_rgb() -> Image.Image:
    """``_coordinates(3)`` as an 8-bit RGB image: red x, green y."""
    return Image.fromarray((_coordinates(3) * 255).round().byte().permute(1, 2, 0).numpy())


def _crop_areas(transform, img, unnormalise, draws: int = 200) -> torch.Tensor:
    """The fraction of the image's area of each of ``draws`` crops, read from the coordinates the
    output's corner pixels hold: its first and last columns sit half an output pixel inside the box."""
    areas = []
    for _ in range(draws):
        coords = unnormalise(transform(img))[:2] * 255
        x, y = coords[0], coords[1]
        side = x.shape[-1]
        width = (x[:, [0, -1]].amax() - x[:, [0, -1]].amin()).item() * side / (side - 1)
        height = (y[-1].mean() - y[0].mean()).item() * side / (side - 1)
        areas.append(width * height / 256**2)
    return torch.tensor(areas)


def _finetune_args(*extra: str):
    argv = [
        "--input_size",
        "32",
        "--in_chans",
        "3",
        "--aa",
        "",
        "--reprob",
        "0",
        "--mean",
        "0",
        "0",
        "0",
        "--std",
        "1",
        "1",
        "1",
    ]
    return main_finetune.get_args_parser().parse_args([*argv, *extra])


def _in_range(areas: torch.Tensor, low: float, high: float, slack: float = 0.03) -> bool:
    """Every area in [low, high] (within the measure's slack) and both ends reached."""
    lowest, highest = areas.min().item(), areas.max().item()
    return low - slack <= lowest < low + 0.05 and high - 0.05 < highest <= high + slack


def test_a_crop_pct_that_makes_huge_images_is_refused_at_start():
    """Refused when the transform is built (before the first epoch), not on the first evaluated image."""
    with pytest.raises(UserError, match=r"^--crop_pct 0.0001 resizes every evaluation image to 320000 x 320000 px"):
        eval_transform(32, crop_pct=1e-4)
    eval_transform(32, crop_pct=0.01)  # 3200 x 3200 px: allowed


def test_scale_reaches_timms_transform():
    torch.manual_seed(0)
    img = _coordinates_rgb()
    areas = _crop_areas(main_finetune.build_train_transform(_finetune_args("--scale", "0.3", "0.5")), img, lambda t: t)
    assert _in_range(areas, 0.3, 0.5), (areas.min(), areas.max())
    default = _crop_areas(main_finetune.build_train_transform(_finetune_args()), img, lambda t: t)
    assert default.min() < 0.2 and default.max() > 0.8  # 0.08 to 1, as before


def test_the_fine_tuning_crop_is_bicubic():
    """The official fine-tuning recipe resizes its crops bicubic; another interpolation would pass unseen (the crop
    areas above are the same under any)."""
    crop = main_finetune.build_train_transform(_finetune_args()).transforms[0]
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC


def test_scale_reaches_the_tensor_path_and_the_probe():
    torch.manual_seed(0)
    flags = ["--in_chans", "2", "--mean", "0", "0", "--std", "1", "1", "--scale", "0.6", "0.9"]
    areas = _crop_areas(main_finetune.build_train_transform(_finetune_args(*flags)), _coordinates(2), lambda t: t)
    assert _in_range(areas, 0.6, 0.9), (areas.min(), areas.max())
    probe = main_linprobe.get_args_parser().parse_args(["--input_size", "32", "--scale", "0.2", "0.4"])
    probe.in_chans, probe.mean, probe.std = 3, IMAGENET_MEAN, IMAGENET_STD
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = _coordinates_rgb()
    areas = _crop_areas(main_linprobe.build_train_transform(probe), img, lambda t: t * std + mean)
    assert _in_range(areas, 0.2, 0.4), (areas.min(), areas.max())


def test_the_probe_crop_clamps_a_box_that_does_not_fit_where_torchvision_redraws():
    """The official probe's crop draws once and clamps (util.crop in the official code); torchvision's
    redraws and crops the centre after 10 misses. A 10 x 100 image, scale (1, 1), ratio (1, 1): the box
    drawn is round(sqrt(1000)) = 32 on a side, clamped to 10 wide; torchvision's centre crop is 10 x 10."""
    tall = Image.new("RGB", (10, 100))
    tops = set()
    for seed in range(50):
        torch.manual_seed(seed)
        top, left, h, w = OneDrawResizedCrop.get_params(tall, (1.0, 1.0), (1.0, 1.0))
        assert (left, h, w) == (0, 32, 10) and 0 <= top <= 68
        tops.add(top)
        assert transforms.RandomResizedCrop.get_params(tall, (1.0, 1.0), (1.0, 1.0)) == (45, 0, 10, 10)
    assert len(tops) > 20  # the position is drawn


def test_the_probe_crop_is_torchvisions_where_its_first_draw_fits():
    """The same random numbers in the same order: a box that fits is the box torchvision draws first."""
    img = Image.new("RGB", (500, 375))
    for seed in range(200):
        torch.manual_seed(seed)
        ours = OneDrawResizedCrop.get_params(img, (0.08, 0.3), (3 / 4, 4 / 3))  # 0.3 of the area always fits
        torch.manual_seed(seed)
        assert ours == transforms.RandomResizedCrop.get_params(img, (0.08, 0.3), (3 / 4, 4 / 3))


def test_the_probe_crop_keeps_a_pixel_of_a_box_under_half_a_pixel():
    """8 x 8 pixels at --scale 0.001 0.002: a box of 0.06 to 0.13 pixels, rounded to 0 x 0, which
    the resize then refused on the tensor path (--in_chans other than 3) and PIL's filled with nothing."""
    crop = OneDrawResizedCrop(16, scale=(0.001, 0.002))
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, h, w = crop.get_params(torch.zeros(4, 8, 8), crop.scale, crop.ratio)
        assert (h, w) == (1, 1) and 0 <= top < 8 and 0 <= left < 8
    torch.manual_seed(0)
    assert crop(torch.rand(4, 8, 8)).shape == (4, 16, 16)


def test_the_probe_takes_the_one_draw_crop():
    """--scale 0.9 1 on a square image: a box of aspect 4/3 drawn at 0.9 of the area is 280 x 210 on 256
    x 256 px, clamped to 256 x 210, 0.82 of the area; torchvision's boxes all cover 0.9 or more."""
    torch.manual_seed(0)
    probe = main_linprobe.get_args_parser().parse_args(["--input_size", "32", "--scale", "0.9", "1"])
    probe.in_chans, probe.mean, probe.std = 3, [0.0] * 3, [1.0] * 3
    areas = _crop_areas(main_linprobe.build_train_transform(probe), _coordinates_rgb(), lambda t: t)
    assert areas.min() < 0.85 and areas.max() > 0.95, (areas.min(), areas.max())


BAD = {
    "--crop_pct 0": ["--crop_pct", "0"],
    "--crop_pct 1.5": ["--crop_pct", "1.5"],
    "--crop_pct -0.5": ["--crop_pct", "-0.5"],
    "--scale 0 1": ["--scale", "0", "1"],
    "--scale 0.5 0.2": ["--scale", "0.5", "0.2"],
    "--scale 0.5 1.5": ["--scale", "0.5", "1.5"],
}


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_out_of_range_values_are_refused_naming_the_flag(entry_point):
    for shown, flags in BAD.items():
        args = entry_point.get_args_parser().parse_args(["--device", "cpu", *flags])
        message = one_line_error(entry_point.check_args, args)
        assert message.startswith(f"{flags[0]} "), (shown, message)
    good = entry_point.get_args_parser().parse_args(["--device", "cpu", "--crop_pct", "1", "--scale", "1", "1"])
    assert entry_point.check_args(good) is None
