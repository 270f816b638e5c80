"""What every training entry point does before its recipe: check the flags, join the process group,
open the checkpoints it starts from (each once), settle the flags, seed; and wrap the model."""

import argparse
import copy
import functools
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util import memory
from util.atomic import remove_stale_temporaries, temporary_path
from util.checkpoint.consistency import check_kind
from util.checkpoint.files import list_checkpoints
from util.checkpoint.flags import fill_from_checkpoints
from util.checkpoint.load import model_state
from util.checkpoint.opening import Opened, open_checkpoint, open_on_every_rank
from util.checkpoint.resume import open_resume, weights_only
from util.claim import appears, claim_output_dir, release_output_dirs
from util.cli.args import check_same_flags, check_same_precision, check_world, effective_lr, resolve_precision
from util.cli.errors import UserError, fail, listed_ranks
from util.cli.log import log
from util.data import normalization
from util.outputs import check_output_dir
from util.train import distributed, interrupt
from util.train.launch_env import launcher_restarts
from util.train.precision import fast_cuda_math


@dataclass(frozen=True)
class Run:
    """A started run: its settled flags (what its checkpoints store; nothing changes them later),
    its device, the checkpoints it continues (``--resume``) or starts from (``--finetune``), and
    which flags those checkpoints gave ({flag: "checkpoint PATH"})."""

    args: argparse.Namespace
    device: torch.device
    resume_from: Opened | None
    init_from: Opened | None
    origins: dict[str, str] = field(default_factory=dict)

    def release_checkpoints(self) -> None:
        """Let go of the opened checkpoints' weights and optimizer state once they are loaded. Held, they stayed in
        host memory for the whole run: on GPUs, where loading copies them to the device, about three times the
        model's size per process (4.0 GB for ViT-L pre-training, 7.9 GB for ViT-H); on the CPU, the model's."""
        for opened in (self.resume_from, self.init_from):
            if opened is not None:
                opened.ckpt.clear()

    def channels_fixed_by(self) -> str:
        """The checkpoint whose weights take this run's channels only, which an image of other channels is told of
        (``util.data.images.load_channels``), or '': the one it resumes, or a --finetune one of as many channels
        (only RGB weights are adapted, to 1 channel). Told to give --in_chans instead, such an image led to a load
        that refused it. RGB runs read every file as RGB and never tell. Read before ``release_checkpoints``."""
        if self.args.in_chans == 3:
            return ""
        if self.resume_from is not None:
            return f"the model of {self.resume_from.path}"
        if self.init_from is None:
            return ""
        try:
            weight = model_state(self.init_from.ckpt, self.init_from.path).get("patch_embed.proj.weight")
        except UserError:  # the encoder's load says what is wrong with the file, after the data are checked
            return ""
        fixed = weight is not None and weight.ndim == 4 and weight.shape[1] == self.args.in_chans
        return f"the model of {self.init_from.path}" if fixed else ""

    def place(self, model: torch.nn.Module) -> None:
        """Move ``model``, with --grad_checkpointing as asked, onto the run's device; a training run whose step
        cannot fit there stops now, in one line (``memory.check_training_fits``: the weights that require no
        gradient, the probe's frozen encoder, are sized as frozen; --eval is not sized)."""
        model.set_grad_checkpointing(self.args.grad_checkpointing)
        model.to(self.device)
        if not getattr(self.args, "eval", False):
            memory.check_training_fits(model, self.args, self.device)

    @property
    def size_source(self) -> str:
        """The checkpoint ``--input_size`` was read from ("" when given or a fallback): the model's
        size check blames it, not a flag the user never gave."""
        return self.origins.get("input_size", "")


def start(flags: argparse.Namespace, fallbacks: dict[str, Any] | None = None, kind: str = "") -> Run:
    """Join the process group, check the output folders (a training run claims --output_dir), open
    the checkpoints, settle the flags, seed and print the configuration (the entry point's
    ``check_args`` checked the flags). ``fallbacks``: flags whose None means "the checkpoint's, else
    this"; ``kind``: the KINDS key of the entry point's model, which a --resume checkpoint must hold. The
    settled values are set on a copy of ``flags``, here and nowhere else, since checkpoints store the args
    (the official format): a resumed or fine-tuned run reads what this run really used."""
    args = copy.copy(flags)
    if args.log_dir is None:
        args.log_dir = args.output_dir  # TensorBoard's events beside the run's checkpoints
    distributed.init_distributed_mode(args)  # args.rank, .world_size, .gpu, .distributed (and .device on GPUs)
    check_same_flags(distributed.gather(vars(flags)))  # each node's torchrun was given its own command
    check_world(args, distributed.world_size())

    training = bool(args.output_dir) and not getattr(args, "eval", False)
    args.resume = resume_after_restart(args, training)
    # The other ranks wait for it too, or they resume another checkpoint than rank 0's. An evaluation (--eval)
    # writes nothing, so no folder is made or must be writable for it (a default ./output_dir in a read-only place).
    if not getattr(args, "eval", False):
        distributed.on_rank_0_for_every_rank(lambda: check_outputs(args, training))
    if training:
        check_seen_by_every_rank(args.output_dir)
    resume_from, init_from = open_checkpoints(args, training)
    finetune = finetune_flag(args)
    if finetune and args.output_dir:  # read or not: its pruning would delete it all the same
        distributed.on_rank_0_for_every_rank(lambda: check_not_among_outputs(finetune, args.output_dir))
    if kind and resume_from is not None:
        # Before the flags it decides, and the data: an MAE resumed by fine-tuning on list files was told to give
        # --nb_classes (a classifier's head gives it), and only once given it that it holds no classifier.
        saved = model_state(resume_from.ckpt, resume_from.path)
        check_kind(saved, kind, resume_from.path, getattr(args, "eval", False))
    origins = settle(args, [s for s in (resume_from, init_from) if s is not None], fallbacks or {}, resume_from)

    seed_everything(args.seed + distributed.rank())
    if torch.cuda.is_available():
        fast_cuda_math()
    interrupt.install()
    log_configuration(args)
    return Run(args, torch.device(args.device), resume_from, init_from, origins)


def check_outputs(args: argparse.Namespace, training: bool) -> None:
    """The output folders, on rank 0 (only it writes); a training run claims --output_dir."""
    for flag, path in (("--output_dir", args.output_dir), ("--log_dir", args.log_dir)):
        if path:
            check_output_dir(path, flag)
    if training:
        # Before the checkpoint it resumes is read: a run that waited for another would resume a stale one.
        claim_output_dir(args.output_dir, "--output_dir")
        if not args.resume:
            check_no_earlier_run(args.output_dir)


def open_checkpoints(args: argparse.Namespace, training: bool) -> tuple[Opened | None, Opened | None]:
    """The checkpoints the run continues (``--resume``) and starts from (``--finetune``), each read once,
    the same file on every rank; None where there is none, or where the resumed run holds --finetune's
    weights already."""
    resume_from = open_resume(args)
    # --resume PATH of weights only (an official release): a new run from those weights, at --start_epoch.
    if training and args.resume != "auto" and resume_from is not None and weights_only(resume_from.ckpt):
        distributed.on_rank_0_for_every_rank(lambda: check_no_earlier_run(args.output_dir, resume_from.path))
    finetune = finetune_flag(args)
    if not finetune:
        return resume_from, None
    if resume_from is not None and not weights_only(resume_from.ckpt):
        # The resumed weights replace the encoder's: a file gone since the run began stopped its resume.
        log.info(f"--finetune {finetune} is not read: the run goes on from {resume_from.path}, which holds its weights")
        return resume_from, None
    # Every rank reads it: the same file everywhere, or every rank stops.
    return resume_from, open_on_every_rank(lambda: open_checkpoint(finetune), finetune, "--finetune")


def finetune_flag(args: argparse.Namespace) -> str:
    """The --finetune checkpoint this run starts from: none for the probe's and fine-tuning's --eval, which
    evaluates the --resume checkpoint, nor for pre-training, which has no such flag."""
    return "" if getattr(args, "eval", False) else getattr(args, "finetune", "")


def settle(
    args: argparse.Namespace, sources: list[Opened], fallbacks: dict[str, Any], resumed: Opened | None = None
) -> dict[str, str]:
    """Fill the flags the user left to the checkpoints ``sources`` (``fallbacks``; a classifier's classes and
    pooling to ``resumed``, the one it continues) and derive what the run needs from the flags: print_freq on
    whole optimizer steps, mean/std, the precision, the effective lr. Returns which flags the checkpoints gave
    ({flag: "checkpoint PATH"})."""
    origins = fill_from_checkpoints(args, sources, fallbacks, resumed)
    # Check points (logging, finiteness, checkpoints) sit on optimizer steps: a multiple of --accum_iter.
    args.print_freq = math.ceil(args.print_freq / args.accum_iter) * args.accum_iter
    stored = [(f"checkpoint {s.path}", s.args) for s in sources]
    normalization.resolve(args, stored, origins.get("in_chans", ""))  # args.mean, args.std
    args.precision = resolve_precision(args.precision, args.device)
    check_same_precision(distributed.gather(args.precision))  # 'auto' is each node's GPUs' choice
    args.lr_given = args.lr is not None  # for messages that say which flag to lower
    args.lr = effective_lr(args, distributed.world_size())
    return origins


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (each rank its own ``seed``: the run's --seed plus its rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def log_configuration(args: argparse.Namespace) -> None:
    log.info(f"job dir: {Path(__file__).resolve().parents[2]}")  # the scripts' folder, as the official ones print
    log.info(json.dumps(vars(args), default=str, indent=1))
    eff_batch = args.batch_size * args.accum_iter * distributed.world_size()
    base_lr = args.lr * 256 / eff_batch  # as the official code prints it: --blr is unused where --lr is given
    log.info(f"precision: {args.precision}  effective batch: {eff_batch}  lr: {args.lr:.3e} (base lr {base_lr:.3e})")


def resume_after_restart(args: argparse.Namespace, training: bool) -> str:
    """``--resume`` for processes a launcher started again with their command (``launcher_restarts``): 'auto'
    once the run has saved a checkpoint in --output_dir (rank 0's view), else as given. As given, they started
    over, or went back to the --resume PATH they began from, or were refused for the checkpoints the run had
    saved, so that no restart could help. Decided on every rank alike: torchrun counts a node's restarts on that
    node alone, and not a restart it makes because another node's processes failed (a membership change), so
    ranks decided on their own count hung, some asking rank 0 whether the run had saved."""
    if not training or args.resume == "auto":  # the same on every rank (check_same_flags)
        return args.resume
    restarts = max(distributed.gather(launcher_restarts(os.environ)))
    if not restarts:
        return args.resume
    saved = distributed.from_main(bool(list_checkpoints(args.output_dir)) if distributed.is_main_process() else None)
    if not saved:
        return args.resume
    log.info(f"restart {restarts} of this job by its launcher: it continues from --output_dir with --resume auto")
    return "auto"


def finish() -> None:
    """What a finished run gives back to its process: the process group and the stop signals (Ctrl-C in
    a notebook). A failed run keeps them until the process ends; its --output_dir goes back however it
    ends (``gives_back_output_dir``)."""
    distributed.cleanup()
    interrupt.uninstall()


def gives_back_output_dir(main: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """An entry point's ``main`` that gives back the --output_dir its run claimed however the run ends.
    A run stopped (Ctrl-C) or failed in a notebook would otherwise hold the folder until the kernel
    ends, and the ``--resume auto`` its message advises, run from a shell, be refused as a second run."""

    @functools.wraps(main)
    def run_main(flags: argparse.Namespace) -> None:
        try:
            main(flags)
        finally:
            release_output_dirs()

    return run_main


def check_no_earlier_run(output_dir: str, start: str = "") -> None:
    """Refuse to start a run afresh (no ``--resume``, or weights only: ``start``) in a folder that holds
    checkpoints: it would replace some (its checkpoint-0.pth, ...), prune others and rewrite log.txt, and a later
    ``--resume auto`` would take whichever is newest, of either run. Pre-training's folder given to fine-tuning
    (the official defaults share ./output_dir) lost its checkpoints so."""
    if found := list_checkpoints(output_dir):
        names = os.path.basename(found[-1]) + (f" and {len(found) - 1} more" if len(found) > 1 else "")
        afresh = f" (it starts afresh: {start} holds weights only)" if start else ""
        fail(
            f"--output_dir {output_dir} holds the checkpoints of an earlier run ({names}), which this run would "
            f"replace or delete{afresh}: continue that run with --resume auto, or give another --output_dir"
        )


# How long the other ranks look for the file rank 0 made in --output_dir: a new name is looked up on the
# server at once by an NFS client (it caches only names it has looked up), so this is only a margin.
SEEN_WAIT_S = 10.0
# The file is a temporary of this name (``temporary_path``): one a killed run left is stale like any other.
SEEN_MARKER = ".seen-by-every-rank"


def check_seen_by_every_rank(output_dir: str) -> None:
    """Stop every rank of a training job unless each sees a file rank 0 makes in ``output_dir``. Only
    rank 0 writes there, so a folder on each node's local disk trains; but a job continued with
    ``--resume auto`` (by hand, or requeued by SLURM onto other nodes) would find its checkpoints on one
    node only: stopped there if another rank cannot read the one rank 0 resumes, started from scratch
    where rank 0's node has none."""
    if distributed.world_size() == 1:
        return
    marker = None
    if distributed.is_main_process():
        # Those of a run killed in between: the folder is this run's now.
        remove_stale_temporaries(output_dir, lambda name: name == SEEN_MARKER)
        marker = temporary_path(os.path.join(output_dir, SEEN_MARKER))
        open(marker, "w").close()
    path = os.path.join(output_dir, str(distributed.from_main(os.path.basename(marker or ""))))
    seen = distributed.gather(appears(path, SEEN_WAIT_S))
    if marker is not None:
        os.remove(marker)
    if blind := [rank for rank, saw in enumerate(seen) if not saw]:
        fail(
            f"--output_dir {output_dir}: rank(s) {listed_ranks(blind)} of {len(seen)} do not see the files "
            f"rank 0 writes there (a folder on each node's local disk?), so a job continued with --resume auto "
            f"would not find its checkpoints on every node; put --output_dir on storage every node of the job shares"
        )


def check_not_among_outputs(finetune: str, output_dir: str) -> None:
    """Refuse a ``--finetune`` checkpoint that is one of ``output_dir``'s checkpoints: this run's own
    of the same name would replace it, and its pruning may delete it (with the log.txt beside it)."""
    if not os.path.isfile(finetune):
        return  # a URL's copy lives in torch.hub's cache
    if any(os.path.samefile(finetune, path) for path in list_checkpoints(output_dir)):
        fail(
            f"--finetune {finetune} is a checkpoint in --output_dir {output_dir}, where this run writes and "
            f"prunes its own: it would be replaced or deleted; give another --output_dir"
        )


def wrap_for_training(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """DistributedDataParallel when distributed, then torch.compile when asked for."""
    wrapped = model
    if args.distributed:
        device_ids = [args.gpu] if str(args.device).startswith("cuda") else None
        # The gradients are views into DDP's all-reduce buckets, not a second gradient-sized copy beside them
        # (copied each way per step); util.memory counts none. The same weights, bitwise, on CPU. Peak RSS per
        # rank, 2 gloo ranks, mae_vit_base_patch16 (0.42 GiB of gradients), --input_size 64, --batch_size 4,
        # fp32, torch 2.14: 2.70 GiB without, 2.33-2.37 with.
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    if args.compile:
        # Static shapes: the training batches all have one shape (the training loaders drop a short last batch) and
        # evaluation has two (full, and the short last one). By default dynamo's "automatic dynamic shapes" compiled
        # the short evaluation batch with a dynamic batch dimension, and that graph then served every full evaluation
        # batch of the later epochs (the static one went unused); with --dist_eval, whose shards differ from the
        # training batch, every evaluation batch ran dynamic. Static, each shape has its own specialised graph: three
        # at most (train, full and short evaluation batch), far below torch._dynamo.config.recompile_limit (8),
        # past which dynamo would run the rest of the run eagerly. tests/test_compile.py counts them.
        wrapped = torch.compile(wrapped, dynamic=False)
    return wrapped
