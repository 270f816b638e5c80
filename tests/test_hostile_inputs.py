"""Flags, k-NN and image reading as a hostile user would try them (issue 20): impossible or
non-finite flag values, an encoder with NaN weights, float and 32-bit TIFFs, a byte-order mark in a
list file, a k above the bank, inputs whose memory has to be sized before it is allocated, and
checkpoints storing flag values no flag could give. Each is refused in one line naming the flag or
file, or (the BOM, the k) handled as a user expects."""

import importlib
import math
import re
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, demo_files, make_dataset, one_line_error, pretrain_args
from PIL import Image

import dataset_stats
import knn_eval
import main_finetune
import main_pretrain
import models_mae
import models_vit
from util.cli.args import check_common, check_layer_decay
from util.cli.errors import UserError
from util.data.channels import image_loader
from util.data.datasets import ImageFiles
from util.data.fast_crop import FastRandomResizedCropFlip
from util.data.images import load_channels, load_rgb
from util.data.lists import read_image_list
from util.data.loaders import eval_transform, pretrain_data
from util.eval import knn
from util.eval.linear import linear_accuracy
from util.eval.pictures import load_images
from util.sizes import MAX_SIDE, image_size


# ---------------------------------------------------------------------------------------------
# 1. Impossible flag values
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--clip_grad", "-1"], "--clip_grad must be positive"),  # would turn training into gradient ascent
        (["--clip_grad", "0"], "--clip_grad must be positive"),  # would stop learning
        (["--clip_grad", "nan"], "--clip_grad must be positive (leave it out for no clipping), got nan"),
        (["--weight_decay", "-100"], "--weight_decay must be 0 or more"),
        (["--weight_decay", "inf"], "--weight_decay must be a finite number, got inf"),
        (["--keep_last", "-1"], "--keep_last must be 0 (keep all) or more"),
        (["--mask_ratio", "nan"], "--mask_ratio must be a finite number"),
        # Were: a ValueError of TensorBoard's (or the sampler's seed) in the last epoch; a demand for
        # --mean and --std with -2 values each.
        (["--epochs", str(10**17)], "--epochs must be at most 1e+15, got 100000000000000000"),
        (["--in_chans", "-2"], "--in_chans must be at least 1, got -2"),
        (["--start_epoch", "-1"], "--start_epoch -1 is outside the run's 400 epochs: give 0 to 399"),
    ],
)
def test_impossible_training_flags_are_refused(tmp_path, flags, message):
    args = pretrain_args(tmp_path / "data", tmp_path / "out", *flags)
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        check_common(args)


def test_non_finite_values_of_any_float_flag_are_refused(tmp_path):
    """Flags that only one entry point has (fine-tuning's --mixup, --mean) go through the same check."""
    argv = ["--data_path", str(tmp_path), "--device", "cpu"]
    for flags in (["--mixup", "nan"], ["--cutmix_minmax", "0.2", "inf"], ["--mean", "0.5", "nan", "0.5"]):
        args = main_finetune.get_args_parser().parse_args(argv + flags)
        with pytest.raises(UserError, match=f"^{flags[0]} (values must be finite numbers|must be a finite number)"):
            check_common(args)


def test_sensible_training_flags_pass(tmp_path):
    flags = ["--clip_grad", "1.0", "--weight_decay", "0", "--keep_last", "0"]
    args = pretrain_args(tmp_path / "data", tmp_path / "out", *flags)
    assert check_common(args) is None


@pytest.mark.parametrize("value", [-1.0, 0.0, 1.5, math.nan, math.inf])
def test_layer_decay_outside_0_1_is_refused(value):
    with pytest.raises(UserError, match=r"^--layer_decay must be in \(0, 1\]"):
        check_layer_decay(value)


def test_layer_decay_in_range_passes():
    assert check_layer_decay(0.65) is None and check_layer_decay(1.0) is None


def test_pretrain_main_refuses_bad_flags_before_training(tmp_path):
    """The checks sit in run.start, so every entry point refuses before its first step."""
    data = make_dataset(tmp_path / "data", 6)
    args = main_pretrain.get_args_parser().parse_args(
        [
            *TINY,
            "--data_path",
            str(data),
            "--output_dir",
            str(tmp_path / "out"),
            "--log_dir",
            "",
            "--epochs",
            "1",
            "--clip_grad",
            "-1",
        ]
    )
    with pytest.raises(UserError, match="^--clip_grad must be positive"):
        main_pretrain.main(args)
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()


# ---------------------------------------------------------------------------------------------
# 2. k-NN: an encoder whose features are not finite gives no score; the k used is the k logged
def labelled_folder(root: Path, per_class: int, val_per_class: int) -> Path:
    for i, src in enumerate(demo_files(per_class + val_per_class)):
        split = "train" if i % (per_class + val_per_class) < per_class else "val"
        dest = root / split / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return root


def knn_args(data: Path, *extra: str):
    argv = ["--data_path", str(data), "--model", "mae_vit_tiny_patch4", "--device", "cpu", "--precision", "fp32"]
    argv += ["--num_workers", "0", "--batch_size", "8"]
    return knn_eval.get_args_parser().parse_args([*argv, *(extra or ["--encoders", "random"])])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_workers", "-1"], r"^--num_workers must be 0 or more, got -1$"),
        (["--seed", str(2**70)], r"^--seed must be in \[0, 2\*\*32 - 1\], got 1180591620717411303424$"),
        (["--device", "foo"], r"^--device foo is unknown; use cpu, cuda, mps"),
        (["--device", "cuda"], r"^--device cuda was asked for but CUDA is not available"),
        (["--input_size", "0"], r"^--input_size must be at least 1, got 0$"),  # not 'a multiple of the patch size'
        (["--encoders", "nowhere.pth"], r"^--encoders nowhere.pth is neither .* 'pixels'; check its path$"),
    ],
)
def test_knn_eval_checks_its_flags_as_training_does(tmp_path, monkeypatch, flags, message):
    """Before any image is read, in one line (they were the tracebacks of the loader, seeding, device)."""

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the flags were checked")

    monkeypatch.setattr(knn, "KnnData", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    with pytest.raises(UserError, match=message):
        knn_eval.main(knn_args(tmp_path, "--encoders", "random", *flags))


def test_knn_of_an_encoder_with_nan_weights_is_refused_naming_the_checkpoint(tmp_path):
    data = labelled_folder(tmp_path / "data", 4, 2)
    model = models_mae.create_model("mae_vit_tiny_patch4", 32)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(math.nan)
    path = tmp_path / "nan.pth"
    torch.save({"model": model.state_dict()}, path)
    args = knn_args(data, "--encoders", "random", str(path))
    # Refused where the weights are read (util/checkpoint/weights.check_weights), before any score;
    # features that turn non-finite in the forward pass are refused too (next test).
    refused = rf"^checkpoint {path}: weight blocks.0.attn.qkv.weight holds .* NaN or infinite"
    with pytest.raises(UserError, match=refused):
        knn_eval.main(args)


def test_knn_evaluate_names_the_encoder_by_default(tmp_path):
    data = knn.KnnData(str(labelled_folder(tmp_path / "data", 4, 2)), 32)
    args = knn_args(tmp_path)
    with pytest.raises(UserError, match="^the encoder gives features that are not finite"):
        knn.evaluate(lambda imgs: {"cls": imgs.flatten(1) * math.inf}, data, args)


@pytest.mark.parametrize("what", ["bank", "query"])
def test_too_few_knn_images_for_the_processes_are_refused_at_start(tmp_path, monkeypatch, what):
    """A rank without bank (or query) images skipped the feature gather the other ranks waited in: gloo
    aborted the job (a collective mismatch), NCCL would wait for its watchdog. Refused when the data are
    read, before pre-training's epochs that come before its first k-NN score."""
    monkeypatch.setattr(knn.distributed, "world_size", lambda: 2)
    refused = rf"^--data_path {tmp_path / 'data'}: 1 k-NN {what} image\(s\) cannot be shared by 2 processes; run fewer"
    with pytest.raises(UserError, match=refused + rf".*\(--knn_{what}_size 0: all\)$"):
        knn.KnnData(str(labelled_folder(tmp_path / "data", 4, 2)), 32, **{f"{what}_size": 1})


def test_knn_k_above_the_bank_is_logged_and_stored_as_used(tmp_path, capsys):
    data = knn.KnnData(str(labelled_folder(tmp_path / "data", 4, 2)), 32)  # a bank of 12 images
    args = knn_args(tmp_path, "--encoders", "random", "--knn_k", "500")
    knn.settle_k(args, data)
    assert args.knn_k == 12
    assert "--knn_k 500 is more than the 12 bank images: k = 12" in capsys.readouterr().out
    knn.settle_k(args, data)  # within the bank: kept, said nothing
    assert args.knn_k == 12 and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# 3. Reading images: float and 32-bit integer pixels have no depth to scale by, whatever --in_chans;
# a byte-order mark in a list file; memory that runs out is not the image's fault
@pytest.fixture
def deep_tiffs(tmp_path) -> dict[str, Path]:
    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    files = {"F": Image.fromarray(ramp.astype(np.float32)), "I": Image.fromarray((ramp * (2**31 - 1)).astype(np.int32))}
    paths = {}
    for mode, img in files.items():
        assert img.mode == mode
        paths[mode] = tmp_path / "images" / f"{mode}.tif"
        paths[mode].parent.mkdir(exist_ok=True)
        img.save(paths[mode])
    return paths


@pytest.mark.parametrize("mode", ["F", "I"])
def test_float_and_int32_tiffs_are_refused_in_rgb_as_with_one_channel(deep_tiffs, mode):
    path = deep_tiffs[mode]
    for read in (load_rgb, lambda p: load_channels(p, 1)):
        with pytest.raises(UserError, match=f"^image {path} holds {mode} pixels .*store it as 8 or 16-bit"):
            read(str(path))


def test_the_fast_loader_names_the_file_of_a_float_tiff(deep_tiffs):
    dataset = ImageFiles(str(deep_tiffs["F"].parent), FastRandomResizedCropFlip(32), lazy=True)
    with pytest.raises(UserError, match=f"^image {deep_tiffs['F']}: it holds F pixels"):
        dataset[0]


def test_16_bit_images_are_still_read_in_rgb(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(path)
    assert load_rgb(str(path)).getpixel((0, 0)) == (255, 255, 255)


def test_a_dark_16_bit_pgm_is_not_read_as_8_bit(tmp_path):
    """Pillow reads 16-bit PGMs as mode I: one whose values all stay below 256 is still 16-bit,
    as --in_chans 1 reads it, not brightened 257 times."""
    for name, value in (("dark.pgm", 250), ("brighter.pgm", 300)):
        pixels = np.full((4, 4), value, dtype=">u2")
        (tmp_path / name).write_bytes(b"P5\n4 4\n65535\n" + pixels.tobytes())
        with Image.open(tmp_path / name) as img:
            assert img.mode == "I"
        assert load_rgb(str(tmp_path / name)).getpixel((0, 0)) == (1, 1, 1)  # value * 255 / 65535, rounded
        assert load_channels(str(tmp_path / name), 1)[0, 0, 0] == pytest.approx(value / 65535)


def test_a_byte_order_mark_does_not_break_the_first_line(tmp_path):
    files = demo_files(1)[:2]
    (tmp_path / "list.txt").write_text("\n".join(f"{f} {i}" for i, f in enumerate(files)), encoding="utf-8-sig")
    assert (tmp_path / "list.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    samples = read_image_list(str(tmp_path / "list.txt"), labelled=True)
    assert samples == [(str(files[0]), 0), (str(files[1]), 1)]


def test_a_file_that_is_no_image_is_named_in_words(tmp_path):
    """Was "(UnidentifiedImageError: cannot identify image file <_io.BufferedReader name='...'>)"."""
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture")
    for read in (load_rgb, lambda p: load_channels(p, 1)):
        message = one_line_error(read, str(path))
        assert (
            message == f"cannot read image {path} (not an image Pillow can read: another format, or its start is "
            "damaged); remove or replace the file"
        ), message


def test_memory_that_runs_out_in_a_transform_is_not_blamed_on_the_file(tmp_path):
    data = make_dataset(tmp_path / "data", 1)

    def exhausting(img):
        raise MemoryError

    with pytest.raises(UserError) as caught:
        ImageFiles(str(data), exhausting)[0]
    message = str(caught.value)
    assert "memory ran out" in message and "not at fault" in message and "--num_workers" in message
    assert "remove or replace" not in message


# ---------------------------------------------------------------------------------------------
# 4. Memory sized before it is allocated
def test_a_huge_list_label_is_refused_before_its_class_scores_are_allocated(tmp_path):
    files = demo_files(3)
    (tmp_path / "train.txt").write_text(f"{files[0]} 0\n{files[1]} {10**12}\n")
    (tmp_path / "val.txt").write_text(f"{files[2]} 0\n")
    data = knn.KnnData(str(tmp_path), 32)  # the class names are not materialised
    assert len(data.classes) == 10**12 + 1 and data.classes[-1] == str(10**12)
    with pytest.raises(UserError, match=r"^the k-NN class scores of 1 query image\(s\) x 1000000000001 classes"):
        knn.evaluate(knn.pixel_features, data, knn_args(tmp_path))


def test_a_linear_classifier_too_large_is_refused():
    x, y = torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="^the linear classifier of 8 features x 1000000000000 classes"):
        linear_accuracy(x, y, x, y, 10**12, epochs=1)


def test_a_classifier_head_beyond_memory_names_nb_classes():
    """The head's 10**12 rows were blamed on --input_size and --model alone."""
    with pytest.raises(UserError, match=r"^building --model vit_tiny_patch4 at --input_size 32 with --nb_classes 10+ "):
        models_vit.create_model("vit_tiny_patch4", 32, num_classes=10**12)
    with pytest.raises(UserError, match=r"; give a smaller --input_size or --model, or fewer --nb_classes$"):
        models_vit.create_model("vit_tiny_patch4", 32, num_classes=10**12)


def test_input_size_beyond_memory_is_refused_before_batches_are_made(tmp_path):
    data = make_dataset(tmp_path / "data", 6)
    settled = ["--in_chans", "3", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]  # as run.start does
    args = pretrain_args(data, tmp_path / "out", "--input_size", "100000", *settled)
    with pytest.raises(UserError, match=r"^16 x 3 x 100000 x 100000 images .*lower --batch_size, --input_size"):
        pretrain_data(args)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_an_elongated_image_is_refused_before_the_evaluation_resize(tmp_path, in_chans):
    """A 1 x 1,000,000 px image, resized to cover 36 x 36 px, would become 36 x 36,000,000 px."""
    path = tmp_path / "images" / "line.png"
    path.parent.mkdir()
    Image.fromarray(np.zeros((1, 1_000_000), np.uint8)).save(path)
    norm = {} if in_chans == 3 else {"mean": (0.5,), "std": (0.5,)}
    dataset = ImageFiles(str(path.parent), eval_transform(32, in_chans=in_chans, **norm), loader=image_loader(in_chans))
    with pytest.raises(UserError, match=f"^image {path}: resizing its 1000000 x 1 px to 36000000 x 36 px"):
        dataset[0]


def test_an_elongated_image_in_the_pictures_is_named(tmp_path):
    """The reconstruction pictures (pre-training's, reconstruct.py's) read their images through the same resize."""
    path = tmp_path / "line.png"
    Image.fromarray(np.zeros((1, 1_000_000), np.uint8)).save(path)
    with pytest.raises(UserError, match=f"^image {path}: resizing its 1000000 x 1 px"):
        load_images([str(path)], eval_transform(32))


def test_the_evaluation_resize_keeps_ordinary_images():
    img = Image.open(demo_files(1)[0]).convert("RGB")
    assert eval_transform(64)(img).shape == (3, 64, 64)


@pytest.mark.parametrize("size", [10**9, 2**20 + 1])
@pytest.mark.parametrize("entry", ["main_pretrain", "main_finetune", "knn_eval"])
def test_an_input_size_beyond_the_largest_side_is_one_line_before_a_model_is_built(tmp_path, entry, size):
    """About 1e9 px overflowed torch's size arithmetic while the model was built, before the memory
    checks could size it: a RuntimeError in every entry point."""
    module = importlib.import_module(entry)
    argv = ["--data_path", str(tmp_path), "--device", "cpu", "--output_dir", "", "--log_dir", "", "--num_workers", "0"]
    if entry == "knn_eval":
        argv = [*argv[:4], "--encoders", "random"]
    args = module.get_args_parser().parse_args([*argv, "--input_size", str(size)])
    message = one_line_error(module.main, args)
    assert message.startswith(f"--input_size {size} is more than {MAX_SIDE} pixels a side")
    assert one_line_error(image_size, [32, size]).startswith(f"--input_size 32 {size} is more than")


@pytest.mark.parametrize("name", [*models_mae.MODELS, *models_vit.MODELS])
def test_up_to_the_largest_side_the_memory_checks_size_every_model(name):
    """The bound is low enough: every model at MAX_SIDE px (rounded to its patch) is a memory line."""
    registry = models_mae if name in models_mae.MODELS else models_vit
    with torch.device("meta"):
        patch = registry.MODELS[name]().patch_embed.patch_size[0]
    with pytest.raises(UserError, match=r"needs about [0-9.]+ GiB, CPU memory has"):
        registry.create_model(name, MAX_SIDE // patch * patch)


def stats_args(data: Path, *extra: str):
    return dataset_stats.get_args_parser().parse_args(["--data_path", str(data), "--num_workers", "0", *extra])


def test_dataset_stats_sizes_its_resize_and_names_the_flag(tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    with pytest.raises(UserError, match=r"^resizing an image to --input_size 100000 .*lower --input_size"):
        dataset_stats.compute(stats_args(data, "--input_size", "100000"))


# ---------------------------------------------------------------------------------------------
# 5. Checkpoints storing flag values no flag could give: refused where any entry point opens them
def _entry_point_argv(entry: str, path: Path, tmp_path: Path) -> list[str]:
    return {
        "reconstruct": [str(demo_files(1)[0]), "--checkpoint", str(path), "--output", str(tmp_path / "r.png")],
        "export": ["--checkpoint", str(path), "--to", "hf", "--output", str(tmp_path / "hf")],
        "knn_eval": ["--data_path", str(tmp_path), "--encoders", str(path), "--num_workers", "0"],
        "main_linprobe": ["--data_path", str(tmp_path), "--finetune", str(path), "--output_dir", "", "--log_dir", ""],
        "main_finetune": ["--data_path", str(tmp_path), "--finetune", str(path), "--output_dir", "", "--log_dir", ""],
        "main_pretrain": ["--data_path", str(tmp_path), "--resume", str(path), "--output_dir", "", "--log_dir", ""],
    }[entry]


@pytest.mark.parametrize(
    "entry, stored, shown",
    [
        ("reconstruct", dict(input_size="abc"), "--input_size 'abc'"),
        ("reconstruct", dict(mean="abc"), "--mean 'abc'"),
        ("reconstruct", dict(input_size=10**9), "--input_size 1000000000"),
        ("export", dict(input_size=["a", "b"]), "--input_size ['a', 'b']"),
        ("export", dict(mask_ratio="x"), "--mask_ratio 'x'"),
        ("export", dict(mask_ratio=2.0), "--mask_ratio 2.0"),
        ("knn_eval", dict(input_size="abc"), "--input_size 'abc'"),
        ("main_linprobe", dict(mean="abc"), "--mean 'abc'"),
    ],
)
def test_a_checkpoint_storing_impossible_flags_is_one_line_naming_it_and_the_value(tmp_path, entry, stored, shown):
    """A real MAE's weights, and the args of a real run with one value changed (a hostile review's
    files): before, tracebacks deep inside sizes and configs, or an error blaming a flag not given."""
    model = models_mae.create_model("mae_vit_tiny_patch4", 32)
    args = pretrain_args(tmp_path / "data", tmp_path / "out", "--model", "mae_vit_tiny_patch4")
    path = tmp_path / "crafted.pth"
    torch.save({"model": model.state_dict(), "args": Namespace(**{**vars(args), **stored})}, path)
    module = importlib.import_module(entry)
    parsed = module.get_args_parser().parse_args(_entry_point_argv(entry, path, tmp_path))
    if hasattr(parsed, "device"):
        parsed.device = "cpu"
    message = one_line_error(module.main, parsed)
    assert message.startswith(f"checkpoint {path} stores flag values this code cannot use: {shown} "), message
    assert not list(tmp_path.glob("r.png")) and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("entry", ["reconstruct", "knn_eval", "main_pretrain", "main_finetune", "main_linprobe"])
def test_a_stored_input_size_the_model_cannot_take_blames_the_checkpoint_not_a_flag(tmp_path, entry):
    """Every entry point that fills --input_size from a checkpoint (--checkpoint, --encoders, --resume,
    --finetune) names that checkpoint when the size does not suit the model, not the flag."""
    model = models_mae.create_model("mae_vit_tiny_patch4", 32)
    path = tmp_path / "c.pth"
    args = pretrain_args(tmp_path / "data", tmp_path / "out", "--model", "mae_vit_tiny_patch4")
    torch.save({"model": model.state_dict(), "args": Namespace(**{**vars(args), "input_size": 30})}, path)
    module = importlib.import_module(entry)
    parsed = module.get_args_parser().parse_args(_entry_point_argv(entry, path, tmp_path))
    if hasattr(parsed, "device"):
        parsed.device = "cpu"
    message = one_line_error(module.main, parsed)
    assert message == (
        f"checkpoint {path} stores --input_size 30, not a multiple of the model's patch size 4; give --input_size, "
        f"or a --model of a patch size that divides it"
    )
