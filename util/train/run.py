"""What every training entry point does around its recipe: start-up, model wrapping, epochs, end of epoch."""

import argparse
import json
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from util.checkpoint.state import Position, TrainState, save_checkpoint
from util.cli.args import check_common, check_world, effective_lr, resolve_precision
from util.cli.log import log
from util.data import normalization
from util.outputs import check_output_dir
from util.train import distributed, interrupt
from util.train.progress import RunLog


def start(args: argparse.Namespace) -> torch.device:
    """Check the flags, join the process group, settle the values the run derives from its flags,
    seed, check the output folders and print the configuration.

    The derived values are written into ``args`` here and nowhere else: checkpoints store ``args``
    (the official format), so a resumed or fine-tuned run reads what this run really used."""
    check_common(args)
    distributed.init_distributed_mode(args)  # args.rank, .world_size, .gpu, .distributed (and .device on GPUs)
    check_world(args, distributed.world_size())
    # Check points (logging, finiteness, checkpoints) sit on optimizer steps: a multiple of --accum_iter.
    args.print_freq = math.ceil(args.print_freq / args.accum_iter) * args.accum_iter
    normalization.resolve(args, normalization.run_sources(args))  # args.mean, args.std
    args.precision = resolve_precision(args.precision, args.device)
    args.lr_given = args.lr is not None  # for messages that say which flag to lower
    args.lr = effective_lr(args, distributed.world_size())
    if distributed.is_main_process():  # only rank 0 writes
        for flag, path in (("--output_dir", args.output_dir), ("--log_dir", args.log_dir)):
            if path:
                check_output_dir(path, flag)

    seed = args.seed + distributed.rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    interrupt.install()

    log.info(f"job dir: {os.path.dirname(os.path.realpath(__file__ + '/..'))}")
    log.info(json.dumps({k: v for k, v in vars(args).items()}, default=str, indent=1))
    eff_batch = args.batch_size * args.accum_iter * distributed.world_size()
    log.info(f"precision: {args.precision}  effective batch: {eff_batch}  lr: {args.lr:.3e} (base lr {args.blr:.3e})")
    return torch.device(args.device)


def wrap_for_training(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """DistributedDataParallel when distributed, then torch.compile when asked for."""
    wrapped = model
    if args.distributed:
        device_ids = [args.gpu] if str(args.device).startswith("cuda") else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def epochs_left(position: Position, loader: DataLoader, args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """(epoch, first iteration) for every epoch from ``position`` to ``args.epochs``; each epoch's
    sampler is set to skip the samples a resumed run already trained on."""
    for epoch in range(position.epoch, args.epochs):
        start_step = position.step if epoch == position.epoch else 0
        loader.sampler.set_epoch(epoch, skip=start_step * args.batch_size)
        yield epoch, start_step


def end_epoch(state: TrainState, epoch: int, stats: dict[str, Any], run_log: RunLog) -> str | None:
    """Checkpoint (atomically), prune old checkpoints and append the epoch's line to log.txt;
    returns the checkpoint's path (None without ``--output_dir``).

    The line goes into the checkpoint's log history first and into log.txt after the checkpoint:
    a kill in between loses nothing, since resuming rewrites log.txt from that history."""
    args = state.args
    path = None
    run_log.record({**stats, "epoch": epoch})
    if args.output_dir:
        path = save_checkpoint(state, epoch)  # also prunes
    run_log.write()
    return path


def stop_requested(args: argparse.Namespace) -> bool:
    """Whether a stop signal reached any rank; every rank gets the same answer (a collective)."""
    return distributed.any_rank(interrupt.requested(), args.device)
