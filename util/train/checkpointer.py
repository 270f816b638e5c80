"""When a run checks its progress, saves and stops: one owner for all three decisions.

Training checks its progress at *check points*: every ``--print_freq`` iterations, every
``--ckpt_every_steps``, and at each epoch's last iteration, all on optimizer steps. A check point
reads the losses since the last one in a single host sync (the GPU is never waited on at every
step), stops the run on a non-finite loss before anything is saved, and logs. Then, inside an
epoch, it saves when ``--ckpt_every_steps`` is due or a stop signal reached any rank, and stops
after that save. Every epoch ends with a checkpoint (``end_epoch``).
"""

import contextlib
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from util.checkpoint.consistency import check_schedule
from util.checkpoint.rng import capture_rng
from util.checkpoint.state import Position, TrainState, prune_checkpoints, save_checkpoint, tensor_bytes
from util.cli.errors import NonFiniteLoss, divergence_advice, fail
from util.cli.log import log
from util.data.loaders import batches
from util.lars import LARS
from util.train import distributed, interrupt
from util.train.progress import MetricLogger, RunLog, SmoothedValue, format_duration, tensorboard_step
from util.train.steps import Accumulation


def steady_pace(seconds: float, iterations: int, first: float | None) -> float:
    """Seconds per iteration of ``iterations`` that took ``seconds``, the ``first`` one's seconds (if given) left
    out where others follow it: a process's first step compiles (--compile, for a minute or more) and warms the
    GPU up, and each epoch's first waits for the loader's first batches. Counted in, it made a run's early
    estimates of the time left many times too long (the 2-core CPU: 83 s of compiling against 0.7 s epochs)."""
    if first is not None and iterations > 1:
        return (seconds - first) / (iterations - 1)
    return seconds / max(iterations, 1)


def stop_requested(device: str) -> bool:
    """Whether a stop signal reached any rank; every rank gets the same answer (a collective), and learns
    which preemption signals reached any rank (``interrupt.agree``), for the launcher to hand over."""
    mine = interrupt.received()
    counts = distributed.all_reduce_sum(
        [float(interrupt.requested()), *(float(s in mine) for s in interrupt.PREEMPTION_SIGNALS)], device
    )
    interrupt.agree({s for s, n in zip(interrupt.PREEMPTION_SIGNALS, counts[1:], strict=True) if n > 0})
    return counts[0] > 0


class Checkpointer:
    """Saves ``state`` and decides when to stop; the only caller of ``save_checkpoint``."""

    def __init__(self, state: TrainState, run_log: RunLog):
        self.state, self.run_log = state, run_log
        self.last_saved: str | None = None  # what a stop names as the place to continue from

    def epoch(self, epoch: int, start_step: int, iterations: int) -> "EpochProgress":
        """The check points of ``epoch``, whose ``iterations`` are left from ``start_step`` on."""
        return EpochProgress(self, epoch, start_step, start_step + iterations)

    def save(self, epoch: int, step: int | None = None) -> str | None:
        self.last_saved = save_checkpoint(self.state, epoch, step)
        return self.last_saved

    def end_epoch(self, epoch: int, line: dict[str, Any] | None = None) -> None:
        """Save the epoch's checkpoint, with its log.txt ``line`` when given.

        The line goes into the checkpoint's log history first and into log.txt after the
        checkpoint: a kill in between loses nothing, since resuming rewrites log.txt from it."""
        if line is not None:
            self.run_log.record(line)
        self.save(epoch)
        self.run_log.write()

    def end_epoch_before_evaluating(self, epoch: int, train_stats: dict[str, float]) -> None:
        """Save the epoch's checkpoint before its evaluation, which reads files training does not (a validation or
        k-NN image that is bad, or of other channels) and may fail: that costs no training. The checkpoint holds the
        epoch's ``train_stats`` under ``extra['unevaluated']`` and not yet its log.txt line, which comes with the
        evaluation (``take_unevaluated``, ``log_evaluated``); a run resumed from it evaluates the epoch first."""
        self.state.extra["unevaluated"] = {"epoch": epoch, "train_stats": train_stats}
        self.end_epoch(epoch)

    def resumed_unevaluated(self, position: Position) -> bool:
        """Whether the run resumes the checkpoint of an epoch saved before its evaluation: it evaluates it first."""
        pending = self.state.extra.get("unevaluated")
        return pending is not None and position == Position(pending["epoch"] + 1)

    def take_unevaluated(self) -> tuple[int, dict[str, float]]:
        """The epoch left unevaluated and its training stats, which the next checkpoint no longer carries."""
        pending = self.state.extra.pop("unevaluated")
        return pending["epoch"], pending["train_stats"]

    def log_evaluated(self, line: dict[str, Any]) -> None:
        """Append the evaluated epoch's ``line`` to log.txt (the next checkpoint carries it). The last epoch's
        checkpoint is written again, so that the run's final checkpoint holds the line and what the evaluation
        changed (fine-tuning's best top-1)."""
        self.run_log.epoch(line)
        if line["epoch"] == self.state.args.epochs - 1:
            self.save(line["epoch"])

    def stop_if_requested(self) -> None:
        """Stop after the last save (``--resume auto`` goes on from it) when a signal asked for it."""
        if stop_requested(self.state.args.device):
            raise interrupt.Interrupted(self.last_saved, self.state.args.output_dir)


class EpochProgress:
    """One epoch's progress lines, check points and mid-epoch saves (see the module docstring)."""

    def __init__(self, owner: Checkpointer, epoch: int, start_step: int, total: int):
        args = owner.state.args
        self.owner, self.args, self.epoch, self.start_step, self.total = owner, args, epoch, start_step, total
        self.accumulation = Accumulation(args.accum_iter, total)
        self.metrics = MetricLogger()
        self.metrics.add_meter("lr", SmoothedValue(window=1, fmt="{value:.6f}"))
        state = owner.state
        saved = state.meters  # the epoch's sums up to the mid-epoch checkpoint this run resumed from
        if start_step and saved and (saved["epoch"], saved["step"]) == (epoch, start_step):
            self.metrics.load_sums(this_ranks_sums(saved["sums"]))  # the epoch's average then covers all of it
        state.meters = None
        self.pending: list[torch.Tensor] = []
        self.lr = 0.0

    def iterate(self, loader: Iterable) -> Iterator[tuple[int, Any]]:
        """(iteration, batch) from ``start_step`` on, with a progress line (position, meters, timings,
        ETA) where ``_line_due``; the line follows ``after_step``, so it shows its losses."""
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        header, width, delimiter = f"Epoch: [{self.epoch}]", len(str(self.total)), self.metrics.delimiter
        begin = end = time.time()
        first = None  # this epoch's first iteration's seconds (steady_pace leaves them out)
        for step, batch in enumerate(batches(loader), self.start_step):
            data_time.update(time.time() - end)
            yield step, batch
            iter_time.update(time.time() - end)
            first = iter_time.value if iter_time.count == 1 else first
            if self._line_due(step):
                eta = format_duration(steady_pace(iter_time.total, iter_time.count, first) * (self.total - step - 1))
                position = f"{header} [{step + 1:>{width}}/{self.total}]"
                fields = [position, f"eta: {eta}", str(self.metrics), f"time: {iter_time}", f"data: {data_time}"]
                log.info(delimiter.join(fields))
            end = time.time()
        pace = self._pace(time.time() - begin, max(iter_time.count, 1), first)
        log.info(f"{header} total time: {pace}")

    def _pace(self, elapsed: float, iterations: int, first: float | None = None) -> str:
        """The epoch's time, s / it and images/s (all ranks), and the training time the epochs after it will take
        at the pace after its ``first`` iteration's seconds: what a long run's user wants at each epoch's end."""
        per_it, args = elapsed / iterations, self.args
        images_per_second = args.batch_size * distributed.world_size() / max(per_it, 1e-9)
        pace = f"{format_duration(elapsed)} ({per_it:.4f} s / it, {images_per_second:.1f} img/s)"
        if left := args.epochs - self.epoch - 1:
            more = format_duration(steady_pace(elapsed, iterations, first) * self.total * left)
            pace += f"; {left} more epoch{'s' if left > 1 else ''} of training at this pace: about {more}"
        return pace

    def _line_due(self, step: int) -> bool:
        """Check points: every ``--print_freq``, the last iteration and the first (it shows that
        training runs, and its pace)."""
        return (step + 1) % self.args.print_freq == 0 or step in (self.start_step, self.total - 1)

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Keep ``loss`` for the next check point; at a check point, check and log the losses, and
        save and stop when that is due (inside the epoch: its end is ``Checkpointer.end_epoch``'s)."""
        self.pending.append(loss.detach())
        self.lr = lr
        # Every iteration, not at check points: the epoch's average lr must not depend on where they
        # fall (a resumed run has its first line, and so a check point, at another iteration).
        self.metrics.update(lr=lr)
        args, last = self.args, step == self.total - 1
        save_now = bool(args.ckpt_every_steps) and (step + 1) % args.ckpt_every_steps == 0
        if not (self._line_due(step) or save_now):
            return
        self._check_and_log(step)  # finiteness first: a checkpoint never holds what a bad step made
        if not self.accumulation.ends(step) or last:
            return  # positions are saved on optimizer steps only; the epoch's end is end_epoch's
        stop = stop_requested(args.device)
        if save_now or stop:
            state = self.owner.state
            sums = self.metrics.sums_of_every_rank(args.device)
            state.meters = {"epoch": self.epoch, "step": step + 1, "sums": sums}
            self.owner.save(self.epoch, step + 1)
            state.meters = None
            if stop:
                raise interrupt.Interrupted(self.owner.last_saved)

    def averages(self) -> dict[str, float]:
        """The epoch's averages over every rank's iterations (one collective)."""
        return self.metrics.averages_over_ranks(self.args.device)

    def _check_and_log(self, step: int) -> None:
        """One host sync: read the pending losses, stop on a non-finite one, log the averages."""
        values = torch.stack(self.pending).float().cpu().tolist()
        self.pending = []
        first = step + 1 - len(values)
        bad = [(first + i, v) for i, v in enumerate(values) if not math.isfinite(v)]
        # All ranks stop together; one rank stopping alone would leave the others hanging.
        summed = distributed.all_reduce_sum(
            [float(len(bad)), sum(values) if not bad else 0.0, len(values)], self.args.device
        )
        if summed[0] > 0:
            where = f"iteration {bad[0][0]}" if bad else "another rank"
            raise NonFiniteLoss(
                f"loss is {bad[0][1] if bad else 'not finite'} at epoch {self.epoch}, {where}; stopping without "
                f"saving, so the last checkpoint stays intact. {divergence_advice(self.args)}"
            )
        for v in values:
            self.metrics.update(loss=v)
        self.owner.run_log.scalars(
            tensorboard_step(self.epoch, step + 1, self.total), train_loss=summed[1] / summed[2], lr=self.lr
        )


def this_ranks_sums(saved: list[dict[str, list[float]]] | dict[str, list[float]]) -> dict[str, list[float]]:
    """This rank's part of a mid-epoch checkpoint's meter sums: its own (a resume inside an epoch has as many
    processes as wrote it: ``consistency.check_flags``). A checkpoint that kept rank 0's sums alone (a dict) gives
    them to every rank, the best guess of each one's."""
    if isinstance(saved, dict):
        return saved
    return saved[distributed.rank()] if len(saved) == distributed.world_size() else {}


def check_accumulation(iterations: int, args: Any) -> None:
    """Refuse an accumulation group longer than an epoch before the run writes anything (log.txt, TensorBoard):
    it found out at its first epoch, after a start that had already replaced them."""
    if args.accum_iter > iterations:
        fail(
            f"--accum_iter {args.accum_iter} is more than the {iterations} iterations of an epoch, so the optimizer "
            f"would step once per epoch on a smaller batch than asked for; lower --accum_iter or --batch_size"
        )


def log_start(first_epoch: int, iterations: int, args: Any) -> None:
    """Say where training starts (or that a finished run has nothing left), and once, that an
    epoch's last accumulation group is shorter (see ``Accumulation``)."""
    if iterations % args.accum_iter:
        log.info(
            f"{iterations} iterations per epoch are not a multiple of --accum_iter {args.accum_iter}: each epoch's "
            f"last optimizer step averages the gradients of its last {iterations % args.accum_iter} iterations"
        )
    if first_epoch == args.epochs:
        log.info(f"nothing to train: the run already finished its {args.epochs} epochs (--epochs)")
    elif first_epoch > args.epochs:  # a smaller --epochs than the run had
        log.info(f"nothing to train: the checkpoint is {first_epoch} epochs in, past --epochs {args.epochs}")
    else:
        log.info(f"start training at epoch {first_epoch} of {args.epochs}")


def check_before_training(state: TrainState, position: Position, iterations: int) -> None:
    """What the run is refused for before it writes anything (log.txt, TensorBoard): a resumed position past this
    data's epoch, an accumulation group longer than an epoch, no room for its first checkpoint; and a warning for a
    schedule that changed since the checkpoint it resumes."""
    left_to_train = position.epoch < state.args.epochs
    if position.step >= iterations:  # its sampler would be asked to skip more samples than the epoch has
        fail(
            f"the --resume checkpoint was written at iteration {position.step} of epoch {position.epoch}, past the end "
            f"of an epoch of this run's training data ({iterations} iterations): the data changed since; resume from "
            f"an epoch-end checkpoint (checkpoint-<epoch>.pth), or with the data it was written with"
        )
    if left_to_train:
        check_accumulation(iterations, state.args)
    check_schedule(position, iterations, state.args)
    if state.args.output_dir and left_to_train:  # a run that saves (a finished one does not)
        distributed.on_rank_0_for_every_rank(lambda: check_room_for_checkpoints(state))


@contextlib.contextmanager
def training(state: TrainState, position: Position, iterations: int) -> Iterator[Checkpointer]:
    """An epoch loop's frame: log.txt and TensorBoard as the checkpoint left them, the ``Checkpointer``, a stop asked
    for during start-up taken before training, TensorBoard closed however the loop ends, the training time if it
    ends. A resumed run's TensorBoard hides what the run logged after the checkpoint (a kill, a stop on a NaN),
    which it logs again: one curve, not two drawn over each other. A run that starts afresh hides every event the
    folder holds, as it replaces log.txt: those of a run killed before its first checkpoint (a job requeued with
    --resume auto, which finds none), or of an earlier run in a shared --log_dir."""
    check_before_training(state, position, iterations)
    first_epoch = position.epoch
    purge_step = tensorboard_step(first_epoch, position.step, iterations) + 1 if position.resumed else 0
    run_log = RunLog(state.args.log_dir, state.args.output_dir, state.log, purge_step)
    checkpointer = Checkpointer(state, run_log)
    log_start(first_epoch, iterations, state.args)
    if first_epoch >= state.args.epochs:  # a finished run resumed: the prune its last save began (a kill may cut it)
        prune_checkpoints(state)
    begin = time.time()
    try:
        checkpointer.stop_if_requested()
        yield checkpointer
    finally:
        run_log.close()
    log.info(f"training time {format_duration(time.time() - begin)}")


def expected_checkpoint_bytes(state: TrainState) -> int:
    """About the size of a checkpoint of ``state``: its tensors as the save error counts them, with the optimizer
    state the first step allocates (a fresh run's optimizer holds none yet) and every rank's random state."""
    unallocated = 0
    for group in state.optimizer.param_groups:
        per_weight, per_parameter = _optimizer_state_per_parameter(state.optimizer, group)
        for p in group["params"]:
            if p.requires_grad and p not in state.optimizer.state:  # a resumed run's is counted as it is
                unallocated += per_weight * p.numel() * p.element_size() + per_parameter
    rng = distributed.world_size() * tensor_bytes(capture_rng())
    return tensor_bytes(state.state_dict()) + unallocated + rng


def _optimizer_state_per_parameter(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[int, int]:
    """(tensors the size of the parameter, bytes besides) that ``optimizer`` keeps for each parameter of ``group``
    once it has stepped: LARS (linear probing) one momentum; AdamW (pre-training, fine-tuning), and any other,
    its two moments (three with amsgrad) and a float32 step count."""
    if isinstance(optimizer, LARS):
        return 1, 0
    return 2 + bool(group.get("amsgrad")), 4


def check_room_for_checkpoints(state: TrainState) -> None:
    """Stop a run whose --output_dir has no room for its first checkpoint (it found out at that save, after an
    epoch's training); warn where it has room for one but not two. A save writes the whole checkpoint to a
    temporary before it renames it and prunes (``atomic_write``, then ``prune_checkpoints``), so the first one
    needs its full size free, and each later one as much again beside the previous checkpoint. Runs that save
    once are warned too, not told apart: fine-tuning's single epoch saves twice (again after its evaluation).
    What the retention flags keep as the run goes on (every --save_freq-th epoch, all with --keep_last 0) is not
    added up: that room may be freed while the run trains, and a refusal for it would stop runs that finish."""
    output_dir = state.args.output_dir
    needed, free = expected_checkpoint_bytes(state), shutil.disk_usage(output_dir).free
    room = f"a checkpoint needs about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free there"
    if free < needed:
        fail(
            f"--output_dir {output_dir} has no room for this run's first checkpoint ({room}); free space there or "
            f"give another --output_dir"
        )
    if free < 2 * needed:
        log.warning(
            f"--output_dir {output_dir} has room for one checkpoint only ({room}): a save after the first writes "
            f"its file beside the last one, deleted only after it, so the run would stop at its second save; free "
            f"space there or give another --output_dir"
        )
