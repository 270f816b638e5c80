"""Input a hostile user would try (issue 13): classes that differ by name between train and val,
link loops in the data, unusable output folders, out-of-range flags, checkpoints of the wrong kind
for reconstruct.py, and resumes with flags that change what is trained. Each ends in one line
naming the flag or file, before any training, or (for resumes) in a one-line warning."""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402
    REPO,
    TINY,
    assert_same,
    checkpoint_names,
    cli_batch,
    demo_files,
    load,
    make_dataset,
    pretrain_args,
    read_log,
)

import knn_eval  # noqa: E402
import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
import models_mae  # noqa: E402
import models_vit  # noqa: E402
import reconstruct  # noqa: E402
from util.checkpoint import resume as resuming  # noqa: E402
from util.checkpoint import state as checkpoint  # noqa: E402
from util.cli.errors import UserError  # noqa: E402
from util.data.datasets import ImageFiles, classification_dataset  # noqa: E402
from util.data.loaders import pretrain_transform  # noqa: E402
from util.train import interrupt
from util.train.precision import LossScaler  # noqa: E402

CPU = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """A run that gets past the checks installs signal handlers; keep them out of pytest."""
    monkeypatch.setattr(interrupt, "install", lambda: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), 16)  # 48 images in 3 class folders


def _split(root: Path, train_classes: tuple[str, ...], val_classes: tuple[str, ...]) -> Path:
    make_dataset(root / "train", 8, train_classes)
    make_dataset(root / "val", 3, val_classes)
    return root


def _classifier_args(entry_point, data: Path, out: Path, *extra: str) -> argparse.Namespace:
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_mini_patch4", "--input_size", "32"]
    argv += ["--batch_size", "8", "--epochs", "1", "--output_dir", str(out), "--log_dir", "", *CPU, *extra]
    return entry_point.get_args_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------
# 2. Train and val classes agree by name, not only by number
@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_validation_classes_must_have_the_training_names(tmp_path, entry_point):
    data = _split(tmp_path / "data", ("airplane", "cat", "ship"), ("airplane", "dog", "ship"))
    with pytest.raises(UserError, match=r"only in train: cat; only in val: dog"):
        entry_point.main(_classifier_args(entry_point, data, tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()


@pytest.mark.parametrize("nb_classes", ["3", "2"])
def test_a_validation_split_lacking_a_class_is_named_whatever_nb_classes_says(tmp_path, nb_classes):
    """val's folders were counted against --nb_classes before they were compared with train's: with 3, the error
    advised --nb_classes 2, with which train's 3 folders were refused, advising 3."""
    data = _split(tmp_path / "data", ("airplane", "cat", "ship"), ("airplane", "cat"))
    expected = r"only in train: ship; only in val: none" if nb_classes == "3" else r"train has 3 class folders"
    with pytest.raises(UserError, match=expected):
        main_finetune.main(_classifier_args(main_finetune, data, tmp_path / "out", "--nb_classes", nb_classes))


# ---------------------------------------------------------------------------------------------
# 3. Links: each real folder once, never out of the data folder
def test_link_loop_does_not_multiply_pretraining_data(data, tmp_path, capsys):
    looped = tmp_path / "looped"
    shutil.copytree(data, looped)
    (looped / "self").symlink_to(".")
    (looped / "cat" / "again").symlink_to("../cat")
    (looped / "ship_too").symlink_to("ship")
    files = ImageFiles(str(looped)).files
    assert len(files) == 48 and len({os.path.realpath(f) for f in files}) == 48
    assert all("self" not in f and "again" not in f and "ship_too" not in f for f in files)
    assert capsys.readouterr().out.count("warning: skipping") == 3


def test_link_out_of_the_data_folder_is_refused(data, tmp_path):
    looped = tmp_path / "looped"
    shutil.copytree(data, looped)
    (looped / "cat" / "up").symlink_to("../..")
    with pytest.raises(UserError, match=r"cat/up is a link to .*, outside the data folder"):
        ImageFiles(str(looped))


def test_links_to_files_and_a_linked_data_folder_are_read(data, tmp_path):
    linked = tmp_path / "linked"
    linked.symlink_to(data)
    assert len(ImageFiles(str(linked)).files) == 48
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(demo_files(2)):  # links to files elsewhere: each names one image
        (flat / f"{i}.jpg").symlink_to(f)
    assert len(ImageFiles(str(flat)).files) == 6


def test_link_loop_does_not_multiply_classification_data(tmp_path):
    data = _split(tmp_path / "data", ("airplane", "cat", "ship"), ("airplane", "cat", "ship"))
    (data / "train" / "cat" / "self").symlink_to(".")
    (data / "train" / "cat" / "ships").symlink_to("../ship")  # ship's images stay ship's
    train = classification_dataset(str(data), "train", None, 3)
    assert len(train) == 24 and sorted(train.targets) == [0] * 8 + [1] * 8 + [2] * 8
    (data / "train" / "cat" / "out").symlink_to("../../val")
    with pytest.raises(UserError, match=r"cat/out is a link to .*val, outside the data folder"):
        classification_dataset(str(data), "train", None, 3)


def test_class_folder_linked_from_elsewhere_is_refused(tmp_path):
    data = _split(tmp_path / "data", ("airplane", "cat"), ("airplane", "cat"))
    make_dataset(tmp_path / "elsewhere", 2, ("ship",))
    (data / "train" / "ship").symlink_to(tmp_path / "elsewhere" / "ship")
    with pytest.raises(UserError, match=r"train/ship is a link to .*elsewhere/ship, outside the data folder"):
        classification_dataset(str(data), "train", None, 3)


@pytest.mark.parametrize("denied", ["train/cat", "val"])
def test_a_folder_that_cannot_be_listed_is_named_not_skipped(tmp_path, monkeypatch, denied):
    """A folder of mode 000 (as for a user other than root; the suite may run as root, so listing it
    is refused here by hand): os.walk would skip its images unannounced, torchvision's class listing
    would end in a traceback."""
    data = _split(tmp_path / "data", ("airplane", "cat"), ("airplane", "cat"))
    scandir = os.scandir

    def refuse(path: str = ".") -> object:
        if os.fspath(path) == str(data / denied):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    message = f"^cannot list the folder {data / denied} \\(Permission denied\\); make it readable"
    with monkeypatch.context() as patch:  # undone before pytest's own clean-up lists tmp_path
        patch.setattr(os, "scandir", refuse)
        with pytest.raises(UserError, match=message):
            classification_dataset(str(data), denied.split("/")[0], None, 2)
        if denied == "train/cat":
            with pytest.raises(UserError, match=message):
                ImageFiles(str(data / "train"))


@pytest.mark.parametrize("transform", ["torchvision", "fast"])
def test_an_image_that_cannot_be_opened_says_to_make_it_readable(tmp_path, monkeypatch, transform):
    """A file of mode 000 (refused here by hand: the suite may run as root): the advice is to make it
    readable, not to replace a file that is fine."""
    make_dataset(tmp_path, 1, layout="flat")
    dataset = ImageFiles(str(tmp_path), pretrain_transform(32, transform), lazy=transform == "fast")
    victim = dataset.files[0]
    real_open = open

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == victim:
            raise PermissionError(13, "Permission denied", victim)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    message = f"^cannot read image {re.escape(victim)} \\(PermissionError: .*\\); make it readable, or remove it$"
    with pytest.raises(UserError, match=message):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# 4. Output folders are checked once, at start
@pytest.mark.parametrize("flag", ["--output_dir", "--log_dir"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_unusable_output_folder_stops_before_training(data, tmp_path, flag, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    path = blocker if where == "a file" else blocker / "run"
    args = pretrain_args(data, tmp_path / "out", "--epochs", "1", flag, str(path))
    with pytest.raises(UserError, match=rf"^{flag} {re.escape(str(path))}: {re.escape(str(blocker))} is a file, not"):
        main_pretrain.main(args)
    assert not list(tmp_path.rglob("checkpoint-*.pth"))


def test_output_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    """A read-only mount, as root sees it: os.access says yes, the probe write says no."""
    import tempfile

    from util.outputs import check_output_dir

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(UserError, match=r"--output_dir .*cannot write a file in .*Read-only file system"):
        check_output_dir(str(tmp_path / "out"), "--output_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path):
    from util.outputs import check_output_dir

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match=r"not writable"):
            check_output_dir(str(folder), "--output_dir")
        with pytest.raises(UserError, match=r"cannot be created"):
            check_output_dir(str(folder / "sub"), "--output_dir")
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# 7. A failing evaluation does not cost the epoch
def test_bad_validation_image_keeps_the_epoch_and_the_resumed_run_scores_it(tmp_path):
    classes = ("airplane", "cat", "ship")
    data = _split(tmp_path / "data", classes, classes)
    flags = ["--epochs", "2", "--warmup_epochs", "1", "--print_freq", "1"]
    whole = tmp_path / "whole"
    main_finetune.main(_classifier_args(main_finetune, data, whole, *flags))

    victim = sorted((data / "val" / "cat").iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(b"not a picture")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"cannot read image {re.escape(str(victim))}"):
        main_finetune.main(_classifier_args(main_finetune, data, out, *flags))
    assert checkpoint_names(out) == {"checkpoint-0.pth"}  # the epoch just trained is kept
    assert load(out / "checkpoint-0.pth")["extra"]["unevaluated"]["epoch"] == 0
    victim.write_bytes(good)
    main_finetune.main(_classifier_args(main_finetune, data, out, *flags, "--resume", "auto"))

    # As if nothing had failed: one line per epoch with its test stats, the same best top-1.
    log = read_log(whole)
    assert [line["epoch"] for line in log] == [0, 1] and all("test_acc1" in line for line in log)
    assert read_log(out) == log
    final, resumed = load(whole / "checkpoint-1.pth"), load(out / "checkpoint-1.pth")
    assert final["extra"]["max_accuracy"] == max(line["test_acc1"] for line in log)
    assert "unevaluated" not in final["extra"]
    assert resumed["extra"] == final["extra"]
    assert_same(resumed["model"], final["model"], "model")


# ---------------------------------------------------------------------------------------------
# 8. Flags that used to end in a traceback, a NaN, or silently wrong runs
PRETRAIN_FLAGS = {
    "mask_ratio_0": (["--mask_ratio", "0"], "--mask_ratio 0.0 must remove at least one"),
    "seed_negative": (["--seed", "-1"], "--seed must be in"),
    "seed_too_large": (["--seed", "5000000000"], "--seed must be in"),
    "device_tpu": (["--device", "tpu"], "--device tpu is unknown"),
    "lr_absurd": (["--lr", "1e38"], "--lr must be positive and at most"),
    "lr_nan": (["--lr", "nan"], "--lr must be positive"),
    "blr_overflow": (["--blr", "1e308"], "--blr must be positive and at most"),
    "effective_lr_absurd": (["--blr", "100", "--accum_iter", "64"], "the effective lr 400 "),
    "ckpt_every_steps_negative": (["--ckpt_every_steps", "-1"], "--ckpt_every_steps must be 0"),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_FLAGS))
def test_bad_pretraining_flag_is_refused_before_training(data, tmp_path, case):
    flags, message = PRETRAIN_FLAGS[case]
    args = pretrain_args(data, tmp_path / "out", "--epochs", "1", "--vis_freq", "0", *flags)
    with pytest.raises(UserError, match=message):
        main_pretrain.main(args)
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()


def test_an_output_dir_that_is_a_dangling_link_is_named_as_such(tmp_path):
    """It was refused as "cannot be created (File exists)", which did not say what was wrong."""
    from util.outputs import check_output_dir

    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError) as refused:
        check_output_dir(str(tmp_path / "out"), "--output_dir")
    assert str(refused.value) == (
        f"--output_dir {tmp_path / 'out'} is a link to {tmp_path / 'gone'}, which does not exist; create that "
        f"folder or give another"
    )


def test_fp16_on_the_cpu_is_refused_with_the_flags_before_the_output_dir_is_made(data, tmp_path):
    """Refused where the run settled its precision, it had made --output_dir (left empty) by then."""
    args = pretrain_args(data, tmp_path / "out", "--precision", "fp16")
    with pytest.raises(UserError, match=r"^--precision fp16 needs a CUDA device; use --precision bf16 or fp32 on "):
        main_pretrain.main(args)
    assert not (tmp_path / "out").exists()


def test_seed_must_leave_room_for_every_rank(monkeypatch):
    from util.cli.args import check_world

    args = argparse.Namespace(seed=2**32 - 2, lr=None, blr=1e-3, batch_size=8, accum_iter=1)
    check_world(args, 2)
    with pytest.raises(UserError, match=r"rank 2 would seed with 4294967296"):
        check_world(args, 3)


def test_mask_ratio_must_remove_and_keep_a_patch():
    from models_mae import check_mask_ratio

    # 1e-17: 1 - 1e-17 is 1.0, all 64 kept; 0.99: int(64 * 0.01) = 0 kept
    for ratio in (0.0, 1e-17, 0.99, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match=r"--mask_ratio"):
            check_mask_ratio(ratio, 64)
    model = models_mae.mae_vit_tiny_patch4(img_size=32)
    for ratio, kept in ((0.001, 63), (0.75, 16), (1 - 1 / 64, 1)):
        check_mask_ratio(ratio, 64)
        assert model.random_masking(torch.zeros(1, 64, 4), ratio)[0].shape[1] == kept  # counted alike


def test_an_image_of_one_patch_is_blamed_on_the_input_size_not_the_mask_ratio(data, tmp_path):
    """--input_size 4 at patch 4: the advice was '--mask_ratio ... use a value in (0, 0]'."""
    args = pretrain_args(data, tmp_path / "out", "--epochs", "1", "--input_size", "4")
    with pytest.raises(UserError, match=r"^--input_size makes each image a single patch; .*give a larger"):
        main_pretrain.main(args)


@pytest.mark.parametrize("patches", [4, 5, 10, 64, 196, 256, 400, 1600, 3136, 65536])
def test_the_mask_ratio_the_error_suggests_is_accepted(patches):
    """The upper bound the message gives is itself accepted (64 patches: 0.9844, rounded up, kept none; 400
    patches, 320 px at patch 16: 0.9975, whose 1 - 0.9975 is under 1 / 400 in float, kept none too)."""
    with pytest.raises(UserError) as err:
        models_mae.check_mask_ratio(1.0, patches)
    top = float(re.search(r"use a value in \(0, ([0-9.]+)\]", str(err.value)).group(1))
    assert top > 1 - 2 / patches  # close to the bound, not a value far below it
    models_mae.check_mask_ratio(top, patches)


FINETUNE_FLAGS = {
    "drop_path": (["--drop_path", "1.5"], "--drop_path must be in"),
    "aa": (["--aa", "garbage"], "--aa garbage is not an auto-augment policy"),
    "smoothing": (["--smoothing", "1.5"], "--smoothing must be in"),
    "mixup_mode": (["--mixup_mode", "garbage", "--mixup", "0.8"], "--mixup_mode garbage is unknown"),
    # Before: timm's AssertionError or torchvision's ValueError as the transform or Mixup was built, or
    # numpy's ValueError at the first mixed batch, or (--recount) an error blaming the first image.
    "cutmix_minmax_one": (["--cutmix_minmax", "0.5"], r"^--cutmix_minmax takes MIN MAX, .*got 0.5$"),
    "cutmix_minmax_reversed": (["--cutmix_minmax", "0.9", "0.1"], r"^--cutmix_minmax takes MIN MAX"),
    "cutmix_minmax_rounded": (["--cutmix_minmax", "0.5", "0.51"], r"^--cutmix_minmax 0.5 0.51 leaves no box"),
    "remode": (["--remode", "garbage"], r"^--remode garbage is unknown; use one of const, rand, pixel$"),
    "recount": (["--recount", "-3"], r"^--recount must be at least 1, got -3$"),
    "color_jitter": (["--aa", "", "--color_jitter", "-1"], r"^--color_jitter must be 0 or more, got -1.0$"),
    "reprob": (["--reprob", "2"], r"^--reprob is a probability: it must be in \[0, 1\], got 2.0$"),
    "mixup_prob": (["--mixup", "0.8", "--mixup_prob", "-1"], r"^--mixup_prob is a probability"),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_FLAGS))
def test_bad_finetuning_flag_is_refused_before_training(tmp_path, case):
    data = _split(tmp_path / "data", ("airplane", "cat", "ship"), ("airplane", "cat", "ship"))
    flags, message = FINETUNE_FLAGS[case]
    with pytest.raises(UserError, match=message):
        main_finetune.main(_classifier_args(main_finetune, data, tmp_path / "out", *flags))
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()


def test_bad_flags_give_one_line_on_the_command_line(data, tmp_path, warm_interpreter):
    """As the user sees them: exit status 2, one line, no traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cases = {
        "seed": ["--seed", "-1"],
        "device": ["--device", "tpu"],
        "mask_ratio": ["--mask_ratio", "0"],
        "output_dir": ["--output_dir", str(blocker / "run")],
    }
    common = [*TINY, "--epochs", "1", "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--log_dir", ""]
    results = cli_batch({name: [*common, *flags] for name, flags in cases.items()}, warm_interpreter)
    for name, result in results.items():
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)


# ---------------------------------------------------------------------------------------------
# 9. reconstruct.py: the kind of checkpoint, and the output, before the work
@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "finetuned.pth"
    model = models_vit.vit_tiny_patch4(img_size=32, num_classes=3)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="vit_tiny_patch4", input_size=32)}, path)
    return path


@pytest.mark.parametrize("extra", [[], ["--model", "mae_vit_tiny_patch4"]], ids=["inferred", "--model"])
def test_reconstruct_refuses_a_classifier_checkpoint(classifier_checkpoint, tmp_path, extra):
    image = str(demo_files(1)[0])
    argv = ["--checkpoint", str(classifier_checkpoint), image, "--output", str(tmp_path / "r.png"), *extra]
    with pytest.raises(UserError, match=r"holds a classifier .*not an MAE with decoder"):
        reconstruct.main(reconstruct.get_args_parser().parse_args(argv))


def test_reconstruct_names_a_linear_probe_as_one(tmp_path):
    """The probe's head is BatchNorm then the linear layer (head.1.*); its checkpoint was asked whether it was 'an
    encoder-only release?' (found by flag fuzzing)."""
    model = models_vit.vit_tiny_patch4(img_size=32, num_classes=3, global_pool=False)
    main_linprobe.add_probe_head(model)
    path = tmp_path / "probe.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="vit_tiny_patch4", input_size=32)}, path)
    argv = ["--checkpoint", str(path), str(demo_files(1)[0]), "--output", str(tmp_path / "r.png")]
    with pytest.raises(UserError, match=r"holds a linear probe \(main_linprobe.py's\), not an MAE with decoder; give"):
        reconstruct.main(reconstruct.get_args_parser().parse_args(argv))


@pytest.mark.parametrize(
    "output, message",
    [
        ("{tmp}", r"is a folder; give a file name"),
        ("{tmp}/missing/r.png", r"the folder .*missing does not exist"),
        ("{tmp}/r.xyz", r"'.xyz' is not a picture format"),
        ("{tmp}/r", r"'' is not a picture format"),
    ],
)
def test_reconstruct_checks_its_output_before_the_work(tmp_path, monkeypatch, output, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(reconstruct, "load_checkpoint", no_work)
    argv = ["--checkpoint", "any.pth", str(demo_files(1)[0]), "--output", output.format(tmp=tmp_path)]
    with pytest.raises(UserError, match=rf"^--output .*{message}"):
        reconstruct.main(reconstruct.get_args_parser().parse_args(argv))


def _no_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the flags were checked")


RECONSTRUCT_FLAGS = {
    "seed": (["--seed", str(2**70)], r"^--seed must be in \[0, 2\*\*32 - 1\], got 1180591620717411303424$"),
    "device_unknown": (["--device", "foo"], r"^--device foo is unknown; use cpu, cuda, mps"),
    "device_absent": (["--device", "cuda"], r"^--device cuda was asked for but CUDA is not available"),
}


@pytest.mark.parametrize("case", sorted(RECONSTRUCT_FLAGS))
def test_reconstruct_checks_seed_and_device_as_training_does(tmp_path, monkeypatch, case):
    """Before the load, in one line (they were the tracebacks of torch's seeding and device)."""
    monkeypatch.setattr(reconstruct, "load_checkpoint", _no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    flags, message = RECONSTRUCT_FLAGS[case]
    argv = ["--checkpoint", "any.pth", str(demo_files(1)[0]), "--output", str(tmp_path / "r.png"), *flags]
    with pytest.raises(UserError, match=message):
        reconstruct.main(reconstruct.get_args_parser().parse_args(argv))


KNN_EVAL_FLAGS = {
    **RECONSTRUCT_FLAGS,
    "seed_negative": (["--seed", "-1"], r"^--seed must be in \[0, 2\*\*32 - 1\], got -1$"),
    "input_size": (["--input_size", "0"], r"^--input_size must be at least 1, got 0$"),
    "num_workers": (["--num_workers", "-1"], r"^--num_workers must be 0 or more, got -1$"),
}


@pytest.mark.parametrize("case", sorted(KNN_EVAL_FLAGS))
def test_knn_eval_checks_seed_device_and_sizes_as_training_does(tmp_path, monkeypatch, case):
    """docs/pretraining.md, docs/what-survives-what.md: knn_eval.py checks these as the entry points do, before
    any checkpoint or image is read (the data folder here holds no image: reading it would fail otherwise)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    flags, message = KNN_EVAL_FLAGS[case]
    argv = ["--data_path", str(tmp_path), "--encoders", str(tmp_path / "missing.pth"), "random", *flags]
    with pytest.raises(UserError, match=message):
        knn_eval.main(knn_eval.get_args_parser().parse_args(argv))


@pytest.mark.parametrize(
    "image, message", [("missing.jpg", "does not exist"), (".", "is a folder"), ("/dev/null", "is not a file")]
)
def test_reconstruct_names_an_image_that_is_no_file_before_the_load(tmp_path, monkeypatch, image, message):
    """Was, after the load: "cannot read image missing.jpg (FileNotFoundError: [Errno 2] ...); remove or
    replace the file", advice for a data set's file, not for a command-line argument."""
    monkeypatch.setattr(reconstruct, "load_checkpoint", _no_load)
    path = str(tmp_path / image)
    argv = [str(demo_files(1)[0]), path, "--checkpoint", "any.pth", "--output", str(tmp_path / "r.png")]
    with pytest.raises(UserError, match=rf"^image {re.escape(path)} {message}; give image files$"):
        reconstruct.main(reconstruct.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mae") / "checkpoint-0.pth"
    model = models_mae.create_model("mae_vit_tiny_patch4", 32)  # 64 patches
    torch.save(
        {"model": model.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_patch4", input_size=32)}, path
    )
    return path


def test_reconstruct_input_size_must_be_the_stored_one_even_with_as_many_patches(mae_checkpoint, tmp_path):
    """16 64 has the 64 patches of 32 (and 24 32 the 48 of 32 24): the weights loaded, and every patch took
    another's position embedding in the picture, without a word. The stored size itself is accepted."""
    path = tmp_path / "wide.pth"
    model = models_mae.create_model("mae_vit_tiny_patch4", (32, 24))
    torch.save(
        {"model": model.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_patch4", input_size=[32, 24])},
        path,
    )
    output = tmp_path / "r.png"
    for saved, given, stored in ((mae_checkpoint, "16 64", "32"), (path, "24 32", "32 24 (height width)")):
        argv = ["--checkpoint", str(saved), str(demo_files(1)[0]), "--device", "cpu", "--output", str(output)]
        refused = rf"^--input_size {given}: checkpoint {saved} was trained at --input_size {re.escape(stored)}, "
        with pytest.raises(UserError, match=refused + r".*; leave --input_size out$"):
            reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--input_size", *given.split()]))
        assert not output.exists()
        reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--input_size", *stored.split()[:2]]))
        output.unlink()


def test_reconstruct_mask_ratio_must_keep_one_of_the_model_patches(mae_checkpoint, tmp_path):
    """0.999 of 64 patches keeps none (the model's ValueError before); 0 removes none, which a picture allows."""
    output = tmp_path / "r.png"
    argv = ["--checkpoint", str(mae_checkpoint), str(demo_files(1)[0]), "--device", "cpu", "--output", str(output)]
    refused = r"^--mask_ratio 0.999 must keep at least one of the 64 patches visible: use a value in \[0, 0.984375\]$"
    with pytest.raises(UserError, match=refused):
        reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--mask_ratio", "0.999"]))
    assert not output.exists()
    with pytest.raises(UserError, match=r"takes 3-channel images, not --in_chans 1: leave --in_chans out"):
        reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--in_chans", "1"]))
    for ratio in ("0", "0.984375"):  # none removed; one kept
        reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--mask_ratio", ratio]))
        assert output.is_file()
        output.unlink()


@pytest.mark.parametrize("sizes", [["0"], ["32", "0"], ["-4"]])
def test_input_size_below_1_is_refused_as_parsed(sizes):
    """0 passed as a multiple of any patch size ('not a multiple of the patch size 4' was the error),
    and reconstruct.py took it for 'not given'."""
    shown = " ".join(sizes)
    for parser, argv in (
        (reconstruct.get_args_parser(), ["--checkpoint", "c.pth", "a.jpg"]),
        (main_pretrain.get_args_parser(), []),
    ):
        with pytest.raises(UserError, match=rf"^--input_size must be at least 1, got {shown}$"):
            parser.parse_args([*argv, "--input_size", *sizes])


def test_reconstruct_and_knn_eval_flags_give_one_line_on_the_command_line(tmp_path, warm_interpreter):
    image = str(demo_files(1)[0])
    reconstructs = {
        "seed": ["--checkpoint", "any.pth", image, "--seed", str(2**70)],
        "input_size": ["--checkpoint", "any.pth", image, "--input_size", "0"],
    }
    knn_evals = {"num_workers": ["--data_path", str(tmp_path), "--encoders", "random", "--num_workers", "-1"]}
    results = cli_batch(reconstructs, warm_interpreter, "reconstruct.py")
    results.update(cli_batch(knn_evals, warm_interpreter, "knn_eval.py"))
    for name, result in results.items():
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --"), (name, result.stderr)


# ---------------------------------------------------------------------------------------------
# 10. Resuming with flags that change what is trained
def _pretrain_state(tmp_path: Path) -> checkpoint.TrainState:
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(
        output_dir=str(tmp_path), resume="", start_epoch=0, epochs=5, save_freq=20, keep_last=1,
        batch_size=8, world_size=1, accum_iter=1, model="mae_vit_tiny_patch4", input_size=32,
        mask_ratio=0.75, norm_pix_loss=False, device="cpu",
    )  # fmt: skip
    return checkpoint.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), LossScaler("fp32"), args)


def test_resume_auto_without_an_output_folder_is_refused(data, tmp_path):
    """It looked in '' ("no checkpoint in , starting from scratch") and trained, saving nothing to resume."""
    args = pretrain_args(data, tmp_path / "out", "--epochs", "1", "--resume", "auto", "--output_dir", "")
    with pytest.raises(UserError, match=r"^--resume auto takes the newest checkpoint in --output_dir, and"):
        main_pretrain.main(args)


def test_evaluating_an_output_folder_without_a_checkpoint_is_refused(tmp_path):
    """--eval --resume auto on a folder whose run has not saved yet scored the random initial weights, as
    if they were the run's (a line 'starting from scratch', then Acc@1 near chance)."""
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path), eval=True)
    with pytest.raises(UserError, match=r"^--eval --resume auto: no checkpoint in .* to evaluate .*; give --resume"):
        resuming.open_resume(args)


def test_resume_with_changed_meaning_warns_in_one_line(tmp_path, capsys):
    path = checkpoint.save_checkpoint(_pretrain_state(tmp_path), epoch=1)
    same = _pretrain_state(tmp_path)
    same.args.resume = path
    resuming.resume(same, resuming.open_resume(same.args))
    assert "warning" not in capsys.readouterr().out
    changed = _pretrain_state(tmp_path)
    changed.args.resume, changed.args.norm_pix_loss, changed.args.mask_ratio = path, True, 0.5
    assert resuming.resume(changed, resuming.open_resume(changed.args)) == checkpoint.Position(2)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "--mask_ratio 0.75 -> 0.5" in warnings[0] and "--norm_pix_loss False -> True" in warnings[0]


@pytest.mark.parametrize(
    "command",
    [
        ["knn_eval.py", "--encoders", "random", "--model", "mae_vit_mini_patch4", "--knn_k", "2"],
        ["main_linprobe.py", "--model", "vit_mini_patch4", "--nb_classes", "3", "--epochs", "1"],
    ],
    ids=["knn_eval", "linprobe"],
)
def test_a_corrupt_image_found_by_loader_workers_ends_the_process(tmp_path, command):
    """A truncated validation image read by a loader worker: one line and exit 2, and the process
    ends, also where the error's traceback kept the loader alive until exit. Its workers ignore
    SIGTERM (a cluster's stop is the main process's to act on), with which multiprocessing would
    end them at exit before waiting for them forever."""
    import subprocess

    data = _split(tmp_path / "data", ("cat", "dog", "frog"), ("cat", "dog", "frog"))
    bad = sorted((data / "val").rglob("*.jpg"))[1]
    bad.write_bytes(bad.read_bytes()[:200])
    flags = ["--data_path", str(data), "--input_size", "32", "--batch_size", "2", "--num_workers", "2"]
    if command[0] == "main_linprobe.py":
        flags += ["--output_dir", str(tmp_path / "out"), "--log_dir", str(tmp_path / "out"), "--warmup_epochs", "0"]
    done = subprocess.run(
        [sys.executable, command[0], *command[1:], *flags], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith(f"error: cannot read image {bad} (")


@pytest.mark.parametrize("resume", ["", "auto"])
@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_a_pretrained_checkpoint_in_the_output_folder_is_not_replaced(tmp_path, entry_point, resume):
    """--finetune out/checkpoint-3.pth --output_dir out: the run's own checkpoint-3.pth, or its
    pruning, would replace or delete the encoder it starts from; refused before training. A new run
    (no --resume) is refused any folder with checkpoints (the official defaults share ./output_dir)."""
    out = tmp_path / "out"
    out.mkdir()
    pretrained = out / "checkpoint-3.pth"
    model = models_mae.mae_vit_tiny_patch4()
    torch.save(
        {"model": model.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_patch4", input_size=32)},
        pretrained,
    )
    before = pretrained.read_bytes()
    data = _split(tmp_path / "data", ("cat", "dog", "frog"), ("cat", "dog", "frog"))
    argv = ["--data_path", str(data), "--nb_classes", "3", "--finetune", str(pretrained), "--output_dir", str(out)]
    refusal = (
        rf"--output_dir {re.escape(str(out))} holds the checkpoints of an earlier run \(checkpoint-3.pth\), which "
        if not resume
        else rf"--finetune {re.escape(str(pretrained))} is a checkpoint in --output_dir"
    )
    with pytest.raises(UserError, match=refusal):
        entry_point.main(entry_point.get_args_parser().parse_args([*argv, "--resume", resume, "--epochs", "1", *CPU]))
    assert pretrained.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["checkpoint-3.pth"]


def test_a_linear_probe_of_one_image_a_batch_is_refused_before_training(tmp_path):
    """The probe's BatchNorm refuses a batch of one image in training mode: a ValueError at the first step."""
    data = _split(tmp_path / "data", ("airplane", "cat", "ship"), ("airplane", "cat", "ship"))
    args = _classifier_args(main_linprobe, data, tmp_path / "out", "--batch_size", "1")
    with pytest.raises(UserError, match=r"^--batch_size must be at least 2 for the linear probe .*got 1$"):
        main_linprobe.main(args)
    assert not (tmp_path / "out" / "checkpoint-0.pth").exists()


@pytest.mark.parametrize(
    "entry_point, given, message",
    [
        (main_finetune, "mae", r"holds an MAE with decoder, not a fine-tuned classifier: start from it with --"),
        (main_linprobe, "mae", r"holds an MAE with decoder, not a linear probe: start from it with --finetune "),
        (main_linprobe, "classifier", r"holds a fine-tuned classifier, not a linear probe: give a checkpoint of "),
        (main_pretrain, "classifier", r"holds a fine-tuned classifier, not an MAE with decoder: give a checkpoint of "),
    ],
    ids=["mae-finetune", "mae-linprobe", "classifier-linprobe", "classifier-pretrain"],
)
def test_a_checkpoint_of_another_kind_given_to_resume_says_which_flag_takes_it(
    data, tmp_path, mae_checkpoint, classifier_checkpoint, entry_point, given, message
):
    """Was: 'does not fit VisionTransformer: 4 missing [...]; check --model and --input_size'."""
    path = mae_checkpoint if given == "mae" else classifier_checkpoint
    if entry_point is main_pretrain:
        args = pretrain_args(data, tmp_path / "out", "--epochs", "1", "--resume", str(path))
    else:
        split = _split(tmp_path / "data", ("airplane", "cat", "ship"), ("airplane", "cat", "ship"))
        args = _classifier_args(entry_point, split, tmp_path / "out", "--resume", str(path))
    with pytest.raises(UserError, match=rf"^--resume {re.escape(str(path))} {message}"):
        entry_point.main(args)


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_resume_of_an_mae_with_list_files_names_its_kind_before_the_classes(tmp_path, mae_checkpoint, entry_point):
    """List files and no --nb_classes: --resume of an MAE was told to give --nb_classes, and only once given it
    that the checkpoint is an MAE, which no --nb_classes makes a classifier to resume."""
    split = Path(__file__).resolve().parent.parent / "demo" / "cifar10-2k-split"
    args = _classifier_args(entry_point, split, tmp_path / "out", "--resume", str(mae_checkpoint))
    args.nb_classes = None
    with pytest.raises(UserError, match=rf"^--resume {re.escape(str(mae_checkpoint))} holds an MAE with decoder, "):
        entry_point.main(args)
