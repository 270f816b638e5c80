"""The GPU study (recipes/cifar10_gpu) at CPU size: the archive that carries CIFAR-10 to the
device and back out of it, the budget's FLOP arithmetic against a hand count, results.json from
synthetic command outputs, and every device command end to end on 50 images with a tiny model."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, cifar_layout

from util.cli.errors import UserError

STUDY = REPO / "recipes" / "cifar10_gpu"
sys.path.insert(0, str(STUDY))  # results.py imports plan.py beside it


def _script(name):
    """A recipe script as a module of its own name: the CPU study has a results.py too."""
    spec = importlib.util.spec_from_file_location(f"cifar10_gpu_{name}", STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


data, plan, results = _script("data"), _script("plan"), _script("results")

CLASSES = sorted(p.name for p in (REPO / "demo" / "cifar10-2k").iterdir())


def tiny_cifar(root: Path) -> Path:
    """CIFAR-10's layout with 4 + 1 demo images of each of the ten classes."""
    return cifar_layout(root, train=4, test=1, classes=CLASSES)


def test_archive_carries_every_image_unchanged_and_packs_the_same_bytes_twice(tmp_path):
    source = tiny_cifar(tmp_path / "cifar")
    archive = tmp_path / "a" / "cifar10.tgz"
    size = data.pack(source, archive)
    first = archive.read_bytes()
    assert size == len(first) and data.pack(source, archive) == size and archive.read_bytes() == first

    dest = tmp_path / "unpacked"
    assert data.unpack(archive, dest) == 50
    originals = sorted(p.relative_to(source) for p in source.rglob("*.jpg"))
    assert sorted(p.relative_to(dest) for p in dest.rglob("*.jpg")) == originals
    assert all((dest / p).read_bytes() == (source / p).read_bytes() for p in originals)
    (dest / originals[0]).unlink()
    assert data.unpack(archive, dest) == 50  # complete once: not extracted again
    assert not (dest / originals[0]).exists()


def test_archive_refusals_name_the_flag(tmp_path):
    source = tiny_cifar(tmp_path / "cifar")
    with pytest.raises(UserError, match=r"--archive .* over --max_mib 1e-06: it must travel"):
        data.pack(source, tmp_path / "big.tgz", max_mib=1e-6)
    assert not (tmp_path / "big.tgz").exists()
    with pytest.raises(UserError, match=r"--data .* needs train/<class>/\*\.jpg and test/"):
        data.pack(source / "train", tmp_path / "x.tgz")
    with pytest.raises(UserError, match=r"--archive .* does not exist: run 'data.py pack'"):
        data.unpack(tmp_path / "none.tgz", tmp_path / "d")
    data.pack(source, tmp_path / "whole.tgz")
    (tmp_path / "cut.tgz").write_bytes((tmp_path / "whole.tgz").read_bytes()[:2000])
    with pytest.raises(UserError, match=r"--archive .*cut.tgz cannot be unpacked"):
        data.unpack(tmp_path / "cut.tgz", tmp_path / "d")
    assert not (tmp_path / "d" / data.COMPLETE).exists()


def test_unpacking_on_a_python_without_extraction_filters_says_which_python(tmp_path, monkeypatch):
    """Python 3.10.0-3.10.11 and 3.11.0-3.11.3: no tarfile.data_filter, and an extractall without the
    filter argument (a TypeError's traceback without the check)."""
    data.pack(tiny_cifar(tmp_path / "cifar"), tmp_path / "a.tgz")

    def old_extractall(self, path=".", members=None, *, numeric_owner=False):
        raise AssertionError("extracted without a filter")

    monkeypatch.delattr(data.tarfile, "data_filter")
    monkeypatch.setattr(data.tarfile.TarFile, "extractall", old_extractall)
    with pytest.raises(UserError, match=r"--archive .*a.tgz needs tarfile's extraction filters: use Python >= 3.10.12"):
        data.unpack(tmp_path / "a.tgz", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_plan_flops_equal_a_hand_count():
    """ViT-Tiny/2 at 32 px: 256 patches of 2x2x3 values, a 192-d encoder of 12 blocks and a
    128-d decoder of 4 (a 10-way head for fine-tuning); per block and token 24 D^2 + 4 T D, a step 3
    forward passes."""
    patches, pixels, d, e = 256, 12, 192, 128
    visible, everything = 64 + 1, 256 + 1
    encoder = 12 * visible * (24 * d * d + 4 * visible * d)
    decoder = 4 * everything * (24 * e * e + 4 * everything * e)
    embed = 2 * patches * pixels * d + 2 * visible * d * e + 2 * everything * e * pixels
    assert plan.pretrain_flops("mae_vit_tiny_patch2") == 3 * (encoder + decoder + embed)
    head = 2 * d * 10  # CIFAR-10's classes
    classifier = 2 * patches * pixels * d + 12 * everything * (24 * d * d + 4 * everything * d) + head
    assert plan.finetune_flops("mae_vit_tiny_patch2") == 3 * classifier
    table = dict(plan.minutes("mae_vit_tiny_patch2", 0.15, 160, 30, 100))
    assert table["labels100.sh 0"] == pytest.approx(2 * 50_000 * 30 * 3 * classifier / (0.15 * 790e12) / 60)
    assert table["pretrain.sh"] == pytest.approx(50_000 * 160 * 3 * (encoder + decoder + embed) / (0.15 * 790e12) / 60)
    # gpu_check.md's re-plan passes the matmul rate its run measured: the minutes scale with it.
    slower = dict(plan.minutes("mae_vit_tiny_patch2", 0.15, 160, 30, 100, peak_tflops=395))
    assert slower["pretrain.sh"] == pytest.approx(2 * table["pretrain.sh"])


def _lines(path, *entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_results_rows_from_synthetic_command_outputs(tmp_path):
    pre, ft = tmp_path / "pretrain", tmp_path / "labels100-s0"
    pre.mkdir(), ft.mkdir()
    h100 = "NVIDIA H100 80GB HBM3"  # common.sh's GPU_NAME: every row says which GPU its seconds are of
    _lines(pre / "times.jsonl", {"run": "pretrain", "seconds": 320.0, "sharing": 1, "status": 0, "gpu": h100})
    _lines(
        pre / "pretrain-log.txt",
        {"epoch": 0, "train_loss": 0.9, "knn_cls_top1": 30.0},
        {"epoch": 1, "train_loss": 0.5, "knn_cls_top1": 41.5},
    )
    frozen = {"encoder": "out/p/checkpoint-1.pth", "cls_top1": 60.0, "cls_linear_top1": 70.0}
    _lines(pre / "frozen.json", {**frozen, "bank": 50_000, "queries": 10_000, "seconds": 12.0, "command": "knn"})
    _lines(
        ft / "times.jsonl",
        {"run": "finetune-mae-labels100-test-s0", "seconds": 250.0, "sharing": 2, "status": 0, "gpu": "NVIDIA H200"},
        {"run": "finetune-scratch-labels100-test-s0", "seconds": 240.0, "sharing": 2, "status": 124},
    )
    _lines(ft / "finetune-mae-labels100-test-s0-log.txt", {"epoch": 0}, {"epoch": 1, "test_acc1": 91.25})
    _lines(ft / "finetune-scratch-labels100-test-s0-log.txt", {"epoch": 0})

    rows, left_out = results.collect([pre, ft])
    by_row = {(r["row"], r["encoder"]): r for r in rows}
    assert left_out == ["finetune-scratch-labels100-test-s0"]  # stopped at its limit: no row
    pretrain = by_row["pre-training", "MAE"]
    assert (pretrain["epochs"], pretrain["gpu_seconds"], pretrain["knn_heldout_top1"]) == (2, 320.0, 41.5)
    # Images trained: an epoch is 48 batches of 1024 (its last 848 images make no batch), not 50,000.
    assert pretrain["img_s"] == round(2 * 48 * 1024 / 320)
    assert pretrain["mfu"] == pytest.approx(
        2 * 48 * 1024 / 320 * plan.pretrain_flops("mae_vit_tiny_patch2") / 790e12, abs=1e-4
    )
    assert by_row["k-NN, cls", "MAE"]["top1"] == 60.0 and by_row["k-NN, cls", "MAE"]["img_s"] == 5000
    assert by_row["linear (cached features), cls", "MAE"]["top1"] == 70.0
    mae = by_row["fine-tune, labels100-test", "MAE"]
    assert (mae["top1"], mae["seed"], mae["seconds"], mae["gpu_seconds"]) == (91.25, 0, 250.0, 125.0)
    assert mae["img_s"] == round(2 * 97 * 512 / 250) and mae["command"].endswith("finetune.sh mae 0 labels100-test")
    assert {"row", "encoder", "seed", "top1", "seconds", "command", "gpu_seconds", "img_s"} <= set(mae)
    assert {r["gpu"] for r in rows} == {h100, "NVIDIA H200"} and mae["gpu"] == "NVIDIA H200"
    assert by_row["k-NN, cls", "MAE"]["gpu"] == h100  # frozen rows: the pre-training command's GPU


def test_results_leave_out_a_stopped_pretraining_and_its_encoders_frozen_rows(tmp_path):
    """Pre-training stopped at its limit: no pre-training row, and no frozen rows of its checkpoint
    (an unfinished schedule), while those of the random encoder and raw pixels stay."""
    _lines(tmp_path / "times.jsonl", {"run": "pretrain", "seconds": 450.0, "sharing": 1, "status": 124})
    _lines(tmp_path / "pretrain-log.txt", {"epoch": 0, "train_loss": 0.9})
    common = {"cls_top1": 50.0, "bank": 10, "queries": 10, "seconds": 1.0, "command": "knn"}
    _lines(
        tmp_path / "frozen.json",
        {**common, "encoder": "out/pretrain/checkpoint-0-step7.pth"},
        {**common, "encoder": "random"},
    )
    rows, left_out = results.collect([tmp_path])
    assert [(r["row"], r["encoder"]) for r in rows] == [("k-NN, cls", "random")]
    assert left_out == ["frozen rows of out/pretrain/checkpoint-0-step7.pth (its pre-training did not finish)"]


def test_results_name_the_frozen_rows_a_stopped_frozen_step_did_not_score(tmp_path):
    """pretrain.sh's frozen step stopped at its limit after scoring the MAE encoder: frozen.json holds its
    rows alone, and the random encoder's and the pixels' rows are missing, which is said."""
    _lines(
        tmp_path / "times.jsonl",
        {"run": "pretrain", "seconds": 300.0, "sharing": 1, "status": 0},
        {"run": "frozen", "seconds": 90.5, "sharing": 1, "status": 124},
    )
    _lines(tmp_path / "pretrain-log.txt", {"epoch": 0, "train_loss": 0.9})
    entry = {"encoder": "out/pretrain/checkpoint-0.pth", "cls_top1": 50.0, "bank": 10, "queries": 10}
    _lines(tmp_path / "frozen.json", {**entry, "seconds": 80.0, "command": "knn"})
    rows, left_out = results.collect([tmp_path])
    assert [(r["row"], r["encoder"]) for r in rows] == [("pre-training", "MAE"), ("k-NN, cls", "MAE")]
    assert left_out == ["frozen rows of the encoders not scored (status 124; scored: out/pretrain/checkpoint-0.pth)"]


def test_every_run_ends_by_the_commands_deadline(tmp_path):
    """common.sh's timed: a run is stopped when the command's DEADLINE is reached, whatever its own
    LIMIT, and killed GRACE seconds later if it ignores the stop; both are recorded as stopped."""
    script = (
        f"source {STUDY / 'common.sh'}; timed slow 1 sleep 30 & "
        "timed stubborn 1 bash -c \"trap '' TERM; sleep 30\" & wait"
    )
    env = {**os.environ, "WORK": str(tmp_path), "OUT": str(tmp_path), "DEADLINE": "1", "GRACE": "0.3", "LIMIT": "100"}
    env["GPU_NAME"] = "NVIDIA H100 80GB HBM3"
    env["WHEELS"] = str(tmp_path / "no-wheels")  # not a wheels/ this checkout may hold
    begin = time.monotonic()
    subprocess.run(["bash", "-c", script], env=env, timeout=20, check=True)
    assert time.monotonic() - begin < 5
    times = {t["run"]: t for t in results.json_lines(tmp_path / "times.jsonl")}
    assert (times["slow"]["status"], times["stubborn"]["status"]) == (124, 137)
    assert all(t["seconds"] < 3 for t in times.values()), times
    assert {t["gpu"] for t in times.values()} == {"NVIDIA H100 80GB HBM3"}  # GPU_NAME, else nvidia-smi's


def test_committed_results_hold_measured_rows_only():
    assert json.loads((STUDY / "results" / "results.json").read_text()) == []  # none measured yet


def _command(script, *args, python, env):
    done = subprocess.run(
        ["bash", str(STUDY / script), *args],
        cwd=REPO,
        env={**env, "PYTHON": str(python), "OUT": str(env["WORK"] + f"/back-{script}{''.join(args)}")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return REPO / env["WORK"] / f"back-{script}{''.join(args)}"


def test_device_commands_end_to_end(tmp_path, warm_interpreter):
    """Each device command as committed (pre-training with --loader memory), with CPU-sized
    overrides; their python is the session's warm one (tests/warm_python.py)."""
    pytest.importorskip("matplotlib")
    data.pack(tiny_cifar(tmp_path / "cifar"), tmp_path / "cifar10.tgz")
    env = {
        **os.environ,
        "ARCHIVE": str(tmp_path / "cifar10.tgz"),
        "WORK": str(tmp_path / "work"),
        "ENCODER": str(tmp_path / "encoder" / "mae.safetensors"),
        "MAE_MODEL": "mae_vit_mini_patch4",
        "INPUT_SIZE": "16",
        "PRETRAIN_EPOCHS": "2",
        "FT_EPOCHS": "1",
        "FT10_EPOCHS": "1",
        "PER_CLASS": "2",
        "OMP_NUM_THREADS": "1",
        "EXTRA": "--device cpu --precision fp32 --batch_size 8 --num_workers 0",
        "WHEELS": str(tmp_path / "no-wheels"),  # not a wheels/ this checkout may hold
    }
    python = warm_interpreter
    backs = [_command("pretrain.sh", python=python, env=env)]
    assert {p.name for p in backs[0].iterdir()} == {
        "pretrain-log.txt",
        "stdout.txt",
        "times.jsonl",
        "frozen.json",
        "reconstructions.png",
        "knn-curve.png",
        "mae-encoder-bf16.safetensors",
    }
    backs += [_command(s, *a, python=python, env=env) for s, a in [("labels10.sh", ()), ("labels100.sh", ("1",))]]
    backs.append(_command("choose.sh", python=python, env=env))
    rows, left_out = results.collect(backs, "mae_vit_mini_patch4")
    assert not left_out and all(len(list(b.iterdir())) <= 8 for b in backs)  # the device returns 8 files
    found = {(r["row"], r["encoder"], r["seed"]) for r in rows}
    assert {("fine-tune, labels10-test", e, s) for e in ("MAE", "scratch") for s in (0, 1)} <= found
    assert {("fine-tune, labels100-test", "MAE", 1), ("fine-tune, labels100-test", "scratch", 1)} <= found
    assert {
        ("fine-tune, labels10-val", "MAE", 0),
        ("fine-tune, heldout", "MAE", 0),
        ("pre-training", "MAE", 0),
    } <= found
    assert {
        ("k-NN, cls", "random", 0),
        ("linear (cached features), cls", "MAE", 0),
        ("k-NN, pixels", "pixels", 0),
    } <= found
    mae = json.loads((backs[2] / "finetune-mae-labels100-test-s1-log.txt").read_text().splitlines()[-1])
    assert mae["test_images"] == 10  # the test set, once, after the last epoch


def test_the_strip_shows_the_epochs_a_run_kept_and_ends_with_its_newest(tmp_path):
    """A run shorter than the default strip, or stopped at its time limit, still gets its pictures:
    the asked epochs it has a checkpoint of, then its newest epoch checkpoint (a mid-epoch one is
    not an epoch's)."""
    pictures = _script("pictures")
    for name in ("checkpoint-0.pth", "checkpoint-10.pth", "checkpoint-17.pth", "checkpoint-18-step3.pth"):
        (tmp_path / name).touch()
    assert pictures.strip_epochs(tmp_path, [0, 10, 50, 100, 199]) == [0, 10, 17]
    assert pictures.strip_epochs(tmp_path, [0, 17]) == [0, 17]
    assert pictures.strip_epochs(tmp_path / "empty", [0, 10]) == []


def test_the_strip_asks_distinct_epochs_in_order_for_every_run_length(tmp_path):
    """pretrain.sh's default strip: epochs 0, 10, 50 and 100 (kept by --save_freq 10) that come before the
    run's last, then its last. Was '0 10 50 100 LAST': a column shown twice for 1, 11, 51 or 101 epochs."""
    line = next(x for x in (STUDY / "pretrain.sh").read_text().splitlines() if x.startswith("read -r -a STRIP"))
    script = f'source {STUDY / "common.sh"}\nfor PRETRAIN_EPOCHS in {{1..250}}; do\n{line}\necho "${{STRIP[*]}}"\ndone'
    env = {**os.environ, "WORK": str(tmp_path), "OUT": str(tmp_path), "GPU_NAME": "none"}
    env["WHEELS"] = str(tmp_path / "no-wheels")  # not a wheels/ this checkout may hold
    env.pop("STRIP_EPOCHS", None)
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True)
    strips = {n: [int(e) for e in out.split()] for n, out in enumerate(done.stdout.splitlines()[1:], 1)}
    assert len(strips) == 250
    for epochs, strip in strips.items():
        assert strip == sorted(set(strip)), f"PRETRAIN_EPOCHS={epochs}: {strip}"
        assert strip == [e for e in (0, 10, 50, 100) if e < epochs - 1] + [epochs - 1], f"PRETRAIN_EPOCHS={epochs}"
    assert strips[1] == [0] and strips[2] == [0, 1] and strips[11] == [0, 10] and strips[12] == [0, 10, 11]
    assert strips[51] == [0, 10, 50] and strips[101] == [0, 10, 50, 100] and strips[160] == [0, 10, 50, 100, 159]


@pytest.mark.parametrize("encoder", ["another model's", "missing"])
def test_fine_tuning_commands_refuse_a_wrong_encoder_before_unpacking(tmp_path, encoder):
    """An encoder of another model (a CPU trial's left in encoder/) or none at all: the device
    command stops at once with one line naming the file, before the unpack's minute."""
    import argparse

    import torch

    from util.interop.files import write_weights

    path = tmp_path / "encoder.safetensors"
    if encoder != "missing":
        write_weights(str(path), {"w": torch.zeros(2)}, argparse.Namespace(model="mae_vit_mini_patch4"))
    env = {**os.environ, "ENCODER": str(path), "MAE_MODEL": "mae_vit_tiny_patch2", "WORK": str(tmp_path / "work")}
    env.update(ARCHIVE=str(tmp_path / "no-archive.tgz"), WHEELS=str(tmp_path / "no-wheels"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(STUDY / "labels10.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"error: checkpoint {path}" if encoder == "missing" else f"error: {path} is an encoder"
    )
    assert "not of mae_vit_tiny_patch2" in done.stderr or encoder == "missing"
    assert not (tmp_path / "work" / "cifar10").exists(), "nothing unpacked"


def test_a_pretraining_that_dies_at_once_ends_pretrain_sh_with_its_reason_in_out(tmp_path):
    """A pre-training that stops before its first epoch (here a flag it refuses) leaves no log.txt
    and no checkpoint: the command ends with the run's status and a line saying so, and what comes
    back holds the run's own error (stdout.txt), not a failed copy's."""
    data.pack(tiny_cifar(tmp_path / "cifar"), tmp_path / "cifar10.tgz")
    out = tmp_path / "back"
    env = {
        **os.environ,
        "ARCHIVE": str(tmp_path / "cifar10.tgz"),
        "WORK": str(tmp_path / "work"),
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PER_CLASS": "2",
        "EXTRA": "--device cpu --mask_ratio 1.5",
        "WHEELS": str(tmp_path / "no-wheels"),
    }
    done = subprocess.run(
        ["bash", str(STUDY / "pretrain.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "pre-training left no checkpoint (status 2): see stdout.txt"
    assert "--mask_ratio" in (out / "stdout.txt").read_text()
    assert {p.name for p in out.iterdir()} == {"stdout.txt", "times.jsonl"}
    # What the loaders run under on the device, in the reply's output: never read there yet.
    machine = done.stdout.splitlines()[0]
    assert machine.startswith(f"machine: {len(os.sched_getaffinity(0))} cores, GPU ") and ", open files " in machine
    assert machine.endswith(" free") and "/dev/shm " in machine
