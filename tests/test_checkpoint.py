"""util.checkpoint (files, load, rng, state, opening, resume, consistency): naming and ordering, pruning, atomic
writes, safe loading, strict model loading, random-number state and resume positions."""

import os
import random
import shlex
import sys
import types
import zipfile
from argparse import Namespace
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch
from helpers import assert_same

import main_linprobe
import models_vit
from util.checkpoint import files as checkpoint_files
from util.checkpoint import state as checkpoint
from util.checkpoint.files import atomic_save, checkpoint_name, list_checkpoints, prune
from util.checkpoint.load import load_checkpoint, model_state, peek_checkpoint
from util.checkpoint.opening import Opened
from util.checkpoint.resume import find_resumable, open_resume, resume
from util.checkpoint.rng import capture_rng, restore_rng
from util.checkpoint.state import Position, TrainState
from util.checkpoint.weights import load_model_strict
from util.cli.errors import UserError
from util.lr_decay import param_groups_lrd
from util.train.precision import LossScaler


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------
# Names and order
def test_names_and_progress_order(tmp_path):
    assert checkpoint_name(3) == "checkpoint-3.pth"
    assert checkpoint_name(3, 40) == "checkpoint-3-step40.pth"
    _touch(
        tmp_path,
        "checkpoint-10.pth",
        "checkpoint-2.pth",
        "checkpoint-3-step5.pth",
        "checkpoint-3-step40.pth",
        "checkpoint-3.pth",
        "checkpoint-2-step7.pth",
        # not checkpoints:
        "checkpoint-4.pth.tmp123",
        "checkpoint-best.pth",
        "log.txt",
        "checkpoint-5.pt",
    )
    order = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    # By the position each resumes at: epoch 3 after 5 and 40 iterations comes after the whole
    # epoch 2 and before the whole epoch 3; numbers compare as numbers (10 > 3).
    assert order == [
        "checkpoint-2-step7.pth",
        "checkpoint-2.pth",
        "checkpoint-3-step5.pth",
        "checkpoint-3-step40.pth",
        "checkpoint-3.pth",
        "checkpoint-10.pth",
    ]
    assert list_checkpoints(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------------------------
# Pruning
def _expected_kept(names: list[str], keep_last: int, keep_every: int, final_epoch: int) -> set[str]:
    """The docstring's rule, written independently: the newest checkpoint; among complete epochs
    the keep_last newest, every keep_every-th and the final one."""
    order = sorted(names, key=lambda n: checkpoint_files.progress(n))
    complete = [n for n in order if "-step" not in n]
    kept = {order[-1]} | set(complete[-keep_last:])
    kept |= {n for n in complete if int(n[len("checkpoint-") : -len(".pth")]) % keep_every == 0}
    kept |= {n for n in complete if n == f"checkpoint-{final_epoch}.pth"}
    return kept


@pytest.mark.parametrize(
    "names, keep_last, keep_every, final_epoch",
    [
        ([f"checkpoint-{e}.pth" for e in range(10)], 1, 20, 99),  # the defaults, run not finished
        ([f"checkpoint-{e}.pth" for e in range(10)], 2, 4, 99),
        ([f"checkpoint-{e}.pth" for e in range(10)], 3, 4, 5),  # final epoch among the old ones
        # The end of an epoch with --ckpt_every_steps and the default --keep_last 1.
        (
            [
                "checkpoint-0.pth",
                "checkpoint-1.pth",
                "checkpoint-2-step1.pth",
                "checkpoint-2-step2.pth",
                "checkpoint-2.pth",
            ],
            1,
            20,
            9,
        ),
        # A run interrupted inside epoch 2, pruned later (e.g. by hand): the newest stays.
        (["checkpoint-0.pth", "checkpoint-1-step3.pth", "checkpoint-1.pth", "checkpoint-2-step3.pth"], 1, 20, 9),
        # The end of an epoch with --ckpt_every_steps: that epoch's mid-epoch checkpoints are still
        # there when it is pruned; they must not count as complete epochs for --keep_last.
        (
            [f"checkpoint-{e}.pth" for e in range(4)] + ["checkpoint-3-step1.pth", "checkpoint-3-step2.pth"],
            2,
            100,
            9,
        ),
    ],
    ids=["defaults", "keep_last2_every4", "final_epoch", "mid_epoch", "mid_epoch_newest", "mid_epoch_and_keep_last"],
)
def test_prune_follows_documented_rule(tmp_path, names, keep_last, keep_every, final_epoch):
    _touch(tmp_path, *names, "log.txt")
    removed = prune(str(tmp_path), keep_last, keep_every, final_epoch)
    expected = _expected_kept(names, keep_last, keep_every, final_epoch)
    assert _names(tmp_path) == expected | {"log.txt"}
    assert sorted(os.path.basename(p) for p in removed) == sorted(set(names) - expected)


def test_prune_keep_last_zero_keeps_everything(tmp_path):
    names = [f"checkpoint-{e}.pth" for e in range(5)] + ["checkpoint-2-step1.pth"]
    _touch(tmp_path, *names)
    assert prune(str(tmp_path), 0, 20, 4) == []
    assert _names(tmp_path) == set(names)


def test_prune_removes_temporaries_of_dead_writers_only(tmp_path):
    _touch(tmp_path, "checkpoint-1.pth", "checkpoint-2.pth.tmp999999", f"checkpoint-3.pth.tmp{os.getpid()}", "a.tmp1")
    prune(str(tmp_path), 1, 20, 9)
    assert _names(tmp_path) == {"checkpoint-1.pth", f"checkpoint-3.pth.tmp{os.getpid()}", "a.tmp1"}


# ---------------------------------------------------------------------------------------------
# Atomic writes
def test_atomic_save_replaces_whole_file(tmp_path):
    path = tmp_path / "checkpoint-0.pth"
    atomic_save({"a": torch.arange(3)}, str(path))
    atomic_save({"a": torch.arange(5)}, str(path))
    assert torch.equal(load_checkpoint(str(path))["a"], torch.arange(5))
    assert _names(tmp_path) == {"checkpoint-0.pth"}


def test_atomic_save_failure_midway_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-0.pth"
    atomic_save({"a": torch.arange(3)}, str(path))
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the disk, then...
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"a": torch.arange(10)}, str(path))
    assert path.read_bytes() == before
    assert _names(tmp_path) == {"checkpoint-0.pth"}, "the temporary file must be removed"


# ---------------------------------------------------------------------------------------------
# Loading untrusted files
class _Malicious:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_load_checkpoint_accepts_tensors_and_namespace(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": Namespace(a=1), "epoch": 0}, good)
    ckpt = load_checkpoint(str(good))
    assert ckpt["args"] == Namespace(a=1) and torch.equal(ckpt["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("pickled_module", ["pathlib", "pathlib._local"])
def test_load_checkpoint_accepts_official_submitit_paths(tmp_path, monkeypatch, pickled_module):
    # The official submitit launchers set args.output_dir (and log_dir, job_dir) to pathlib paths.
    # Python <= 3.12 pickles PosixPath as pathlib.PosixPath, 3.13 as pathlib._local.PosixPath: a
    # checkpoint of either must load on any Python. The writer is made to use each name here.
    monkeypatch.setitem(
        sys.modules, pickled_module, sys.modules.get(pickled_module) or _holding_posix_path(pickled_module)
    )
    monkeypatch.setattr(PosixPath, "__module__", pickled_module)
    official = tmp_path / "checkpoint-799.pth"
    args = Namespace(model="mae_vit_large_patch16", output_dir=PosixPath("/checkpoint/me/experiments/42"))
    torch.save({"model": {"w": torch.ones(2)}, "args": args, "epoch": 799}, official)
    monkeypatch.undo()  # the reader gets no help: pathlib._local does not exist before Python 3.13
    assert f"{pickled_module}\nPosixPath".encode() in _pickle_of(official)
    assert load_checkpoint(str(official))["args"].output_dir == PosixPath("/checkpoint/me/experiments/42")
    assert peek_checkpoint(str(official))["args"].output_dir == PosixPath("/checkpoint/me/experiments/42")


def _holding_posix_path(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.PosixPath = PosixPath
    return module


def _pickle_of(checkpoint: Path) -> bytes:
    with zipfile.ZipFile(checkpoint) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def _write_bad(path: Path, kind: str) -> None:
    if kind == "truncated":
        torch.save({"model": {"w": torch.ones(1000)}, "epoch": 0}, path)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "list":
        torch.save([torch.ones(1)], path)
    elif kind == "malicious":
        marker = path.parent / "MARKER"
        torch.save({"model": _Malicious(f"touch {shlex.quote(str(marker))}")}, path)
    elif kind == "text":
        path.write_text("hello")
    elif kind == "html":  # what a failed download saves
        path.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    elif kind == "lfs_pointer":  # a checkpoint cloned without git-lfs
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 1234\n")
    elif kind == "folder":  # a Hugging Face export, or an output folder, given for its file
        path.mkdir()
    elif kind != "missing":
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("truncated", ["truncated"]),
        ("list", ["not a dict"]),
        ("malicious", ["refused"]),
        ("missing", ["does not exist; check its path"]),
        ("folder", ["is a folder, not a checkpoint file", "export.py --from hf"]),
        ("text", ["not a PyTorch checkpoint"]),
        ("html", ["not a PyTorch checkpoint"]),
        ("lfs_pointer", ["not a PyTorch checkpoint"]),
    ],
)
def test_load_checkpoint_refuses_bad_file_with_one_line(tmp_path, kind, words):
    path = tmp_path / f"{kind}.pth"
    _write_bad(path, kind)
    with pytest.raises(UserError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "MARKER").exists()


def test_malicious_checkpoint_message_names_the_refused_global(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"model": _Malicious(f"touch {shlex.quote(str(marker))}")}, tmp_path / "evil.pth")
    with pytest.raises(UserError) as err:
        load_checkpoint(str(tmp_path / "evil.pth"))
    assert "posix.system" in str(err.value), f"the message should say what was refused: {err.value}"
    assert not marker.exists()


def test_model_state_and_strict_loading():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    own = model.state_dict()
    assert model_state({"model": own}, "p") is own
    assert model_state(dict(own), "p").keys() == own.keys()  # a bare state dict
    for bad in ({"foo": 1}, {"model": {}}, {"model": {"w": 1}}):
        with pytest.raises(UserError, match="no model state dict"):
            model_state(bad, "p.pth")

    target = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    load_model_strict(target, own, "p.pth")
    assert_same(target.state_dict(), own)

    missing = {k: v for k, v in own.items() if k != "1.bias"}
    with pytest.raises(UserError, match=r"1 missing \['1\.bias'\]"):
        load_model_strict(target, missing, "p.pth")
    with pytest.raises(UserError, match=r"1 unexpected \['extra'\]"):
        load_model_strict(target, {**own, "extra": torch.zeros(1)}, "p.pth")
    with pytest.raises(
        UserError, match=r"1 of another shape \['0\.weight'\] \(e\.g\. 0\.weight: \(4, 2\) vs \(3, 2\)\)"
    ):
        load_model_strict(target, {**own, "0.weight": torch.zeros(4, 2)}, "p.pth")


def test_model_state_drops_the_prefix_of_a_model_saved_inside_data_parallel():
    """model.state_dict() of a DataParallel / DistributedDataParallel wrapper names every weight 'module.<name>':
    was refused as an encoder without decoder (--resume) or as no known encoder (--finetune, export.py)."""
    own = torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict()
    wrapped = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 3))).state_dict()
    assert set(wrapped) == {"module.0.weight", "module.0.bias"}  # what such a script saves
    for ckpt in ({"model": wrapped}, dict(wrapped)):
        assert model_state(ckpt, "p").keys() == own.keys()
    partly = {"module.0.weight": own["0.weight"], "0.bias": own["0.bias"]}  # not a wrapper's: left as it is
    assert model_state({"model": partly}, "p").keys() == partly.keys()
    # torch.compile's wrapper names them '_orig_mod.<name>'; compiled around DDP, '_orig_mod.module.<name>'.
    compiled = torch.compile(torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 3)))).state_dict()
    assert set(compiled) == {"_orig_mod.module.0.weight", "_orig_mod.module.0.bias"}
    assert model_state({"model": compiled}, "p").keys() == own.keys()


# ---------------------------------------------------------------------------------------------
# Random-number state and resume
def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    np.random.randn()  # leave a cached Gaussian in numpy's state
    state = capture_rng()
    expected = _draw()
    _draw()
    atomic_save({"rng": [state]}, str(tmp_path / "c.pth"))
    restore_rng(load_checkpoint(str(tmp_path / "c.pth"))["rng"][0])  # loads without pickled code
    assert_same(_draw(), expected)


def _state(model, args) -> TrainState:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return TrainState(model, optimizer, LossScaler("fp32"), args)


def _args(**kw) -> Namespace:
    flags = dict(start_epoch=0, resume="", output_dir="", device="cpu", keep_last=0, save_freq=1, epochs=0)
    return Namespace(**{**flags, "batch_size": 8, "world_size": 1, "accum_iter": 1, **kw})


def test_resume_positions_and_find_resumable(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    state = _state(model, _args(output_dir=str(tmp_path)))
    model(torch.ones(1, 2)).sum().backward()
    state.optimizer.step()

    def save(epoch, step):
        checkpoint.save_checkpoint(state, epoch, step)

    assert resume(state, open_resume(state.args)) == Position(0, 0)  # no --resume
    save(0, None)
    save(1, 4)
    whole = (tmp_path / "checkpoint-1-step4.pth").read_bytes()
    (tmp_path / "checkpoint-1-step8.pth").write_bytes(whole[:100])  # newest, but broken

    found = find_resumable(str(tmp_path))
    assert os.path.basename(found.path) == "checkpoint-1-step4.pth" and found.ckpt["step"] == 4
    assert "checkpoint-1-step8.pth" in capsys.readouterr().out

    fresh = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), resume="auto"))
    assert resume(fresh, open_resume(fresh.args)) == Position(1, 4)
    assert_same(fresh.model.state_dict(), model.state_dict())
    assert_same(fresh.optimizer.state_dict(), state.optimizer.state_dict())
    # The broken newest is reported as skipped, once: not also as a later checkpoint that --resume auto
    # "would take" (it is --resume auto that skipped it; found by a docs review).
    printed = capsys.readouterr().out
    assert "skipping" in printed and "checkpoints beyond" not in printed
    fresh.args.resume = str(tmp_path / "checkpoint-0.pth")
    assert resume(fresh, open_resume(fresh.args)) == Position(1, 0)  # after a complete epoch: the next one
    # A --resume PATH behind the folder's newest is warned about: --resume auto would take another one.
    assert "holds checkpoints beyond" in capsys.readouterr().out

    # Weights only (an official release): the model loads, training starts at --start_epoch.
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    fresh = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "weights.pth"), start_epoch=3))
    assert resume(fresh, open_resume(fresh.args)) == Position(3, 0)
    assert_same(fresh.model.state_dict(), model.state_dict())
    assert fresh.optimizer.state_dict()["state"] == {}


def test_resume_with_another_number_of_processes(tmp_path, capsys):
    """docs/checkpoints.md: an epoch-end checkpoint of 2 processes resumes in 1 with a warning that the
    random state is not restored; one written inside an epoch is refused (its position counts batches
    of 2 processes)."""
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    for name, step in (("end.pth", None), ("mid.pth", 3)):
        saved = _args(world_size=2)
        ckpt = {**state.state_dict(), "args": saved, "epoch": 0, "step": step, "rng": [capture_rng()] * 2}
        atomic_save(ckpt, str(tmp_path / name))
    fresh = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "end.pth")))
    assert resume(fresh, open_resume(fresh.args)) == Position(1, 0)
    assert "written by 2 processes, this run has 1: random state is not restored" in capsys.readouterr().out
    fresh.args.resume = str(tmp_path / "mid.pth")
    with pytest.raises(UserError, match="inside an epoch with number of processes 2, this run has 1"):
        resume(fresh, open_resume(fresh.args))
    other_batch = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "mid.pth"), world_size=2, batch_size=16))
    with pytest.raises(UserError, match="inside an epoch with --batch_size 8, this run has 16"):
        resume(other_batch, open_resume(other_batch.args))


def test_resume_auto_skips_a_checkpoint_written_inside_an_epoch_with_other_batches(tmp_path, capsys):
    """A job torchrun restarts on fewer nodes (--nnodes 1:2) resumes with --resume auto: its newest checkpoint,
    written inside an epoch by more processes, was refused, and every restart failed the same way. Now the newest
    epoch-end checkpoint is resumed, saying why the newer one is skipped; with the same settings, the newer one."""
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), world_size=2))
    checkpoint.save_checkpoint(state, 0)
    checkpoint.save_checkpoint(state, 1, 3)
    capsys.readouterr()
    fewer = _state(torch.nn.Linear(2, 2), _args(resume="auto", output_dir=str(tmp_path)))
    assert resume(fewer, open_resume(fewer.args)) == Position(1, 0)
    assert capsys.readouterr().out.startswith(
        f"warning: skipping {tmp_path / 'checkpoint-1-step3.pth'}: it was written inside an epoch with number of "
        f"processes 2, this run has 1, and its position counts the batches of those settings\n"
    )
    same = _state(torch.nn.Linear(2, 2), _args(resume="auto", output_dir=str(tmp_path), world_size=2))
    assert resume(same, open_resume(same.args)) == Position(1, 3)
    assert "skipping" not in capsys.readouterr().out


def test_resume_from_an_official_full_checkpoint_says_it_is_not_exact(tmp_path, capsys):
    """The official code's checkpoints hold model, optimizer, epoch, scaler and args, no random state: the
    resumed masks, mixup and drop paths were drawn afresh (other weights than an uninterrupted run's, seen with
    one built by hand from ours) without the warning a checkpoint of another process count gets."""
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    ours = load_checkpoint(checkpoint.save_checkpoint(state, 0))
    official = {key: ours[key] for key in ("model", "optimizer", "epoch", "scaler", "args")}
    torch.save(official, tmp_path / "official.pth")
    capsys.readouterr()
    fresh = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "official.pth")))
    assert resume(fresh, open_resume(fresh.args)) == Position(1, 0)
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warned == [f"warning: {tmp_path / 'official.pth'} holds no random state (the official code saves none): "
                      f"resume is not exact"]  # fmt: skip
    fresh.args.resume = str(tmp_path / "checkpoint-0.pth")  # ours: restored, nothing to say
    resume(fresh, open_resume(fresh.args))
    assert "random state" not in capsys.readouterr().out


def test_a_mid_epoch_checkpoint_resumed_with_another_seed_is_refused(tmp_path):
    """The epoch's order is drawn from --seed: resumed at iteration 3 with another seed, the run skipped the
    first 3 batches of another order, training some images of the epoch twice and others not at all
    (seen: no warning, other weights than the run of either seed). An epoch-end checkpoint resumes."""
    from util.data.sampling import SeededSampler

    same_skip = [list(SeededSampler(48, seed))[:24] for seed in (0, 5)]  # what 3 batches of 8 trained
    assert {i for i, _ in same_skip[0]} != {i for i, _ in same_skip[1]}  # the premise: other images
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), seed=0))
    checkpoint.save_checkpoint(state, 0)
    checkpoint.save_checkpoint(state, 1, 3)
    other_seed = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "checkpoint-1-step3.pth"), seed=5))
    with pytest.raises(UserError, match="inside an epoch with --seed 0, this run has 5; resume with the same"):
        resume(other_seed, open_resume(other_seed.args))
    other_seed.args.resume = str(tmp_path / "checkpoint-0.pth")
    assert resume(other_seed, open_resume(other_seed.args)) == Position(1, 0)


def test_a_mid_epoch_checkpoint_resumed_with_another_accum_iter_is_refused(tmp_path):
    """docs/checkpoints.md: a position inside an epoch counts iterations, and with another --accum_iter the
    optimizer steps fall on other iterations than the ones the checkpoint counted. An epoch-end one resumes."""
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), accum_iter=2))
    checkpoint.save_checkpoint(state, 0)
    checkpoint.save_checkpoint(state, 1, 4)
    other = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "checkpoint-1-step4.pth"), accum_iter=4))
    with pytest.raises(UserError, match="inside an epoch with --accum_iter 2, this run has 4; resume with the same"):
        resume(other, open_resume(other.args))
    other.args.resume = str(tmp_path / "checkpoint-0.pth")
    assert resume(other, open_resume(other.args)) == Position(1, 0)


def test_resume_with_flags_that_change_what_is_learned_warns_naming_each(tmp_path, capsys):
    """--mask_ratio, --norm_pix_loss, ... (MEANING_FLAGS) changed on resume: training goes on with
    the new values, and one warning names each change; flags that change nothing learned (--epochs)
    are not named."""
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), mask_ratio=0.75, norm_pix_loss=True))
    checkpoint.save_checkpoint(state, 0)
    changed = dict(mask_ratio=0.5, norm_pix_loss=False, epochs=9)
    fresh = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "checkpoint-0.pth"), **changed))
    capsys.readouterr()
    assert resume(fresh, open_resume(fresh.args)) == Position(1, 0)
    warned = [line for line in capsys.readouterr().out.splitlines() if "trained with other flags" in line]
    assert warned == [
        f"warning: {tmp_path / 'checkpoint-0.pth'} was trained with other flags (--mask_ratio 0.75 -> 0.5, "
        f"--norm_pix_loss True -> False); training goes on with the new ones"
    ]


def test_resume_with_other_mixing_or_drop_path_warns_as_smoothing_does(tmp_path, capsys):
    """Fine-tuning's --mixup, --cutmix and --drop_path change its targets and regularisation as --smoothing
    does, which was named: these went on without a word (main_finetune, from epoch ends and mid-epoch)."""
    saved = dict(smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1)
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), **saved))
    checkpoint.save_checkpoint(state, 0)
    changed = dict(smoothing=0.1, mixup=0.0, cutmix=0.0, drop_path=0.2)
    fresh = _state(torch.nn.Linear(2, 2), _args(resume=str(tmp_path / "checkpoint-0.pth"), **changed))
    capsys.readouterr()
    resume(fresh, open_resume(fresh.args))
    warned = [line for line in capsys.readouterr().out.splitlines() if "trained with other flags" in line]
    assert warned == [
        f"warning: {tmp_path / 'checkpoint-0.pth'} was trained with other flags (--mixup 0.8 -> 0.0, --cutmix 1.0 "
        f"-> 0.0, --drop_path 0.1 -> 0.2); training goes on with the new ones"
    ]


def test_resume_refuses_other_optimizer_layout(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = _state(model, _args(output_dir=str(tmp_path)))
    checkpoint.save_checkpoint(state, 0)
    twin = torch.nn.Linear(2, 2)
    two_groups = torch.optim.AdamW([{"params": [p]} for p in twin.parameters()])
    other = TrainState(twin, two_groups, LossScaler("fp32"), _args(resume=str(tmp_path / "checkpoint-0.pth")))
    with pytest.raises(UserError, match="optimizer"):
        resume(other, open_resume(other.args))


def _two_group_state(weight_decay: float, layer_decay: float, args: Namespace, lr: float = 0.1) -> TrainState:
    """A model whose optimizer has param_groups_lrd's settings: a weight decay and an lr_scale per group."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    groups = [
        {"params": [model.weight], "weight_decay": weight_decay, "lr_scale": layer_decay},
        {"params": [model.bias], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return TrainState(model, torch.optim.AdamW(groups, lr=lr), LossScaler("fp32"), args)


def test_weight_decay_and_layer_decay_given_on_resume_are_the_ones_used(tmp_path):
    """The optimizer's load_state_dict replaced every group's settings by the checkpoint's: --weight_decay
    0.5 and --layer_decay 0.5 given on resume trained with the saved 0.05 and 0.75, and the new checkpoint's
    args claimed 0.5 (seen on all three entry points, comparing the weights with an unchanged run's)."""
    state = _two_group_state(0.05, 0.75, _args(output_dir=str(tmp_path)))
    state.model(torch.ones(1, 2)).sum().backward()
    state.optimizer.step()
    checkpoint.save_checkpoint(state, 0)
    fresh = _two_group_state(0.5, 0.5, _args(resume=str(tmp_path / "checkpoint-0.pth")), lr=0.7)
    resume(fresh, open_resume(fresh.args))
    assert [(g["weight_decay"], g["lr_scale"]) for g in fresh.optimizer.param_groups] == [(0.5, 0.5), (0.0, 1.0)]
    assert_same(fresh.optimizer.state_dict()["state"], state.optimizer.state_dict()["state"])  # moments, steps
    # The lr is the schedule's, set at each step: the checkpoint's until then (fine-tuning saves its last epoch
    # again after evaluating it, before any step; found by the fault campaign with the lr taken from the flags).
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [0.1, 0.1]


def test_a_non_fused_optimizers_step_counts_resume_as_the_fused_optimizer_keeps_them(tmp_path):
    """torch converts a loaded optimizer state by the groups it loads, which were the checkpoint's: the step
    counts of a non-fused AdamW (a CPU run's checkpoint, the official code's) stayed CPU tensors in a GPU run's
    fused AdamW, whose first step refused them ('Expected all tensors to be on the same device'). On a CPU both
    live on the CPU; their dtype tells the two conversions apart: a non-fused AdamW makes its steps in the
    default dtype (float64 here), a fused one keeps them in float32 on the parameter's device."""
    model = torch.nn.Linear(2, 2, dtype=torch.float32)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = _state(model, _args(output_dir=str(tmp_path)))
        state.model(torch.ones(1, 2, dtype=torch.float32)).sum().backward()
        state.optimizer.step()
    finally:
        torch.set_default_dtype(default)
    assert {s["step"].dtype for s in state.optimizer.state.values()} == {torch.float64}
    checkpoint.save_checkpoint(state, 0)
    twin = torch.nn.Linear(2, 2)
    fused = TrainState(
        twin, torch.optim.AdamW(twin.parameters(), lr=0.1, fused=True), LossScaler("fp32"),
        _args(resume=str(tmp_path / "checkpoint-0.pth")),
    )  # fmt: skip
    resume(fused, open_resume(fused.args))
    steps = [s["step"] for s in fused.optimizer.state.values()]
    assert [(s.dtype, s.device, float(s)) for s in steps] == [(torch.float32, torch.device("cpu"), 1.0)] * 2
    assert all(g["fused"] for g in fused.optimizer.param_groups)  # this run's setting, not the checkpoint's


def test_a_mid_epoch_resume_on_changed_data_warns(tmp_path, capsys):
    """The position counts iterations of the data's order: other data, another order."""
    from util.checkpoint.consistency import check_same_data

    class Files:
        def __init__(self, names):
            self.files = [str(tmp_path / "data" / n) for n in names]

    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    check_same_data(state, Files(["a.jpg", "b.jpg"]), Position(1, 0))
    moved = Files([])
    moved.files = [str(tmp_path / "elsewhere" / n) for n in ("a.jpg", "b.jpg")]
    check_same_data(state, moved, Position(1, 3))  # the same files in another folder: the same data
    assert "warning" not in capsys.readouterr().out
    check_same_data(state, Files(["a.jpg", "b.jpg", "c.jpg"]), Position(1, 3))
    out = capsys.readouterr().out
    assert "warning: the training data changed since the checkpoint (2 -> 3 images" in out
    assert "iteration 3" in out
    check_same_data(state, Files(["a.jpg"]), Position(2, 0))  # at an epoch's start the order is new anyway
    assert "warning" not in capsys.readouterr().out


def test_a_mid_epoch_resume_after_class_folders_were_renamed_warns(tmp_path, capsys):
    """CIFAR-10's class folders hold the same file names (0000.jpg, ...): 'cat' renamed 'zebra' puts the
    ship images before the cat images, another order of the same names. The digest of the names alone was
    the same, and the resumed epoch went on in the new order without a word (found by a probe that renamed
    a class folder of a stopped pre-training run)."""
    from util.checkpoint.consistency import check_same_data

    class Files:
        def __init__(self, *classes):
            self.files = [str(tmp_path / "data" / c / n) for c in classes for n in ("0000.jpg", "0001.jpg")]

    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    check_same_data(state, Files("airplane", "cat", "ship"), Position(1, 0))
    check_same_data(state, Files("airplane", "cat", "ship"), Position(1, 3))
    assert "warning" not in capsys.readouterr().out
    check_same_data(state, Files("airplane", "ship", "zebra"), Position(1, 3))
    assert "warning: the training data changed since the checkpoint (6 -> 6 images" in capsys.readouterr().out


def test_a_checkpoint_of_earlier_versions_compares_the_image_count_only(tmp_path, capsys):
    """Checkpoints written before the paths' digest hold one of the file names ('digest'): resumed inside an
    epoch on the same data, they must not warn; on another count they do."""
    from util.checkpoint.consistency import check_same_data

    class Files:
        files = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]

    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    state.extra["data"] = {"images": 2, "digest": "0" * 40}
    check_same_data(state, Files(), Position(1, 1))
    assert "warning" not in capsys.readouterr().out
    state.extra["data"] = {"images": 3, "digest": "0" * 40}
    check_same_data(state, Files(), Position(1, 1))
    assert "warning: the training data changed since the checkpoint (3 -> 2 images" in capsys.readouterr().out


def test_a_classifier_resumed_on_other_class_folders_is_refused(tmp_path):
    """A label is a class's position among the sorted folder names. Resumed after 'cat' was renamed 'zebra'
    (or removed and 'dog' added), fine-tuning went on with the head's output 1 meaning ship (dog): top-1 fell
    from 58% to 33% without a word (found by a probe of a stopped fine-tuning run). Now one line, at an
    epoch's end as inside one; the same folders pass, and a list file's labels (the indices) are not names."""
    from util.checkpoint.consistency import check_same_data
    from util.data.lists import ClassIndices

    class Split:
        def __init__(self, classes):
            self.classes = classes
            self.files = [str(tmp_path / "train" / c / "0000.jpg") for c in classes]

    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), data_path="data"))
    check_same_data(state, Split(["airplane", "cat", "ship"]), Position(1, 0))
    assert state.extra["data"]["classes"] == ["airplane", "cat", "ship"]
    source = Opened(str(tmp_path / "checkpoint-0.pth"), {})
    check_same_data(state, Split(["airplane", "cat", "ship"]), Position(1, 0, resumed=True, source=source))
    for classes, change in (
        (["airplane", "ship", "zebra"], "1: cat -> ship"),
        (["airplane", "cat"], "2: ship -> none"),
    ):
        refused = rf"^--data_path data: the class folders differ from those .*-0.pth was trained on \(label {change}\)"
        for position in (Position(1, 0, resumed=True, source=source), Position(1, 3, resumed=True, source=source)):
            with pytest.raises(UserError, match=refused):
                check_same_data(state, Split(classes), position)
    state.args.eval = True  # an evaluation is not told to fine-tune afresh
    with pytest.raises(UserError, match=r"give the data it was trained on \(the folders as they were\)$"):
        check_same_data(state, Split(["airplane", "ship", "zebra"]), Position(1, 0, resumed=True, source=source))
    lists = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    check_same_data(lists, Split(ClassIndices(3)), Position(1, 0))
    assert "classes" not in lists.extra["data"]


def test_a_mid_epoch_position_past_the_new_datas_epoch_is_refused(tmp_path):
    """Resumed from iteration 4 (of 6) onto data of 2 iterations an epoch: the sampler was asked to skip more
    samples than the epoch has, and the run ended in a traceback (ValueError: __len__() should return >= 0)."""
    from helpers import make_dataset, run_pretrain

    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "1", "--ckpt_every_steps", "2"]
    run_pretrain(make_dataset(tmp_path / "all", 16), tmp_path / "out", *flags, "--vis_freq", "0", "--keep_last", "0")
    mid_epoch = tmp_path / "out" / "checkpoint-0-step4.pth"
    fewer = make_dataset(tmp_path / "fewer", 6)  # 18 images: 2 batches of 8
    refused = (
        r"^the --resume checkpoint was written at iteration 4 of epoch 0, past the end of an epoch of this run's "
        r"training data \(2 iterations\): the data changed since; resume from an epoch-end checkpoint"
    )
    with pytest.raises(UserError, match=refused):
        run_pretrain(fewer, tmp_path / "again", *flags, "--vis_freq", "0", "--resume", str(mid_epoch))
    assert not (tmp_path / "again" / "checkpoint-0.pth").exists()


def test_a_changed_schedule_on_resume_is_named_with_the_lr_it_jumps_to(tmp_path, capsys):
    """A finished run extended with --epochs went on at 6.25e-05 where its last steps had ~0, without a word
    (so did --warmup_epochs, --blr, --min_lr, --weight_decay or another process count). The lr by hand: cosine
    from 1e-4 to 0 without warm-up; at epoch 1 of 1 the old schedule is over (0), of 2 it is at its middle."""
    from helpers import make_dataset, run_pretrain

    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--vis_freq", "0", "--keep_last", "0"]
    flags += ["--lr", "1e-4", "--warmup_epochs", "0", "--min_lr", "0", "--ckpt_every_steps", "3"]
    data, out = make_dataset(tmp_path / "data", 16), tmp_path / "out"  # 6 iterations an epoch
    run_pretrain(data, out, *flags, "--epochs", "1")
    capsys.readouterr()
    run_pretrain(data, out, *flags, "--epochs", "1", "--resume", "auto")  # unchanged: nothing to say
    assert "warning" not in capsys.readouterr().out
    run_pretrain(data, out, *flags, "--epochs", "2", "--resume", "auto")
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warned == [
        f"warning: {out / 'checkpoint-0.pth'} was trained with another schedule (--epochs 1 -> 2; the lr at epoch 1, "
        f"iteration 0 is 5e-05, not 0); training goes on with this run's"
    ]
    # Inside an epoch: at iteration 3 of 6 (epoch 0.5), 1e-4 x (1 + cos(pi x 0.5 / 2)) / 2 = 8.54e-05, where the
    # 1-epoch schedule gives 1e-4 x (1 + cos(pi / 2)) / 2 = 5e-05; and the weight decay is named.
    run_pretrain(
        data, out, *flags, "--epochs", "2", "--resume", str(out / "checkpoint-0-step3.pth"), "--weight_decay", "0.1"
    )
    warned = [line for line in capsys.readouterr().out.splitlines() if "another schedule" in line]
    assert warned == [
        f"warning: {out / 'checkpoint-0-step3.pth'} was trained with another schedule (--epochs 1 -> 2; --weight_decay "
        f"0.05 -> 0.1; the lr at epoch 0, iteration 3 is 8.54e-05, not 5e-05); training goes on with this run's"
    ]


def test_a_finished_run_extended_with_more_epochs_keeps_its_final_checkpoint(tmp_path):
    """docs/checkpoints.md: the last epoch's checkpoint is kept for good. Extended from --epochs 2 to 3, the run
    pruned checkpoint-1.pth (the 2-epoch run's result: not a --save_freq multiple, no longer the last) at its
    first save; with 800 epochs extended to 1600 at --save_freq 20, checkpoint-799.pth went so. It stays, also
    through a later restart of the extended run, and a run that is not extended prunes as before."""
    from helpers import checkpoint_names, load, make_dataset, run_pretrain

    data = make_dataset(tmp_path / "data", 16)
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--vis_freq", "0", "--save_freq", "5"]
    run_pretrain(data, tmp_path / "out", *flags, "--epochs", "2")
    assert checkpoint_names(tmp_path / "out") == {"checkpoint-0.pth", "checkpoint-1.pth"}
    run_pretrain(data, tmp_path / "out", *flags, "--epochs", "3", "--resume", "auto")
    assert checkpoint_names(tmp_path / "out") == {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth"}
    run_pretrain(data, tmp_path / "out", *flags, "--epochs", "4", "--resume", "auto")  # extended again
    assert checkpoint_names(tmp_path / "out") == {f"checkpoint-{epoch}.pth" for epoch in range(4)}
    assert load(tmp_path / "out" / "checkpoint-3.pth")["extra"]["finals"] == ["checkpoint-1.pth", "checkpoint-2.pth"]
    run_pretrain(data, tmp_path / "out", *flags, "--epochs", "4", "--resume", "auto")  # finished: prunes, keeps
    assert checkpoint_names(tmp_path / "out") == {f"checkpoint-{epoch}.pth" for epoch in range(4)}


@pytest.mark.parametrize(
    "saved_epochs, folder, kept",
    [(2, "out", ["checkpoint-1.pth"]), (3, "out", []), (2, "elsewhere", [])],
    ids=["the-final-one", "inside-its-run", "another-folder"],
)
def test_only_the_final_checkpoint_of_a_run_in_the_folder_is_kept_as_such(tmp_path, saved_epochs, folder, kept):
    """checkpoint-1.pth, resumed by a run of 5 epochs in out/: the last of a 2-epoch run is kept; of a 3-epoch
    run, cut short (a kill), it goes as any other; one in another folder is out of the run's reach."""
    (tmp_path / "out").mkdir()
    (tmp_path / folder).mkdir(exist_ok=True)
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path / folder), epochs=saved_epochs))
    path = checkpoint.save_checkpoint(state, 1)
    fresh = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path / "out"), resume=path, epochs=5))
    assert resume(fresh, open_resume(fresh.args)) == Position(2, 0)
    assert fresh.extra.get("finals", []) == kept


@pytest.mark.parametrize("kept_by", [["--keep_last", "3"], ["--save_freq", "1"]])
def test_a_resume_whose_retention_flags_prune_what_the_run_kept_names_those_checkpoints(tmp_path, capsys, kept_by):
    """The same command with --resume auto, typed again without the run's --keep_last 3 (or --save_freq 1),
    deleted checkpoint-1.pth and checkpoint-2.pth at the next save without a word. The warning names exactly
    what goes, before it goes; given again, the run's flags keep them."""
    from helpers import checkpoint_names, make_dataset, run_pretrain

    data, out = make_dataset(tmp_path / "data", 16), tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--vis_freq", "0", "--epochs", "4"]
    run_pretrain(data, out, *flags, *kept_by)
    (out / "checkpoint-3.pth").unlink()  # as if killed during epoch 3
    run_pretrain(data, out, *flags, *kept_by, "--resume", "auto")
    everything = {f"checkpoint-{epoch}.pth" for epoch in range(4)}
    assert checkpoint_names(out) == everything
    (out / "checkpoint-3.pth").unlink()
    capsys.readouterr()
    run_pretrain(data, out, *flags, "--resume", "auto")  # --keep_last 1 --save_freq 20
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    old, new = kept_by[1], {"--keep_last": "1", "--save_freq": "20"}[kept_by[0]]
    assert warned == [
        f"warning: {kept_by[0]} {old} -> {new}: this run's pruning deletes checkpoint-1.pth, checkpoint-2.pth from "
        f"{out}, which the run kept so far; give the run's {' '.join(kept_by)} to keep them"
    ]
    assert everything - checkpoint_names(out) == {"checkpoint-1.pth", "checkpoint-2.pth"}


@pytest.mark.parametrize("stored", [dict(save_freq=0), dict(keep_last="x"), dict(keep_last=None)])
def test_retention_flags_no_flag_could_give_are_passed_over(tmp_path, stored):
    """A changed (or foreign) checkpoint's --save_freq 0 would divide by zero in the retention comparison."""
    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), keep_last=1, save_freq=20))
    path = checkpoint.save_checkpoint(state, 0)
    ckpt = load_checkpoint(path)
    vars(ckpt["args"]).update(stored)
    atomic_save(ckpt, path)
    fresh = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), resume=path, keep_last=1, save_freq=20))
    assert resume(fresh, open_resume(fresh.args)) == Position(1, 0)


def test_prune_keeps_the_finals_it_is_given(tmp_path):
    _touch(tmp_path, *(f"checkpoint-{epoch}.pth" for epoch in range(5)))
    prune(str(tmp_path), keep_last=1, keep_every=20, final_epoch=9, finals=["checkpoint-2.pth"])
    assert _names(tmp_path) == {"checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-4.pth"}


def test_file_names_that_are_not_utf8_are_recorded(tmp_path):
    """A Latin-1 name from an old archive reaches python as a str with surrogates (os.fsdecode): the
    data's digest takes its bytes, where encoding it as UTF-8 ended the run in a traceback."""
    import hashlib

    from util.checkpoint.consistency import check_same_data

    class Files:
        def __init__(self, names):
            self.files = [os.fsdecode(os.path.join(os.fsencode(tmp_path), n)) for n in names]

    state = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path)))
    check_same_data(state, Files([b"caf\xe9.jpg", b"b.jpg"]), Position(1, 0))
    assert state.extra["data"]["paths"] == hashlib.sha1(b"caf\xe9.jpg\nb.jpg").hexdigest()
    check_same_data(state, Files([b"a.jpg", b"b.jpg"]), Position(1, 0))  # UTF-8 names: the digest as before
    assert state.extra["data"]["paths"] == hashlib.sha1(b"a.jpg\nb.jpg").hexdigest()


def test_an_interrupt_during_a_checkpoint_write_is_raised_as_itself_and_leaves_no_file(tmp_path, monkeypatch):
    """A second Ctrl-C while a checkpoint is written raises KeyboardInterrupt inside torch.save's
    write callback; torch turned it into 'unexpected pos', a traceback (found by the fault campaign)."""
    from helpers import budgeted_open

    from util import atomic
    from util.checkpoint.files import atomic_save

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "open", budgeted_open(1000, interrupt, lambda path, mode: "w" in mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"model": {"w": torch.randn(10_000)}}, str(tmp_path / "checkpoint-0.pth"))
    assert os.listdir(tmp_path) == []  # the temporary file is gone, and nothing was renamed


@pytest.mark.parametrize(
    "change, flags",
    [
        ({"num_classes": 2}, "--nb_classes"),
        ({"global_pool": False}, "--global_pool"),
        ({"img_size": 64}, "--input_size"),
        ({"factory": "vit_mini_patch4"}, "--model"),
        ({"in_chans": 1}, "--in_chans"),
        ({"in_chans": 1, "img_size": 64}, "--input_size and --in_chans"),
    ],
)
def test_a_checkpoint_that_does_not_fit_names_the_flags_that_decide_it(change, flags):
    """--resume of a classifier with another --nb_classes or pooling was told to 'check --model and --input_size';
    one of other image channels (a weights-only release of 3 channels resumed with --in_chans 1), 'check --model'."""
    import models_vit

    saved = models_vit.vit_tiny_patch4(img_size=32, num_classes=3, global_pool=True).state_dict()
    factory = models_vit.MODELS[change.pop("factory", "vit_tiny_patch4")]
    model = factory(**{"img_size": 32, "num_classes": 3, "global_pool": True, **change})
    with pytest.raises(UserError, match=rf"^checkpoint c.pth does not fit VisionTransformer: .*; check {flags}$"):
        load_model_strict(model, saved, "c.pth")


def test_a_linear_probe_of_other_classes_names_nb_classes():
    """The probe's head is BatchNorm then the linear layer (head.1.weight): --eval --resume of a probe with another
    --nb_classes was told to 'check --model' (found by flag fuzzing)."""
    import models_vit

    def probe(classes: int) -> torch.nn.Module:
        model = models_vit.vit_tiny_patch4(img_size=32, num_classes=classes, global_pool=False)
        main_linprobe.add_probe_head(model)
        return model

    with pytest.raises(UserError, match=r"^checkpoint c.pth does not fit VisionTransformer: .*; check --nb_classes$"):
        load_model_strict(probe(4), probe(10).state_dict(), "c.pth")


def test_an_mae_of_other_channels_names_in_chans():
    """An MAE's pixel prediction has patch_size^2 x channels rows: another --in_chans changes it too, and
    is named as --in_chans alone."""
    import models_mae

    saved = models_mae.mae_vit_tiny_patch4(img_size=32).state_dict()
    model = models_mae.mae_vit_tiny_patch4(img_size=32, in_chans=4)
    with pytest.raises(
        UserError, match=r"^checkpoint c.pth does not fit MaskedAutoencoderViT: 3 of .*; check --in_chans$"
    ):
        load_model_strict(model, saved, "c.pth")


def _classifier_state(args: Namespace, head_last: bool) -> TrainState:
    """vit_mini_patch4 fine-tuning's optimizer after one step; ``head_last`` registers ``head`` after ``fc_norm``,
    the order of classifiers before commit 314a7bd (their top layer's groups and parameters come in another order)."""
    torch.manual_seed(0)
    model = models_vit.vit_mini_patch4(num_classes=3, img_size=16, global_pool=True)
    if head_last:
        head = model.head
        del model.head
        model.head = head
    optimizer = torch.optim.AdamW(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    return TrainState(model, optimizer, LossScaler("fp32"), args)


def test_resume_of_a_fine_tuning_checkpoint_whose_groups_came_in_another_order(tmp_path):
    """A fine-tuning run of commit 4b1813c (head registered before fc_norm, so its top layer's groups
    came in the other order) stopped today's resume: 'its optimizer state does not fit this
    model and optimizer (... a parameter group that doesn't match the size ...)'. Groups and parameters are
    matched by the names both record, so each moment lands on its own parameter."""
    old = _classifier_state(_args(output_dir=str(tmp_path)), head_last=True)
    old_order = [g["names"] for g in old.optimizer.param_groups]
    checkpoint.save_checkpoint(old, 0)
    new = _classifier_state(_args(resume=str(tmp_path / "checkpoint-0.pth")), head_last=False)
    assert [g["names"] for g in new.optimizer.param_groups] != old_order  # the layouts do differ
    resume(new, open_resume(new.args))
    groups = old.optimizer.param_groups
    moments = {n: old.optimizer.state[p] for g in groups for n, p in zip(g["names"], g["params"], strict=True)}
    for group in new.optimizer.param_groups:
        for name, param in zip(group["names"], group["params"], strict=True):
            assert_same(new.optimizer.state[param], moments[name])


def test_a_resume_path_of_the_newest_checkpoint_is_not_warned_about(tmp_path, capsys):
    """--resume PATH of the folder's newest checkpoint, epoch-end or mid-epoch, is what --resume auto would
    take too: no warning. Its own position is not beyond itself (a `>=` there warned on every such resume)."""
    model = torch.nn.Linear(2, 2)
    state = _state(model, _args(output_dir=str(tmp_path)))
    model(torch.ones(1, 2)).sum().backward()
    state.optimizer.step()
    for epoch, step, name in ((0, None, "checkpoint-0.pth"), (1, 4, "checkpoint-1-step4.pth")):
        checkpoint.save_checkpoint(state, epoch, step)
        fresh = _state(torch.nn.Linear(2, 2), _args(output_dir=str(tmp_path), resume=str(tmp_path / name)))
        capsys.readouterr()
        assert resume(fresh, open_resume(fresh.args)) == Position(epoch + (step is None), step or 0)
        assert "checkpoints beyond" not in capsys.readouterr().out, name


def test_a_mid_epoch_position_at_the_new_datas_epoch_end_is_refused(tmp_path):
    """Resumed from iteration 4 onto data of exactly 4 iterations an epoch: the sampler would skip the whole epoch,
    which then ended with no iteration trained and its checkpoint written as complete. The boundary of
    test_a_mid_epoch_position_past_the_new_datas_epoch_is_refused (a `>` there let it through)."""
    from helpers import make_dataset, run_pretrain

    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "1", "--ckpt_every_steps", "2"]
    run_pretrain(make_dataset(tmp_path / "all", 16), tmp_path / "out", *flags, "--vis_freq", "0", "--keep_last", "0")
    mid_epoch = tmp_path / "out" / "checkpoint-0-step4.pth"
    exactly = make_dataset(tmp_path / "exactly", 11)  # 33 images: 4 batches of 8
    with pytest.raises(UserError, match=r"written at iteration 4 of epoch 0, past the end .* \(4 iterations\)"):
        run_pretrain(exactly, tmp_path / "again", *flags, "--vis_freq", "0", "--resume", str(mid_epoch))
    assert not (tmp_path / "again" / "checkpoint-0.pth").exists()


def test_the_loss_scale_resumes_as_saved(tmp_path):
    """An fp16 run's loss scale (what its overflows backed it off to) comes back on resume, not the initial 65536.
    On CPU with torch's CPU GradScaler in the place of LossScaler, whose fp16 scaler needs CUDA."""
    model = torch.nn.Linear(2, 2)
    args = _args(output_dir=str(tmp_path), keep_last=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = TrainState(model, torch.optim.AdamW(model.parameters()), scaler, args)
    model(torch.ones(1, 2)).sum().backward()
    state.optimizer.step()
    path = checkpoint.save_checkpoint(state, 0)
    fresh_model = torch.nn.Linear(2, 2)
    fresh = TrainState(
        fresh_model, torch.optim.AdamW(fresh_model.parameters()), torch.amp.GradScaler("cpu"), _args(resume=path)
    )
    assert fresh.scaler.get_scale() == 65536.0
    resume(fresh, open_resume(fresh.args))
    assert fresh.scaler.get_scale() == 1024.0


def test_resume_auto_opens_rank_0_s_choice_on_every_rank(tmp_path):
    """--resume auto: rank 0 picks the checkpoint and every rank opens that one (two gloo processes). A rank that
    took its own view of the folder, or none, would start from scratch beside a resumed rank 0, which DDP hides."""
    from helpers import run_ranks

    from util.train import distributed

    model = torch.nn.Linear(2, 2)
    state = _state(model, _args(output_dir=str(tmp_path)))
    checkpoint.save_checkpoint(state, 0)
    args = _args(output_dir=str(tmp_path), resume="auto")

    def each_rank() -> None:
        torch.distributed.init_process_group("gloo")
        opened = open_resume(args)
        print(f"rank {distributed.rank()} opened {opened.path if opened else None}")
        torch.distributed.destroy_process_group()

    logs = run_ranks(each_rank, tmp_path / "ranks")
    for rank, log in enumerate(logs):
        assert f"rank {rank} opened {tmp_path / 'checkpoint-0.pth'}" in log, log
