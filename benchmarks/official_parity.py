"""Our three training recipes against the official code's, optimizer step by optimizer step, on CPU in fp32.

    bash benchmarks/fetch_official.sh PATH_TO_MAE_CLONE   # once: the official code -> benchmarks/official_mae
    python -m benchmarks.official_parity                   # about 15 s; a markdown table on stdout

For pre-training, fine-tuning (label smoothing and --clip_grad; then drop path with mixup/cutmix) and linear
probing (LARS, the BatchNorm head, the frozen encoder), each codebase gets: its own model of one small ViT
(depth 4, 32-px images, patch 4) holding the same weights; the same fixed batches, with the random state seeded
alike before each (the masking noise, drop path's and mixup's draws); its own optimizer and parameter groups from
the same flags (--blr, --batch_size 8, --accum_iter 2, --weight_decay, --layer_decay, --warmup_epochs 1, --min_lr,
--epochs 2); and its own ``train_one_epoch`` (its lr schedule, its accumulation and clipping; no loss scaling on a
CPU) for 2 epochs of 6 iterations: 6 optimizer steps, warm-up and then cosine. After every step it compares the
micro-batches' losses, every group's lr and weight decay, the parameter names of every group (and the groups'
order), and the weights and buffers. Ours come from the entry points' own ``build_optimizer``/``build_criterion``/
``add_probe_head``; the official ones are built as its ``main_*.py`` build them inside ``main()``, which cannot
be called without a data set: those lines are restated here.

The official code runs on current timm (``gpu_check_official``'s patches) with two choices made here: its
attention is fused as ours is (timm 0.3.2, which it pins, had only the explicit softmax; the row "unfused" shows
what that costs: rounding), and its classifier's ``fc_norm`` is registered after the head, where timm 0.3.2's
VisionTransformer, which had no ``fc_norm``, put it (current timm has one before the head, which changes the order
of the gradient norm's sum under --clip_grad: the last bits). Pre-training's groups come from timm's
``param_groups_weight_decay`` on both sides: the official ``optim_factory.add_weight_decay`` under its current
name. Exit status 1 where a row that should be bitwise is not.
"""

import contextlib
import functools
import logging
import platform
import random
import sys
import warnings
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import timm.models.vision_transformer as timm_vit
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
import models_mae  # noqa: E402
import models_vit  # noqa: E402
from benchmarks import gpu_check_official as official  # noqa: E402
from engine_finetune import train_one_epoch as our_classifier_epoch  # noqa: E402
from engine_pretrain import train_one_epoch as our_pretrain_epoch  # noqa: E402
from util.checkpoint.state import TrainState  # noqa: E402
from util.cli.args import effective_lr  # noqa: E402
from util.train.checkpointer import Checkpointer  # noqa: E402
from util.train.precision import LossScaler  # noqa: E402
from util.train.progress import RunLog  # noqa: E402

ITERATIONS, EPOCHS = 6, 2  # per epoch; with --accum_iter 2: 3 optimizer steps of warm-up, 3 of cosine
ARCH = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)  # heads 16 wide, as the decoder's
NORM = functools.partial(nn.LayerNorm, eps=1e-6)
CPU = torch.device("cpu")


@dataclass
class Trace:
    """What one codebase did: each micro-batch's loss and, after each optimizer step, its groups and weights."""

    losses: list[float] = field(default_factory=list)
    groups: list[list[tuple[frozenset, float, float]]] = field(default_factory=list)  # (names, lr, weight decay)
    weights: list[dict[str, torch.Tensor]] = field(default_factory=list)


def traced(model: nn.Module, optimizer: torch.optim.Optimizer) -> Trace:
    """A Trace that the optimizer fills after each of its steps."""
    trace, names = Trace(), {id(p): n for n, p in model.named_parameters()}

    def after_step(opt: torch.optim.Optimizer, *_: object) -> None:
        groups = [(frozenset(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]
        trace.groups.append(groups)
        trace.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    optimizer.register_step_post_hook(after_step)
    return trace


def recording(fn: Callable, losses: list[float]) -> Callable:
    """``fn`` (a criterion, or the MAE's forward), noting each loss it returns."""

    def call(*args: object, **kwargs: object) -> object:
        out = fn(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).item())
        return out

    return call


class Batches:
    """Fixed batches, copied (mixup and cutmix mix in place), with torch's, numpy's and python's random state
    seeded from the batch's index before each: both codebases draw the same masks, drop paths and mixes."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int):
        self.batches, self.seed = batches, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for i, batch in enumerate(self.batches):
            torch.manual_seed(self.seed + i)
            np.random.seed(self.seed + i)
            random.seed(self.seed + i)
            yield tuple(t.clone() for t in batch)


def epochs_of_batches(seed: int) -> list[Batches]:
    """Each epoch's batches: 8 normalised 32-px images and labels of 10 classes."""
    g = torch.Generator().manual_seed(seed)
    batch = lambda: (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))  # noqa: E731
    return [Batches([batch() for _ in range(ITERATIONS)], 100 * epoch) for epoch in range(EPOCHS)]


def flags(**recipe: float | str | None) -> tuple[Namespace, Namespace]:
    """The same flags as our run's args and the official run's, each with its own effective lr."""
    common = dict(batch_size=8, accum_iter=2, warmup_epochs=1, epochs=EPOCHS, lr=None, clip_grad=None)
    common.update(recipe)
    ours = Namespace(**common, device="cpu", precision="fp32", print_freq=1000, ckpt_every_steps=0, output_dir="")
    ours.mask_ratio, ours.mean, ours.std = 0.75, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours.lr = effective_lr(ours, world_size=1)
    theirs = Namespace(**common, mask_ratio=0.75)
    theirs.lr = theirs.blr * theirs.batch_size * theirs.accum_iter / 256  # the official main_*.py's, one process
    return ours, theirs


def run_ours(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    args: Namespace,
    criterion: nn.Module | None,
    mixup: Mixup | None,
) -> Trace:
    """Our engines' train_one_epoch (the MAE's where ``criterion`` is None) over the fixed epochs."""
    trace = traced(model, optimizer)
    state = TrainState(model, optimizer, LossScaler("fp32"), args)
    checkpointer = Checkpointer(state, RunLog("", ""))
    if criterion is None:
        model.forward = recording(model.forward, trace.losses)
    for epoch, batches in enumerate(epochs_of_batches(args.data_seed)):
        if criterion is None:
            our_pretrain_epoch(model, batches, state, epoch, checkpointer)
        else:
            our_classifier_epoch(model, batches, state, epoch, checkpointer, recording(criterion, trace.losses), mixup)
    return trace


@contextlib.contextmanager
def official_engines_on_cpu(code: official.OfficialCode) -> Iterator[None]:
    """The official engines call ``torch.cuda.synchronize()`` every step, and print."""
    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for module in (code.engine_pretrain, code.engine_finetune, code.misc):
        module.print = lambda *args, **kwargs: None
    try:
        with warnings.catch_warnings():  # torch.cuda.amp's deprecation, and its autocast and scaler off without CUDA
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.cuda.synchronize = synchronize


def run_theirs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    args: Namespace,
    criterion: nn.Module | None,
    mixup: Mixup | None,
) -> Trace:
    """The official engines' train_one_epoch over the same epochs, as its main_*.py call them."""
    code, trace = official.load(), traced(model, optimizer)
    if criterion is None:
        model.forward = recording(model.forward, trace.losses)
    with official_engines_on_cpu(code):
        scaler = code.misc.NativeScalerWithGradNormCount()  # torch's GradScaler, which turns itself off without CUDA
        for epoch, batches in enumerate(epochs_of_batches(args.data_seed)):
            if criterion is None:
                code.engine_pretrain.train_one_epoch(model, batches, optimizer, CPU, epoch, scaler, args=args)
            else:
                loss = recording(criterion, trace.losses)
                code.engine_finetune.train_one_epoch(
                    model, loss, batches, optimizer, CPU, epoch, scaler, args.clip_grad, mixup, args=args
                )
    return trace


def attention(model: nn.Module, fused: bool) -> nn.Module:
    for module in model.modules():
        if isinstance(module, timm_vit.Attention):
            module.fused_attn = fused
    return model


# ----------------------------------------------------------------------------------------------- the recipes


def pretraining(fused: bool = True) -> tuple[Trace, Trace]:
    torch.manual_seed(0)
    decoder = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    ours = models_mae.MaskedAutoencoderViT(**ARCH, **decoder, norm_layer=NORM, norm_pix_loss=True)
    theirs = attention(official.official_model(ours, fused_attn=fused), fused)
    args, their_args = flags(blr=1.5e-4, weight_decay=0.05, min_lr=0.0, data_seed=1)
    optimizer = main_pretrain.build_optimizer(ours, args, CPU)
    # The official main_pretrain.py: AdamW(optim_factory.add_weight_decay(model, wd), lr, betas=(0.9, 0.95)).
    groups = param_groups_weight_decay(theirs, their_args.weight_decay)
    their_optimizer = torch.optim.AdamW(groups, lr=their_args.lr, betas=(0.9, 0.95))
    return run_ours(ours, optimizer, args, None, None), run_theirs(theirs, their_optimizer, their_args, None, None)


def classifiers(global_pool: bool, drop_path: float) -> tuple[nn.Module, nn.Module]:
    """Our classifier and the official one of the same architecture, with the same weights."""
    torch.manual_seed(0)
    ours = models_vit.VisionTransformer(global_pool=global_pool, num_classes=10, drop_path_rate=drop_path, **ARCH)
    theirs = official.load().models_vit.VisionTransformer(
        global_pool=global_pool,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=NORM,
        num_classes=10,
        drop_path_rate=drop_path,
        **ARCH,
    )
    # fc_norm registered last, where timm 0.3.2's VisionTransformer (which had none) let the official code put it
    if global_pool:
        theirs.fc_norm = theirs._modules.pop("fc_norm")
    theirs.load_state_dict(ours.state_dict())
    return ours, attention(theirs, True)


def official_mixup(args: Namespace) -> Mixup | None:
    """The official main_finetune.py's Mixup, built from the same flags."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=args.nb_classes,
    )  # fmt: skip


def official_criterion(args: Namespace, mixup: Mixup | None) -> nn.Module:
    """The official main_finetune.py's criterion, chosen from the same flags."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def finetuning(mix: bool = False, drop_path: float = 0.0) -> tuple[Trace, Trace]:
    args, their_args = flags(
        blr=5e-4, weight_decay=0.05, layer_decay=0.65, min_lr=1e-6, clip_grad=0.5, smoothing=0.1, nb_classes=10,
        mixup=0.8 * mix, cutmix=1.0 * mix, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
        mixup_mode="batch", input_size=32, data_seed=2,
    )  # fmt: skip
    ours, theirs = classifiers(True, drop_path)
    mixup = main_finetune.build_mixup(args)
    optimizer, criterion = main_finetune.build_optimizer(ours, args, CPU), main_finetune.build_criterion(args, mixup)
    # The official main_finetune.py: AdamW over lr_decay.param_groups_lrd, and its choice of criterion.
    groups = official.load().lr_decay.param_groups_lrd(
        theirs,
        their_args.weight_decay,
        no_weight_decay_list=theirs.no_weight_decay(),
        layer_decay=their_args.layer_decay,
    )
    their_optimizer, their_mixup = torch.optim.AdamW(groups, lr=their_args.lr), official_mixup(their_args)
    their_criterion = official_criterion(their_args, their_mixup)
    return (
        run_ours(ours, optimizer, args, criterion, mixup),
        run_theirs(theirs, their_optimizer, their_args, their_criterion, their_mixup),
    )


def linear_probing() -> tuple[Trace, Trace]:
    args, their_args = flags(blr=0.1, weight_decay=0.01, min_lr=0.0, data_seed=3)  # some decay: LARS applies it
    ours, theirs = classifiers(False, 0.0)
    main_linprobe.add_probe_head(ours)
    optimizer = main_linprobe.build_optimizer(ours, args)
    # The official main_linprobe.py: the BatchNorm head, all frozen but it, LARS over the head.
    theirs.head = nn.Sequential(nn.BatchNorm1d(theirs.head.in_features, affine=False, eps=1e-6), theirs.head)
    for param in theirs.parameters():
        param.requires_grad = False
    for param in theirs.head.parameters():
        param.requires_grad = True
    their_optimizer = official.load().lars.LARS(
        theirs.head.parameters(), lr=their_args.lr, weight_decay=their_args.weight_decay
    )
    return (
        run_ours(ours, optimizer, args, nn.CrossEntropyLoss(), None),
        run_theirs(theirs, their_optimizer, their_args, nn.CrossEntropyLoss(), None),
    )


# ----------------------------------------------------------------------------------------------- the table

RECIPES = [
    ("pre-training (--norm_pix_loss)", True, pretraining),
    ("pre-training, official attention unfused (timm 0.3.2's)", False, lambda: pretraining(fused=False)),
    ("fine-tuning (layer decay, label smoothing, --clip_grad)", True, finetuning),
    ("fine-tuning + drop path 0.1 + mixup/cutmix", True, lambda: finetuning(mix=True, drop_path=0.1)),
    ("linear probing (LARS, BatchNorm head, frozen encoder)", True, linear_probing),
]
COLUMNS = ["recipe", "steps", "max \\|Δ loss\\|", "max \\|Δ lr\\|", "weight decays", "groups' parameters"]
HEADER = "| " + " | ".join([*COLUMNS, "groups' order", "max \\|Δ weights\\|", "result"]) + " |"


def difference(ours: Trace, theirs: Trace) -> dict[str, float | bool | int]:
    """The largest differences over all steps (and micro-batches' losses)."""
    steps = min(len(ours.groups), len(theirs.groups))
    same_sets = same_order = same_decay = True
    lr = weights = 0.0
    for ours_groups, their_groups, ours_w, their_w in zip(
        ours.groups, theirs.groups, ours.weights, theirs.weights, strict=False
    ):
        theirs_by_names = {names: (g_lr, wd) for names, g_lr, wd in their_groups}
        same_order &= [g[0] for g in ours_groups] == [g[0] for g in their_groups]
        same_sets &= {g[0] for g in ours_groups} == set(theirs_by_names) and ours_w.keys() == their_w.keys()
        for names, g_lr, wd in ours_groups:
            if names in theirs_by_names:
                lr = max(lr, abs(g_lr - theirs_by_names[names][0]))
                same_decay &= wd == theirs_by_names[names][1]
        for name, value in ours_w.items():
            if name in their_w and value.is_floating_point():
                weights = max(weights, (value.double() - their_w[name].double()).abs().max().item())
    loss = max(abs(a - b) for a, b in zip(ours.losses, theirs.losses, strict=False))
    counts_agree = len(ours.groups) == len(theirs.groups) and len(ours.losses) == len(theirs.losses)
    return dict(
        steps=steps,
        loss=loss,
        lr=lr,
        decay=same_decay,
        sets=same_sets and counts_agree,
        order=same_order,
        weights=weights,
    )


def row(name: str, d: dict, bitwise_expected: bool) -> tuple[str, bool]:
    """The table's row, and whether it is as expected (bitwise, or within rounding for the unfused attention)."""
    exact = d["loss"] == d["lr"] == d["weights"] == 0 and d["decay"] and d["sets"] and d["order"]
    close = d["lr"] == 0 and d["decay"] and d["sets"] and d["weights"] < 1e-5 and d["loss"] < 1e-5
    # Where bitwise is expected, anything else differs, however little (a 1% change of LARS's trust moved the
    # probe's weights by 2e-8 in 6 steps).
    verdict = "bitwise" if exact else ("rounding" if close and not bitwise_expected else "**differs**")
    yes = lambda ok: "same" if ok else "**differ**"  # noqa: E731
    cells = [
        name,
        str(d["steps"]),
        f"{d['loss']:.1e}",
        f"{d['lr']:.1e}",
        yes(d["decay"]),
        yes(d["sets"]),
        yes(d["order"]),
    ]
    cells += [f"{d['weights']:.1e}", verdict]
    return "| " + " | ".join(cells) + " |", exact if bitwise_expected else close


def versions() -> str:
    commit = (official.OFFICIAL_DIR / "COMMIT").read_text().strip()
    return (
        f"official code: facebookresearch/mae at {commit}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, timm {timm.__version__}, numpy {np.__version__}; CPU, fp32, 1 thread"
    )


def main() -> int:
    reason = official.missing_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # one order of the reductions on every machine
    logging.getLogger("mae").setLevel(logging.WARNING)  # our engines' progress lines
    lines, ok = [versions(), "", HEADER, "|" + " --- |" * 9], True
    for name, bitwise_expected, recipe in RECIPES:
        text, as_expected = row(name, difference(*recipe()), bitwise_expected)
        lines.append(text)
        ok &= as_expected
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
