"""Every output file atomic and checked before the work (issue 20): a full disk in any writer
leaves the earlier file whole and is one line (or, for what training can do without, one warning
while training goes on); JSON outputs are checked before the work; only files count as
checkpoints; an output folder inside the data is refused."""

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import budgeted_open, demo_files, folder_of_length, make_dataset, make_split
from PIL import Image

import dataset_stats
import export
import knn_eval
import models_mae
import reconstruct
from util import atomic, claim, outputs
from util.checkpoint.files import atomic_save, list_checkpoints, prune
from util.cli.errors import UserError
from util.eval import knn
from util.eval.pictures import save_png
from util.train.progress import RunLog


def full_disk(monkeypatch, module, only: str, after_bytes: int = 0) -> None:
    """Files that ``module`` opens for writing, whose path contains ``only``, take ``after_bytes``
    bytes and then fail as a full disk does."""

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def wrap(path: str, mode: str) -> bool:
        return ("w" in mode or "a" in mode) and only in path

    monkeypatch.setattr(module, "open", budgeted_open(after_bytes, full, wrap), raising=False)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def no_temporaries(folder: Path) -> bool:
    return not list(folder.glob("*.tmp*"))


# ---------------------------------------------------------------------------------------------
# The mechanism: atomic_write and atomic_append
def test_atomic_append_adds_lines_and_a_full_disk_keeps_the_old_ones(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    atomic.atomic_append(str(path), '{"a": 1}\n')
    atomic.atomic_append(str(path), '{"a": 2}\n')
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}')  # a last line without its newline: ours still starts a line of its own
    atomic.atomic_append(str(path), '{"a": 2}\n')
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    full_disk(monkeypatch, atomic, "results.jsonl", after_bytes=12)  # the old line fits, the new one not
    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_append(str(path), '{"a": 3}\n')
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n' and no_temporaries(tmp_path)


def test_stale_temporaries_are_told_from_this_process_own():
    assert atomic.stale_temporary_of("checkpoint-3.pth.tmp999999") == "checkpoint-3.pth"
    assert atomic.stale_temporary_of("log.txt.tmp") == "log.txt"  # the name of earlier versions
    assert atomic.stale_temporary_of(os.path.basename(atomic.temporary_path("log.txt"))) is None  # ours
    assert atomic.stale_temporary_of("log.txt") is None and atomic.stale_temporary_of("a.tmpx") is None


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic_save keeps its behaviour through atomic_write; only files are checkpoints
def test_atomic_save_reports_the_full_disk_not_torch_message(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-0.pth"
    atomic_save({"a": torch.arange(3)}, str(path))
    before = path.read_bytes()
    full_disk(monkeypatch, atomic, ".pth.tmp", after_bytes=100)
    with pytest.raises(OSError) as err:
        atomic_save({"a": torch.arange(10_000)}, str(path))
    assert err.value.errno == errno.ENOSPC  # not torch's "unexpected pos" RuntimeError
    assert path.read_bytes() == before and no_temporaries(tmp_path)


def test_only_files_count_as_checkpoints(tmp_path):
    for name in ("checkpoint-1.pth", "checkpoint-2.pth"):
        atomic_save({"epoch": name}, str(tmp_path / name))
    (tmp_path / "checkpoint-3.pth").mkdir()  # folders named like a checkpoint, newer than the files
    (tmp_path / "checkpoint-4.pth.tmp999999").mkdir()
    (tmp_path / "checkpoint-5.pth").symlink_to(tmp_path / "gone")  # a broken link
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-1.pth"), str(tmp_path / "checkpoint-2.pth")]
    # keep_last 1: the newest checkpoint is checkpoint-2.pth, not the folder, so it stays.
    assert prune(str(tmp_path), keep_last=1, keep_every=100, final_epoch=9) == [str(tmp_path / "checkpoint-1.pth")]
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"checkpoint-2.pth", "checkpoint-3.pth", "checkpoint-4.pth.tmp999999", "checkpoint-5.pth"}


# ---------------------------------------------------------------------------------------------
# An output folder inside the data
def test_output_dir_inside_the_data_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    (tmp_path / "data2").mkdir()
    (tmp_path / "link_to_data").symlink_to(data)
    (tmp_path / "runs").symlink_to(data / "cats")
    for inside in (data, data / "out", data / "cats" / "run1", tmp_path / "link_to_data" / "out", tmp_path / "runs"):
        with pytest.raises(UserError) as err:
            outputs.check_outside_data(str(inside), str(data), "--output_dir")
        message = one_line(err)
        assert message.startswith(f"--output_dir {inside} is inside --data_path {data}"), message
        assert message.endswith("give a folder outside the data"), message
    # Beside the data (also a folder whose name starts like it), or beside a list file: fine.
    for outside in (tmp_path / "out", tmp_path / "data2" / "out", tmp_path):
        outputs.check_outside_data(str(outside), str(data), "--output_dir")
    (data / "train.txt").write_text("cats/a.jpg\n")
    outputs.check_outside_data(str(data / "out"), str(data / "train.txt"), "--output_dir")


# ---------------------------------------------------------------------------------------------
# An output that is one of the command's inputs, or lies under a file
def test_an_output_that_is_an_input_is_refused_however_it_is_reached(tmp_path):
    source = tmp_path / "a.jpg"
    source.write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(source)
    os.link(source, tmp_path / "hard.jpg")
    (tmp_path / "sub").mkdir()
    inputs = [("--checkpoint", "https://example.com/c.pth"), ("the input image", str(source))]
    for output in (source, tmp_path / "sub" / ".." / "a.jpg", tmp_path / "link.jpg", tmp_path / "hard.jpg"):
        with pytest.raises(UserError) as err:
            outputs.check_not_an_input(str(output), "--output", inputs)
        message = one_line(err)
        assert message.startswith(f"--output {output} is the input image {source}"), message
        assert message.endswith(": writing it would replace it; give another name"), message
        assert ("(the same file)" in message) == (output.name != "a.jpg"), message
    with pytest.raises(UserError, match=rf"^--output {tmp_path} holds the input image {source}: writing the folder"):
        outputs.check_not_an_input(str(tmp_path), "--output", inputs)
    # Another file, a folder beside the input, an output not there yet: fine.
    (tmp_path / "b.jpg").write_bytes(b"x")
    for output in (tmp_path / "b.jpg", tmp_path / "sub", tmp_path / "new.jpg"):
        outputs.check_not_an_input(str(output), "--output", inputs)
    assert source.read_bytes() == b"x"


def test_an_output_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "r.png"
    blocker.write_bytes(b"")
    for check, name in ((outputs.check_output_file, "x.png"), (outputs.check_json_output, "x.json")):
        for target in (blocker / name, blocker / "sub" / name):
            with pytest.raises(UserError) as err:
                check(str(target), "--output")
            assert one_line(err) == f"--output {target}: {blocker} is a file, not a folder; give a path in a folder"


# ---------------------------------------------------------------------------------------------
# knn_eval --output: checked before the work, appended atomically
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("labelled"), train=4, val=2)


def _knn_eval(data: Path, output: Path) -> None:
    argv = ["--data_path", str(data), "--encoders", "pixels", "--knn_k", "3", "--model", "mae_vit_tiny_patch4"]
    argv += ["--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--output", str(output)]
    knn_eval.main(knn_eval.get_args_parser().parse_args(argv))


def _no_work(monkeypatch) -> None:
    def work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(knn, "KnnData", work)
    monkeypatch.setattr(knn, "evaluate", work)


@pytest.mark.parametrize("case", ["folder", "missing_folder", "not_json_lines", "not_utf8"])
def test_knn_output_is_checked_before_the_work(labelled, tmp_path, monkeypatch, case):
    output = {"folder": tmp_path, "missing_folder": tmp_path / "no" / "knn.jsonl"}.get(case, tmp_path / "knn.jsonl")
    if case == "not_json_lines":
        output.write_text('{"encoder": "pixels"}\n{"encoder": "rand\n')  # torn by an earlier version
    if case == "not_utf8":
        output.write_bytes(b"\xff\xfe\n")
    _no_work(monkeypatch)
    with pytest.raises(UserError) as err:
        _knn_eval(labelled, output)
    message = one_line(err)
    assert message.startswith(f"--output {output}"), message
    expected = {"folder": "is a folder", "missing_folder": "does not exist"}.get(case, "line 2 is not JSON")
    if case == "not_utf8":
        expected = "line 1 is not JSON"
    assert expected in message, message


def test_knn_output_that_is_an_encoder_is_refused_as_an_input(labelled, tmp_path, monkeypatch):
    """It was 'line 1 is not JSON ...: repair or remove it', of the checkpoint being evaluated."""
    encoder = tmp_path / "checkpoint-0.pth"
    torch.save({"model": models_mae.create_model("mae_vit_tiny_patch4", 32).state_dict()}, encoder)
    _no_work(monkeypatch)
    argv = ["--data_path", str(labelled), "--encoders", str(encoder), "--output", str(encoder), "--device", "cpu"]
    with pytest.raises(UserError) as err:
        knn_eval.main(knn_eval.get_args_parser().parse_args(argv))
    refused = f"--output {encoder} is --encoders {encoder}: writing it would replace it; give another name"
    assert one_line(err) == refused


def test_knn_output_full_disk_keeps_the_earlier_lines(labelled, tmp_path, monkeypatch):
    output = tmp_path / "knn.jsonl"
    _knn_eval(labelled, output)
    before = output.read_text()
    (record,) = [json.loads(line) for line in before.splitlines()]
    assert record["encoder"] == "pixels" and record["queries"] == 6
    full_disk(monkeypatch, atomic, "knn.jsonl", after_bytes=len(before) + 10)  # the new line is torn
    with pytest.raises(UserError) as err:
        _knn_eval(labelled, output)
    message = one_line(err)
    assert message.startswith(f"--output {output}: cannot write it (No space left on device); the file is left")
    assert output.read_text() == before and no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# dataset_stats --json: checked before the work, written atomically
def _stats(data: Path, json_path: Path) -> None:
    argv = ["--data_path", str(data), "--num_workers", "0", "--input_size", "8", "--json", str(json_path)]
    dataset_stats.main(dataset_stats.get_args_parser().parse_args(argv))


def test_stats_json_is_checked_before_the_work(tmp_path, monkeypatch):
    def work(*a, **k):
        raise AssertionError("the work started before --json was checked")

    monkeypatch.setattr(dataset_stats, "pretrain_dataset", work)
    # /dev/null: checked only (never written): the atomic rename would have replaced the device by a file.
    devnull = (Path("/dev/null"), "is not a regular file (a device or a pipe); give a file name")
    for target, expected in ((tmp_path, "is a folder"), (tmp_path / "no" / "s.json", "does not exist"), devnull):
        with pytest.raises(UserError) as err:
            _stats(tmp_path, target)
        message = one_line(err)
        assert message.startswith(f"--json {target}") and expected in message, message


def test_stats_json_replaces_only_json_and_never_its_input(tmp_path, monkeypatch):
    """--json an image of the data, or the list file read, was replaced by the JSON."""
    data = make_dataset(tmp_path / "d", 1)
    image = next(data.rglob("*.jpg"))
    listing = data / "train.txt"
    listing.write_text(f"{image.relative_to(data)}\n")
    before = image.read_bytes(), listing.read_bytes()
    with pytest.raises(UserError) as err:
        _stats(data, image)
    assert one_line(err) == (
        f"--json {image} exists and is not JSON, which is what this writes there; remove it or give another name"
    )
    with pytest.raises(UserError) as err:
        _stats(listing, listing)
    assert one_line(err).startswith(f"--json {listing} is --data_path {listing}: writing it would replace it")
    assert (image.read_bytes(), listing.read_bytes()) == before
    # Its own earlier output, and an empty file, are replaced: the same command runs again.
    target = tmp_path / "stats.json"
    for _ in range(2):
        _stats(data, target)
        assert json.loads(target.read_text())["images"] == 1
    target.write_text("")
    _stats(data, target)
    assert json.loads(target.read_text())["images"] == 1
    # A large file is not read whole to find out whether it is JSON.
    monkeypatch.setattr(outputs, "MAX_JSON_BYTES", 10)
    with pytest.raises(UserError) as err:
        _stats(data, target)
    assert "MiB, far more than the JSON this writes; give another name" in one_line(err)


def test_stats_json_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", 1)
    target = tmp_path / "stats.json"
    target.write_text('{"mean": [0.5]}\n')
    full_disk(monkeypatch, atomic, "stats.json", after_bytes=20)
    with pytest.raises(UserError) as err:
        _stats(data, target)
    assert one_line(err).startswith(f"--json {target}: cannot write it (No space left on device)")
    assert target.read_text() == '{"mean": [0.5]}\n' and no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# reconstruct.py --output and save_png
@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_tiny_patch4", 32)
    path = tmp_path_factory.mktemp("mae") / "checkpoint-0.pth"
    atomic_save({"model": model.state_dict(), "args": Namespace(model="mae_vit_tiny_patch4", input_size=32)}, str(path))
    return path


def _reconstruct(checkpoint: Path, output: Path) -> None:
    images = [str(p) for p in make_dataset(output.parent / "images", 1).rglob("*.jpg")][:2]
    argv = ["--checkpoint", str(checkpoint), *images, "--output", str(output), "--device", "cpu"]
    reconstruct.main(reconstruct.get_args_parser().parse_args(argv))


def test_reconstruct_full_disk_is_one_line_and_keeps_the_earlier_picture(mae_checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "recon.png"
    _reconstruct(mae_checkpoint, output)
    before = output.read_bytes()
    assert Image.open(output).size == (4 * 32 * 4, 2 * 32 * 4)  # 4 columns, 2 rows, upscaled x4 to 512 wide
    full_disk(monkeypatch, atomic, "recon.png", after_bytes=100)
    with pytest.raises(UserError) as err:
        _reconstruct(mae_checkpoint, output)
    message = one_line(err)
    assert message.startswith(f"--output {output}: cannot write it (No space left on device)"), message
    assert output.read_bytes() == before and no_temporaries(tmp_path)


def test_reconstruct_refuses_to_write_over_its_input_image(mae_checkpoint, tmp_path, monkeypatch):
    """It replaced the JPEG it read with its picture grid (exit 0)."""
    image = tmp_path / "photo.jpg"
    shutil.copyfile(demo_files(1)[0], image)
    (tmp_path / "link.jpg").symlink_to(image)
    before = image.read_bytes()

    def no_work(*a, **k):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(reconstruct, "load_checkpoint", no_work)
    for output in (image, tmp_path / "link.jpg"):
        argv = ["--checkpoint", str(mae_checkpoint), str(image), "--output", str(output), "--device", "cpu"]
        with pytest.raises(UserError) as err:
            reconstruct.main(reconstruct.get_args_parser().parse_args(argv))
        assert one_line(err).startswith(f"--output {output} is the input image {image}"), one_line(err)
    assert image.read_bytes() == before


@pytest.mark.parametrize("existing", ["text", "jpeg"])
def test_reconstruct_replaces_only_a_picture_of_its_format(mae_checkpoint, tmp_path, existing):
    output = tmp_path / "recon.png"
    if existing == "text":
        output.write_text("notes\n")
    else:
        shutil.copyfile(demo_files(1)[0], output)  # a photo whose name says PNG
    before = output.read_bytes()
    with pytest.raises(UserError) as err:
        _reconstruct(mae_checkpoint, output)
    assert one_line(err) == (
        f"--output {output} exists and is not a PNG picture, which is what this writes there; "
        f"remove it or give another name"
    )
    assert output.read_bytes() == before


def test_reconstruct_replaces_its_own_earlier_picture(mae_checkpoint, tmp_path):
    for name in ("recon.png", "recon.jpg"):
        output = tmp_path / name
        output.write_bytes(b"")  # an empty file holds nothing to lose
        for _ in range(2):  # the same command again
            _reconstruct(mae_checkpoint, output)
            assert Image.open(output).format == ("PNG" if name.endswith(".png") else "JPEG")


def test_export_never_replaces_its_checkpoint_even_with_force(mae_checkpoint, tmp_path):
    """--force replaced a full training checkpoint with the bare encoder it exported."""
    checkpoint = tmp_path / "checkpoint-0.pth"
    shutil.copyfile(mae_checkpoint, checkpoint)
    (tmp_path / "link.pth").symlink_to(checkpoint)
    before = checkpoint.read_bytes()
    for output in (checkpoint, tmp_path / "link.pth"):
        for force in ([], ["--force"]):
            argv = ["--checkpoint", str(checkpoint), "--to", "timm", "--output", str(output), *force]
            with pytest.raises(UserError) as err:
                export.main(export.get_args_parser().parse_args(argv))
            assert one_line(err).startswith(f"--output {output} is --checkpoint {checkpoint}"), one_line(err)
    assert checkpoint.read_bytes() == before


def test_save_png_writes_the_format_its_extension_names(tmp_path):
    picture = np.zeros((4, 8, 3), dtype=np.uint8)
    for name, fmt in (("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.bmp", "BMP")):
        save_png(picture, str(tmp_path / name), min_width=16)
        assert Image.open(tmp_path / name).format == fmt and Image.open(tmp_path / name).size == (16, 8)


def test_save_png_upscales_by_the_smallest_whole_factor_that_reaches_min_width(tmp_path):
    # 5 px wide to at least 16: 4 times (20 px), not 3 (15 px, short of it); a wide picture stays as it is.
    for width, expected in ((5, 20), (16, 16), (40, 40)):
        save_png(np.zeros((2, width, 3), dtype=np.uint8), str(tmp_path / "a.png"), min_width=16)
        assert Image.open(tmp_path / "a.png").size == (expected, 2 * expected // width)


# ---------------------------------------------------------------------------------------------
# Training: log.txt atomic; TensorBoard and the picture are warnings, training goes on
@pytest.mark.parametrize("history", [[{"epoch": 0}], None])  # None: a checkpoint older than the history
def test_log_txt_and_picture_temporaries_of_killed_runs_are_removed(tmp_path, history):
    """A kill -9 while log.txt or a picture is written leaves its temporary; the next run in the folder removes
    them (a picture's was left for good: a resumed run does not draw that epoch again). Not other files'."""
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    (tmp_path / "log.txt.tmp999999").write_text('{"epoch": 0')
    (tmp_path / "reconstruction-3.png.tmp999998").write_bytes(b"\x89PNG")
    (tmp_path / "notes.txt.tmp999997").write_text("a user's")
    RunLog("", str(tmp_path), history)
    assert (tmp_path / "log.txt").read_text() == '{"epoch": 0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "notes.txt.tmp999997"]


def test_picture_full_disk_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    path = tmp_path / "reconstruction-0.png"
    path.write_bytes(b"an earlier picture")
    run_log = RunLog("", str(tmp_path), [])
    full_disk(monkeypatch, atomic, "reconstruction-0.png", after_bytes=10)
    picture = np.zeros((32, 128, 3), dtype=np.uint8)
    assert run_log.write_optional(str(path), lambda: save_png(picture, str(path))) is False
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"warning: cannot write {path} (No space left on device); training goes on without it"]
    assert path.read_bytes() == b"an earlier picture" and no_temporaries(tmp_path)
    run_log.epoch({"epoch": 0})  # log.txt still written
    assert json.loads((tmp_path / "log.txt").read_text()) == {"epoch": 0}


def test_tensorboard_full_disk_is_one_warning_and_turns_it_off(tmp_path, monkeypatch, capsys):
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)  # what would print a thread's traceback
    run_log = RunLog(str(tmp_path / "tb"), str(tmp_path), [])
    capsys.readouterr()
    # TensorBoard's writer thread opens the event file for each write, through io.open.
    full_disk(monkeypatch, io, "tfevents")
    run_log.scalars(0, loss=1.0)
    run_log.epoch({"epoch": 0, "train_loss": 1.0})  # flushes TensorBoard: its thread's error comes out
    run_log.scalars(1, loss=0.5)  # TensorBoard is off: nothing happens
    run_log.image("reconstructions", np.zeros((4, 4, 3), dtype=np.uint8), 1)
    run_log.close()
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [
        f"warning: cannot write TensorBoard events in {tmp_path / 'tb'} (No space left on device); TensorBoard is "
        f"off for the rest of this run, training goes on (log.txt and checkpoints as usual)"
    ]
    assert "Traceback" not in captured.err and thread_errors == []
    assert json.loads((tmp_path / "log.txt").read_text()) == {"epoch": 0, "train_loss": 1.0}


def test_pretraining_refuses_an_output_dir_inside_its_data(tmp_path):
    from helpers import run_pretrain

    from util.cli.errors import UserError

    data = make_dataset(tmp_path / "data", 2)
    with pytest.raises(UserError, match="is inside --data_path"):
        run_pretrain(data, data / "out", "--epochs", "1")
    assert not (data / "out").exists(), "the refused folder was created inside the data"


# ---------------------------------------------------------------------------------------------
# One run per --output_dir
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin, or kills it
"""


def _hold(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder`` as a run does (the test's stand-in for a running run)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_into_an_output_dir_in_use_is_refused_before_it_reads_or_writes(tmp_path, monkeypatch):
    """Two runs into one folder (a job submitted twice) would overwrite each other's checkpoints and
    log.txt: the second stops at start, after the wait for a run that is ending, having written
    nothing; a holder killed with -9 leaves no stale claim."""
    from helpers import one_line_error, pretrain_args, pretrain_in_process

    data, out = make_dataset(tmp_path / "data", 2), tmp_path / "out"
    out.mkdir()
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "2", "--epochs", "1", "--resume", "auto"]
    args = pretrain_args(data, out, *flags)
    monkeypatch.setattr(claim, "CLAIM_WAIT_SECONDS", 0.5)
    holder = _hold(out)
    try:
        message = one_line_error(pretrain_in_process, args)
    finally:
        holder.kill()
        holder.wait()
    assert message == (
        f"--output_dir {out} is in use by another run (still training, or a job submitted twice): two runs would "
        f"overwrite each other's checkpoints; wait for it to end, or give another --output_dir"
    )
    assert list(out.iterdir()) == []
    pretrain_in_process(args)  # the holder was killed: its claim went with it
    assert (out / "checkpoint-0.pth").exists()
    claim.claim_output_dir(str(out), "--output_dir")  # a finished run released it; and a process may
    claim.claim_output_dir(str(out), "--output_dir")  # claim a folder it holds again (notebooks)


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_before_it_writes(tmp_path, capsys):
    """Without --resume, a run would replace the earlier run's checkpoint-0.pth, prune the rest and rewrite
    its log.txt (the official defaults put pre-training and fine-tuning in one ./output_dir); refused in one
    line, nothing touched. --resume auto continues the earlier run."""
    from helpers import one_line_error, pretrain_args, pretrain_in_process

    data, out = make_dataset(tmp_path / "data", 2), tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "2", "--epochs", "2", "--keep_last", "0"]
    pretrain_in_process(pretrain_args(data, out, *flags))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "log.txt"} <= set(before)
    message = one_line_error(pretrain_in_process, pretrain_args(data, out, *flags))
    assert message == (
        f"--output_dir {out} holds the checkpoints of an earlier run (checkpoint-1.pth and 1 more), which this run "
        f"would replace or delete: continue that run with --resume auto, or give another --output_dir"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    capsys.readouterr()
    pretrain_in_process(pretrain_args(data, out, *flags, "--resume", "auto"))
    assert "nothing to train: the run already finished its 2 epochs (--epochs)\n" in capsys.readouterr().out
    pretrain_in_process(pretrain_args(data, out, *flags, "--epochs", "1", "--resume", "auto"))
    # Resumed with a smaller --epochs: said as it is, not as a run that finished 1 epoch.
    assert "nothing to train: the checkpoint is 2 epochs in, past --epochs 1\n" in capsys.readouterr().out


def test_a_new_run_from_weights_only_into_a_folder_with_checkpoints_is_refused(tmp_path):
    """--resume of weights only (an official release) starts afresh at --start_epoch, as a run without --resume
    does: it replaced the earlier run's checkpoint-0.pth and checkpoint-1.pth and rewrote its log.txt without a
    word (found by a review)."""
    from helpers import one_line_error, pretrain_args, pretrain_in_process

    data, out = make_dataset(tmp_path / "data", 2), tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "2", "--epochs", "2", "--keep_last", "0"]
    pretrain_in_process(pretrain_args(data, out, *flags))
    weights = tmp_path / "weights.pth"
    torch.save({"model": torch.load(out / "checkpoint-1.pth", weights_only=False)["model"]}, weights)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = one_line_error(pretrain_in_process, pretrain_args(data, out, *flags, "--resume", str(weights)))
    assert message == (
        f"--output_dir {out} holds the checkpoints of an earlier run (checkpoint-1.pth and 1 more), which this run "
        f"would replace or delete (it starts afresh: {weights} holds weights only): continue that run with "
        f"--resume auto, or give another --output_dir"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    pretrain_in_process(pretrain_args(data, tmp_path / "new", *flags, "--resume", str(weights)))  # a new folder
    assert (tmp_path / "new" / "checkpoint-1.pth").is_file()


def _train_loss_steps(folder: Path) -> list[int]:
    """The x of each train_loss point TensorBoard draws for ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("train_loss")]


def test_a_run_that_starts_afresh_hides_the_events_the_folder_holds(tmp_path):
    """A job killed before its first checkpoint and requeued with --resume auto starts from scratch: it replaced
    log.txt but drew its curve over the killed run's (two points at each x), the purge being a resumed run's
    only (found by a review)."""
    from helpers import pretrain_args, pretrain_in_process

    data, out = make_dataset(tmp_path / "data", 2), tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "2", "--epochs", "1", "--print_freq", "1"]
    pretrain_in_process(pretrain_args(data, out, *flags, "--resume", "auto"))
    for checkpoint in out.glob("checkpoint-*.pth"):  # what a kill before the first checkpoint leaves
        checkpoint.unlink()
    once = _train_loss_steps(out)
    assert once == [333, 666, 1000]
    pretrain_in_process(pretrain_args(data, out, *flags, "--resume", "auto"))
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    assert _train_loss_steps(out) == once


def test_tensorboard_events_go_beside_the_checkpoints_unless_log_dir_says_otherwise(tmp_path, monkeypatch):
    """The official --log_dir is ./output_dir whatever --output_dir is: every run given only --output_dir wrote
    its events into that one folder, which TensorBoard draws as one run. Here it follows --output_dir."""
    from helpers import TINY, pretrain_in_process

    data = make_dataset(tmp_path / "data", 2)
    monkeypatch.chdir(tmp_path)
    base = [*TINY, "--data_path", str(data), "--model", "mae_vit_mini_patch4", "--batch_size", "2", "--epochs", "1"]
    pretrain_in_process([*base, "--output_dir", "run_a"])
    pretrain_in_process([*base, "--output_dir", "run_b", "--log_dir", "tb_b"])
    pretrain_in_process([*base, "--output_dir", "run_c", "--log_dir", ""])
    events = sorted(str(p.parent) for p in tmp_path.rglob("events.out.tfevents.*"))
    assert events == [str(tmp_path / "run_a"), str(tmp_path / "tb_b")]
    assert not (tmp_path / "output_dir").exists()


def test_evaluation_does_not_claim_the_output_dir(tmp_path, monkeypatch):
    """--eval writes nothing there: it may score a checkpoint of the run still training in that folder."""
    from helpers import make_split

    import main_finetune

    out = tmp_path / "out"
    argv = ["--data_path", str(make_split(tmp_path / "split", 2, 1)), "--model", "vit_mini_patch4", "--input_size"]
    argv += ["32", "--nb_classes", "3", "--output_dir", str(out), "--log_dir", "", "--device", "cpu"]
    argv += ["--num_workers", "0", "--batch_size", "2", "--epochs", "1", "--mixup", "0", "--cutmix", "0"]
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    monkeypatch.setattr(claim, "CLAIM_WAIT_SECONDS", 0.5)
    holder = _hold(out)  # the run, still training
    try:
        main_finetune.main(main_finetune.get_args_parser().parse_args([*argv, "--eval", "--resume", "auto"]))
        with pytest.raises(UserError, match="is in use by another run"):
            main_finetune.main(main_finetune.get_args_parser().parse_args([*argv, "--resume", "auto"]))
    finally:
        holder.kill()
        holder.wait()


def _free(folder: Path) -> bool:
    """Whether another run could claim ``folder`` now (a descriptor of its own conflicts as another process's)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_forked_children_do_not_hold_the_output_dir(tmp_path):
    """DataLoader workers are forked after the claim: the lock must not live on in them, or a run killed
    with -9 holds its folder until its workers notice (5 s; for ever for one that hangs), and a run that
    ended until its persistent workers do."""
    claim.claim_output_dir(str(tmp_path), "--output_dir")
    started, ready = os.pipe()
    worker = os.fork()
    if worker == 0:  # a loader worker, alive after its run gave the folder back
        os.write(ready, b"1")  # (after the fork handlers)
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"
        assert not _free(tmp_path)
        claim.release_output_dirs()
        assert _free(tmp_path)
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        os.close(started)
        os.close(ready)


def test_a_stopped_run_gives_its_output_dir_back(tmp_path, monkeypatch):
    """A run stopped in a notebook (Ctrl-C) says 'continue with --resume auto': run from a shell while
    the kernel lives on, that resume must not be refused as a second run."""
    from helpers import isolated_interrupts, pretrain_args, pretrain_in_process

    import main_pretrain
    from util.train import interrupt

    out = tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "2", "--epochs", "1"]
    args = pretrain_args(make_dataset(tmp_path / "data", 2), out, *flags)
    build = main_pretrain.build_model

    def stopped_while_building(*a, **k):  # the stop request comes before training begins
        os.kill(os.getpid(), signal.SIGINT)
        return build(*a, **k)

    monkeypatch.setattr(main_pretrain, "build_model", stopped_while_building)
    with isolated_interrupts(), pytest.raises(interrupt.Interrupted, match="stopped on request"):
        pretrain_in_process(args)
    assert _free(out)


def test_every_rank_resumes_after_rank_0_holds_the_output_dir(tmp_path, monkeypatch):
    """Rank 0 may wait for a run that is ending to write its last checkpoint: a rank that read the folder
    meanwhile would resume an older checkpoint than rank 0's (torchrun, two gloo processes)."""
    from helpers import pretrain_args, run_ranks

    from util.train import distributed, run

    out = tmp_path / "out"
    args = pretrain_args(tmp_path / "data", out, "--resume", "auto")

    def waiting_claim(path: str, flag: str) -> None:  # rank 0's wait, then its claim
        time.sleep(2)
        (out / "claimed").touch()

    def open_resume(args: Namespace) -> None:  # each rank says what it would have read
        print(f"claimed before the read: {(out / 'claimed').exists()}")

    monkeypatch.setattr(run, "claim_output_dir", waiting_claim)
    monkeypatch.setattr(run, "open_resume", open_resume)
    logs = run_ranks(lambda: (run.start(args), distributed.cleanup()), tmp_path / "ranks")
    assert all("claimed before the read: True" in log for log in logs), logs


def test_a_folder_that_cannot_be_locked_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """NFS without lock support, say: flock fails with ENOLCK. The run is not refused, but warned."""
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    claim.claim_output_dir(str(tmp_path), "--output_dir")
    warned = [line for line in capsys.readouterr().out.splitlines() if "cannot be locked" in line]
    assert warned == [
        f"warning: --output_dir {tmp_path} cannot be locked ({os.strerror(errno.ENOLCK)}): a second run into it "
        f"would not be noticed"
    ]
    assert claim._claimed == {}


def test_an_output_dir_too_long_for_the_run_s_file_names_is_refused_at_start(tmp_path):
    # 4096 bytes with the NUL end a path (PATH_MAX). Here the start's probe (.write-test- and 8 characters) fit,
    # and a checkpoint's temporary did not: the run trained an epoch, then ended in 'cannot write checkpoint ...:
    # File name too long (... MiB are free there) ... free space'.
    folder = folder_of_length(tmp_path, 4095 - len("/.write-test-12345678"))
    checkpoint_tmp = atomic.temporary_path(str(folder / "checkpoint-0.pth"))
    with pytest.raises(OSError) as too_long:
        open(checkpoint_tmp, "wb")
    assert too_long.value.errno == errno.ENAMETOOLONG, "the folder leaves no room for a checkpoint"
    with pytest.raises(UserError, match=r"--output_dir .*: the path is too long for the files written in it .*"):
        outputs.check_output_dir(str(folder), "--output_dir")


def test_an_output_dir_with_room_for_the_run_s_file_names_is_taken(tmp_path):
    longest = atomic.temporary_path("checkpoint-9999-step999999.pth")
    folder = folder_of_length(tmp_path, 4095 - len(longest) - 1)
    outputs.check_output_dir(str(folder), "--output_dir")
    with open(folder / longest, "wb"):  # the invariant: the longest name fits
        pass


def test_an_output_file_whose_temporary_name_is_too_long_is_refused_before_work(tmp_path):
    # NAME_MAX is 255: a 250-character picture name fits, its temporary (name.tmp<pid>) does not.
    name = "r" * 246 + ".png"
    with pytest.raises(OSError) as too_long:
        open(atomic.temporary_path(str(tmp_path / name)), "wb")
    assert too_long.value.errno == errno.ENAMETOOLONG
    with pytest.raises(UserError, match=r"--output .*: the path is too long .*give a shorter path"):
        outputs.check_output_file(str(tmp_path / name), "--output")


def test_an_output_name_over_name_max_in_bytes_is_refused_before_work(tmp_path):
    # NAME_MAX counts bytes: 124 'é' (2 bytes each in UTF-8) and '.png' are 128 characters but 252 bytes, and
    # the temporary (name.tmp<pid>) is over 255. The start's probe, as long in characters, fit and let it pass.
    name = "é" * 124 + ".png"
    with pytest.raises(OSError) as too_long:
        open(atomic.temporary_path(str(tmp_path / name)), "wb")
    assert too_long.value.errno == errno.ENAMETOOLONG
    for check, path in ((outputs.check_output_file, name), (outputs.check_json_output, name[:-4] + ".json")):
        with pytest.raises(UserError, match=r"^--output .*: the path is too long .*give a shorter path$"):
            check(str(tmp_path / path), "--output")
    outputs.check_output_file(str(tmp_path / ("é" * 100 + ".png")), "--output")  # 204 bytes, and its temporary, fit


def test_a_short_output_name_that_just_fits_path_max_is_taken(tmp_path):
    # The probe was at least 21 characters (.write-test-, 8 random ones, '.'): longer than r.png.tmp<pid>, so a
    # folder with room for the picture was refused.
    name = "r.png"
    folder = folder_of_length(tmp_path, 4095 - len("/" + atomic.temporary_path(name)))
    outputs.check_output_file(str(folder / name), "--output")
    with open(atomic.temporary_path(str(folder / name)), "wb"):  # the invariant: it fits
        pass


def test_a_folder_held_by_a_run_takes_no_other_lock(tmp_path):
    """The hold on --output_dir is exclusive: with a shared lock two runs of this code both held the folder, and
    only a stand-in holding it exclusively (_HOLDER) was refused. Probed here from another open file description,
    which flock treats as another holder, shared and exclusive."""
    claim.claim_output_dir(str(tmp_path), "--output_dir")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for mode in (fcntl.LOCK_SH, fcntl.LOCK_EX):
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        claim.release_output_dirs()


def test_atomic_write_syncs_the_whole_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """What makes atomic_write survive a power loss, which no test can cause: the temporary file is flushed and
    synced with all its bytes before it is renamed over the target, and the folder is synced after the rename.
    Seen as the order of fsync and os.replace calls, and the size on disk of the file each fsync syncs."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync-folder",) if stat.S_ISDIR(info.st_mode) else ("fsync-file", info.st_size))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    data = b"x" * 100  # stays in Python's write buffer, not yet the file's, until the flush
    atomic.atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(data))
    assert events == [("fsync-file", len(data)), ("replace", "out.bin"), ("fsync-folder",)]
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_folder_whose_new_version_cannot_take_its_place_is_left_as_it_was(tmp_path, monkeypatch):
    """atomic_write_folder renames the earlier folder aside before the new one takes its name: where that second
    rename fails, the earlier folder is renamed back, whole, and nothing is left beside it."""
    folder = tmp_path / "hf"
    atomic.atomic_write_folder(str(folder), {"a.json": b"old"})
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        if os.path.basename(src).startswith(".hf.tmp"):  # the new folder taking the name
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError):
        atomic.atomic_write_folder(str(folder), {"a.json": b"new", "b.json": b"new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.json"] and (folder / "a.json").read_bytes() == b"old"


def test_a_run_waits_for_the_folder_of_a_run_that_is_ending(tmp_path, monkeypatch):
    """A run stopped with Ctrl-C and started again may find the first still writing its last checkpoint: the claim
    waits up to CLAIM_WAIT_SECONDS for the folder and takes it once free, rather than refusing at once."""
    monkeypatch.setattr(claim, "CLAIM_WAIT_SECONDS", 30.0)
    holder = _hold(tmp_path)
    ending = threading.Timer(0.5, holder.kill)
    ending.start()
    try:
        claim.claim_output_dir(str(tmp_path), "--output_dir")
    finally:
        ending.join()
        holder.wait()
        claim.release_output_dirs()
