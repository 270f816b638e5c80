"""--in_chans and non-square --input_size: the 2-D sin-cos embedding of an h x w grid, resizing a
position embedding from a square grid to another shape, patchify/unpatchify and the masked loss
for any channel count, reading 1/8/16-bit files and multi-page TIFFs, the 3 -> 1 patch-embedding
sum, and pre-training, fine-tuning, probing and reconstruction runs on tiny data."""

import argparse
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CLASSES, DEMO, isolated_interrupts, load, noisy_photo, one_line_error, pretrain_args, read_log
from PIL import Image

import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
import reconstruct
from models_mae import MaskedAutoencoderViT
from util.checkpoint.encoder import load_pretrained_encoder
from util.cli.errors import UserError
from util.data.channels import ResizeToCover
from util.data.device_decode import RandomResizedCropFlipOnDevice, collate_encoded
from util.data.images import load_channels
from util.data.loaders import eval_transform, pretrain_transform
from util.pos_embed import interpolate_pos_embed, resize_pos_embed, sincos_2d

CPU = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]


def small_mae(img_size, in_chans: int, norm_pix_loss: bool = False, seed: int = 0) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(
        img_size=img_size,
        patch_size=4,
        in_chans=in_chans,
        embed_dim=16,
        depth=1,
        num_heads=2,
        decoder_embed_dim=8,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix_loss,
    )


# ---------------------------------------------------------------------------------------------
# Sin-cos embedding of an h x w grid (the functions themselves: test_pos_embed)
def test_non_square_mae_uses_the_hw_embedding():
    model = small_mae((8, 12), in_chans=1)
    assert model.grid_size == (2, 3) and model.num_patches == 6 and model.img_size == (8, 12)
    expected = torch.from_numpy(sincos_2d(16, (2, 3), cls_token=True))[None]
    assert torch.equal(model.pos_embed.data, expected)
    assert torch.equal(model.decoder_pos_embed.data, torch.from_numpy(sincos_2d(8, (2, 3), cls_token=True))[None])
    assert small_mae((8, 8), in_chans=3).img_size == 8  # a square stays an int, as before


def test_interpolate_pos_embed_square_checkpoint_into_non_square_classifier():
    checkpoint_model = models_mae.mae_vit_tiny_patch16().state_dict()  # 224 px: 14 x 14
    before = checkpoint_model["pos_embed"].clone()
    model = models_vit.vit_tiny_patch16(img_size=(224, 160), num_classes=10, global_pool=True)
    interpolate_pos_embed(model, checkpoint_model)
    assert checkpoint_model["pos_embed"].shape == model.pos_embed.shape == (1, 1 + 14 * 10, 192)
    assert torch.equal(checkpoint_model["pos_embed"][:, 0], before[:, 0])
    grid = before[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 10), mode="bicubic", align_corners=False)
    torch.testing.assert_close(checkpoint_model["pos_embed"][:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 140, 192))
    missing = model.load_state_dict(checkpoint_model, strict=False).missing_keys
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


# ---------------------------------------------------------------------------------------------
# 3 -> 1 channels when fine-tuning
def _mae_checkpoint(path: Path, in_chans: int = 3) -> Path:
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(img_size=16, in_chans=in_chans)
    torch.save({"model": model.state_dict()}, path)
    return path


def test_summed_patch_weights_see_gray_as_the_rgb_model_sees_it_repeated(tmp_path, capsys):
    ckpt = _mae_checkpoint(tmp_path / "mae.pth")
    rgb = models_vit.vit_tiny_patch4(img_size=16, num_classes=3, global_pool=True)
    gray = models_vit.vit_tiny_patch4(img_size=16, in_chans=1, num_classes=3, global_pool=True)
    load_pretrained_encoder(rgb, str(ckpt))
    capsys.readouterr()
    load_pretrained_encoder(gray, str(ckpt))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--in_chans")]
    assert said == [f"--in_chans 1: summed the RGB patch-embedding weights of {ckpt} over their 3 input channels"]
    weights = torch.load(ckpt)["model"]["patch_embed.proj.weight"]
    assert torch.equal(gray.patch_embed.proj.weight.data, weights.sum(dim=1, keepdim=True))
    images = torch.randn(2, 1, 16, 16)
    rgb.eval(), gray.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            gray.forward_features(images), rgb.forward_features(images.expand(-1, 3, -1, -1)), rtol=0, atol=2e-5
        )


@pytest.mark.parametrize("ckpt_chans,model_chans", [(3, 5), (3, 2), (1, 3), (5, 1)])
def test_other_channel_changes_are_one_line_errors(tmp_path, ckpt_chans, model_chans):
    ckpt = _mae_checkpoint(tmp_path / "mae.pth", ckpt_chans)
    model = models_vit.vit_tiny_patch4(img_size=16, in_chans=model_chans, num_classes=3)
    with pytest.raises(UserError) as info:
        load_pretrained_encoder(model, str(ckpt))
    message = str(info.value)
    assert "\n" not in message and str(ckpt) in message
    assert f"pre-trained on {ckpt_chans}-channel images" in message and f"--in_chans {model_chans}" in message
    # Was only "pre-train with --in_chans N": the run of the weights' own channels was not named.
    assert message.endswith(f"give --in_chans {ckpt_chans} (the weights'), or pre-train with --in_chans {model_chans}")


def test_non_square_checkpoint_is_resized_from_the_grid_it_stores(tmp_path):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch4(img_size=(16, 8))  # a 4 x 2 grid: 8 tokens, no square
    model = models_vit.vit_tiny_patch4(img_size=(8, 16), num_classes=3)  # 2 x 4
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(input_size=[16, 8])}, path)
    load_pretrained_encoder(model, str(path))
    expected = resize_pos_embed(mae.pos_embed.data, (2, 4), old_grid=(4, 2))
    assert torch.equal(model.pos_embed.data, expected)
    # Without the stored size, 8 tokens are 4 x 2 or 2 x 4: taken as they are for a model with as
    # many tokens (as any exact fit), and refused where they would have to be resized.
    torch.save({"model": mae.state_dict()}, path)
    with pytest.raises(UserError, match="it stores no --input_size to tell its height and width") as info:
        load_pretrained_encoder(models_vit.vit_tiny_patch4(img_size=16, num_classes=3), str(path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Transforms and loaders at (height, width)
def test_crops_have_the_asked_height_and_width(tmp_path):
    photo = noisy_photo(tmp_path / "photo.jpg", 120, 90)  # width 120, height 90
    for loader in ("torchvision", "fast"):
        transform = pretrain_transform((16, 24), loader)
        item = transform(str(photo) if loader == "fast" else Image.open(photo).convert("RGB"))
        assert item.shape == (3, 16, 24), loader
    on_device = RandomResizedCropFlipOnDevice((16, 24))
    batch, _ = collate_encoded([(on_device(str(photo)), 0), (on_device(str(photo)), 0)])
    assert batch.to("cpu").shape == (2, 3, 16, 24)
    tensor = torch.rand(2, 90, 120)  # what load_channels gives for a 2-page TIFF
    assert pretrain_transform((16, 24), in_chans=2, mean=(0.5, 0.5), std=(0.2, 0.2))(tensor).shape == (2, 16, 24)
    # Evaluation: resize to cover 16/0.875 x 24/0.875 (aspect kept), then the center crop.
    assert eval_transform((16, 24))(Image.open(photo).convert("RGB")).shape == (3, 16, 24)
    assert eval_transform((40, 8))(Image.open(photo).convert("RGB")).shape == (3, 40, 8)
    assert eval_transform((16, 24), (0.5,), (0.2,), in_chans=1)(tensor[:1]).shape == (1, 16, 24)
    assert ResizeToCover((45, 20))(Image.open(photo)).size == (60, 45)  # height sets the scale, width follows
    assert ResizeToCover((20, 100))(torch.rand(1, 90, 120)).shape == (1, 75, 100)


# ---------------------------------------------------------------------------------------------
# Reading files with their own channels
def write_multiband_tiff(path: Path, pixels: np.ndarray) -> Path:
    """An uncompressed little-endian TIFF of one page with C 16-bit samples per pixel (chunky),
    photometric min-is-black with C - 1 extra samples: valid TIFF that Pillow cannot open."""
    height, width, channels = pixels.shape
    data = pixels.astype("<u2").tobytes()
    bits = struct.pack(f"<{channels}H", *[16] * channels)
    extra = struct.pack(f"<{channels - 1}H", *[0] * (channels - 1))
    bits_at, extra_at = 8, 8 + len(bits)
    data_at = extra_at + len(extra)
    ifd_at = data_at + len(data)
    short, long_ = 3, 4
    entries = [  # (tag, type, count, value or offset)
        (256, short, 1, width),
        (257, short, 1, height),
        (258, short, channels, bits_at),
        (259, short, 1, 1),  # no compression
        (262, short, 1, 1),  # min-is-black
        (273, long_, 1, data_at),
        (277, short, 1, channels),
        (278, short, 1, height),
        (279, long_, 1, len(data)),
        (284, short, 1, 1),  # chunky
        (338, short, channels - 1, extra_at),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        inline = kind == short and count == 1
        ifd += struct.pack("<HHIHH" if inline else "<HHII", tag, kind, count, *((value, 0) if inline else (value,)))
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_at) + bits + extra + data + ifd + struct.pack("<I", 0))
    return path


def write_pages(path: Path, pages: list[np.ndarray]) -> Path:
    images = [Image.fromarray(p) for p in pages]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def test_files_are_scaled_by_their_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    Image.fromarray(gray8 > 127).save(tmp_path / "bits.png")
    Image.fromarray(np.stack([gray8, gray8 // 2], -1), "LA").save(tmp_path / "alpha.png")
    pages = [rng.integers(0, 65536, (5, 7), dtype=np.uint16) for _ in range(5)]
    write_pages(tmp_path / "five.tif", pages)

    def read(name: str, in_chans: int = 1) -> torch.Tensor:
        out = load_channels(str(tmp_path / name), in_chans)
        assert out.dtype == torch.float32 and out.shape == (in_chans, 5, 7)
        return out

    assert torch.equal(read("g8.png")[0], torch.from_numpy(gray8.astype(np.float32) / 255))
    assert torch.equal(read("g16.png")[0], torch.from_numpy(gray16.astype(np.float32) / 65535))
    assert torch.equal(read("g16.tif")[0], torch.from_numpy(gray16.astype(np.float32) / 65535))
    assert torch.equal(read("bits.png")[0], torch.from_numpy((gray8 > 127).astype(np.float32)))
    assert torch.equal(read("alpha.png")[0], torch.from_numpy(gray8.astype(np.float32) / 255))  # alpha dropped
    assert torch.equal(read("alpha.png", 2)[1], torch.from_numpy((gray8 // 2).astype(np.float32) / 255))
    five = read("five.tif", 5)
    for k, page in enumerate(pages):
        assert torch.equal(five[k], torch.from_numpy(page.astype(np.float32) / 65535))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (file, --in_chans, what the error must say)."""
    rgb = Image.open(sorted((DEMO / "cat").glob("*.jpg"))[0])
    rgb.save(tmp_path / "rgb.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "gray.png")
    write_pages(tmp_path / "three.tif", [np.zeros((8, 8), np.uint16)] * 3)
    write_pages(tmp_path / "sizes.tif", [np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8)])
    write_pages(tmp_path / "rgbpages.tif", [np.zeros((8, 8, 3), np.uint8)] * 2)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "float.tif")
    write_multiband_tiff(tmp_path / "bands.tif", np.zeros((8, 8, 5), np.uint16))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {
        "rgb_as_gray": (
            tmp_path / "rgb.jpg",
            1,
            "has 3 channel(s) (mode RGB) but --in_chans is 1; convert it to grayscale",
        ),
        "gray_as_five": (
            tmp_path / "gray.png",
            5,
            "has 1 channel(s) (mode I;16) but --in_chans is 5; store it as a 5-page",
        ),
        "pages_as_gray": (tmp_path / "three.tif", 1, "has 3 channel(s) (3 pages, one channel each)"),
        "page_sizes": (tmp_path / "sizes.tif", 2, "pages differ in size"),
        "colour_pages": (tmp_path / "rgbpages.tif", 2, "page 0 has 3 bands"),
        "float": (tmp_path / "float.tif", 1, "store it as 8 or 16-bit unsigned integers"),
        "five_bands": (tmp_path / "bands.tif", 5, "store one channel per page"),
        "broken": (tmp_path / "broken.png", 1, "cannot read image"),
    }


def test_bad_files_are_one_line_errors(tmp_path):
    for name, (path, in_chans, says) in _bad_files(tmp_path).items():
        with pytest.raises(UserError) as info:
            load_channels(str(path), in_chans)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and says in message, (name, message)


# ---------------------------------------------------------------------------------------------
# Runs on tiny data
def _gray16_folder(root: Path, count: int, classes: tuple[str, ...] = ("",)) -> Path:
    """16-bit grayscale PNGs made from demo photos (their luminance times 257, plus noise in the
    low byte, so the 16 bits carry more than 8)."""
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for src in sorted((DEMO / (cls or "cat")).glob("*.jpg"))[:count]:
            luma = np.asarray(Image.open(src).convert("L"), dtype=np.uint32) * 257
            pixels = np.clip(luma + rng.integers(0, 256, luma.shape), 0, 65535).astype(np.uint16)
            Image.fromarray(pixels).save(root / cls / f"{src.stem}.png")
    return root


def _five_page_folder(root: Path, count: int) -> Path:
    """5-channel 16-bit multi-page TIFFs: R, G, B of a demo photo, its luminance and an edge map."""
    root.mkdir(parents=True)
    for src in sorted((DEMO / "ship").glob("*.jpg"))[:count]:
        rgb = np.asarray(Image.open(src).convert("RGB"), dtype=np.float64) / 255
        luma = rgb.mean(-1)
        edges = np.abs(np.diff(luma, axis=1, prepend=luma[:, :1]))
        channels = [rgb[..., 0], rgb[..., 1], rgb[..., 2], luma, edges / max(edges.max(), 1e-6)]
        write_pages(root / f"{src.stem}.tif", [(c * 65535).round().astype(np.uint16) for c in channels])
    return root


def _on_one_thread(main: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run an entry point's main() in this process on one torch thread, then restore the count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(args)
    finally:
        torch.set_num_threads(saved)


def _run_pretrain(data: Path, out: Path, *extra: str) -> None:
    args = pretrain_args(data, out, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8", *extra)
    torch.manual_seed(0)
    _on_one_thread(main_pretrain.main, args)


@pytest.mark.parametrize(
    "in_chans,size,norm",
    [
        (1, ["16", "12"], ["--mean", "0.45", "--std", "0.25"]),
        (5, ["12", "16"], ["--norm_pix_loss", "--mean", *["0.4"] * 5, "--std", *["0.25"] * 5]),
    ],
)
def test_pretrain_on_own_channels(tmp_path, capsys, in_chans, size, norm):
    if in_chans == 1:
        data = _gray16_folder(tmp_path / "data", 16)
    else:
        data = _five_page_folder(tmp_path / "data", 16)
    out = tmp_path / "out"
    _run_pretrain(data, out, "--in_chans", str(in_chans), "--input_size", *size, *norm, "--vis_images", "2")
    printed = capsys.readouterr().out
    assert f"--loader fast with --in_chans {in_chans}: images are read and cropped as --loader torchvision" in printed
    height, width = int(size[0]), int(size[1])
    state = load(out / "checkpoint-0.pth")["model"]
    assert state["patch_embed.proj.weight"].shape == (192, in_chans, 4, 4)
    assert state["decoder_pred.weight"].shape == (4 * 4 * in_chans, 128)
    assert state["pos_embed"].shape == (1, 1 + (height // 4) * (width // 4), 192)
    expected = torch.from_numpy(sincos_2d(192, (height // 4, width // 4), cls_token=True))[None]
    assert torch.equal(state["pos_embed"], expected)
    (entry,) = read_log(out)
    assert math.isfinite(entry["train_loss"]) and entry["train_loss"] > 0
    # The picture: one gray row per image and channel, four panels of the crop's width.
    picture = Image.open(out / "reconstruction-0.png")
    factor = picture.width // (4 * width)
    assert picture.size == (4 * width * factor, 2 * in_chans * height * factor)

    # reconstruct.py reads the model, its size and channels from the checkpoint.
    image = next(p for p in sorted(data.iterdir()))
    args = reconstruct.get_args_parser().parse_args(
        [
            str(image),
            "--checkpoint",
            str(out / "checkpoint-0.pth"),
            "--output",
            str(tmp_path / "r.png"),
            "--device",
            "cpu",
        ]
    )
    reconstruct.main(args)
    shown = f"{height}x{width}" if height != width else f"{height}"
    assert f"mae_vit_tiny_patch4 at {shown} px, {in_chans} channel(s)" in capsys.readouterr().out
    assert Image.open(tmp_path / "r.png").size == picture.size[:1] + (in_chans * height * factor,)


def _classification_split(root: Path, gray: bool) -> Path:
    for split, chosen in (("train", slice(0, 8)), ("val", slice(8, 11))):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for src in sorted((DEMO / cls).glob("*.jpg"))[chosen]:
                img = Image.open(src)
                if gray:
                    img.convert("L").save(root / split / cls / f"{src.stem}.png")
                else:
                    img.save(root / split / cls / src.name)
    return root


def _classifier(entry_point, data: Path, out: Path, *extra: str):
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_tiny_patch4", "--batch_size", "8"]
    argv += ["--output_dir", str(out), "--log_dir", "", "--epochs", "1", "--warmup_epochs", "0", *CPU, *extra]
    _on_one_thread(entry_point.main, entry_point.get_args_parser().parse_args(argv))
    log = out / "log.txt"
    return json.loads(log.read_text().splitlines()[-1]) if log.exists() else {}


def test_non_square_finetune_and_probe_from_a_square_checkpoint(tmp_path, capsys):
    ckpt = _mae_checkpoint(tmp_path / "mae.pth")  # 16 x 16 px: a 4 x 4 grid
    data = _classification_split(tmp_path / "data", gray=False)
    logged = _classifier(main_finetune, data, tmp_path / "ft", "--finetune", str(ckpt), "--input_size", "16", "8")
    printed = capsys.readouterr().out
    assert "resizing pos_embed (1, 17, 192) -> (1, 9, 192) (grid (4, 2))" in printed
    assert logged["test_images"] == 9 and math.isfinite(logged["train_loss"])
    state = load(tmp_path / "ft" / "checkpoint-0.pth")
    assert state["model"]["pos_embed"].shape == (1, 9, 192) and state["args"].input_size == [16, 8]
    # --eval of that checkpoint at its own non-square size.
    _classifier(
        main_finetune,
        data,
        tmp_path / "ev",
        "--eval",
        "--resume",
        str(tmp_path / "ft" / "checkpoint-0.pth"),
        "--input_size",
        "16",
        "8",
    )
    assert "(9 images)" in capsys.readouterr().out

    gray = _classification_split(tmp_path / "gray", gray=True)
    norm = ["--mean", "0.45", "--std", "0.22"]
    logged = _classifier(
        main_linprobe,
        gray,
        tmp_path / "lp",
        "--finetune",
        str(ckpt),
        "--input_size",
        "8",
        "12",
        "--in_chans",
        "1",
        *norm,
    )
    printed = capsys.readouterr().out
    assert "--in_chans 1: summed the RGB patch-embedding weights" in printed
    assert "resizing pos_embed (1, 17, 192) -> (1, 7, 192) (grid (2, 3))" in printed
    assert logged["test_images"] == 9 and math.isfinite(logged["train_loss"])


def test_bad_sizes_and_channels_are_one_line_errors(tmp_path):
    """Refused in one line (helpers.one_line_error), before any work."""
    data = _gray16_folder(tmp_path / "data", 4)
    run = ["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--log_dir", "", *CPU]
    pre = ["--model", "mae_vit_tiny_patch4", "--batch_size", "2", *run]
    gray = ["--in_chans", "1", "--mean", "0.5", "--std", "0.2"]
    two = ["--in_chans", "2", "--mean", "0.5", "0.5", "--std", "0.2", "0.2"]
    not_multiple = "is not a multiple of the model's patch size 4"
    pretrain_cases = {
        "height": (pre + ["--input_size", "30", "32"], f"--input_size 30 32 (height width) {not_multiple}"),
        "three": (pre + ["--input_size", "32", "16", "8"], "--input_size takes one value (a square) or two"),
        "chans": (pre + ["--input_size", "32", "--in_chans", "0"], "--in_chans must be at least 1, got 0"),
        "norm": (pre + ["--input_size", "32", "--in_chans", "1"], "--in_chans 1 needs --mean and --std with 1 value"),
        "device": (pre + ["--input_size", "32", "--loader", "device", *gray], "--loader device decodes 8-bit RGB"),
        "file": (pre + ["--input_size", "32", *two], "has 1 channel(s) (mode I;16) but --in_chans is 2"),
    }
    finetune_cases = {
        "width": (
            ["--model", "vit_tiny_patch4", *run, "--input_size", "32", "18"],
            f"--input_size 32 18 (height width) {not_multiple}",
        ),
    }
    for entry_point, cases in ((main_pretrain, pretrain_cases), (main_finetune, finetune_cases)):
        for name, (argv, says) in cases.items():
            with isolated_interrupts():
                message = one_line_error(entry_point.main, entry_point.get_args_parser().parse_args(argv))
            assert says in message, (name, message)
