"""util.cli.log: rank 0 shows info and warnings on stdout (as print did), other ranks show nothing."""

import json
import os
import re

import pytest

from util.cli import log as util_log


@pytest.fixture(autouse=True)
def _restore_rank():
    yield
    util_log.set_rank(0, distributed=False)


def test_one_process_prints_plain_lines_and_marks_warnings(capsys):
    util_log.set_rank(0, distributed=False)
    util_log.log.info("resumed model from x.pth")
    util_log.log.warning("skipping y.pth: truncated")
    assert capsys.readouterr().out == "resumed model from x.pth\nwarning: skipping y.pth: truncated\n"


def test_other_ranks_are_silent_and_rank_0_stamps_its_lines(capsys):
    util_log.set_rank(1, distributed=True)
    util_log.log.info("epoch 3")
    util_log.log.warning("a warning every rank would repeat")
    assert capsys.readouterr().out == ""
    util_log.set_rank(0, distributed=True)
    util_log.log.info("epoch 3")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] epoch 3\n", capsys.readouterr().out)


def test_errors_still_reach_stderr_on_other_ranks(capsys):
    from util.cli.errors import fail, run_cli

    util_log.set_rank(1, distributed=True)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: fail("--data_path /nowhere does not exist"))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: --data_path /nowhere does not exist\n"


def _raise(error: BaseException):
    def main():
        raise error

    return main


def test_ctrl_c_where_no_handler_waits_for_a_check_point_is_one_line_and_status_130(capsys):
    from util.cli.errors import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(_raise(KeyboardInterrupt()))
    assert stop.value.code == 130
    assert capsys.readouterr().err == (
        "stopped at once by Ctrl-C; the files written so far are complete (a training run continues from its "
        "last checkpoint with --resume auto)\n"
    )


def test_a_stop_on_request_without_output_dir_does_not_name_a_checkpoint(capsys):
    from util.cli.errors import run_cli
    from util.train.interrupt import Interrupted

    with pytest.raises(SystemExit):
        run_cli(_raise(Interrupted(None)))
    assert capsys.readouterr().err == "stopped on request; nothing was saved, since the run has no --output_dir\n"


@pytest.fixture
def _fresh_handler():
    util_log._handler.lost = False
    yield
    util_log._handler.lost = False


def test_a_closed_stdout_pipe_leaves_the_run_going_with_one_warning(monkeypatch, capsys, _fresh_handler):
    # `| head -1`: the reader ends, and each later write fails with EPIPE; a log line must not end the run.
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = open(write_end, "w")
    monkeypatch.setattr("sys.stdout", broken)
    util_log.log.info("epoch 0")  # raised BrokenPipeError
    util_log.log.info("epoch 1")
    broken.flush()  # its descriptor now leads to /dev/null: the buffered lines go nowhere, without an error
    monkeypatch.undo()
    broken.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("warning: stdout is unwritable (Broken pipe): going on without printing")


def test_no_stdout_at_all_leaves_the_run_going_with_one_warning(monkeypatch, capsys, _fresh_handler):
    # `>&-`: Python's sys.stdout is None, and each line raised AttributeError.
    monkeypatch.setattr("sys.stdout", None)
    util_log.log.info("epoch 0")
    util_log.log.warning("a warning")
    monkeypatch.undo()
    assert capsys.readouterr().err.startswith("warning: stdout is closed: going on without printing")


def test_a_run_whose_stdout_reader_ends_trains_to_its_checkpoint(tmp_path):
    # `main_pretrain.py ... | head -1`: the run ended in a BrokenPipeError traceback, status 1, no checkpoint.
    import subprocess
    import sys

    from tests.helpers import REPO, TINY, load, make_dataset

    data = make_dataset(tmp_path / "data", 6)
    out = tmp_path / "out"
    argv = [sys.executable, "main_pretrain.py", *TINY, "--data_path", str(data), "--output_dir", str(out)]
    proc = subprocess.Popen([*argv, "--epochs", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert err.startswith("warning: stdout is unwritable (Broken pipe): going on") and err.count("\n") == 1, err
    assert load(out / "checkpoint-0.pth")["epoch"] == 0


def test_a_tool_whose_stdout_reader_ended_is_one_line_and_status_141(monkeypatch, capsys):
    # `reconstruct.py ... | head -1`: the print after the picture was written ended in a BrokenPipeError traceback,
    # status 1.
    from util.cli.errors import run_cli

    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = open(write_end, "w")
    monkeypatch.setattr("sys.stdout", broken)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: print("wrote out.png", flush=True))
    broken.flush()  # led to /dev/null: the line still buffered goes nowhere, without an error
    monkeypatch.undo()
    broken.close()
    assert stop.value.code == 128 + 13  # SIGPIPE's status, as `yes | head -1` gives
    assert capsys.readouterr().err.startswith("error: stdout was closed before all was printed")


def test_a_broken_pipe_that_is_not_stdout_s_stays_a_traceback(capsys):
    # A bug's BrokenPipeError (a socket, a worker's pipe) is not a closed stdout: it must not be hidden.
    from util.cli.errors import run_cli

    def main():
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_cli(main)


def test_dataset_stats_writes_its_json_before_a_closed_stdout_ends_it(tmp_path, monkeypatch, capsys):
    # `dataset_stats.py ... --json s.json | head -1`: the second line failed before the file was written.
    import dataset_stats
    from tests.helpers import make_dataset
    from util.cli.errors import run_cli

    data = make_dataset(tmp_path / "data", 2)
    args = dataset_stats.get_args_parser().parse_args(
        ["--data_path", str(data), "--input_size", "32", "--json", str(tmp_path / "s.json")]
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = open(write_end, "w", buffering=1)  # line-buffered, as a terminal: the first line fails
    monkeypatch.setattr("sys.stdout", broken)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: dataset_stats.main(args))
    monkeypatch.undo()
    broken.close()
    assert stop.value.code == 141
    assert json.loads((tmp_path / "s.json").read_text())["images"] == 6
