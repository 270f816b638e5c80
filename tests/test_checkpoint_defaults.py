"""Flags a checkpoint decides when they are not given (issue: a 32-px demo encoder fine-tuned at the
default 224 px was killed for memory): fine-tuning, probing, k-NN and resuming take --model,
--input_size and --in_chans from the checkpoint, say so in one line, and explicit flags win; a run
that cannot fit is refused before its first step."""

import json
import re
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import demo_files, load_spec, make_dataset, make_split, official_layouts, one_line_error, run_pretrain
from PIL import Image

import knn_eval
import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
import reconstruct
from engine_finetune import FALLBACKS
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


# ---------------------------------------------------------------------------------------------
# Official releases store no args: --model and --input_size come from their weights' shapes
@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, str]:
    """vit_tiny_patch4 at 48 px in each official layout, saved as the releases are ({"model": weights})."""
    root = tmp_path_factory.mktemp("releases")
    torch.manual_seed(0)
    paths = {}
    for kind, state in official_layouts(48).items():
        paths[kind] = str(root / f"{kind}.pth")
        torch.save({"model": state}, paths[kind])
    return paths


@pytest.mark.parametrize("kind", ["full", "encoder"])
@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_classifiers_take_model_and_size_from_an_official_release(
    entry_point, kind, releases, split, tmp_path, monkeypatch, capsys
):
    """Was: the fallback vit_large_patch16 at 224 px, whose load refused the weights in one line."""
    path = releases[kind]
    flags = ["--finetune", path, "--data_path", str(split), "--nb_classes", "3", "--output_dir", str(tmp_path)]
    args = _settled(entry_point, monkeypatch, *flags, *CPU)
    assert (args.model, args.input_size, args.in_chans) == ("vit_tiny_patch4", 48, 3)
    lines = [line for line in capsys.readouterr().out.splitlines() if "flags not given" in line]
    taken = "--model vit_tiny_patch4 --input_size 48 --in_chans 3 (flags not given)"
    assert lines == [f"from the weights of checkpoint {path}: {taken}"]


def test_fine_tuning_an_official_mae_with_its_decoder_runs_at_its_size(releases, split, tmp_path):
    out = tmp_path / "out"
    argv = ["--finetune", releases["full"], "--data_path", str(split), "--nb_classes", "3", "--epochs", "1"]
    argv += ["--batch_size", "4", "--output_dir", str(out), "--log_dir", str(out), *CPU]
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    saved = torch.load(out / "checkpoint-0.pth", weights_only=False)["args"]
    assert (saved.model, saved.input_size) == ("vit_tiny_patch4", 48)


def test_pretraining_resumes_an_official_mae_as_its_model(releases, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", 2)
    argv = ["--resume", releases["full"], "--data_path", str(data), "--output_dir", str(tmp_path / "out"), *CPU]
    args = _settled(main_pretrain, monkeypatch, *argv)
    assert (args.model, args.input_size) == ("mae_vit_tiny_patch4", 48)


def test_pretraining_resumes_an_mae_saved_inside_data_parallel(releases, tmp_path, monkeypatch):
    """'module.'-prefixed names: was refused as an encoder without decoder (or as no known encoder)."""
    wrapped = tmp_path / "wrapped.pth"
    ckpt = torch.load(releases["full"], weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in ckpt["model"].items()}}, wrapped)
    data = make_dataset(tmp_path / "data", 2)
    argv = ["--resume", str(wrapped), "--data_path", str(data), "--output_dir", str(tmp_path / "out"), *CPU]
    args = _settled(main_pretrain, monkeypatch, *argv)
    assert (args.model, args.input_size) == ("mae_vit_tiny_patch4", 48)
    argv = [*argv, "--epochs", "1", "--batch_size", "6", "--log_dir", "", "--vis_freq", "0"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))  # the strict load of the weights
    assert (tmp_path / "out" / "checkpoint-0.pth").is_file()


@pytest.mark.parametrize(
    "kind, pooling", [("pooled", "--global_pool"), ("classifier", "--cls_token")], ids=["gp", "cls"]
)
def test_eval_of_an_official_fine_tuned_classifier_takes_its_model(kind, pooling, releases, split, tmp_path, capsys):
    """mae_finetuned_vit_*.pth: global pooling (fc_norm), a head of 1000 rows (3 here); the head is not
    part of the encoder the model is recognised by, and the strict load of --eval takes the whole. Its
    classes and pooling come from its head and norms: it stores no args (was: --nb_classes 1000 and
    fine-tuning's global pooling, refused by the load unless both were given)."""
    path = releases[kind]
    argv = ["--eval", "--resume", path, "--data_path", str(split), *CPU, "--output_dir", str(tmp_path)]
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    taken = f"--model vit_tiny_patch4 --input_size 48 --in_chans 3 --nb_classes 3 {pooling} (flags not given)"
    assert f"from the weights of checkpoint {path}: {taken}" in out
    assert f"resumed model from {path}" in out


@pytest.fixture(scope="module")
def unknown(tmp_path_factory) -> str:
    """Weights of no known model: vit_tiny_patch4's encoder a block short."""
    state = {k: v for k, v in official_layouts(32)["encoder"].items() if not k.startswith("blocks.11.")}
    path = str(tmp_path_factory.mktemp("unknown") / "unknown.pth")
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_weights_of_no_known_model_without_model_are_refused_in_one_line(entry_point, unknown, split, tmp_path):
    """Not the fallback vit_large_patch16 built for its load to refuse them, naming a --model nobody gave."""
    argv = ["--finetune", unknown, "--data_path", str(split), "--nb_classes", "3", "--output_dir", str(tmp_path), *CPU]
    refused = one_line_error(entry_point.main, entry_point.get_args_parser().parse_args(argv))
    assert refused == (
        f"checkpoint {unknown} stores no --model, and its weights fit no known encoder (at a square image size); "
        f"give --model"
    )


def test_a_given_model_wins_over_the_weights(releases, unknown, split, tmp_path, monkeypatch, capsys):
    flags = ["--data_path", str(split), "--nb_classes", "3", "--output_dir", str(tmp_path), *CPU]
    # Its size is still the weights' where they fit it, and only that is said to come from them.
    args = _settled(main_finetune, monkeypatch, "--finetune", releases["encoder"], "--model", "vit_tiny_patch4", *flags)
    assert (args.model, args.input_size) == ("vit_tiny_patch4", 48)
    assert (
        f"checkpoint {releases['encoder']}: --input_size 48 --in_chans 3 (flags not given)" in capsys.readouterr().out
    )
    # Weights of another model: the given one at the fallback size (the load then says what does not fit).
    args = _settled(main_finetune, monkeypatch, "--finetune", releases["encoder"], "--model", "vit_mini_patch4", *flags)
    assert (args.model, args.input_size) == ("vit_mini_patch4", 224)
    assert "flags not given" not in capsys.readouterr().out
    argv = ["--finetune", unknown, "--model", "vit_tiny_patch4", "--input_size", "32", *flags]
    refused = one_line_error(main_finetune.main, main_finetune.get_args_parser().parse_args(argv))
    assert refused.startswith(f"--finetune {unknown} does not fit VisionTransformer"), refused


def test_weights_are_read_only_where_a_flag_is_missing_and_no_args_decide(releases, pretrained, monkeypatch):
    """Recognition builds every known model (on the meta device, seconds for the big ones)."""
    calls = []
    monkeypatch.setattr(models_vit, "encoder_for_weights", lambda *a, **k: calls.append(a) or ("vit_tiny_patch4", 48))
    release = Opened(releases["encoder"], torch.load(releases["encoder"]))
    ours = Opened(str(pretrained), torch.load(pretrained, weights_only=False))
    fallbacks = {**FALLBACKS, "nb_classes": 1000}  # not counted: these args have no --data_path
    fill_from_checkpoints(Namespace(model="vit_tiny_patch4", input_size=32, in_chans=3), [release], fallbacks)
    fill_from_checkpoints(Namespace(model=None, input_size=None), [ours, release], fallbacks)
    assert calls == []
    fill_from_checkpoints(Namespace(model=None, input_size=None, in_chans=None), [release], fallbacks)
    assert len(calls) == 1  # once for the three flags


# ---------------------------------------------------------------------------------------------
# --in_chans from the weights: a patch embedding [dim, C, p, p] of a release of other channels
@pytest.fixture(scope="module")
def gray_release(tmp_path_factory) -> str:
    """mae_vit_tiny_patch4 of 1-channel images at 32 px, full, saved as the releases are ({"model": weights})."""
    path = str(tmp_path_factory.mktemp("gray") / "gray.pth")
    torch.manual_seed(0)
    torch.save({"model": official_layouts(32, in_chans=1)["full"]}, path)
    return path


@pytest.fixture(scope="module")
def gray_split(tmp_path_factory):
    """``split``'s layout with grayscale images (one channel, as a 1-channel model reads them)."""
    root = make_split(tmp_path_factory.mktemp("gray_split"), 4, 2)
    for image in root.rglob("*.jpg"):
        Image.open(image).convert("L").save(image)
    return root


GRAY_NORM = ["--mean", "0.45", "--std", "0.25"]  # a release stores no normalisation: one value per channel


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_a_release_of_other_channels_gives_its_in_chans(entry_point, gray_release, gray_split, tmp_path, capsys):
    """Was: --in_chans fell back to 3, and the load refused the weights, advising to pre-train with
    --in_chans 3 though the weights take 1 channel."""
    out = tmp_path / "out"
    argv = ["--finetune", gray_release, "--data_path", str(gray_split), "--nb_classes", "3", "--epochs", "1"]
    argv += ["--batch_size", "4", "--output_dir", str(out), "--log_dir", str(out), *GRAY_NORM, *CPU]
    entry_point.main(entry_point.get_args_parser().parse_args(argv))
    lines = [line for line in capsys.readouterr().out.splitlines() if "flags not given" in line]
    taken = "--model vit_tiny_patch4 --input_size 32 --in_chans 1 (flags not given)"
    assert lines == [f"from the weights of checkpoint {gray_release}: {taken}"]
    saved = torch.load(out / "checkpoint-0.pth", weights_only=False)
    assert saved["args"].in_chans == 1 and saved["model"]["patch_embed.proj.weight"].shape[1] == 1


def test_a_given_in_chans_wins_over_the_weights(gray_release, gray_split, tmp_path, monkeypatch, capsys):
    """Given, --in_chans is not read from the weights (nor said to be); one the weights cannot take is
    refused by the load in its one line."""
    flags = ["--finetune", gray_release, "--data_path", str(gray_split), "--nb_classes", "3"]
    flags += ["--output_dir", str(tmp_path), *CPU]
    args = _settled(main_finetune, monkeypatch, *flags, "--in_chans", "1", *GRAY_NORM)
    assert args.in_chans == 1
    taken = "--model vit_tiny_patch4 --input_size 32 (flags not given)"
    assert f"from the weights of checkpoint {gray_release}: {taken}" in capsys.readouterr().out
    argv = main_finetune.get_args_parser().parse_args([*flags, "--in_chans", "3"])
    refused = one_line_error(main_finetune.main, argv)
    assert refused.startswith(
        f"--finetune {gray_release} was pre-trained on 1-channel images, this model takes --in_chans 3; "
    ), refused


@pytest.mark.parametrize("entry_point", [main_finetune, main_pretrain], ids=["finetune", "pretrain"])
def test_channels_read_from_the_weights_without_normalisation_blame_the_weights(
    entry_point, gray_release, gray_split, tmp_path
):
    """Was "--in_chans 1 needs --mean and --std ...", a flag the user never gave."""
    flag = "--finetune" if entry_point is main_finetune else "--resume"
    argv = [flag, gray_release, "--data_path", str(gray_split), "--output_dir", str(tmp_path), *CPU]
    argv += ["--nb_classes", "3"] if entry_point is main_finetune else []
    refused = one_line_error(entry_point.main, entry_point.get_args_parser().parse_args(argv))
    assert refused.startswith(
        f"--in_chans 1, from the weights of checkpoint {gray_release}, needs --mean and --std with 1 value(s) each"
    ), refused


def test_reconstructing_with_a_release_of_other_channels_blames_its_weights(gray_release, gray_split, tmp_path):
    image = next(gray_split.rglob("*.jpg"))
    argv = [str(image), "--checkpoint", gray_release, "--output", str(tmp_path / "r.png"), "--device", "cpu"]
    refused = one_line_error(reconstruct.main, reconstruct.get_args_parser().parse_args(argv))
    assert refused.startswith(f"--in_chans 1, from the weights of checkpoint {gray_release}, needs --mean"), refused


@pytest.mark.parametrize("in_chans", [[], ["--in_chans", "1"]], ids=["weights", "flag"])
def test_reconstructing_a_colour_image_with_a_gray_model_does_not_advise_another_in_chans(
    gray_release, tmp_path, in_chans
):
    """Was "... but --in_chans is 1; convert it to grayscale ..., or give --in_chans 3", a flag the user had not
    given, which the checkpoint's 1-channel weights then refused."""
    image = demo_files(1)[0]
    argv = [str(image), "--checkpoint", gray_release, "--output", str(tmp_path / "r.png"), "--device", "cpu"]
    refused = one_line_error(reconstruct.main, reconstruct.get_args_parser().parse_args([*argv, *GRAY_NORM, *in_chans]))
    assert refused == (
        f"image {image} has 3 channel(s) (mode RGB) but the model of {gray_release} takes 1; convert it to "
        f"grayscale (mode L or I;16)"
    )


def test_pretraining_resumes_a_release_of_other_channels_at_its_channels(gray_release, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", 2)
    argv = ["--resume", gray_release, "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    args = _settled(main_pretrain, monkeypatch, *argv, *GRAY_NORM, *CPU)
    assert (args.model, args.input_size, args.in_chans) == ("mae_vit_tiny_patch4", 32, 1)


@pytest.mark.parametrize("vis_freq", ["10", "0"], ids=["picture", "training"])
def test_resuming_a_gray_model_on_colour_images_does_not_advise_another_in_chans(gray_release, tmp_path, vis_freq):
    """Was "... but --in_chans is 1; ..., or give --in_chans 3": the flag was not given, and the resumed weights
    refuse 3 channels. The reconstruction picture reads images first; without it the training loader does."""
    data = make_dataset(tmp_path / "data", 2)
    argv = ["--resume", gray_release, "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    argv += ["--epochs", "1", "--batch_size", "2", "--vis_freq", vis_freq, *GRAY_NORM, *CPU]
    refused = one_line_error(main_pretrain.main, main_pretrain.get_args_parser().parse_args(argv))
    taken = f" has 3 channel\\(s\\) \\(mode RGB\\) but the model of {re.escape(gray_release)} takes 1; convert it to "
    assert re.fullmatch(rf"image {re.escape(str(data))}/\S+\.jpg{taken}grayscale \(mode L or I;16\)", refused), refused


@pytest.fixture(scope="module")
def gray_classifier(tmp_path_factory) -> str:
    """vit_tiny_patch4 of 1-channel images at 32 px, 3 classes, saved as the fine-tuned releases are."""
    path = str(tmp_path_factory.mktemp("gray_classifier") / "gray_ft.pth")
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(img_size=32, in_chans=1, num_classes=3, global_pool=True)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize(
    "entry_point,start,in_chans",
    [
        (main_finetune, "--finetune", []),
        (main_finetune, "--finetune", ["--in_chans", "1"]),
        (main_linprobe, "--finetune", []),
        (main_finetune, "--resume", []),
    ],
    ids=["finetune-weights", "finetune-flag", "linprobe", "eval-resume"],
)
def test_classifying_colour_images_with_a_gray_model_does_not_advise_another_in_chans(
    entry_point, start, in_chans, gray_release, gray_classifier, split, tmp_path
):
    """Was "... but --in_chans is 1; ..., or give --in_chans 3": the 1-channel weights then refused 3 channels
    (only RGB weights are adapted, to 1 channel), whether --in_chans came from them or was given."""
    path = gray_release if start == "--finetune" else gray_classifier
    argv = [start, path, "--data_path", str(split), "--nb_classes", "3", "--output_dir", str(tmp_path / "out")]
    argv += ["--epochs", "1", "--batch_size", "2", *(["--eval"] if start == "--resume" else []), *GRAY_NORM, *CPU]
    refused = one_line_error(entry_point.main, entry_point.get_args_parser().parse_args([*argv, *in_chans]))
    taken = f" has 3 channel\\(s\\) \\(mode RGB\\) but the model of {re.escape(path)} takes 1; convert it to "
    assert re.fullmatch(rf"image {re.escape(str(split))}/\S+\.jpg{taken}grayscale \(mode L or I;16\)", refused), refused


def test_fine_tuning_an_rgb_model_on_gray_flags_still_advises_in_chans_3(pretrained, split, tmp_path):
    """RGB weights fine-tuned with --in_chans 1 are summed to one channel: a colour image may be read with
    --in_chans 3, which the load takes, so the line advises it."""
    argv = ["--finetune", str(pretrained), "--data_path", str(split), "--nb_classes", "3", "--in_chans", "1"]
    argv += ["--output_dir", str(tmp_path / "out"), "--epochs", "1", "--batch_size", "2", *GRAY_NORM, *CPU]
    refused = one_line_error(main_finetune.main, main_finetune.get_args_parser().parse_args(argv))
    assert refused.endswith("but --in_chans is 1; convert it to grayscale (mode L or I;16), or give --in_chans 3")


# ---------------------------------------------------------------------------------------------
# Probing a global-pool fine-tuned release (fc_norm, no final norm: mae_finetuned_vit_*)
def test_probing_a_pooled_release_says_which_flag_takes_it(releases, split, tmp_path, capsys):
    """Was: "does not fit VisionTransformer (2 missing ['norm.bias', 'norm.weight']; 2 unexpected
    ['fc_norm.bias', 'fc_norm.weight']); check --model and that it is an MAE checkpoint": the model was
    right, and no flag was named. The probe reads the class token (--cls_token) by default."""
    path = releases["pooled"]
    flags = ["--finetune", path, "--data_path", str(split), "--nb_classes", "3", "--epochs", "1"]
    flags += ["--batch_size", "4", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), *CPU]
    for pooling in ([], ["--cls_token"]):
        refused = one_line_error(main_linprobe.main, main_linprobe.get_args_parser().parse_args([*flags, *pooling]))
        assert refused == (
            f"--finetune {path} was fine-tuned with --global_pool: it has fc_norm, not the final norm that the "
            f"class token is read after (--cls_token); give --global_pool, or the pre-trained MAE checkpoint it "
            f"was fine-tuned from"
        )
    # The flag it names takes it.
    main_linprobe.main(main_linprobe.get_args_parser().parse_args([*flags, "--global_pool"]))
    assert f"loaded pre-trained encoder from {path}" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["base", "large", "huge"])
@pytest.mark.parametrize("kind", ["mae", "gp", "cls"])
def test_the_official_releases_give_their_models_at_224_px(size, kind):
    """The official checkpoints' names and shapes (../shared/spec; meta tensors): an MAE with its decoder,
    classifiers fine-tuned with global pooling or the class token, each with a 1000-row head."""
    patch = 14 if size == "huge" else 16
    release = {"mae": f"mae_vit_{size}_patch{patch}", "gp": f"vit_{size}_patch{patch}_gp"}
    release["cls"] = f"vit_{size}_patch{patch}_cls"
    state = {k: torch.empty(shape, device="meta") for k, shape in load_spec()[release[kind]].items()}
    args = Namespace(model=None, input_size=None, in_chans=None, crop_pct=None, nb_classes=None, global_pool=None)
    opened = Opened(release[kind], {"model": state})
    counted = {**main_finetune.FALLBACKS, "nb_classes": lambda _: ("the class folders of data/train", 7)}
    fill_from_checkpoints(args, [opened], counted, resumed=opened)
    assert (args.model, args.input_size, args.in_chans) == (f"vit_{size}_patch{patch}", 224, 3)
    # A classifier's head and norms give its classes and pooling; an MAE has neither: the data's class folders,
    # and fine-tuning's pooling.
    assert (args.nb_classes, args.global_pool) == (7 if kind == "mae" else 1000, kind != "cls")


# ---------------------------------------------------------------------------------------------
# --nb_classes and the pooling of a classifier the run continues (--resume): its head and norms decide
@pytest.fixture(scope="module")
def heads(pretrained, split, tmp_path_factory) -> dict[str, str]:
    """A classifier fine-tuned and a probe trained for 1 epoch on the 3-class split, each with the pooling that
    is not its entry point's default (the classifier's --cls_token, the probe's --global_pool)."""
    root = tmp_path_factory.mktemp("heads")
    paths = {}
    for entry_point, pooling in ((main_finetune, "--cls_token"), (main_linprobe, "--global_pool")):
        out = root / entry_point.__name__
        argv = ["--finetune", str(pretrained), "--data_path", str(split), "--nb_classes", "3", pooling, "--epochs", "1"]
        argv += ["--batch_size", "4", "--output_dir", str(out), "--log_dir", "", *CPU]
        entry_point.main(entry_point.get_args_parser().parse_args(argv))
        paths[entry_point.__name__] = str(out / "checkpoint-0.pth")
    return paths


@pytest.mark.parametrize(
    "entry_point, pooling", [(main_finetune, "--cls_token"), (main_linprobe, "--global_pool")], ids=["ft", "probe"]
)
def test_eval_takes_the_classes_and_pooling_of_the_checkpoint_it_evaluates(
    entry_point, pooling, heads, split, tmp_path, capsys
):
    """The issue: `main_finetune.py --eval --resume OUT/checkpoint-0.pth` of a 10-class run was refused ("2 of
    another shape ['head.bias', 'head.weight'] ...; check --nb_classes") though the checkpoint says its
    classes. Without --nb_classes and a pooling flag, the evaluation scores the model the run trained: the
    accuracy its run logged for that epoch."""
    path = heads[entry_point.__name__]
    argv = ["--eval", "--resume", path, "--data_path", str(split), "--output_dir", str(tmp_path), *CPU]
    entry_point.main(entry_point.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    taken = f"--model vit_tiny_patch4 --input_size 32 --in_chans 3 --nb_classes 3 {pooling} (flags not given)"
    assert f"from checkpoint {path}: {taken}" in out
    logged = json.loads((Path(path).parent / "log.txt").read_text().splitlines()[-1])
    assert float(re.search(r"\* Acc@1 ([\d.]+)", out).group(1)) == pytest.approx(logged["test_acc1"], abs=1e-3)


@pytest.mark.parametrize(
    "given, refused",
    [
        (["--nb_classes", "5"], "{split}/val has 3 class folders but --nb_classes is 5; give --nb_classes 3"),
        (
            ["--global_pool"],
            "checkpoint {path} does not fit VisionTransformer: 2 missing ['fc_norm.bias', "
            "'fc_norm.weight']; 2 unexpected ['norm.bias', 'norm.weight']; check --global_pool",
        ),
    ],
    ids=["nb_classes", "global_pool"],
)
def test_a_given_class_count_or_pooling_that_disagrees_keeps_its_error(given, refused, heads, split, tmp_path):
    """An explicit flag wins over the checkpoint, and is refused in one line naming it."""
    path = heads["main_finetune"]
    argv = ["--eval", "--resume", path, "--data_path", str(split), "--output_dir", str(tmp_path), *CPU, *given]
    assert one_line_error(main_finetune.main, main_finetune.get_args_parser().parse_args(argv)) == refused.format(
        split=split, path=path
    )


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_a_finetune_checkpoint_gives_no_classes_or_pooling(entry_point, heads, split, tmp_path, monkeypatch, capsys):
    """A classifier given to --finetune starts a new head: the entry point's pooling (the official default) and
    as many classes as the data's class folders, whatever its own head and norms are."""
    source = heads["main_linprobe" if entry_point is main_finetune else "main_finetune"]
    argv = ["--finetune", source, "--data_path", str(split), "--output_dir", str(tmp_path), *CPU]
    args = _settled(entry_point, monkeypatch, *argv)
    assert (args.nb_classes, args.global_pool) == (3, entry_point is main_finetune)
    said = [line for line in capsys.readouterr().out.splitlines() if "--nb_classes" in line]
    assert said == [f"from the class folders of {split / 'train'}: --nb_classes 3 (flags not given)"]


def test_a_training_resume_takes_the_classes_of_the_run_it_continues(heads, split, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(heads["main_linprobe"], out)
    argv = ["--resume", "auto", "--epochs", "2", "--data_path", str(split), "--output_dir", str(out), *CPU]
    args = _settled(main_linprobe, monkeypatch, *argv)
    assert (args.nb_classes, args.global_pool) == (3, True)


def test_eval_of_a_release_of_other_classes_blames_the_release(split, tmp_path):
    """An official fine-tuned release stores no args: its head (5 rows here, ImageNet's 1000 there) decides
    --nb_classes, and 3 class folders were told to "give --nb_classes 3", which its head then refused."""
    path = str(tmp_path / "release.pth")
    torch.save({"model": models_vit.vit_tiny_patch4(img_size=32, num_classes=5, global_pool=True).state_dict()}, path)
    argv = ["--eval", "--resume", path, "--data_path", str(split), "--output_dir", str(tmp_path / "out"), *CPU]
    refused = one_line_error(main_finetune.main, main_finetune.get_args_parser().parse_args(argv))
    said = f"{split / 'val'} has 3 class folders, but {path}, which this run resumes, was trained on 5"
    assert refused.startswith(said), refused


def test_a_label_beyond_the_resumed_head_blames_the_checkpoint(heads, split, tmp_path):
    """A list's label is checked against --nb_classes, here the 3 rows of the head --eval evaluates, which the
    user never gave: "give --nb_classes 4 or more" led to a head that the checkpoint's weights refused."""
    listed = tmp_path / "listed"
    listed.mkdir()
    images = sorted((split / "val").rglob("*.jpg"))
    (listed / "val.txt").write_text("".join(f"{image} {i % 4}\n" for i, image in enumerate(images)))
    path = heads["main_finetune"]
    argv = ["--eval", "--resume", path, "--data_path", str(listed), "--output_dir", str(tmp_path / "out"), *CPU]
    refused = one_line_error(main_finetune.main, main_finetune.get_args_parser().parse_args(argv))
    said = f"{listed / 'val.txt'} line 4: the label 3 is not below the 3 classes {path}, which this run resumes, was "
    assert refused == f"{said}trained on; give the data it was trained on, or correct the label"
