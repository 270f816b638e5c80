"""Flags a checkpoint decides when they are not given (issue: a 32-px demo encoder fine-tuned at the
default 224 px was killed for memory): fine-tuning, probing, k-NN and resuming take --model,
--input_size and --in_chans from the checkpoint, say so in one line, and explicit flags win; a run
that cannot fit is refused before its first step."""

from argparse import Namespace

import pytest
import torch
from helpers import make_dataset, make_split, run_pretrain

import knn_eval
import main_finetune
import main_linprobe
import main_pretrain
import models_mae
from util import memory
from util.checkpoint.flags import fill_from_checkpoints
from util.checkpoint.opening import Opened
from util.cli.errors import UserError

CPU = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 1-epoch tiny MAE at 32 px, as the README's demo run makes it (mae_vit_tiny_patch4)."""
    root = tmp_path_factory.mktemp("pre")
    run_pretrain(make_dataset(root / "data", 6), root / "out", "--epochs", "1", "--vis_freq", "0")
    return root / "out" / "checkpoint-0.pth"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("split"), 4, 2)


class _Stop(Exception):
    pass


def _settled(entry_point, monkeypatch, *argv: str):
    """The settled args of ``entry_point.main(argv)``, stopping right after start-up."""
    start, seen = entry_point.start, {}

    def keep(*a, **k):
        seen["run"] = start(*a, **k)
        raise _Stop

    with monkeypatch.context() as patch, pytest.raises(_Stop):
        patch.setattr(entry_point, "start", keep)
        entry_point.main(entry_point.get_args_parser().parse_args(list(argv)))
    return seen["run"].args


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_classifiers_take_model_and_size_from_the_pretrained_checkpoint(
    entry_point, pretrained, split, tmp_path, monkeypatch, capsys
):
    flags = ["--finetune", str(pretrained), "--data_path", str(split), "--nb_classes", "3"]
    args = _settled(entry_point, monkeypatch, *flags, "--output_dir", str(tmp_path), *CPU)
    assert (args.model, args.input_size, args.in_chans) == ("vit_tiny_patch4", 32, 3)
    lines = [line for line in capsys.readouterr().out.splitlines() if "flags not given" in line]
    assert lines == [
        f"from checkpoint {pretrained}: --model vit_tiny_patch4 --input_size 32 --in_chans 3 (flags not given)"
    ]
    # Explicit flags win, and are not reported as taken.
    args = _settled(entry_point, monkeypatch, *flags, "--input_size", "64", "--output_dir", str(tmp_path), *CPU)
    assert (args.model, args.input_size) == ("vit_tiny_patch4", 64)
    assert "--input_size 32" not in capsys.readouterr().out


def test_without_a_checkpoint_the_documented_defaults_hold(split, tmp_path, monkeypatch):
    args = _settled(main_finetune, monkeypatch, "--data_path", str(split), "--output_dir", str(tmp_path), *CPU)
    assert (args.model, args.input_size, args.in_chans) == ("vit_large_patch16", 224, 3)


def test_resume_auto_takes_the_model_of_the_run_it_continues(pretrained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-0.pth").write_bytes(pretrained.read_bytes())
    data = make_dataset(tmp_path / "data", 6)
    argv = ["--data_path", str(data), "--output_dir", str(out), "--resume", "auto", "--epochs", "2", *CPU]
    args = _settled(main_pretrain, monkeypatch, *argv)
    assert (args.model, args.input_size) == ("mae_vit_tiny_patch4", 32)


def test_knn_eval_takes_the_model_of_its_first_checkpoint(pretrained, split, tmp_path, capsys):
    out = tmp_path / "knn.jsonl"
    argv = ["--data_path", str(split), "--encoders", str(pretrained), "--output", str(out), *CPU[:2]]
    knn_eval.main(knn_eval.get_args_parser().parse_args([*argv, "--num_workers", "0", "--knn_k", "2"]))
    assert '"model": "mae_vit_tiny_patch4"' in out.read_text()
    assert f"from checkpoint {pretrained}: --model mae_vit_tiny_patch4 --input_size 32" in capsys.readouterr().out


def test_knn_eval_scores_a_probed_encoder_given_first(pretrained, split, tmp_path, capsys):
    """A linear probe's checkpoint stores a classifier's name (vit_tiny_patch4): k-NN scores it with
    the MAE of that name, as it does when the probe is not the first encoder."""
    probe = tmp_path / "probe"
    flags = ["--finetune", str(pretrained), "--data_path", str(split), "--nb_classes", "3", "--cls_token"]
    main_linprobe.main(
        main_linprobe.get_args_parser().parse_args(
            [*flags, "--epochs", "1", "--batch_size", "4", "--output_dir", str(probe), "--log_dir", str(probe), *CPU]
        )
    )
    out = tmp_path / "knn.jsonl"
    argv = ["--data_path", str(split), "--encoders", str(probe / "checkpoint-0.pth"), "--output", str(out), *CPU]
    knn_eval.main(knn_eval.get_args_parser().parse_args([*argv, "--knn_k", "2"]))
    assert '"model": "mae_vit_tiny_patch4"' in out.read_text()
    assert "--model mae_vit_tiny_patch4 --input_size 32 (flags not given)" in capsys.readouterr().out


def test_a_run_that_cannot_fit_is_refused_before_its_first_step(pretrained, split, tmp_path, monkeypatch):
    """The issue's case: the demo encoder fine-tuned at 224 px, batch 64 (3136 tokens an image)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * 2**30)
    argv = ["--finetune", str(pretrained), "--data_path", str(split), "--nb_classes", "3", "--input_size", "224"]
    argv += ["--batch_size", "64", "--output_dir", str(tmp_path), *CPU]
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))
    with pytest.raises(UserError, match=r"training --batch_size 64 at --input_size 224 .* lower --batch_size") as err:
        main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    assert "\n" not in str(err.value) and not steps


@pytest.mark.parametrize("stored", ["mae_vit_base_patch16", "mae_vit_base_patch16_dec512d8b"])
def test_official_decoder_alias_names_the_classifier(stored):
    # The official main_pretrain.py takes both names, and its checkpoints store the one given.
    source = Opened("official.pth", {"args": Namespace(model=stored)})
    args = Namespace(model=None)
    fill_from_checkpoints(args, [source], {"model": "vit_large_patch16"})
    assert args.model == "vit_base_patch16"
    resumed = Namespace(model=None)
    fill_from_checkpoints(resumed, [source], {"model": "mae_vit_large_patch16"})
    assert resumed.model in models_mae.MODELS
