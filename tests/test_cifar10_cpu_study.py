"""The CPU study's scripts (recipes/cifar10_cpu) end to end on a few dozen images, so that they
cannot silently break: splits, pre-training with the k-NN monitor, frozen-encoder rows,
fine-tuning from MAE and from scratch, the results table and the pictures."""

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from helpers import REPO, cifar_layout

import models_mae

STUDY = REPO / "recipes" / "cifar10_cpu"
sys.path.insert(0, str(STUDY))

from figures import reconstruction_strip  # noqa: E402
from splits import make_splits  # noqa: E402


def test_splits_are_disjoint_balanced_and_kept_apart_from_test(tmp_path):
    data = cifar_layout(tmp_path / "cifar", train=30, test=4)
    counts = make_splits(data, tmp_path / "splits", per_class=5)
    assert counts == {
        "heldout/train": 81,  # 27 of 30 per class: every 10th went to val
        "heldout/val": 9,
        "labels10-val/train": 15,
        "labels10-val/val": 9,
        "labels10-test/train": 15,
        "labels10-test/test": 12,
    }

    def names(split):
        return {p.name for p in (tmp_path / "splits" / split).rglob("*.jpg")}

    assert not names("heldout/train") & names("heldout/val")
    assert names("labels10-test/train") <= names("heldout/train")
    assert names("labels10-test/train") == names("labels10-val/train")
    few = tmp_path / "splits" / "labels10-test" / "train"
    assert all(len(list(d.iterdir())) == 5 for d in few.iterdir())
    # Links point at the original files: nothing is copied.
    assert all(p.is_symlink() and p.resolve().is_relative_to(data) for p in few.rglob("*.jpg"))
    # Built again, the splits are left as they are.
    assert make_splits(data, tmp_path / "splits", per_class=5) == counts


def test_splits_skip_hidden_files_and_folders_as_training_does(tmp_path):
    """A '.ipynb_checkpoints' folder stopped the splits as a class short of --per_class; macOS's '._*.jpg'
    files, which training skips, took places in val (they sort first)."""
    data = cifar_layout(tmp_path / "cifar", train=30, test=4)
    clean = make_splits(data, tmp_path / "clean", per_class=5)
    for folder in (data / "train").iterdir():
        (folder / "._0000.jpg").write_bytes(b"\0\5\26\7")  # AppleDouble metadata
    (data / "train" / ".ipynb_checkpoints").mkdir()
    assert make_splits(data, tmp_path / "splits", per_class=5) == clean
    assert not [p for p in (tmp_path / "splits").rglob(".*")]


def test_the_reconstruction_strip_skips_hidden_files(tmp_path):
    """The strip's first image was macOS's '._*.jpg' beside the first test image ('not an image')."""
    images = cifar_layout(tmp_path / "cifar", train=0, test=2) / "test"
    for folder in images.iterdir():
        (folder / "._0000.jpg").write_bytes(b"\0\5\26\7")  # AppleDouble metadata
    model = models_mae.create_model("mae_vit_mini_patch4", 32)
    args = Namespace(model="mae_vit_mini_patch4", input_size=32, norm_pix_loss=False, mask_ratio=0.75)
    (tmp_path / "pretrain").mkdir()
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "pretrain" / "checkpoint-0.pth")
    reconstruction_strip(tmp_path, images, [0], 3, tmp_path / "strip.png")
    assert (tmp_path / "strip.png").is_file()


def test_splits_of_a_missing_or_small_data_set_are_one_line_errors(tmp_path):
    """A missing --data was iterdir's FileNotFoundError; a short class said only 'a class'."""
    with pytest.raises(SystemExit, match=r"^error: .*nowhere/train is not a folder; give --data the CIFAR-10"):
        make_splits(tmp_path / "nowhere", tmp_path / "splits")
    data = cifar_layout(tmp_path / "cifar", train=3, test=1)
    with pytest.raises(SystemExit, match=r"^error: .*/train/\w+ has 2 training images outside val, .*; lower --per"):
        make_splits(data, tmp_path / "splits", per_class=5)


def _bash(script, out, data, *args, python, extra="", **env):
    run_env = {
        **os.environ,
        "OUT": str(out),
        "DATA": str(data),
        "PYTHON": str(python),
        "EXTRA": extra,
        "OMP_NUM_THREADS": "1",
        **env,
    }
    result = subprocess.run(
        ["bash", str(STUDY / script), *args], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_study_scripts_run_end_to_end(tmp_path, warm_interpreter):
    """Their python is the session's warm one (tests/warm_python.py): each run is forked from a
    process that imported torch once."""
    pytest.importorskip("matplotlib")
    _study(tmp_path, warm_interpreter)


def _study(tmp_path, python):
    data = cifar_layout(tmp_path / "cifar", train=12, test=3)
    out = tmp_path / "study"
    subprocess.run(
        [python, str(STUDY / "splits.py"), "--data", str(data), "--out", str(out / "data"), "--per_class", "4"],
        check=True,
        capture_output=True,
    )
    small = "--batch_size 8 --num_workers 0"
    _bash("pretrain.sh", out, data, python=python, extra=f"{small} --warmup_epochs 0 --knn_freq 1", PRETRAIN_EPOCHS="2")
    log = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1] and all("knn_cls_top1" in line for line in log)

    _bash("frozen.sh", out, data, python=python, extra=f"{small} --linear_epochs 2", PRETRAIN_EPOCHS="2")
    frozen = [json.loads(line) for line in (out / "frozen.json").read_text().splitlines()]
    assert [r["encoder"].endswith("checkpoint-1.pth") for r in frozen] == [True, False, False]
    assert [r["encoder"] for r in frozen[1:]] == ["random", "pixels"]
    assert {"cls_top1", "avg_top1", "cls_linear_top1"} <= set(frozen[0]) and "pixels_linear_top1" in frozen[2]

    for init in ("mae", "scratch"):
        _bash(
            "finetune.sh",
            out,
            data,
            init,
            "0",
            python=python,
            extra=f"{small} --nb_classes 3",
            PRETRAIN_EPOCHS="2",
            FT_EPOCHS="2",
        )
    ft = [json.loads(line) for line in (out / "finetune-mae-labels10-test-s0" / "log.txt").read_text().splitlines()]
    assert ["test_acc1" in line for line in ft] == [False, True]  # the test set once, at the end
    assert ft[-1]["test_images"] == 9

    dest = tmp_path / "results"
    table = subprocess.run(
        [python, str(STUDY / "results.py"), "--out", str(out), "--dest", str(dest)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = json.loads((dest / "results.json").read_text())
    assert {(r["row"], r["encoder"]) for r in rows} >= {
        ("k-NN, cls", "MAE, epoch 1"),
        ("k-NN, cls", "random"),
        ("k-NN, pixels", "pixels"),
        ("linear (cached features), cls", "MAE, epoch 1"),
        ("fine-tune, labels10-test", "MAE"),
        ("fine-tune, labels10-test", "scratch"),
    }
    assert "| fine-tune, labels10-test | scratch |" in table
    assert (dest / "pretrain-log.txt").read_text() == (out / "pretrain" / "log.txt").read_text()

    docs = tmp_path / "docs"
    subprocess.run(
        [
            python,
            str(STUDY / "figures.py"),
            "--out",
            str(out),
            "--images",
            str(data / "test"),
            "--epochs",
            "0",
            "1",
            "--count",
            "3",
            "--docs",
            str(docs),
        ],
        check=True,
        capture_output=True,
    )
    from PIL import Image

    strip = Image.open(docs / "cifar10-cpu-study-reconstructions.png")
    assert strip.width * 4 == strip.height * 3  # rows original, masked, 2 epochs; 3 images each
    assert (docs / "cifar10-cpu-study-knn.png").stat().st_size > 1000
