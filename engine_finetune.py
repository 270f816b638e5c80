"""Classification: one training epoch, evaluation, and the epoch loop shared by fine-tuning and
linear probing."""

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import models_vit
from util.checkpoint.consistency import check_evaluated_classes, check_same_data
from util.checkpoint.encoder import load_pretrained_encoder
from util.checkpoint.flags import head_flags
from util.checkpoint.resume import resume
from util.checkpoint.state import Position, TrainState
from util.cli.errors import UserError
from util.cli.log import log
from util.data.channels import image_loader
from util.data.datasets import class_count, classification_splits, validation_split
from util.data.loaders import batches, eval_loader, eval_transform, train_loader
from util.lr_sched import adjust_learning_rate
from util.train import distributed
from util.train.checkpointer import Checkpointer, training
from util.train.precision import LossScaler, autocast
from util.train.run import Run, finish, wrap_for_training
from util.train.steps import accumulating, optimizer_step, to_device


def data_classes(args: argparse.Namespace) -> tuple[str, int]:
    """--nb_classes where neither given nor the --resume head's: the class folders of the split the run reads
    first (--eval: the validation split), listed by name before the model is built; list files are refused.
    Where the data set will refuse the folder, the official 1000 (ImageNet's), said by no line: the model's
    own checks come first, as with the flag given."""
    return class_count(args.data_path, args.eval) or ("", 1000)


# What --model, --input_size, --in_chans, --crop_pct and --nb_classes mean when not given and no checkpoint decides
# them (--crop_pct None: the official rule), so that --eval --resume evaluates as the run did; --nb_classes is
# counted in the data (official: 1000, ImageNet's, which a user's own class folders had to override); --global_pool's
# is each entry point's own (``fallbacks``).
FALLBACKS = {
    "model": "vit_large_patch16", "input_size": 224, "in_chans": 3, "crop_pct": None, "nb_classes": data_classes,
}  # fmt: skip


def fallbacks(global_pool: bool) -> dict[str, Any]:
    """FALLBACKS with the entry point's pooling: fine-tuning's global pooling, the probe's class token."""
    return {**FALLBACKS, "global_pool": global_pool}


def classifier_and_data(
    run: Run, train_transform: Callable, head_init_std: float, **model_kwargs: Any
) -> tuple[models_vit.VisionTransformer, Dataset | None, Dataset]:
    """The ``--model`` classifier, with the ``--finetune`` encoder in it (the head drawn with
    ``head_init_std``), and the training (``train_transform``; None for --eval) and validation sets of
    ``--data_path``."""
    args = run.args
    model = models_vit.create_model(
        args.model,
        args.input_size,
        args.in_chans,
        num_classes=args.nb_classes,
        global_pool=args.global_pool,
        size_source=run.size_source,
        **model_kwargs,
    )
    val_transform = eval_transform(args.input_size, args.mean, args.std, args.in_chans, args.crop_pct)
    read_image = image_loader(args.in_chans, run.channels_fixed_by())  # a file's pixels (not a DataLoader)
    trained_on = _trained_on(run, args.nb_classes)
    if args.eval:  # the validation images alone: a machine given only them evaluates, and no time goes on listing
        train_set = None
        val_set = validation_split(
            args.data_path, val_transform, args.nb_classes, loader=read_image, resumed_from=trained_on
        )
        log.info(f"{len(val_set)} validation images, {args.nb_classes} classes")
    else:
        train_set, val_set = classification_splits(
            args.data_path, train_transform, val_transform, args.nb_classes, loader=read_image, resumed_from=trained_on
        )
        log.info(f"{len(train_set)} training and {len(val_set)} validation images, {args.nb_classes} classes")
    if run.init_from is not None:
        load_pretrained_encoder(model, run.init_from, head_init_std=head_init_std)
    return model, train_set, val_set


def _trained_on(run: Run, nb_classes: int) -> str:
    """The checkpoint this run resumes, where its head has ``nb_classes`` rows (args or not: an official release
    stores none, and other class folders were told to give --nb_classes of their count, which its head refused);
    else ''."""
    resumed = run.resume_from
    if resumed is None:
        return ""
    try:
        rows = head_flags(resumed).get("nb_classes")
    except UserError:  # the load says what is wrong with the file, after the data are checked
        return ""
    return resumed.path if rows == nb_classes else ""


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    state: TrainState,
    epoch: int,
    checkpointer: Checkpointer,
    criterion: torch.nn.Module,
    mixup_fn: Callable | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    """Train the classifier ``model`` (possibly DDP-wrapped or compiled) for the rest of ``epoch``,
    from iteration ``start_step`` on; returns the epoch's average loss and lr over every rank's iterations."""
    args, optimizer, scaler = state.args, state.optimizer, state.scaler
    device = torch.device(args.device)
    model.train(True)
    progress = checkpointer.epoch(epoch, start_step, len(loader))
    accumulation = progress.accumulation
    for step, batch in progress.iterate(loader):
        if accumulation.starts(step):  # the lr follows the schedule per optimizer step
            lr = adjust_learning_rate(optimizer, epoch + step / progress.total, args)
        samples, targets = to_device(batch, device)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = accumulation.ends(step)
        with accumulating(model, update):
            with autocast(args.precision, args.device):
                loss = criterion(model(samples), targets)
            scaler.scale(loss / accumulation.size(step)).backward()
        if update:
            optimizer_step(model, optimizer, scaler, args.clip_grad)
        progress.after_step(step, loss, lr)  # logs; at check points: finiteness, mid-epoch saves, stops
    return progress.averages()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, args: argparse.Namespace) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy. With ``--dist_eval`` each rank scores its
    own shard (no padding) and the sums are added over ranks, so every image counts once."""
    model.eval()
    device = torch.device(args.device)
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    for images, targets in batches(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(args.precision, args.device):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        sums += torch.stack(
            [
                criterion(logits, targets).double(),
                hits[:, :1].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.full((), len(targets), dtype=torch.float64, device=device),  # no host-to-device copy
            ]
        )
    loss, top1, top5, count = distributed.all_reduce_sum(sums.tolist(), device) if args.dist_eval else sums.tolist()
    stats = {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss / count, "images": int(count)}
    log.info(
        f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({stats['images']} images)"
    )
    return stats


def train_or_evaluate(
    run: Run,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Dataset | None,
    val_set: Dataset,
    criterion: torch.nn.Module,
    mixup_fn: Callable | None = None,
) -> None:
    """Resume (``--resume``), wrap for DDP/compile, then evaluate only (``--eval``) or train."""
    args = run.args
    state = TrainState(model, optimizer, LossScaler(args.precision), args)
    position = resume(state, run.resume_from)
    if args.eval:
        check_evaluated_classes(run.resume_from, val_set, args)
    else:
        check_same_data(state, train_set, position)
    run.release_checkpoints()  # both loaded (the encoder by classifier_and_data): their copies are not needed
    wrapped_model = wrap_for_training(model, args)  # DDP and/or compiled: what the steps call
    val_loader = eval_loader(val_set, args)
    if args.eval:
        evaluate(wrapped_model, val_loader, args)
    else:
        fit(wrapped_model, state, position, train_loader(train_set, args), val_loader, criterion, mixup_fn)
    del wrapped_model  # before the process group goes: distributed.cleanup says why
    finish()


def fit(
    wrapped_model: torch.nn.Module,
    state: TrainState,
    position: Position,
    train_loader: DataLoader,
    val_loader: DataLoader,
    criterion: torch.nn.Module,
    mixup_fn: Callable | None = None,
) -> None:
    """Train from ``position`` to ``args.epochs``, evaluating after every epoch and keeping the
    best top-1 in the checkpoint (``extra['max_accuracy']``).

    An epoch is checkpointed before it is evaluated, so that a failing evaluation (a bad
    validation image, say) cannot cost the epoch. Its checkpoint thus holds the best top-1 of the
    epochs before it, and the epoch's training stats under ``extra['unevaluated']``: a run
    resumed from it evaluates that epoch first, and logs it, as the uninterrupted run did.
    """
    args = state.args
    state.extra.setdefault("max_accuracy", 0.0)
    with training(state, position, len(train_loader)) as checkpointer:
        if checkpointer.resumed_unevaluated(position):
            _evaluate_epoch(wrapped_model, val_loader, checkpointer)
        for epoch in range(position.epoch, args.epochs):
            start_step = position.steps_done(epoch)
            train_loader.sampler.set_epoch(epoch, skip=start_step * args.batch_size)  # skips what was trained
            train_stats = train_one_epoch(
                wrapped_model, train_loader, state, epoch, checkpointer, criterion, mixup_fn, start_step
            )
            checkpointer.end_epoch_before_evaluating(epoch, train_stats)  # its log line comes with the evaluation
            checkpointer.stop_if_requested()  # the resumed run evaluates this epoch
            _evaluate_epoch(wrapped_model, val_loader, checkpointer)


def _evaluate_epoch(wrapped_model: torch.nn.Module, val_loader: DataLoader, checkpointer: Checkpointer) -> None:
    """Evaluate the epoch in ``extra['unevaluated']`` (the model is as it ended) if ``--eval_freq``
    asks for it, update the best top-1 and append the epoch's line to log.txt (``log_evaluated``: the
    run's final checkpoint holds the best top-1 of every epoch). (A stop asked for while evaluating is
    taken at the next epoch's first check point.)"""
    state, run_log = checkpointer.state, checkpointer.run_log
    args = state.args
    epoch, trained = checkpointer.take_unevaluated()
    train_stats = {f"train_{k}": v for k, v in trained.items()}
    # The official log.txt lines end with the trained parameter count (the probe's: its head).
    n_parameters = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    if (epoch + 1) % args.eval_freq and epoch != args.epochs - 1:
        checkpointer.log_evaluated({**train_stats, "epoch": epoch, "n_parameters": n_parameters})
        return
    test_stats = evaluate(wrapped_model, val_loader, args)
    best = state.extra["max_accuracy"] = max(state.extra["max_accuracy"], test_stats["acc1"])
    log.info(
        f"accuracy of the network on the {test_stats['images']} test images: {test_stats['acc1']:.1f}%; "
        f"max accuracy: {best:.2f}%"
    )
    # Against the epoch, as the official code draws them (training's scalars: against epoch x 1000).
    run_log.scalars(epoch, **{f"perf/test_{k}": test_stats[k] for k in ("acc1", "acc5", "loss")})
    test = {f"test_{k}": v for k, v in test_stats.items()}
    line = {**train_stats, **test, "max_accuracy": best, "epoch": epoch, "n_parameters": n_parameters}
    checkpointer.log_evaluated(line)
