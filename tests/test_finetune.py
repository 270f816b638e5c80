"""Fine-tuning and linear probing: pre-trained encoders load with exactly the expected missing
keys, layer-wise lr decay groups, LARS, evaluation (also sharded over 2 processes), and the
pre-train -> fine-tune / linear probe -> eval pipeline on real CIFAR-10 images."""

import json
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    TINY,
    assert_same,
    cli,
    load,
    make_split,
    one_line_error,
    pretrain_args,
    run_ranks,
    torch_threads,
)

import engine_finetune
import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
from util.checkpoint.encoder import load_pretrained_encoder
from util.cli.errors import UserError
from util.data.datasets import class_count
from util.lars import LARS
from util.lr_decay import param_groups_lrd
from util.train import distributed
from util.train.progress import RunLog

CPU = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A short pre-training run of the mini model (the size of the encoder matters to none of these
    tests, and its steps take a quarter of the tiny one's time), whose checkpoint the tests fine-tune and probe."""
    root = tmp_path_factory.mktemp("ft")
    data = make_split(root / "data", train=16, val=9)  # 27 validation images: odd on purpose
    pre = root / "pre"
    flags = ["--model", "mae_vit_mini_patch4", "--epochs", "1", "--warmup_epochs", "0", "--vis_freq", "0"]
    args = pretrain_args(data, pre, *flags, "--log_dir", "")
    main_pretrain.main(args)
    return data, pre / "checkpoint-0.pth", root


def _classifier_args(entry_point, data, out, *extra):
    """Flags of main_finetune / main_linprobe for the tiny split on CPU; ``extra`` wins."""
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_mini_patch4", "--input_size", "32"]
    argv += ["--batch_size", "8", "--output_dir", str(out), "--log_dir", "", "--warmup_epochs", "1", *CPU, *extra]
    return entry_point.get_args_parser().parse_args(argv)


def _finetune_args(data, out, *extra):
    return _classifier_args(main_finetune, data, out, *extra)


def _without_nb_classes(args):
    """``args`` as parsed from a command that does not give --nb_classes."""
    args.nb_classes = None
    return args


def _last_log(out: Path) -> dict:
    return json.loads((out / "log.txt").read_text().strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
def test_finetune_then_eval_reproduces_logged_accuracy(pipeline, tmp_path, capsys):
    data, ckpt, _ = pipeline
    out = tmp_path / "ft"
    crops = ["--crop_pct", "1.0", "--scale", "0.5", "1.0"]
    mix = ["--mixup", "0.8", "--cutmix", "1.0", "--blr", "5e-3", *crops]
    main_finetune.main(_finetune_args(data, out, "--finetune", str(ckpt), "--epochs", "2", *mix))
    logged = _last_log(out)
    assert logged["epoch"] == 1 and logged["test_images"] == 27
    assert logged["max_accuracy"] >= logged["test_acc1"]
    saved = torch.load(out / "checkpoint-1.pth", weights_only=False)
    assert saved["args"].crop_pct == 1.0 and saved["args"].scale == [0.5, 1.0]
    # The optimizer's groups: no weight decay for the position embedding, the class token, biases and norms.
    decay = {name: group["weight_decay"] for group in saved["optimizer"]["param_groups"] for name in group["names"]}
    assert {decay[k] for k in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias")} == {0.0}
    assert decay["blocks.0.attn.qkv.weight"] == decay["head.weight"] == 0.05
    capsys.readouterr()
    # Evaluated as the run was: --crop_pct from the checkpoint, not given again.
    main_finetune.main(_finetune_args(data, tmp_path / "eval", "--eval", "--resume", str(out / "checkpoint-1.pth")))
    printed = capsys.readouterr().out
    assert "--crop_pct 1.0 --global_pool (flags not given)" in printed  # the pooling: the checkpoint's weights
    acc = float(re.search(r"\* Acc@1 ([\d.]+)", printed).group(1))
    assert acc == pytest.approx(logged["test_acc1"], abs=1e-3)


@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_a_resume_goes_on_without_the_finetune_checkpoint_it_started_from(pipeline, tmp_path, capsys, entry_point):
    """The same command with --resume auto read --finetune again on every rank, though the resumed weights
    replace the encoder's: a pre-trained checkpoint moved or deleted since the run began stopped its resume
    ('checkpoint ... does not exist; check its path', not naming --finetune). It is not read now, and the
    resumed run ends as one that never stopped."""
    data, ckpt, _ = pipeline
    encoder = str(shutil.copy(ckpt, tmp_path / "encoder.pth"))
    flags = ["--finetune", encoder, "--epochs", "2", "--ckpt_every_steps", "2", "--keep_last", "0"]
    entry_point.main(_classifier_args(entry_point, data, tmp_path / "whole", *flags))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(tmp_path / "whole" / "checkpoint-0-step4.pth", stopped)
    os.remove(encoder)
    capsys.readouterr()
    entry_point.main(_classifier_args(entry_point, data, stopped, *flags, "--resume", "auto"))
    resumed = stopped / "checkpoint-0-step4.pth"
    assert f"--finetune {encoder} is not read: the run goes on from {resumed}, which holds its weights" in (
        capsys.readouterr().out
    )
    whole, again = (torch.load(out / "checkpoint-1.pth", weights_only=False) for out in (tmp_path / "whole", stopped))
    assert all(torch.equal(whole["model"][k], again["model"][k]) for k in whole["model"])


def test_linear_probe_trains_only_the_head(pipeline, tmp_path):
    data, ckpt, _ = pipeline
    out = tmp_path / "lin"
    args = _classifier_args(main_linprobe, data, out, "--batch_size", "16", "--epochs", "2", "--finetune", str(ckpt))
    main_linprobe.main(args)
    probed = torch.load(out / "checkpoint-1.pth", weights_only=False)["model"]
    encoder = torch.load(ckpt, weights_only=False)["model"]
    for name, value in probed.items():
        if name.startswith("head."):
            continue
        assert torch.equal(value, encoder[name]), f"{name} changed during linear probing"
    # The head did train: BatchNorm statistics moved and the linear layer left its init.
    assert not torch.equal(probed["head.0.running_mean"], torch.zeros_like(probed["head.0.running_mean"]))
    assert set(k for k in probed if k.startswith("head.")) == {
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
        "head.1.weight",
        "head.1.bias",
    }


def test_eval_freq_evaluates_every_nth_and_the_last_epoch(pipeline, tmp_path):
    data, _, _ = pipeline
    out = tmp_path / "ft"
    main_linprobe.main(_classifier_args(main_linprobe, data, out, "--epochs", "5", "--eval_freq", "2"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3, 4]
    assert ["test_acc1" in line for line in lines] == [False, True, False, True, True]
    assert all("train_loss" in line for line in lines)
    # The official key: the trained parameters, here the probe's linear head (128 x 3 + 3).
    assert all(line["n_parameters"] == 128 * 3 + 3 for line in lines)


# Flags that only watch or save a run, and how its data are loaded: all at once, in one run.
WATCHERS = ["--print_freq", "1", "--log_dir", "{out}", "--ckpt_every_steps", "2", "--save_freq", "1"]
WATCHERS += ["--keep_last", "0", "--dist_eval", "--num_workers", "2"]


@pytest.mark.parametrize("watching", [["--eval_freq", "3"], WATCHERS], ids=["eval_freq", "watchers"])
def test_what_only_watches_changes_no_weight(pipeline, tmp_path, watching):
    """Evaluating, logging, TensorBoard, checkpoints and loader workers draw nothing from the streams training
    draws on (drop path's and mixup's here): the weights and optimizer after 3 epochs are those of a run that
    evaluated every epoch and did none of the rest. (Pre-training's: helpers.REFERENCE_EXTRAS, test_knn.)"""
    data, ckpt, _ = pipeline
    flags = ["--finetune", str(ckpt), "--epochs", "3", "--drop_path", "0.2", "--mixup", "0.8", "--cutmix", "1.0"]
    trained = []
    for name, extra in (("plain", []), ("watched", watching)):
        out = tmp_path / name
        main_finetune.main(_finetune_args(data, out, *flags, *[f.format(out=out) for f in extra]))
        final = load(out / "checkpoint-2.pth")
        trained.append({"model": final["model"], "optimizer": final["optimizer"]})
    assert_same(*trained)


def test_dist_eval_over_two_processes_counts_every_image_once(pipeline, finetuned, tmp_path, capsys):
    """Two ranks forked from this process in a gloo group, as torchrun's (helpers.run_ranks); each takes the
    model, its size, classes and pooling from the checkpoint, and reads the validation split alone."""
    data, _, _ = pipeline
    trained, logged = finetuned
    flags = [
        "--data_path",
        str(data),
        "--batch_size",
        "4",
        "--eval",
        "--resume",
        str(trained),
        "--output_dir",
        str(tmp_path / "e"),
        "--log_dir",
        "",
        *CPU,
    ]
    acc_line = re.compile(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) images\)")

    def evaluate() -> None:
        main_finetune.main(main_finetune.get_args_parser().parse_args([*flags, "--dist_eval"]))

    capsys.readouterr()
    with torch_threads(1):  # as the ranks
        main_finetune.main(main_finetune.get_args_parser().parse_args(flags))
    single = acc_line.search(capsys.readouterr().out).groups()
    sharded = acc_line.search(run_ranks(evaluate, tmp_path / "ranks")[0]).groups()
    assert single[3] == sharded[3] == "27"
    assert single == sharded and float(single[0]) == pytest.approx(logged, abs=1e-3)


def test_dist_eval_with_fewer_images_than_processes_is_refused_at_start(tmp_path):
    """The probe's first evaluation forward is where DDP sends rank 0's BatchNorm statistics: a rank
    with no validation batch skipped it and the others waited forever (3 images over 4 ranks)."""
    data = make_split(tmp_path / "data", train=4, val=1)
    args = _classifier_args(main_linprobe, data, tmp_path / "out", "--batch_size", "2", "--epochs", "1", "--dist_eval")
    outputs = run_ranks(lambda: main_linprobe.main(args), tmp_path / "ranks", 4, timeout=90, exit_codes=[2] * 4)
    refused = f"error: --dist_eval: the 3 validation image(s) of --data_path {data} cannot be shared by 4 processes; "
    assert all(refused + "drop --dist_eval (each process then scores them all)\n" in out for out in outputs)
    assert not any("Epoch: [0]" in out for out in outputs)  # refused before training, not after an epoch of it


def test_loader_workers_started_by_forkserver(pipeline, tmp_path):
    """Python 3.14 starts processes by forkserver on Linux (spawn on macOS), which pickles what a
    DataLoader worker gets: pre-training's loader and fine-tuning's (RandAugment, erasing, mixup)
    run with 2 workers started that way. The server imports torch, torchvision and timm once, not each of the
    6 workers (half the test's time): what a worker gets is pickled all the same."""
    data, ckpt, _ = pipeline
    workers = ["--device", "cpu", "--precision", "fp32", "--num_workers", "2", "--epochs", "1", "--log_dir", ""]
    pre = [*TINY, "--model", "mae_vit_mini_patch4", "--data_path", str(data), "--output_dir", str(tmp_path / "pre")]
    ft = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_mini_patch4", "--input_size", "32"]
    ft += ["--finetune", str(ckpt), "--batch_size", "8", "--mixup", "0.8", "--reprob", "0.25"]
    ft += ["--output_dir", str(tmp_path / "ft")]
    script = tmp_path / "forkserver.py"
    script.write_text(
        "import multiprocessing, sys\n"
        "import main_finetune, main_pretrain\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.set_start_method('forkserver')\n"
        "    multiprocessing.set_forkserver_preload(['torch', 'torchvision', 'timm'])\n"
        f"    main_pretrain.main(main_pretrain.get_args_parser().parse_args({[*pre, *workers]!r}))\n"
        f"    main_finetune.main(main_finetune.get_args_parser().parse_args({[*ft, *workers]!r}))\n"
    )
    path = [str(Path(main_pretrain.__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = cli([str(script)], env={"PYTHONPATH": os.pathsep.join(path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pre" / "checkpoint-0.pth").exists() and _last_log(tmp_path / "ft")["test_images"] == 27


# ---------------------------------------------------------------------------------------------
def test_mae_checkpoint_loads_with_exactly_head_and_fc_norm_missing(pipeline, capsys):
    _, ckpt, _ = pipeline
    model = models_vit.vit_mini_patch4(num_classes=3, global_pool=True)
    load_pretrained_encoder(model, str(ckpt))
    printed = capsys.readouterr().out
    assert "initialised: ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']" in printed
    encoder = torch.load(ckpt, weights_only=False)["model"]
    for name, value in model.state_dict().items():
        if not name.startswith(("head.", "fc_norm.")):
            assert torch.equal(value, encoder[name]), name
    assert model.head.weight.std().item() < 1e-4  # trunc-normal(2e-5)
    assert torch.all(model.head.bias == 0)


class _Recorded(Exception):
    pass


@pytest.mark.parametrize(
    ("entry_point", "std"), [(main_finetune, 2e-5), (main_linprobe, 0.01)], ids=["finetune", "probe"]
)
def test_the_head_a_checkpoint_lacks_is_drawn_with_the_officials_std(pipeline, tmp_path, monkeypatch, entry_point, std):
    """The official scripts draw the new head trunc-normal with std 2e-5 (fine-tuning) and 0.01 (the probe)."""
    data, ckpt, _ = pipeline

    def record(model, source, head_init_std):
        raise _Recorded(head_init_std)  # the run stops here: its training is not what is tested

    monkeypatch.setattr(engine_finetune, "load_pretrained_encoder", record)
    with pytest.raises(_Recorded) as recorded:
        entry_point.main(_classifier_args(entry_point, data, tmp_path / "out", "--finetune", str(ckpt)))
    assert recorded.value.args == (std,)


def test_class_token_model_loads_norm_and_misses_only_head(pipeline, capsys):
    _, ckpt, _ = pipeline
    model = models_vit.vit_mini_patch4(num_classes=3, global_pool=False)
    load_pretrained_encoder(model, str(ckpt))
    assert "initialised: ['head.bias', 'head.weight']" in capsys.readouterr().out
    encoder = torch.load(ckpt, weights_only=False)["model"]
    assert torch.equal(model.norm.weight, encoder["norm.weight"])


@pytest.mark.parametrize("global_pool", [True, False])
def test_a_classifier_checkpoint_keeps_its_head_of_the_same_shape(tmp_path, capsys, global_pool):
    """--finetune of a classifier fine-tuned on as many classes: its head (and fc_norm) load as they are,
    not re-drawn. The official scripts stop there instead (they assert that the head is missing):
    docs/official-differences.md."""
    source = models_vit.vit_mini_patch4(num_classes=3, global_pool=global_pool)
    with torch.no_grad():
        source.head.weight.normal_(std=0.5)  # far from trunc-normal(2e-5): a re-drawn head would show
        source.head.bias.fill_(0.25)
    path = tmp_path / "classifier.pth"
    torch.save({"model": source.state_dict()}, path)
    model = models_vit.vit_mini_patch4(num_classes=3, global_pool=global_pool)
    load_pretrained_encoder(model, str(path))
    assert "initialised: nothing" in capsys.readouterr().out
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("global_pool", [True, False])
def test_a_linear_probes_checkpoint_starts_a_classifier_with_its_encoder(tmp_path, capsys, global_pool):
    """--finetune of main_linprobe.py's checkpoint: its head (BatchNorm then linear, head.0/head.1) is dropped as
    a head of another shape is, and its encoder loads. It was refused as "not an MAE checkpoint"; the official
    scripts load it (its head's keys are unexpected there, which they ignore)."""
    probe = models_vit.vit_mini_patch4(num_classes=3)
    main_linprobe.add_probe_head(probe)
    path = tmp_path / "probe.pth"
    torch.save({"model": probe.state_dict()}, path)
    model = models_vit.vit_mini_patch4(num_classes=3, global_pool=global_pool)
    load_pretrained_encoder(model, str(path))
    assert "initialised: ['" in capsys.readouterr().out
    for name, value in model.state_dict().items():
        if not name.startswith(("head.", "fc_norm.")):
            assert torch.equal(value, probe.state_dict()[name]), name
    assert model.head.weight.std().item() < 1e-4  # drawn anew: trunc-normal(2e-5)


def test_encoder_only_checkpoint_at_another_resolution(pipeline, tmp_path):
    """The official release format (encoder only, under 'model'), loaded at a larger input size:
    the position embedding is resized and the grid's corners keep their values approximately."""
    _, ckpt, _ = pipeline
    state = {
        k: v
        for k, v in torch.load(ckpt, weights_only=False)["model"].items()
        if not k.startswith(("decoder", "mask_token"))
    }
    path = tmp_path / "encoder.pth"
    torch.save({"model": state}, path)
    model = models_vit.vit_mini_patch4(img_size=64, num_classes=3)
    load_pretrained_encoder(model, str(path))
    new, old = model.pos_embed.detach(), state["pos_embed"]
    assert new.shape == (1, 1 + 16 * 16, 128)
    assert torch.equal(new[:, 0], old[:, 0])  # the class token's embedding is not interpolated
    old_grid, new_grid = old[0, 1:].reshape(8, 8, -1), new[0, 1:].reshape(16, 16, -1)
    corner_error = (new_grid[0, 0] - old_grid[0, 0]).abs().mean() / old_grid.abs().mean()
    assert corner_error < 0.3


def test_foreign_checkpoint_is_refused_naming_keys(tmp_path):
    mae = models_mae.mae_vit_tiny_patch16()
    path = tmp_path / "wrong.pth"
    torch.save({"model": mae.state_dict()}, path)
    model = models_vit.vit_tiny_patch4(num_classes=3)  # another patch size
    with pytest.raises(UserError, match=r"other shape \['patch_embed.proj.weight'"):
        load_pretrained_encoder(model, str(path))
    torch.save({"model": {"backbone.weight": torch.zeros(3)}}, path)
    with pytest.raises(UserError, match=r"missing \[.*unexpected \['backbone.weight'\]"):
        load_pretrained_encoder(model, str(path))


# ---------------------------------------------------------------------------------------------
def test_layer_decay_groups_for_vit_base():
    decay, wd = 0.65, 0.05
    model = models_vit.vit_base_patch16(num_classes=1000, global_pool=True)
    groups = param_groups_lrd(model, wd, model.no_weight_decay(), decay)
    seen = {}
    for g in groups:
        for name in g["names"]:
            seen[name] = (g["lr_scale"], g["weight_decay"])
    params = dict(model.named_parameters())
    assert set(seen) == set(params)

    def expected(name):
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = 13  # fc_norm and head: 12 blocks + 1
        no_decay = params[name].ndim == 1 or name in ("cls_token", "pos_embed")
        return decay ** (13 - layer), 0.0 if no_decay else wd

    for name in params:
        assert seen[name] == pytest.approx(expected(name)), name
    assert seen["head.weight"] == (1.0, wd)
    assert seen["blocks.11.mlp.fc1.weight"] == pytest.approx((0.65, wd))
    assert seen["blocks.0.attn.qkv.bias"] == pytest.approx((0.65**12, 0.0))
    assert seen["pos_embed"] == pytest.approx((0.65**13, 0.0))
    assert len(groups) == 2 * 14


def test_the_mixing_flags_reach_timms_mixup():
    argv = ["--mixup", "0.8", "--cutmix", "0.6", "--mixup_prob", "0.7", "--mixup_switch_prob", "0.4"]
    argv += ["--smoothing", "0.2", "--mixup_mode", "pair", "--nb_classes", "7"]
    mixup = main_finetune.build_mixup(main_finetune.get_args_parser().parse_args(argv))
    got = {k: getattr(mixup, k) for k in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "label_smoothing")}
    assert got == {"mixup_alpha": 0.8, "cutmix_alpha": 0.6, "mix_prob": 0.7, "switch_prob": 0.4, "label_smoothing": 0.2}
    assert (mixup.mode, mixup.num_classes) == ("pair", 7)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_loss_smooths_labels_by_smoothing_or_takes_mixups_soft_targets(smoothing):
    """Without mixing, the loss is cross-entropy with --smoothing's label smoothing (torch's formula: (1 - s) of the
    true class's and s of the classes' mean negative log-probability); with it, cross-entropy on the mixed targets."""
    args = main_finetune.get_args_parser().parse_args(["--smoothing", str(smoothing), "--nb_classes", "5"])
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    criterion = main_finetune.build_criterion(args, None)
    want = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(criterion(logits, labels), want)
    soft = torch.softmax(torch.randn(6, 5), dim=1)  # mixed targets, smoothing included
    mixed = main_finetune.build_criterion(args, object())
    torch.testing.assert_close(mixed(logits, soft), -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean())


class _FixedLogits(torch.nn.Module):
    """A classifier whose images are indices into fixed logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images]


def test_evaluate_gives_top1_top5_and_mean_loss_by_hand():
    """10 images in batches of 6 and 4, 7 classes: top-1 and top-5 from each true class's rank among the logits,
    the cross-entropy averaged over images (not over batches)."""
    torch.manual_seed(3)
    logits, targets = torch.randn(10, 7), torch.randint(0, 7, (10,))
    loader = [(torch.arange(0, 6), targets[:6]), (torch.arange(6, 10), targets[6:])]
    args = Namespace(device="cpu", precision="fp32", dist_eval=False)
    stats = engine_finetune.evaluate(_FixedLogits(logits), loader, args)
    above = (logits > logits.gather(1, targets[:, None])).sum(dim=1)  # classes scored above the true one
    top1, top5 = 100 * (above == 0).float().mean().item(), 100 * (above < 5).float().mean().item()
    assert 0 < top1 < top5 < 100  # the two differ, and neither is trivial
    assert stats == pytest.approx(
        {"acc1": top1, "acc5": top5, "loss": torch.nn.functional.cross_entropy(logits, targets).item(), "images": 10}
    )


def test_an_epoch_worse_than_an_earlier_one_leaves_the_best_top1():
    """max_accuracy, in the state and the epoch's log line, is the best top-1 so far (50 here), not the last (20)."""
    torch.manual_seed(3)  # the logits of the test above: top-1 20%
    logits, targets = torch.randn(10, 7), torch.randint(0, 7, (10,))
    model = _FixedLogits(logits)
    args = Namespace(device="cpu", precision="fp32", dist_eval=False, eval_freq=1, epochs=1)
    state, lines = Namespace(args=args, model=model, extra={"max_accuracy": 50.0}), []
    checkpointer = Namespace(
        state=state, run_log=RunLog("", ""), take_unevaluated=lambda: (0, {"loss": 1.0}), log_evaluated=lines.append
    )
    engine_finetune._evaluate_epoch(model, [(torch.arange(10), targets)], checkpointer)
    assert lines[0]["test_acc1"] == pytest.approx(20.0)
    assert state.extra["max_accuracy"] == lines[0]["max_accuracy"] == 50.0


def test_the_probe_head_standardises_each_feature_over_the_batch_with_eps_1e_6():
    """In training, each feature less its batch mean, over sqrt(biased batch variance + 1e-6), into the linear
    layer: features of a spread near 1e-3 (whose standardisation the eps sets) and of a large one."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(2, 3)
    model = torch.nn.Module()
    model.head = linear
    main_linprobe.add_probe_head(model)
    head = model.head.train()
    x = torch.stack([1e-3 * torch.randn(8), 5 + 40 * torch.randn(8)], dim=1)
    mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
    torch.testing.assert_close(head(x), linear((x - mean) / (var + 1e-6).sqrt()))
    assert [name for name, _ in head.named_parameters()] == ["1.weight", "1.bias"]  # no affine BatchNorm weights


def test_lars_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.0, 1.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # [1.5, 3.0]
    trust = 0.001 * 5.0 / update.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * trust * update)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # 1-D: plain momentum step
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    opt.step()  # momentum: mu = 0.9 * mu + g
    assert torch.allclose(b.detach(), torch.tensor([0.8 - 0.1 * (0.9 * 2.0 + 2.0)]))


# ---------------------------------------------------------------------------------------------
def test_nb_classes_must_match_folders(pipeline, tmp_path):
    data, _, _ = pipeline
    args = _finetune_args(data, tmp_path / "x", "--epochs", "1")
    args.nb_classes = 10
    with pytest.raises(UserError, match=r"has 3 class folders but --nb_classes is 10"):
        main_finetune.main(args)


# --nb_classes not given, and no --resume head to decide it: the class folders' count
@pytest.mark.parametrize("entry_point", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_class_folders_give_the_classes_not_given(pipeline, tmp_path, capsys, entry_point):
    """The official default, 1000 (ImageNet's), refused a user's own class folders ('has 3 class folders but
    --nb_classes is 1000; give --nb_classes 3'): the tool knew the answer it asked for. The head has a row per
    class folder, and the run says where the count came from, as it says what a checkpoint gave."""
    data, ckpt, _ = pipeline
    out = tmp_path / "out"
    args = _without_nb_classes(_classifier_args(entry_point, data, out, "--finetune", str(ckpt), "--epochs", "1"))
    entry_point.main(args)
    printed = capsys.readouterr().out
    assert f"from the class folders of {data / 'train'}: --nb_classes 3 (flags not given)" in printed
    saved = load(out / "checkpoint-0.pth")
    head = saved["model"]["head.weight" if entry_point is main_finetune else "head.1.weight"]
    assert head.shape[0] == 3 and saved["args"].nb_classes == 3
    assert args.nb_classes is None  # the settled value is the run's copy's (and its checkpoint's)
    assert _last_log(out)["test_images"] == 27


def test_a_given_nb_classes_is_not_counted(pipeline, tmp_path, capsys):
    """A flag given wins: the class folders are not counted, and a count that differs keeps its refusal."""
    data, _, _ = pipeline
    with pytest.raises(UserError, match=r"has 3 class folders but --nb_classes is 4; give --nb_classes 3$"):
        main_finetune.main(_finetune_args(data, tmp_path / "x", "--epochs", "1", "--nb_classes", "4"))
    assert "from the class folders" not in capsys.readouterr().out


def test_list_files_need_nb_classes(tmp_path):
    """A list file cannot say how many classes there are: a class with no image in it (or only in the other
    split) would be missing from a head of the largest label + 1, and 1000 (ImageNet's) made a 10-label list
    train a head of 1000 outputs without a word. Refused before any list is read, naming the file."""
    split = REPO / "demo" / "cifar10-2k-split"
    args = _without_nb_classes(_finetune_args(split, tmp_path / "x", "--epochs", "1"))
    expected = f"{split / 'train.txt'} cannot tell how many classes there are (a class may have no image in it); "
    assert one_line_error(main_finetune.main, args) == expected + "give --nb_classes"


def test_the_count_is_that_of_the_split_the_run_reads(pipeline, tmp_path):
    """Training counts train/'s class folders (names only: hidden ones are no class, as for the data set);
    --eval, which reads the validation split alone, counts val/'s (or test/'s), or refuses val.txt as training
    refuses train.txt."""
    data, _, _ = pipeline
    root = tmp_path / "d"
    shutil.copytree(data, root)
    shutil.copytree(root / "train" / "cat", root / "train" / "dog")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    assert class_count(str(root), evaluating=False) == (f"the class folders of {root / 'train'}", 4)
    assert class_count(str(root), evaluating=True) == (f"the class folders of {root / 'val'}", 3)
    (root / "val").rename(root / "test")
    shutil.rmtree(root / "train")
    assert class_count(str(root), evaluating=True) == (f"the class folders of {root / 'test'}", 3)
    listed = _validation_only(data, tmp_path / "listed", "list")
    with pytest.raises(UserError, match=rf"^{listed / 'val.txt'} cannot tell how many classes there are"):
        class_count(str(listed), evaluating=True)
    # No count where the data set will refuse the folder: it says why where it is read, after the model's checks.
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert class_count(str(tmp_path / "empty"), evaluating=False) is None
    assert class_count(str(tmp_path / "absent"), evaluating=False) is None


@pytest.mark.parametrize("seen", ["same", "another", "lists"])
def test_two_ranks_count_the_class_folders_alike(pipeline, tmp_path, seen):
    """Two ranks forked in a gloo group, as torchrun's, each start fine-tuning without --nb_classes: the same
    count on both, or, where rank 1 sees a class folder more or list files (a stale copy of the data), the same
    one-line refusal on both (rank 1 refused its list alone, and rank 0 waited for it in the gather)."""
    from util.data import datasets
    from util.train.run import finish, start

    data, _, _ = pipeline
    args = _without_nb_classes(_finetune_args(data, tmp_path / "out", "--epochs", "1"))

    def body() -> None:
        if seen == "another" and os.environ["RANK"] == "1":
            listed = datasets.class_folders
            datasets.class_folders = lambda folder: (["zebra", *listed(folder)[0]], [])
        if seen == "lists" and os.environ["RANK"] == "1":
            datasets.split_source = lambda data_path, split, flag: (True, os.path.join(data_path, "train.txt"))
        print(f"classes: {start(args, main_finetune.FALLBACKS).args.nb_classes}")
        finish()

    outputs = run_ranks(body, tmp_path / "ranks", timeout=60, exit_codes=(0, 0) if seen == "same" else (2, 2))
    if seen == "same":
        assert all("classes: 3" in output for output in outputs), outputs
    else:
        refused = f"error: --data_path {data}: rank 1 of 2 lists 4 class folders in {data / 'train'}, rank 0 3: every"
        if seen == "lists":
            refused = f"error: --data_path {data}: rank 1 of 2 reads list files there, rank 0 class folders: every"
        assert all(refused in output and "classes:" not in output for output in outputs), outputs


def test_every_rank_takes_the_same_count(pipeline, monkeypatch):
    """A rank that sees other class folders would build another head: refused on every rank, as other images are."""
    data, _, _ = pipeline
    monkeypatch.setattr(distributed, "gather", lambda mine: [mine, mine + 1])
    refused = (
        rf"^--data_path {data}: rank 1 of 2 lists 4 class folders in {data / 'train'}, rank 0 3: every node of the "
        r"job must see the same data; put it on storage every node shares$"
    )
    with pytest.raises(UserError, match=refused):
        class_count(str(data), evaluating=False)


@pytest.mark.parametrize("classes", ["given", "counted"])
def test_a_resume_onto_another_number_of_class_folders_says_the_data_changed(pipeline, tmp_path, classes):
    """A class folder added between a stop and --resume auto with the same command: the error said 'give
    --nb_classes 4', and doing so stopped on the checkpoint's head of 3 outputs (found by a data-change probe).
    Without --nb_classes the resumed head's rows win over the folders counted now, so the refusal is the same."""
    data, ckpt, _ = pipeline
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    out = tmp_path / "ft"

    def command(*flags: str):
        args = _finetune_args(copy, out, *flags)
        return args if classes == "given" else _without_nb_classes(args)

    main_finetune.main(command("--epochs", "1", "--finetune", str(ckpt)))
    for split in ("train", "val"):
        shutil.copytree(copy / split / "cat", copy / split / "dog")
    refused = (
        rf"^{copy / 'train'} has 4 class folders, but {out / 'checkpoint-0.pth'}, which this run resumes, was "
        r"trained on 3; give the data it was trained on, or fine-tune afresh into another --output_dir$"
    )
    with pytest.raises(UserError, match=refused):
        main_finetune.main(command("--epochs", "2", "--resume", "auto"))


def test_missing_validation_folder(pipeline, tmp_path):
    data, _, _ = pipeline
    only_train = tmp_path / "d"
    shutil.copytree(data / "train", only_train / "train")
    with pytest.raises(UserError, match=r"has no 'val/test' folder"):
        main_finetune.main(_finetune_args(only_train, tmp_path / "x", "--epochs", "1"))


@pytest.fixture(scope="module")
def finetuned(pipeline, tmp_path_factory) -> tuple[Path, float]:
    """A classifier fine-tuned for 1 epoch on the pipeline's split, and the top-1 its run logged."""
    data, ckpt, _ = pipeline
    out = tmp_path_factory.mktemp("finetuned")
    main_finetune.main(_finetune_args(data, out, "--finetune", str(ckpt), "--epochs", "1"))
    return out / "checkpoint-0.pth", _last_log(out)["test_acc1"]


def _validation_only(data: Path, root: Path, layout: str) -> Path:
    """The pipeline's validation images alone: val/ class folders, or a val.txt list of them (labels as
    ImageFolder numbers the sorted folders)."""
    if layout == "folders":
        shutil.copytree(data / "val", root / "val")
        return root
    shutil.copytree(data / "val", root / "images")
    classes = sorted(p.name for p in (root / "images").iterdir())
    lines = [f"images/{c}/{f.name} {i}" for i, c in enumerate(classes) for f in sorted((root / "images" / c).iterdir())]
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("layout", ["folders", "list"])
def test_eval_needs_no_training_split(pipeline, finetuned, tmp_path, capsys, layout):
    """--eval scores the validation images alone: it listed the training split too, and a folder holding
    only the validation images (val/ without train/, val.txt without train.txt) was refused."""
    data, _, _ = pipeline
    trained, logged = finetuned
    only_val = _validation_only(data, tmp_path / "d", layout)
    # Without --nb_classes: the head it resumes decides, val.txt though a list cannot tell the classes.
    main_finetune.main(
        _without_nb_classes(_finetune_args(only_val, tmp_path / "e", "--eval", "--resume", str(trained)))
    )
    printed = capsys.readouterr().out
    assert f"from checkpoint {trained}: " in printed and "--nb_classes 3 --global_pool (flags not given)" in printed
    assert "27 validation images, 3 classes" in printed and " training and " not in printed
    assert float(re.search(r"\* Acc@1 ([\d.]+)", printed).group(1)) == pytest.approx(logged, abs=1e-3)


def test_eval_without_validation_images_says_where_they_go(finetuned, tmp_path):
    (tmp_path / "d").mkdir()
    args = _finetune_args(tmp_path / "d", tmp_path / "e", "--eval", "--resume", str(finetuned[0]))
    with pytest.raises(UserError, match=r"has no val/ or test/ class folders and no val.txt or test.txt list; give"):
        main_finetune.main(args)


def test_eval_refuses_class_folders_other_than_the_checkpoints(pipeline, finetuned, tmp_path):
    """A label is a class folder's position among the sorted names: 'cat' renamed 'zebra' makes the ship
    images label 1, scored against the head's 'cat' output. Training refuses such a resume; --eval compared
    train/ with val/ only, and scored both renamed alike without a word."""
    data, _, _ = pipeline
    trained, _ = finetuned
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for split in ("train", "val"):
        (copy / split / "cat").rename(copy / split / "zebra")
    refused = (
        rf"^--data_path {copy}: the class folders differ from those {trained} was trained on \(label 1: cat -> "
        r"ship\): its outputs would mean other classes; give the data it was trained on \(the folders as they were\)$"
    )
    with pytest.raises(UserError, match=refused):
        main_finetune.main(_finetune_args(copy, tmp_path / "e", "--eval", "--resume", str(trained)))


@pytest.mark.parametrize("classes", ["given", "counted"])
def test_eval_onto_another_number_of_class_folders_is_not_told_to_fine_tune(pipeline, finetuned, tmp_path, classes):
    """--eval --resume of validation folders fewer or more than the head's rows: the advice ended 'or fine-tune
    afresh into another --output_dir', which an evaluation (it trains nothing) cannot follow; the check of the
    folders' names already said it to training runs alone."""
    data, _, _ = pipeline
    trained, _ = finetuned
    copy = tmp_path / "data"
    shutil.copytree(data / "val", copy / "val")
    shutil.copytree(copy / "val" / "cat", copy / "val" / "dog")
    args = _finetune_args(copy, tmp_path / "e", "--eval", "--resume", str(trained))
    refused = (
        rf"^{copy / 'val'} has 4 class folders, but {trained}, which this run resumes, was trained on 3; give the "
        r"data it was trained on$"
    )
    with pytest.raises(UserError, match=refused):
        main_finetune.main(args if classes == "given" else _without_nb_classes(args))


def test_eval_writes_nothing_and_makes_no_folder(pipeline, finetuned, tmp_path):
    """No checkpoint, log.txt or TensorBoard events: --output_dir and --log_dir (by default --output_dir) were
    made and probed for writing all the same, so an evaluation with the default ./output_dir where it cannot be
    made was refused for a folder it never writes."""
    data, _, _ = pipeline
    out = tmp_path / "never" / "out"
    args = _finetune_args(data, out, "--eval", "--resume", str(finetuned[0]), "--log_dir", str(tmp_path / "tb"))
    main_finetune.main(args)
    args.log_dir = None  # TensorBoard's default: --output_dir
    main_finetune.main(args)
    assert not list(tmp_path.iterdir())


def test_eval_without_checkpoint_is_refused(pipeline, tmp_path):
    data, _, _ = pipeline
    with pytest.raises(UserError, match=r"--eval needs a model"):
        main_finetune.main(_finetune_args(data, tmp_path / "x", "--eval"))


@pytest.mark.parametrize("entry", ["pretrain --resume", "finetune --finetune"])
def test_an_opened_checkpoints_weights_are_let_go_before_training(pipeline, tmp_path, monkeypatch, entry):
    """The opened --resume (or --finetune) checkpoint was held for the whole run: on GPUs, where loading copies it to
    the device, a host copy of the weights and moments (three times the model) in every process. By the first
    epoch, its tensors are gone."""
    import gc
    import weakref

    import engine_finetune
    from util.checkpoint import opening

    data, ckpt, _ = pipeline
    held: list[weakref.ref] = []
    real_load, real_pretrain_epoch, real_finetune_epoch = (
        opening.load_checkpoint,
        main_pretrain.train_one_epoch,
        engine_finetune.train_one_epoch,
    )
    alive: list[bool] = []

    def load(path, *args, **kwargs):
        opened = real_load(path, *args, **kwargs)
        held.extend(weakref.ref(t) for t in opened["model"].values())
        return opened

    def probe(real):
        def epoch(*args, **kwargs):
            gc.collect()
            alive.append(any(ref() is not None for ref in held))
            return real(*args, **kwargs)

        return epoch

    monkeypatch.setattr(opening, "load_checkpoint", load)
    monkeypatch.setattr(main_pretrain, "train_one_epoch", probe(real_pretrain_epoch))
    monkeypatch.setattr(engine_finetune, "train_one_epoch", probe(real_finetune_epoch))
    if entry == "pretrain --resume":
        shutil.copytree(ckpt.parent, tmp_path / "pre")
        flags = ["--model", "mae_vit_mini_patch4", "--epochs", "2", "--vis_freq", "0", "--resume", "auto"]
        main_pretrain.main(pretrain_args(data, tmp_path / "pre", *flags, "--log_dir", ""))
    else:
        main_finetune.main(_finetune_args(data, tmp_path / "ft", "--finetune", str(ckpt), "--epochs", "1"))
    assert held and alive == [False]
