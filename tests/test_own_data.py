"""Your own data: dataset_stats.py against hand computations, --mean/--std applied as
(x - mean) / std everywhere, stored in checkpoints and taken up by fine-tuning, reconstruct.py
and knn_eval.py, and file lists (parsing errors name the line; a list gives the folder's data
set; pre-training and fine-tuning run and resume exactly from lists)."""

import argparse
import json
import math
import os
import shlex
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_same,
    isolated_interrupts,
    load,
    make_dataset,
    make_split,
    preserved_signals,
    read_log,
    recorded_calls,
    run_pretrain,
)
from PIL import Image

import dataset_stats
import engine_finetune
import knn_eval
import main_finetune
import main_linprobe
import main_pretrain
import reconstruct
from util.checkpoint.resume import open_resume
from util.cli.errors import UserError
from util.data import normalization
from util.data.datasets import ListedImages, classification_splits, pretrain_dataset
from util.data.lists import read_image_list
from util.data.loaders import eval_transform, pretrain_transform
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device

MEAN, STD = [0.25, 0.5, 0.75], [0.125, 0.25, 0.5]  # exact in binary: expected values are exact too
COLOUR = (200, 30, 90)
CPU = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]


@pytest.fixture(autouse=True)
def _isolate():
    with isolated_interrupts():
        yield


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)  # PNG: lossless, so the pixels are known
    return path


def _constant(path: Path, colour=COLOUR, width: int = 40, height: int = 36) -> Path:
    return _save(path, np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3)))


def _normalised(colour=COLOUR, mean=MEAN, std=STD) -> torch.Tensor:
    """(x - mean) / std of a colour, per channel, in float64."""
    return (torch.tensor(colour, dtype=torch.float64) / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(
        std, dtype=torch.float64
    )


def _flags(mean=MEAN, std=STD) -> list[str]:
    return ["--mean", *map(str, mean), "--std", *map(str, std)]


# ---------------------------------------------------------------------------------------------
# dataset_stats.py
def _stats(data: Path, *extra: str) -> dict:
    args = dataset_stats.get_args_parser().parse_args(["--data_path", str(data), "--num_workers", "0", *extra])
    return dataset_stats.compute(args)


def test_stats_equal_a_hand_computation_at_the_images_size(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (4, 4, 3)) for _ in range(3)]
    for i, pixels in enumerate(images):
        _save(tmp_path / "d" / f"{i}.png", pixels)
    stats = _stats(tmp_path / "d", "--input_size", "4")  # Pillow leaves a same-size resize alone
    everything = np.concatenate([p.reshape(-1, 3) for p in images]) / 255.0
    assert stats["images"] == 3
    assert stats["mean"] == pytest.approx(everything.mean(axis=0).tolist(), abs=1e-12)
    assert stats["std"] == pytest.approx(everything.std(axis=0).tolist(), abs=1e-12)  # population std
    # Exactly: the mean is the exact fraction rounded once.
    for c in range(3):
        values = [int(v) for p in images for v in p[..., c].ravel()]
        assert stats["mean"][c] == float(Fraction(sum(values), 255 * len(values)))


def test_stats_resize_gives_every_image_the_same_weight(tmp_path):
    # Constant images stay constant through the bicubic resize; a large and a small image count
    # the same (as in training, one crop of input_size² pixels each).
    colours = [(0, 0, 0), (255, 255, 255), (255, 0, 51)]
    for i, (colour, (w, h)) in enumerate(zip(colours, [(50, 40), (7, 9), (16, 16)], strict=True)):
        _constant(tmp_path / "d" / f"{i}.png", colour, w, h)
    stats = _stats(tmp_path / "d", "--input_size", "8")
    values = np.array(colours) / 255.0
    assert stats["mean"] == pytest.approx(values.mean(axis=0).tolist(), abs=1e-12)
    assert stats["std"] == pytest.approx(values.std(axis=0).tolist(), abs=1e-12)
    # --input_size 0: every pixel at the image's own size (the 50x40 image dominates).
    raw = _stats(tmp_path / "d", "--input_size", "0")
    weights = np.array([50 * 40, 7 * 9, 16 * 16])
    assert raw["mean"] == pytest.approx((values * weights[:, None]).sum(0) / weights.sum(), abs=1e-12)


def test_stats_max_images_takes_evenly_spaced_images_and_lists_work(tmp_path):
    for i in range(10):
        _constant(tmp_path / "d" / f"{i}.png", (i * 20, 0, 0), 4, 4)
    stats = _stats(tmp_path / "d", "--input_size", "4", "--max_images", "4")
    assert stats["images"] == 4
    assert stats["mean"][0] == pytest.approx(np.mean([0, 60, 120, 180]) / 255, abs=1e-12)  # images 0, 3, 6, 9
    (tmp_path / "d" / "some.txt").write_text("# two of them\n1.png\n\n5.png\n")
    listed = _stats(tmp_path / "d" / "some.txt", "--input_size", "4")
    assert listed["images"] == 2 and listed["mean"][0] == pytest.approx((20 + 100) / 2 / 255, abs=1e-12)


def test_stats_of_other_channel_counts_equal_a_hand_computation(tmp_path):
    """--in_chans reads images as training does: a 16-bit grayscale file's values over 65535, an
    RGBA file's four bands; sizes as for RGB (own size, or constant images through the resize)."""
    rng = np.random.default_rng(1)
    gray = [rng.integers(0, 65536, (5, 6)).astype(np.uint16) for _ in range(3)]
    for i, values in enumerate(gray):
        (tmp_path / "gray").mkdir(exist_ok=True)
        Image.fromarray(values).save(tmp_path / "gray" / f"{i}.png")  # mode I;16: 16-bit PNG
    stats = _stats(tmp_path / "gray", "--in_chans", "1", "--input_size", "0")
    # The model sees float32 values: the statistics are theirs, summed in float64.
    everything = (np.concatenate([g.ravel() for g in gray]) / 65535.0).astype(np.float32).astype(np.float64)
    assert stats["in_chans"] == 1 and stats["images"] == 3
    assert stats["mean"] == pytest.approx([everything.mean()], abs=1e-12)
    assert stats["std"] == pytest.approx([everything.std()], abs=1e-12)

    colours = [(0, 0, 0, 255), (255, 255, 255, 0), (255, 0, 51, 102)]
    for i, (colour, (w, h)) in enumerate(zip(colours, [(50, 40), (7, 9), (16, 16)], strict=True)):
        _save(tmp_path / "rgba" / f"{i}.png", np.broadcast_to(np.array(colour), (h, w, 4)))
    stats = _stats(tmp_path / "rgba", "--in_chans", "4", "--input_size", "8")
    values = np.array(colours) / 255.0  # constant images stay constant: each image counts once
    assert stats["mean"] == pytest.approx(values.mean(axis=0).tolist(), abs=1e-6)
    assert stats["std"] == pytest.approx(values.std(axis=0).tolist(), abs=1e-6)
    with pytest.raises(UserError, match=r"has 4 channel\(s\) .* but --in_chans is 1"):
        _stats(tmp_path / "rgba", "--in_chans", "1")
    with pytest.raises(UserError, match="--in_chans must be at least 1, got 0"):
        _stats(tmp_path / "rgba", "--in_chans", "0")


@pytest.mark.parametrize("in_chans", ["3", "1"], ids=["8-bit RGB, integer sums", "16-bit gray, float64 sums"])
def test_stats_are_the_same_for_any_num_workers(tmp_path, in_chans):
    """docs/own-data.md: the same result for any --num_workers, bit for bit; 130 images make 3 batches, which the
    two workers load in turn."""
    rng = np.random.default_rng(2)
    for i in range(130):
        if in_chans == "3":
            _save(tmp_path / f"{i:03d}.png", rng.integers(0, 256, (5, 6, 3)))
        else:
            Image.fromarray(rng.integers(0, 65536, (5, 6)).astype(np.uint16)).save(tmp_path / f"{i:03d}.png")
    flags = ["--in_chans", in_chans, "--input_size", "0"]
    alone = _stats(tmp_path, *flags)
    assert alone["images"] == 130
    assert _stats(tmp_path, *flags, "--num_workers", "2") == alone


@pytest.mark.parametrize("cores, workers", [(2, 2), (8, 4)])
def test_stats_workers_default_to_at_most_the_usable_cores(cores, workers, monkeypatch):
    """4 workers on a 2-core machine made PyTorch print its too-many-workers warning four times."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert dataset_stats.get_args_parser().get_default("num_workers") == workers


def test_stats_help_names_no_checkpoint():
    """dataset_stats.py opens none: its --in_chans defaults to 3, not to 'the checkpoint's'."""
    assert "checkpoint" not in dataset_stats.get_args_parser().format_help()


def test_stats_command_prints_flags_that_parse_and_writes_json(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", 2)
    argv = ["--data_path", str(data), "--input_size", "32", "--num_workers", "0"]
    argv += ["--json", str(tmp_path / "stats.json")]
    capsys.readouterr()
    dataset_stats.main(dataset_stats.get_args_parser().parse_args(argv))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("--mean"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["images"] == 6 and stats["input_size"] == 32
    parsed = main_pretrain.get_args_parser().parse_args(shlex.split(line))
    assert parsed.mean == pytest.approx(stats["mean"], abs=1e-6)
    assert parsed.std == pytest.approx(stats["std"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The normalisation applied is (x - mean) / std
def test_transforms_and_device_normalisation_apply_the_given_values(tmp_path):
    img = Image.open(_constant(tmp_path / "c.png"))
    expected = _normalised().float().view(3, 1, 1).expand(3, 16, 16)
    for transform in (eval_transform(16, MEAN, STD), pretrain_transform(16, "torchvision", MEAN, STD)):
        assert torch.allclose(transform(img), expected, atol=1e-6)
    uint8 = torch.tensor(COLOUR, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalize_on_device(uint8, MEAN, STD), expected[:, :4, :4], atol=1e-5)
    # The defaults stay ImageNet's.
    imagenet = _normalised(mean=IMAGENET_MEAN, std=IMAGENET_STD).float().view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(eval_transform(16)(img), imagenet, atol=1e-6)


@pytest.fixture(scope="module")
def constant_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("constant")
    for i in range(16):
        _constant(root / f"{i:02d}.png", width=40 + i, height=36)
    return root


@pytest.fixture(scope="module")
def custom_pretrained(tmp_path_factory, constant_data) -> Path:
    """One epoch of pre-training with --mean/--std given: the checkpoint fine-tuning starts from."""
    out = tmp_path_factory.mktemp("custom")
    with preserved_signals():
        run_pretrain(constant_data, out, "--epochs", "1", "--warmup_epochs", "0", "--vis_freq", "0", *_flags())
    return out / "checkpoint-0.pth"


@pytest.mark.parametrize("loader", ["fast", "torchvision"])
def test_pretraining_feeds_the_model_normalised_pixels(constant_data, tmp_path, monkeypatch, loader):
    seen = []
    build = main_pretrain.build_model

    def build_and_watch(*given):
        model = build(*given)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
        return model

    monkeypatch.setattr(main_pretrain, "build_model", build_and_watch)
    run_pretrain(constant_data, tmp_path, "--epochs", "1", "--vis_freq", "0", "--loader", loader, *_flags())
    assert seen and all(batch.shape == (16, 3, 32, 32) for batch in seen)
    expected = _normalised().float().view(1, 3, 1, 1).expand_as(seen[0])
    assert torch.allclose(seen[0], expected, atol=1e-5)
    saved = load(tmp_path / "checkpoint-0.pth")["args"]
    assert (saved.mean, saved.std) == (MEAN, STD)


def test_pretraining_defaults_to_imagenet_and_stores_it(constant_data, tmp_path, capsys):
    run_pretrain(constant_data, tmp_path, "--epochs", "1", "--vis_freq", "0")
    saved = load(tmp_path / "checkpoint-0.pth")["args"]
    assert (saved.mean, saved.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert "normalisation: mean 0.485 0.456 0.406 std 0.229 0.224 0.225 (ImageNet's, the default)" in (
        capsys.readouterr().out
    )


class _Stop(Exception):
    pass


def _classifier_transforms(entry_point, monkeypatch, tmp_path: Path, *flags: str) -> tuple:
    """(settled args, train transform, val transform) as ``entry_point.main`` builds them; stops there."""
    built = {}

    def capture(data_path, train_tf, val_tf, nb_classes, *rest, **kwargs):
        built.update(train=train_tf, val=val_tf)
        raise _Stop

    monkeypatch.setattr(engine_finetune, "classification_splits", capture)  # both entry points' data
    start = entry_point.start

    def keep_run(*a, **k):
        built["run"] = start(*a, **k)
        return built["run"]

    monkeypatch.setattr(entry_point, "start", keep_run)
    argv = ["--model", "vit_tiny_patch4", "--input_size", "32", "--nb_classes", "3", "--data_path", str(tmp_path)]
    argv += ["--output_dir", str(tmp_path / "out"), "--log_dir", "", *CPU, *flags]
    if entry_point is main_finetune:
        argv += ["--aa", "", "--reprob", "0"]  # augmentations that change a constant image's colour
    args = entry_point.get_args_parser().parse_args(argv)
    with pytest.raises(_Stop):
        entry_point.main(args)
    return built["run"].args, built["train"], built["val"]


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_classifiers_take_the_pretrained_checkpoints_values(entry_point, custom_pretrained, tmp_path, monkeypatch):
    args, train_tf, val_tf = _classifier_transforms(entry_point, monkeypatch, tmp_path, "--finetune",
                                                    str(custom_pretrained))  # fmt: skip
    assert (args.mean, args.std) == (MEAN, STD)
    img = Image.open(_constant(tmp_path / "c.png"))
    expected = _normalised().float().view(3, 1, 1).expand(3, 32, 32)
    # Constant images stay constant through crops, flips and resizes (--aa '' --reprob 0).
    assert torch.allclose(val_tf(img), expected, atol=1e-6)
    assert torch.allclose(train_tf(img), expected, atol=1e-6)


def test_explicit_values_win_and_warn_when_they_differ(custom_pretrained, tmp_path, monkeypatch, capsys):
    other = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    args, _, val_tf = _classifier_transforms(main_finetune, monkeypatch, tmp_path, "--finetune",
                                             str(custom_pretrained), *_flags(*other))  # fmt: skip
    assert (args.mean, args.std) == other
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1
    assert str(custom_pretrained) in warnings[0] and "mean 0.25 0.5 0.75 std 0.125 0.25 0.5" in warnings[0]
    img = Image.open(_constant(tmp_path / "c.png"))
    expected = _normalised(mean=other[0], std=other[1]).float().view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(val_tf(img), expected, atol=1e-6)
    # The same values as the checkpoint's: no warning.
    _classifier_transforms(main_finetune, monkeypatch, tmp_path, "--finetune", str(custom_pretrained), *_flags())
    assert "warning" not in capsys.readouterr().out


def _resume_source(args: argparse.Namespace) -> list:
    """What run.start hands normalisation for ``--resume``: the checkpoint it opens, or nothing."""
    opened = open_resume(args)
    return [(f"checkpoint {opened.path}", opened.args)] if opened else []


def test_eval_and_resume_take_the_values_of_the_checkpoint_they_load(custom_pretrained, tmp_path):
    args = argparse.Namespace(resume=str(custom_pretrained), finetune="", eval=True, output_dir="", mean=None, std=None)
    normalization.resolve(args, _resume_source(args))
    assert (args.mean, args.std) == (MEAN, STD)
    # --resume auto: the newest checkpoint of --output_dir; an official release (no args): ImageNet's.
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {}}, out / "checkpoint-0.pth")
    shutil.copyfile(custom_pretrained, out / "checkpoint-1.pth")
    args = argparse.Namespace(resume="auto", output_dir=str(out), mean=None, std=None)
    normalization.resolve(args, _resume_source(args))
    assert (args.mean, args.std) == (MEAN, STD)
    official = argparse.Namespace(resume=str(out / "checkpoint-0.pth"), output_dir="", mean=None, std=None)
    normalization.resolve(official, _resume_source(official))
    assert (official.mean, official.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_reconstruct_uses_the_checkpoints_values(custom_pretrained, tmp_path, monkeypatch):
    used = {}
    grid = reconstruct.reconstruction_grid

    def watch(model, imgs, noise, mask_ratio, mean, std):
        used.update(imgs=imgs, mean=mean, std=std)
        return grid(model, imgs, noise, mask_ratio, mean, std)

    monkeypatch.setattr(reconstruct, "reconstruction_grid", watch)
    image = _constant(tmp_path / "c.png")
    argv = ["--checkpoint", str(custom_pretrained), str(image), "--output", str(tmp_path / "r.png"), "--device", "cpu"]
    reconstruct.main(reconstruct.get_args_parser().parse_args(argv))
    assert (used["mean"], used["std"]) == (MEAN, STD)
    assert torch.allclose(used["imgs"][0], _normalised().float().view(3, 1, 1).expand(3, 32, 32), atol=1e-6)
    # The picture's original column is the image itself again.
    with Image.open(tmp_path / "r.png") as picture:
        assert picture.getpixel((1, 1)) == COLOUR


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--mean", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"],
            r"--mean takes one value per image channel \(3\), got 2",
        ),
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2"], r"--std takes one value per image channel \(3\), got 1"),
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"], r"--std values must be positive"),
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "-1", "0.2"], r"--std values must be positive"),
        (["--mean", "0.5", "nan", "0.5", "--std", "0.2", "0.2", "0.2"], r"--mean values must be finite"),
        (["--mean", "0.5", "0.5", "0.5", "--std", "inf", "0.2", "0.2"], r"--std values must be finite"),
        (["--mean", "0.5", "0.5", "0.5"], r"--mean and --std go together: give both \(--std is missing\)"),
        # Finite, but not in float32, where images are normalised: torchvision's ValueError (a std rounded to
        # 0) in the loader, or pixels of inf and NaN.
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "1e-50", "0.2"], r"--std 0.2 1e-50 0.2: pixels in \[0, 1\]"),
        (["--mean", "1e300", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"], r"leave float32's range"),
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "1e-40", "0.2"], r"leave float32's range"),
    ],
)
def test_bad_mean_or_std_is_a_one_line_error_naming_the_flag(constant_data, tmp_path, flags, message):
    with pytest.raises(UserError, match=message) as error:
        run_pretrain(constant_data, tmp_path, "--epochs", "1", *flags)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("entry_point", [main_pretrain, main_finetune, main_linprobe], ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mean", "0.5", "0.5", "0.5"], r"--mean and --std go together: give both \(--std is missing\)"),
        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"], r"--std values must be positive"),
        (["--mean", "0.5", "--std", "0.2"], r"--mean takes one value per image channel \(3\), got 1"),
        (["--in_chans", "2", "--mean", "0.5", "--std", "0.2"], r"--mean takes one value per image channel \(2\)"),
        (["--in_chans", "2"], r"--in_chans 2 needs --mean and --std with 2 value\(s\) each"),
    ],
)
def test_bad_mean_or_std_is_refused_with_the_other_flags(tmp_path, entry_point, flags, message):
    """By check_args, as own-data.md says ("checked before anything runs"): the SLURM launcher runs it
    before the job waits in the queue, and a run before it claims --output_dir or reads a checkpoint.
    Was: only once the run had started (the launcher submitted such jobs)."""
    args = entry_point.get_args_parser().parse_args(["--output_dir", str(tmp_path / "out"), *CPU, *flags])
    with pytest.raises(UserError, match=message):
        entry_point.check_args(args)


def test_mean_and_std_a_checkpoint_may_count_are_left_to_it(tmp_path):
    """Where --resume or --finetune may decide the channels, check_args does not count the values
    (the run counts them against the checkpoint's), and giving none is no error."""
    one = ["--mean", "0.5", "--std", "0.2"]
    for entry_point, source in (
        (main_pretrain, "--resume"),
        (main_finetune, "--finetune"),
        (main_linprobe, "--resume"),
    ):
        for flags in (one, ["--in_chans", "2"]):
            argv = ["--output_dir", str(tmp_path / "out"), *CPU, source, str(tmp_path / "x.pth"), *flags]
            entry_point.check_args(entry_point.get_args_parser().parse_args(argv))


def test_tools_refuse_bad_mean_or_std_before_reading_the_checkpoint(tmp_path):
    not_read = tmp_path / "garbage.pth"
    not_read.write_bytes(b"not a checkpoint")
    image = _constant(tmp_path / "c.png")
    with pytest.raises(UserError, match=r"--mean and --std go together"):
        knn_eval.main(
            knn_eval.get_args_parser().parse_args(
                [
                    "--data_path",
                    str(tmp_path),
                    "--encoders",
                    str(not_read),
                    "--device",
                    "cpu",
                    "--mean",
                    "0.5",
                    "0.5",
                    "0.5",
                ]
            )
        )
    argv = ["--checkpoint", str(not_read), str(image), "--device", "cpu", "--output", str(tmp_path / "r.png")]
    with pytest.raises(UserError, match=r"--std values must be positive"):
        reconstruct.main(
            reconstruct.get_args_parser().parse_args([*argv, "--mean", "0", "0", "0", "--std", "1", "0", "1"])
        )


@pytest.mark.parametrize("in_chans, flags, advised", [(3, ([0.5] * 3, [0.2] * 3), True), (1, ([0.45], [0.22]), False)])
def test_the_warning_advises_dropping_the_flags_only_where_the_checkpoints_values_fit(in_chans, flags, advised, capsys):
    """An RGB checkpoint's three values cannot normalise a 1-channel run: without --mean/--std that run
    is refused (the test below), so the warning must not tell the user to drop them."""
    saved = argparse.Namespace(mean=[0.25, 0.5, 0.75], std=[0.125, 0.25, 0.5])
    args = argparse.Namespace(mean=flags[0], std=flags[1], in_chans=in_chans)
    normalization.resolve(args, [("checkpoint x.pth", saved)])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "checkpoint x.pth was trained on pixels normalised" in warnings[0]
    assert ("drop --mean/--std" in warnings[0]) == advised


def test_the_warning_advises_dropping_the_flags_only_for_the_values_that_would_then_be_used(capsys):
    """Without --mean/--std a run takes the first stored values (knn_eval: its first --encoders checkpoint
    that stores some): a later checkpoint with other values was also told to drop the flags "to use the
    checkpoint's", which gave it the first one's and the same warning."""
    first = argparse.Namespace(mean=[0.25, 0.5, 0.75], std=[0.125, 0.25, 0.5])
    same = argparse.Namespace(mean=[0.25, 0.5, 0.75], std=[0.125, 0.25, 0.5])
    other = argparse.Namespace(mean=[0.5] * 3, std=[0.25] * 3)
    args = argparse.Namespace(mean=[0.45] * 3, std=[0.22] * 3)
    sources = [("checkpoint a.pth", first), ("checkpoint b.pth", other), ("checkpoint c.pth", same)]
    normalization.resolve(args, sources)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    advised = {line.split(" was trained")[0].split()[-1]: "drop --mean/--std" in line for line in warnings}
    assert advised == {"a.pth": True, "b.pth": False, "c.pth": True}, warnings


def test_checkpoint_values_of_another_channel_count_are_refused(tmp_path):
    saved = argparse.Namespace(mean=[0.5], std=[0.2])
    args = argparse.Namespace(mean=None, std=None)
    with pytest.raises(UserError, match=r"checkpoint x.pth stores --mean 0.5: 1 value\(s\) for images of 3 channels"):
        normalization.resolve(args, [("checkpoint x.pth", saved)])


# ---------------------------------------------------------------------------------------------
# File lists
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def two_images(tmp_path) -> Path:
    for name in ("a.png", "b c.png"):
        _constant(tmp_path / "imgs" / name, width=8, height=8)
    return tmp_path


def test_list_skips_blank_lines_and_comments_and_keeps_order(two_images):
    listed = _write(two_images / "list.txt", "# my data\n\n  imgs/b c.png 1\nimgs/a.png 0  \n   # indented comment\n")
    samples = read_image_list(str(listed), labelled=True, nb_classes=2)
    assert samples == [(str(two_images / "imgs" / "b c.png"), 1), (str(two_images / "imgs" / "a.png"), 0)]
    # Pre-training: the same list, labels ignored; a line that names a file as a whole is that file.
    assert read_image_list(str(listed), labelled=False) == [(p, 0) for p, _ in samples]
    unlabelled = _write(two_images / "plain.txt", "imgs/b c.png\n" + str(two_images / "imgs" / "a.png") + "\n")
    assert [p for p, _ in read_image_list(str(unlabelled), labelled=False)] == [p for p, _ in samples]


def test_lines_end_at_unix_windows_and_old_mac_breaks_only(tmp_path):
    """A file name may hold what str.splitlines also breaks at (U+2028, U+0085, a form feed)."""
    names = ["a\u2028b.png", "c\x85d.png", "e\x0cf.png", "g.png"]
    for name in names:
        _constant(tmp_path / "imgs" / name, width=8, height=8)
    listed = tmp_path / "list.txt"
    listed.write_bytes("\ufeffimgs/a\u2028b.png 0\r\nimgs/c\x85d.png 1\rimgs/e\x0cf.png 0\nimgs/g.png 1".encode())
    samples = read_image_list(str(listed), labelled=True, nb_classes=2)
    assert samples == [(str(tmp_path / "imgs" / name), label) for name, label in zip(names, [0, 1, 0, 1], strict=True)]


@pytest.mark.parametrize(
    "text, labelled, message",
    [
        ("imgs/a.png 0\n\n# c\nimgs/gone.png 1\n", True, r"list.txt line 4: no file imgs/gone.png"),
        ("imgs/a.png 0\nimgs/gone.png\n", False, r"list.txt line 2: no file imgs/gone.png"),
        ("imgs/a.png 0\nimgs/a.png\n", True, r"list.txt line 2: no label after 'imgs/a.png'"),
        ("# x\nimgs/a.png cat\n", True, r"list.txt line 2: the label 'cat' is not a class index"),
        ("imgs/a.png -1\n", True, r"list.txt line 1: the label '-1' is not a class index"),
        ("imgs/a.png 0\nimgs/a.png 3\n", True, r"line 2: the label 3 is not below --nb_classes 3; give --nb_classes 4"),
        ("# nothing\n\n", True, r"the list file .*list.txt names no images"),
    ],
)
def test_bad_list_lines_are_one_line_errors_naming_file_and_line(two_images, text, labelled, message):
    listed = _write(two_images / "list.txt", text)
    with pytest.raises(UserError, match=message) as error:
        read_image_list(str(listed), labelled=labelled, nb_classes=3)
    assert "\n" not in str(error.value)


@pytest.fixture
def many_images(tmp_path) -> Path:
    """Two class folders of 12 images each (enough to be listed), written once and linked: the test
    is about names, not pixels."""
    first = _constant(tmp_path / "imgs" / "first.png", width=4, height=4)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir()
        for i in range(12):
            os.link(first, tmp_path / "imgs" / cls / f"{i:02d}.png")
    return tmp_path


def _list_of(root: Path, labels: bool) -> Path:
    lines = [
        f"imgs/{cls}/{i:02d}.png" + (f" {c}" if labels else "")
        for c, cls in enumerate(("cat", "dog"))
        for i in range(12)
    ]
    return _write(root / "list.txt", "\n".join(lines) + "\n")


@pytest.mark.parametrize("labelled, labels", [(True, True), (False, True), (False, False)])
def test_a_list_is_checked_from_its_folders_listings_not_a_lookup_per_file(many_images, labelled, labels):
    """On a network file system each look-up of a file is a round trip to the server: a list of
    ImageNet's 1.28M files took 1.28M of them per rank (pre-training with a labelled list: 2.56M,
    the whole line, then the path), where a listing of each of its 1,000 folders does."""
    listed = _list_of(many_images, labels)
    with recorded_calls(os, "stat") as looked_up:
        samples = read_image_list(str(listed), labelled=labelled)
    assert [p for p in looked_up if p.endswith(".png") or p.endswith(".png 0") or p.endswith(".png 1")] == []
    expected = [str(many_images / "imgs" / cls / f"{i:02d}.png") for cls in ("cat", "dog") for i in range(12)]
    assert samples == [(p, (i // 12) if labelled else 0) for i, p in enumerate(expected)]


def test_a_listed_folder_still_finds_what_a_lookup_would(many_images):
    """What the listing does not show is looked up: the answers stay os.path.isfile's."""
    cat = many_images / "imgs" / "cat"
    (cat / "link.png").symlink_to(cat / "00.png")  # a link to a file is a file
    (cat / "folder.png").mkdir()  # a folder named as an image is not
    (cat / "03.png 1").write_bytes((cat / "03.png").read_bytes())  # unlabelled, a whole line may name a file
    lines = [f"imgs/cat/{i:02d}.png 0" for i in range(12)] + ["imgs/cat/link.png 0", "imgs/cat/03.png 1"]
    listed = _write(many_images / "list.txt", "\n".join(lines) + "\n")
    assert read_image_list(str(listed), labelled=True)[-2:] == [(str(cat / "link.png"), 0), (str(cat / "03.png"), 1)]
    assert read_image_list(str(listed), labelled=False)[-1] == (str(cat / "03.png 1"), 0)
    for bad, number in (
        ("imgs/cat/folder.png 0", 13),
        ("imgs/cat/gone.png 0", 13),
        ("imgs/cat/link.png 0\nimgs/cat/gone.png 0", 14),
    ):
        with pytest.raises(UserError, match=rf"list.txt line {number}: no file {bad.splitlines()[-1][:-2]} "):
            read_image_list(str(_write(listed, "\n".join(lines[:12] + [bad]) + "\n")), labelled=True)


def test_a_missing_file_is_said_before_a_bad_label_on_a_later_line(many_images):
    """The files are checked after the lines are parsed; the errors still come in the lines' order."""
    lines = [f"imgs/cat/{i:02d}.png 0" for i in range(12)] + ["imgs/cat/gone.png 0", "imgs/cat/00.png cat"]
    listed = _write(many_images / "list.txt", "\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"list.txt line 13: no file imgs/cat/gone.png "):
        read_image_list(str(listed), labelled=True)
    _write(listed, "\n".join(lines[:12] + lines[13:]) + "\n")
    with pytest.raises(UserError, match=r"list.txt line 13: the label 'cat' is not a class index"):
        read_image_list(str(listed), labelled=True)


def test_a_binary_file_as_list_is_refused(tmp_path):
    path = _constant(tmp_path / "c.png")
    with pytest.raises(UserError, match="is an image; give the folder that holds the images, or a list file"):
        pretrain_dataset(str(path), pretrain_transform(32))
    path.rename(tmp_path / "c.dat")  # not named as an image: read as a list file
    with pytest.raises(UserError, match="is not a text file"):
        pretrain_dataset(str(tmp_path / "c.dat"), pretrain_transform(32))
    (tmp_path / "nul.txt").write_bytes(b"\x00\x01binary")  # valid UTF-8: was 'line 1: no file \x00\x01binary'
    with pytest.raises(UserError, match="nul.txt is not a text file"):
        pretrain_dataset(str(tmp_path / "nul.txt"), pretrain_transform(32))


def test_a_list_in_another_encoding_is_named_as_such_not_as_binary(tmp_path):
    (tmp_path / "list.txt").write_bytes("a.jpg\ncafé.jpg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"list.txt line 2 is not UTF-8 text; save the list file as UTF-8$"):
        read_image_list(str(tmp_path / "list.txt"), labelled=False)


def _lists_from_folders(folders: Path, lists: Path) -> Path:
    """train.txt and val.txt in ``lists`` naming the images of ``folders`` (relative paths, class
    indices as ImageFolder numbers the sorted class names)."""
    for split in ("train", "val"):
        lines = ["# path label"]
        for index, cls in enumerate(sorted(p.name for p in (folders / split).iterdir())):
            for f in sorted((folders / split / cls).iterdir()):
                rel = Path("..") / folders.name / split / cls / f.name
                lines.append(f"{rel} {index}")
        _write(lists / f"{split}.txt", "\n".join(lines) + "\n")
    return lists


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[Path, Path]:
    """The same images as class folders (<root>/folders) and as lists (<root>/lists)."""
    root = tmp_path_factory.mktemp("splits")
    folders = make_split(root / "folders", train=16, val=5)
    return folders, _lists_from_folders(folders, root / "lists")


def _resolved(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(str(Path(p).resolve()), t) for p, t in samples]


def test_lists_give_the_folders_data_set(splits):
    folders, lists = splits
    tf = eval_transform(32)
    by_folder = classification_splits(str(folders), tf, tf, nb_classes=3)
    by_list = classification_splits(str(lists), tf, tf, nb_classes=3)
    for a, b in zip(by_folder, by_list, strict=True):
        assert isinstance(b, ListedImages)
        assert _resolved(a.samples) == _resolved(b.samples)
        assert a.targets == b.targets and len(b.classes) == 3
        assert torch.equal(a[7][0], b[7][0]) and a[7][1] == b[7][1]
    # Without --nb_classes (the k-NN monitor): as many classes as the largest index + 1, in both.
    train, val = classification_splits(str(lists), tf, tf, nb_classes=None)
    assert train.classes == val.classes == ["0", "1", "2"]
    # Pre-training reads train.txt of such a folder, or the list file itself, in the list's order.
    expected = [str(Path(p).resolve()) for p, _ in by_folder[0].samples]
    for path in (lists, lists / "train.txt"):
        assert [str(Path(f).resolve()) for f in pretrain_dataset(str(path), tf).files] == expected


def test_classification_list_layout_errors(splits, tmp_path):
    _, lists = splits
    tf = eval_transform(32)
    with pytest.raises(UserError, match=r"is a file; for classification give the folder that holds train.txt"):
        classification_splits(str(lists / "train.txt"), tf, tf, nb_classes=3)
    only_train = tmp_path / "only"
    only_train.mkdir()
    shutil.copyfile(lists / "train.txt", only_train / "train.txt")
    with pytest.raises(UserError, match=r"has train.txt but no val.txt or test.txt"):
        classification_splits(str(only_train), tf, tf, nb_classes=3)
    # Line 1 is the comment, 2-17 class 0, 18-33 class 1: the first image of class 2 is line 34.
    with pytest.raises(UserError, match=r"train.txt line 34: the label 2 is not below --nb_classes 2"):
        classification_splits(str(lists), tf, tf, nb_classes=2)


# Pre-training from a list: the same run as from the folder, and an exact resume inside an epoch.
# Both runs also checkpoint inside the epochs (--ckpt_every_steps), for the resume.
RUN = ["--epochs", "2", "--warmup_epochs", "1", "--blr", "2e-3", "--vis_freq", "1", "--keep_last", "0"]
RUN += ["--ckpt_every_steps", "2", "--model", "mae_vit_mini_patch4"]  # the smallest model: its size does not matter


def _without_args(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt.items() if k != "args"}


def test_pretraining_from_a_list_equals_the_folder_and_resumes_exactly(tmp_path):
    data = make_dataset(tmp_path / "folder", 16)  # 48 images, 3 iterations of 16 per epoch
    files = sorted(p.relative_to(tmp_path) for p in data.rglob("*.jpg"))
    listed = _write(tmp_path / "all.txt", "".join(f"{f}\n" for f in files))

    by_folder = run_pretrain(data, tmp_path / "f", *RUN)
    run_pretrain(listed, tmp_path / "l", *RUN)
    final = "checkpoint-1.pth"
    assert_same(_without_args(load(tmp_path / "l" / final)), _without_args(load(tmp_path / "f" / final)))
    picture = "reconstruction-1.png"
    assert (tmp_path / "l" / picture).read_bytes() == (tmp_path / "f" / picture).read_bytes()
    assert load(tmp_path / "l" / final)["args"].data_path == str(listed) != by_folder.data_path

    # Resume from the mid-epoch checkpoint (epoch 1, 2 iterations done), from other initial weights.
    resumed = tmp_path / "r"
    run_pretrain(listed, resumed, *RUN, "--resume", str(tmp_path / "l" / "checkpoint-1-step2.pth"), init_seed=12345)
    assert_same(_without_args(load(resumed / final)), _without_args(load(tmp_path / "l" / final)))
    assert read_log(resumed) == read_log(tmp_path / "l")


def _finetune(data: Path, out: Path, *extra: str) -> None:
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_mini_patch4", "--input_size", "32"]
    argv += ["--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--output_dir", str(out), "--log_dir", ""]
    argv += [*CPU, "--keep_last", "0", *extra]
    torch.manual_seed(0)  # the head's initialisation: the same in every run compared
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order in every run compared bit for bit
    try:
        main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    finally:
        torch.set_num_threads(saved)


def test_finetuning_from_lists_equals_the_folders_and_resumes_exactly(splits, tmp_path):
    folders, lists = splits
    _finetune(folders, tmp_path / "f")
    _finetune(lists, tmp_path / "l")
    final = "checkpoint-1.pth"
    by_folders = _without_args(load(tmp_path / "f" / final))
    # The class folders' names are recorded (a resume onto others is refused); a list's labels are the indices.
    assert by_folders["extra"]["data"].pop("classes") == ["airplane", "cat", "ship"]
    assert_same(_without_args(load(tmp_path / "l" / final)), by_folders)
    logged = [json.loads(line) for line in (tmp_path / "l" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in logged] == [0, 1] and logged[-1]["test_images"] == 15
    assert all(math.isfinite(line["train_loss"]) for line in logged)

    _finetune(lists, tmp_path / "r", "--resume", str(tmp_path / "l" / "checkpoint-0.pth"))
    assert_same(_without_args(load(tmp_path / "r" / final)), _without_args(load(tmp_path / "l" / final)))
