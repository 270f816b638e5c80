"""Command-line flags that every entry point shares, and their validation."""

import argparse
import math
import os
from collections.abc import Iterable
from typing import Any

import torch

from util.cli.errors import fail
from util.data import normalization

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("cpu", "cuda", "mps")
# The official recipes go up to 6.4 (the linear probe's LARS at batch 16384). AdamW moves every
# weight by about lr per step, so far beyond this a run can only blow up.
MAX_LR = 100.0
SEED_LIMIT = 2**32  # numpy seeds with 32 bits, and each rank seeds with --seed + rank
# TensorBoard's steps are epoch x 1000 in 64 bits (2**63 / 1000 is 9.2e15): far beyond, the first
# scalar of the run's last epochs was a ValueError.
MAX_EPOCHS = 10**15
# What a node may set its own way (check_same_flags): its resources, and where it reads and writes. Its paths
# may name the same files by other paths (a share mounted elsewhere; the files themselves are checked to be
# the same), but each must be given on every node or on none, and --resume auto on all or none: a rank that
# alone resumes, starts from a checkpoint, writes or runs the k-NN monitor leaves the others waiting.
PER_NODE_FLAGS = ("num_workers", "pin_mem", "log_dir", "local_rank", "world_size", "dist_url", "dist_on_itp")
PER_NODE_PATHS = ("data_path", "output_dir", "resume", "finetune", "knn_data_path")


def add_schedule_args(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int,
    epochs: int,
    weight_decay: float,
    blr: float,
    min_lr: float,
    warmup_epochs: int,
) -> None:
    """Batch, epochs, optimizer and learning-rate schedule; defaults differ per entry point."""
    g = parser.add_argument_group("schedule")
    g.add_argument("--batch_size", default=batch_size, type=int, help="per GPU (effective batch: x accum_iter x GPUs)")
    g.add_argument("--epochs", default=epochs, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="iterations whose gradients make one step")
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--lr", type=float, metavar="LR", help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", type=float, default=blr, metavar="LR", help="base lr: lr = blr * effective batch / 256")
    g.add_argument("--min_lr", type=float, default=min_lr, metavar="LR", help="lower lr bound of the cosine schedule")
    g.add_argument("--clip_grad", type=float, metavar="NORM", help="clip the gradient norm (default: no clipping)")
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs, metavar="N", help="epochs of linear lr warm-up")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Data, output, device, precision, resume, checkpointing and distributed flags."""
    g = parser.add_argument_group("run")
    g.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", help="dataset path")
    g.add_argument("--output_dir", default="./output_dir", help="where to save checkpoints and log.txt")
    # The official default is ./output_dir whatever --output_dir is: runs given only --output_dir then wrote their
    # events into one folder, which TensorBoard draws as one run (and a resumed run's purge would hide the others').
    g.add_argument("--log_dir", default=None, help="where to write TensorBoard logs (default: --output_dir; '': none)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda if present, else cpu")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint, or 'auto': the newest good one in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch (overridden by --resume)")
    g.add_argument("--num_workers", default=default_workers(), type=int, help="per process (default: min(10, cores))")
    g.add_argument("--pin_mem", action="store_true", help="pin the loader's CPU memory: faster copies to the GPU")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: GPU bf16 (else fp16), CPU fp32")
    g.add_argument("--save_freq", default=20, type=int, metavar="N", help="keep every N-th epoch's and the last")
    g.add_argument("--keep_last", default=1, type=int, metavar="K", help="keep the K newest epochs' too (0: all)")
    g.add_argument("--ckpt_every_steps", default=0, type=int, metavar="N", help="save every N iterations too (0: no)")
    g.add_argument("--print_freq", default=20, type=int, metavar="N", help="log every N iterations")
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower")

    d = parser.add_argument_group("distributed")
    d.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    d.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    d.add_argument("--dist_on_itp", action="store_true")
    d.add_argument("--dist_url", default="env://", help="url used to set up distributed training")


def default_workers(most: int = 10) -> int:
    """The official 10 data-loading workers, or fewer on fewer cores (PyTorch warns beyond them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))


def add_classifier_args(parser: argparse.ArgumentParser, models: Iterable[str], fallbacks: dict[str, Any]) -> None:
    """Model and crop flags of the classifiers (fine-tuning and linear probing); ``models``: the known names;
    ``fallbacks``: what the flags a checkpoint decides are without one, for the help."""
    g = parser.add_argument_group("model")
    known = ", ".join(models)
    g.add_argument("--model", help=f"one of: {known} (default: --resume's or --finetune's, else {fallbacks['model']})")
    add_input_size_arg(g)
    add_in_chans_arg(g)
    g.add_argument("--finetune", default="", help="MAE checkpoint (file or URL) to start from")
    # Neither given: None, which the --resume checkpoint's pooling settles, else the fallback (checkpoint/flags.py).
    pooling = "global pooling" if fallbacks["global_pool"] else "the class token"
    pool = f"average the patch tokens, then fc_norm (default: --resume's pooling, else {pooling})"
    g.add_argument("--global_pool", action="store_true", help=pool)
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="class token, not global pooling")
    parser.set_defaults(global_pool=None)
    # Not given: the --resume head's rows, else the data's class folders (engine_finetune.data_classes).
    classes = "number of classification types (default: --resume's head's rows, else the class folders; lists: needed)"
    g.add_argument("--nb_classes", type=int, help=classes)
    c = parser.add_argument_group("crops")
    pct = "evaluation: center crop / resized image, in (0, 1] (default: the checkpoint's, else 224/256; 1 above 224 px)"
    c.add_argument("--crop_pct", type=float, help=pct)
    area = "training: RandomResizedCrop's range of crop areas, fractions of the image's"
    c.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("LOW", "HIGH"), help=area)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate (the model of --resume)")
    g.add_argument("--dist_eval", action="store_true", help="shard evaluation over processes (each image once)")
    g.add_argument("--eval_freq", default=1, type=int, metavar="N", help="evaluate every N epochs and after the last")


def check_classifier_args(args: argparse.Namespace) -> None:
    """The flags of ``add_classifier_args`` and ``add_eval_args`` that argparse cannot check."""
    check_at_least(args, 1, "eval_freq")
    if args.nb_classes is not None:  # None: --resume's, else the fallback
        check_at_least(args, 1, "nb_classes")
    if args.eval and not args.resume:
        fail("--eval needs a model to evaluate: give --resume CHECKPOINT")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:  # not `<= 0`: NaN would pass that
        fail(f"--crop_pct must be in (0, 1] (1: no resize of an image of --input_size), got {args.crop_pct}")
    low, high = args.scale
    if not 0 < low <= high <= 1:
        fail(f"--scale LOW HIGH must have 0 < LOW <= HIGH <= 1 (fractions of the image's area), got {low} {high}")


def resolve_precision(precision: str, device: str) -> str:
    """Turn 'auto' into a concrete precision and refuse what the device cannot do."""
    on_cuda = str(device).startswith("cuda")
    if precision == "auto":
        if not on_cuda:
            return "fp32"
        try:  # emulated bf16 (V100, T4) is slow: take fp16 there
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no emulation and no such argument
            native_bf16 = torch.cuda.is_bf16_supported()
        return "bf16" if native_bf16 else "fp16"
    check_precision(precision, device)
    return precision


def check_precision(precision: str, device: str) -> None:
    """A ``--precision`` that ``--device`` can compute in: fp16 (its loss scaling) is CUDA's alone."""
    if precision == "fp16" and not str(device).startswith("cuda"):
        fail(f"--precision fp16 needs a CUDA device; use --precision bf16 or fp32 on --device {device}")


def check_at_least(args: argparse.Namespace, minimum: int, *names: str, zero_means: str = "") -> None:
    """Each ``--name`` is at least ``minimum`` (0 or 1), or a one-line error; ``zero_means`` says
    what 0 asks for where it asks for something (``--knn_bank_size 0``: all)."""
    for name in names:
        if (value := getattr(args, name)) < minimum:
            bound = f"at least {minimum}" if minimum else f"0{f' ({zero_means})' if zero_means else ''} or more"
            fail(f"--{name} must be {bound}, got {value}")


def check_finite(args: argparse.Namespace) -> None:
    """Every float flag (and every value of a list of floats) is a finite number: argparse's
    ``type=float`` takes 'nan' and 'inf', which pass comparisons such as ``value < 0`` unnoticed."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name} must be a finite number, got {value}")
        if isinstance(value, list | tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            fail(f"--{name} values must be finite numbers, got {' '.join(map(str, value))}")


def check_layer_decay(layer_decay: float) -> None:
    """Fine-tuning's ``--layer_decay`` scales layer l's lr by layer_decay ** (depth - l): a negative
    value flips every other layer's step, 0 freezes all but the last, above 1 blows up the first."""
    if not 0 < layer_decay <= 1:  # not written as `<= 0`: NaN would pass that
        fail(f"--layer_decay must be in (0, 1] (1: the same lr for every layer), got {layer_decay}")


def check_common(args: argparse.Namespace) -> None:
    """Refuse flag values that are impossible or contradict each other, naming the flag."""
    check_at_least(args, 1, "batch_size", "epochs", "accum_iter", "save_freq", "print_freq")
    if args.epochs > MAX_EPOCHS:
        fail(f"--epochs must be at most {MAX_EPOCHS:.0e}, got {args.epochs}")
    if getattr(args, "in_chans", None) is not None:  # here, before --mean and --std are counted against it
        check_at_least(args, 1, "in_chans")
    check_at_least(args, 0, "num_workers", "warmup_epochs")
    check_at_least(args, 0, "ckpt_every_steps", zero_means="only at epoch ends")
    check_at_least(args, 0, "keep_last", zero_means="keep all")
    # A negative norm flips every gradient (ascent), 0 zeroes them: clipping takes a positive norm.
    if args.clip_grad is not None and not args.clip_grad > 0:
        fail(f"--clip_grad must be positive (leave it out for no clipping), got {args.clip_grad}")
    # Negative weight decay pushes the weights away from 0, growing them without bound.
    if not args.weight_decay >= 0:
        fail(f"--weight_decay must be 0 or more, got {args.weight_decay}")
    if args.ckpt_every_steps % args.accum_iter:
        fail(f"--ckpt_every_steps {args.ckpt_every_steps} must be a multiple of --accum_iter {args.accum_iter}")
    for name in ("lr", "blr"):  # not written as `<= 0`: NaN would pass that
        value = getattr(args, name)
        if value is not None and not 0 < value <= MAX_LR:
            fail(f"--{name} must be positive and at most {MAX_LR:g}, got {value}")
    if not 0 <= args.min_lr <= MAX_LR:
        fail(f"--min_lr must be 0 or more (and at most {MAX_LR:g}), got {args.min_lr}")
    check_seed(args.seed)
    if args.start_epoch < 0 or args.start_epoch >= args.epochs and not getattr(args, "eval", False):
        fail(f"--start_epoch {args.start_epoch} is outside the run's {args.epochs} epochs: give 0 to {args.epochs - 1}")
    check_finite(args)  # after the checks above, which say more (each also refuses NaN)
    check_norm_flags(args)
    check_device(args.device)
    # Here, not only where the run settles its precision: by then it had made --output_dir, and the SLURM
    # launcher submitted a CPU job that would refuse it.
    check_precision(args.precision, args.device)


def check_norm_flags(args: argparse.Namespace) -> None:
    """``--mean``/``--std`` as far as the flags decide them: here, with the other flags, so that a
    run refuses them before it opens anything and the SLURM launcher before the job waits in the
    queue. The channel count they must match is ``--in_chans``, else 3 where no checkpoint (``--resume``,
    ``--finetune``) can decide it; the run checks them again against the checkpoint's."""
    from_checkpoint = bool(getattr(args, "resume", "") or getattr(args, "finetune", ""))
    channels = getattr(args, "in_chans", None)
    if channels is None and not from_checkpoint:
        channels = 3
    normalization.check_flags(args, channels, from_checkpoint)


def check_seed(seed: int) -> None:
    """A ``--seed`` numpy takes (32 bits). Training seeds numpy with it; the commands that seed only
    torch take the same range, so that every entry point accepts the same seeds. ``check_world``
    checks it again with the number of processes, as each rank seeds with --seed + rank."""
    if not 0 <= seed < SEED_LIMIT:
        fail(f"--seed must be in [0, 2**32 - 1], got {seed}")


def check_device(device: str) -> None:
    """A device this code runs on, and that is present."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in DEVICES:
        fail(f"--device {device} is unknown; use {', '.join(DEVICES)} (or cuda:N for one GPU)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {device} was asked for but CUDA is not available; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            fail(f"--device {device}: there are only {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device} was asked for but MPS is not available; use --device cpu")


def check_world(args: argparse.Namespace, world_size: int) -> None:
    """What depends on the number of processes: every rank's seed and the effective lr."""
    if args.seed + world_size - 1 >= SEED_LIMIT:
        fail(
            f"--seed {args.seed}: rank {world_size - 1} would seed with {args.seed + world_size - 1}, beyond "
            f"numpy's 2**32 - 1; use a seed below {SEED_LIMIT - world_size + 1}"
        )
    lr = effective_lr(args, world_size)
    if not (math.isfinite(lr) and 0 < lr <= MAX_LR):
        fail(
            f"the effective lr {lr:.3g} (--blr {args.blr:g} x effective batch / 256) is not in (0, {MAX_LR:g}]; "
            f"lower --blr or give --lr"
        )


class InputSize(argparse.Action):
    """``--input_size S`` (a square) or ``--input_size H W``. A square is stored as one int, as
    before, so that square runs keep their args (and checkpoints) unchanged; height and width as
    a list, which JSON metadata (.safetensors) gives back as it was."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: list[int],  # nargs="+" of type=int
        option_string: str | None = None,
    ) -> None:
        # Here, not where the patch size is known: 0 is a multiple of every patch size, and
        # reads as 'not given' where a default is taken with `or`.
        if any(value < 1 for value in values):
            fail(f"--input_size must be at least 1, got {' '.join(map(str, values))}")
        square = len(values) == 1 or (len(values) == 2 and values[0] == values[1])
        setattr(namespace, self.dest, values[0] if square else list(values))


def add_input_size_arg(group: argparse._ArgumentGroup) -> None:
    """The ``--input_size`` flag of every entry point, None when not given; ``image_size`` reads it."""
    group.add_argument(
        "--input_size",
        type=int,
        nargs="+",
        action=InputSize,
        metavar="SIZE",
        help="image size: one value (a square) or two (height width), each a multiple of the patch size "
        "(default: the checkpoint's, else 224)",
    )


def add_in_chans_arg(group: argparse._ArgumentGroup, default: str = "the checkpoint's, else 3") -> None:
    """``--in_chans``, None when not given: image channels, read from the files as they are (util/data/images.py).
    ``default``: what None means, for the help (a command that opens no checkpoint says 3)."""
    group.add_argument(
        "--in_chans",
        type=int,
        metavar="C",
        help="image channels: 3 reads files as RGB, 1 grayscale ones (8 or 16-bit) as they are, others multi-page "
        f"TIFFs, a page per channel, or files with that many bands (default: {default})",
    )


def effective_lr(args: argparse.Namespace, world_size: int) -> float:
    """Absolute lr: --lr if given, else blr * (batch_size * accum_iter * world size) / 256."""
    return args.lr if args.lr is not None else args.blr * (args.batch_size * args.accum_iter * world_size) / 256


def check_same_flags(every_ranks: list[dict[str, Any]]) -> None:
    """Refuse, in one line on every rank, a job whose processes were started with other flags (``vars`` of each
    rank's flags, in rank order), but for what may differ per node (``PER_NODE_FLAGS``, ``PER_NODE_PATHS``).
    Torchrun on each node takes that node's command: ranks given another lr, seed, mask ratio or precision
    trained on, DDP averaging their gradients, each applying them its own way, and rank 0 saved its own
    weights; with another epoch count or batch size, one waited for the others at the end."""
    ours, *theirs = map(_agreed, every_ranks)
    differing: dict[str, int] = {}  # flag -> the first rank that differs from rank 0 on it
    for rank, flags in enumerate(theirs, 1):
        for name in sorted(ours.keys() | flags.keys()):
            if flags.get(name) != ours.get(name):
                differing.setdefault(name, rank)
    if not differing:
        return
    name, rank = next(iter(differing.items()))
    others = [f"--{n}" for n in differing if n != name]
    more = f" (and {len(others)} more: {', '.join(others)})" if others else ""
    fail(
        f"the processes of this job were started with other flags: {_shown(name, ours.get(name))} on rank 0, "
        f"{_shown(name, theirs[rank - 1].get(name))} on rank {rank}{more}; start every node with the same "
        f"command (it may differ only in --num_workers, --pin_mem, --log_dir, and in the paths it gives to the same "
        f"files)"
    )


def check_same_precision(chosen: list[str]) -> None:
    """Refuse a job whose ranks chose other precisions (``chosen``, each rank's, in rank order): --precision auto is
    each node's own (bf16 on GPUs that compute in it, else fp16), and a job on both kinds trained in two, the fp16
    ranks skipping the steps their loss scaler found overflowing while the others took them."""
    rank = next((r for r, precision in enumerate(chosen) if precision != chosen[0]), None)
    if rank is not None:
        fail(
            f"--precision auto chose {chosen[0]} on rank 0 and {chosen[rank]} on rank {rank}, whose GPUs differ: "
            f"give every node the same --precision (fp16 runs on every GPU)"
        )


def _agreed(flags: dict[str, Any]) -> dict[str, Any]:
    """What of ``flags`` every rank must share: a path only as given or not (and 'auto'), per node flags not."""
    agreed = {name: value for name, value in flags.items() if name not in PER_NODE_FLAGS}
    for name in PER_NODE_PATHS:
        if agreed.get(name):
            agreed[name] = "auto" if agreed[name] == "auto" else "PATH"
    return agreed


def _shown(name: str, value: Any) -> str:
    """A flag as the command line gives it: ``--blr 0.001``, ``--compile``, ``no --compile``."""
    if value is None or value is False or value == "":
        return f"no --{name}"
    if value is True:
        return f"--{name}"
    return f"--{name} {' '.join(map(str, value)) if isinstance(value, list | tuple) else value}"
