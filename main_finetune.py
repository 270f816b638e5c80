"""Fine-tuning a pre-trained MAE encoder for classification (end-to-end, all layers).

    torchrun --nproc_per_node=8 main_finetune.py --data_path /path/to/imagenet --model vit_base_patch16 \
        --finetune mae_pretrain_vit_base.pth --batch_size 32 --accum_iter 4 --epochs 100 --blr 5e-4 \
        --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval

Flags, defaults and checkpoint format follow the official MAE code.
"""

import argparse
from collections.abc import Callable

import torch
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torchvision import transforms

import models_vit
import util.compat  # noqa: F401  (makes timm RandAugment work with Pillow 13)
from engine_finetune import classifier_and_data, fallbacks, train_or_evaluate
from util.cli.args import (
    add_classifier_args,
    add_eval_args,
    add_run_args,
    add_schedule_args,
    check_at_least,
    check_classifier_args,
    check_common,
    check_layer_decay,
)
from util.cli.errors import fail, run_cli
from util.cli.log import log
from util.data.channels import tensor_train_transform
from util.data.normalization import add_norm_args
from util.lr_decay import param_groups_lrd
from util.sizes import image_size
from util.train.run import gives_back_output_dir, start

FALLBACKS = fallbacks(global_pool=True)  # the official default pooling


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE fine-tuning for image classification")
    add_schedule_args(parser, batch_size=64, epochs=50, weight_decay=0.05, blr=1e-3, min_lr=1e-6, warmup_epochs=5)
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")
    add_classifier_args(parser, models_vit.MODELS, FALLBACKS)
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--color_jitter", type=float, default=None, metavar="PCT", help="colour jitter (without --aa)")
    aug.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME", help="auto augment policy")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    aug.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase prob")
    aug.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    aug.add_argument("--recount", type=int, default=1, help="random erase count")
    aug.add_argument("--resplit", action="store_true", help="no effect (official flag: no augmentation splits exist)")
    aug.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0")
    aug.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    aug.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio (enables it)")
    aug.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix when enabled")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both enabled")
    aug.add_argument("--mixup_mode", type=str, default="batch", help='"batch", "pair", or "elem"')

    add_run_args(parser)
    add_norm_args(parser)
    add_eval_args(parser)
    return parser


MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("const", "rand", "pixel")  # timm's RandomErasing asserts one of them (any case; '' is const)
PROBABILITIES = ("reprob", "mixup_prob", "mixup_switch_prob")


def check_args(args: argparse.Namespace) -> None:
    """The flags' own checks, before anything starts (the SLURM launcher runs them before submitting);
    those of fine-tuning alone are the ones timm would take silently, or fail on with a traceback."""
    check_common(args)
    check_classifier_args(args)
    check_layer_decay(args.layer_decay)
    if not 0 <= args.drop_path < 1:
        fail(f"--drop_path must be in [0, 1), got {args.drop_path}")
    if not 0 <= args.smoothing < 1:
        fail(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if _mixes(args) and args.batch_size % 2 and not args.eval:  # here, so the SLURM launcher checks it too
        fail(f"--mixup/--cutmix mix pairs of images: --batch_size must be even, got {args.batch_size}")
    if args.mixup_mode not in MIXUP_MODES:
        fail(f"--mixup_mode {args.mixup_mode} is unknown; use one of {', '.join(MIXUP_MODES)}")
    check_augmentation(args)
    if args.aa:  # timm parses the policy when it builds the transform: let it, on a small one
        try:
            create_transform(32, is_training=True, auto_augment=args.aa)
        except (AssertionError, KeyError, ValueError) as e:
            fail(
                f"--aa {args.aa} is not an auto-augment policy timm knows ({str(e) or type(e).__name__}); use e.g. "
                f"rand-m9-mstd0.5-inc1, augmix-m5, v0 or original, or --aa '' for none"
            )


def check_augmentation(args: argparse.Namespace) -> None:
    """The augmentation flags timm takes as they are: an assertion or a ValueError when the transform or
    Mixup is built, or (--cutmix_minmax reversed, --recount below 0) at the first batch."""
    for name in PROBABILITIES:
        if not 0 <= (value := getattr(args, name)) <= 1:
            fail(f"--{name} is a probability: it must be in [0, 1], got {value}")
    if args.remode.lower() not in ("", *ERASE_MODES):
        fail(f"--remode {args.remode} is unknown; use one of {', '.join(ERASE_MODES)}")
    check_at_least(args, 1, "recount")  # timm reads 0 as 1: --reprob 0 erases nothing
    if args.color_jitter is not None and not args.color_jitter >= 0:
        fail(f"--color_jitter must be 0 or more, got {args.color_jitter}")
    minmax = args.cutmix_minmax
    if minmax is not None and (len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1):
        shown = " ".join(map(str, minmax))
        fail(f"--cutmix_minmax takes MIN MAX, box sides as fractions of the image's, 0 <= MIN < MAX <= 1; got {shown}")


def check_cutmix_sides(minmax: list[float] | None, input_size: int | list[int]) -> None:
    """timm draws a CutMix box side from int(side x MIN) up to int(side x MAX), that one excluded:
    numpy refuses the draw (at the first mixed batch) where both round to the same pixel count."""
    if minmax is None:
        return
    for side in image_size(input_size):
        if int(side * minmax[0]) >= int(side * minmax[1]):
            fail(
                f"--cutmix_minmax {minmax[0]} {minmax[1]} leaves no box size to draw on a side of {side} px "
                f"(--input_size): both give {int(side * minmax[0])} px; widen the range"
            )


def _mixes(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args: argparse.Namespace) -> Mixup | None:
    if not _mixes(args):
        return None
    check_cutmix_sides(args.cutmix_minmax, args.input_size)  # the size is settled only now (a checkpoint's)
    log.info("mixup is activated")
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=args.nb_classes,
    )


def build_train_transform(args: argparse.Namespace) -> Callable:
    """timm's fine-tuning augmentation (random resized crop, flip, RandAugment or colour jitter,
    random erasing). For images that are not RGB, its part that is defined on any channels:
    RandAugment and colour jitter act on RGB (or 8-bit gray) pictures, not on 16-bit or many-band
    tensors, so they are left out, and said so."""
    height, width = image_size(args.input_size)
    if args.in_chans == 3:
        return create_transform(
            input_size=height if height == width else (height, width),
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=args.aa,
            interpolation="bicubic",
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            scale=tuple(args.scale),
            mean=tuple(args.mean),  # --mean/--std, or the pre-trained checkpoint's (util/data/normalization.py)
            std=tuple(args.std),
        )
    if args.aa or args.color_jitter:
        log.info(f"--in_chans {args.in_chans}: --aa and --color_jitter are RGB augmentations and are not applied")
    steps = [tensor_train_transform((height, width), tuple(args.scale), args.mean, args.std)]
    if args.reprob > 0:
        steps.append(RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device="cpu"))
    return transforms.Compose(steps)


def build_optimizer(
    model: models_vit.VisionTransformer, args: argparse.Namespace, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the layer-wise lr decay groups (``util.lr_decay``), as the official fine-tuning."""
    groups = param_groups_lrd(model, args.weight_decay, model.no_weight_decay(), args.layer_decay)
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def build_criterion(args: argparse.Namespace, mixup_fn: Mixup | None) -> torch.nn.Module:
    """The training loss: on ``mixup_fn``'s soft targets, which hold the --smoothing; else label smoothing's
    cross-entropy where --smoothing is above 0; else the plain one."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


@gives_back_output_dir
def main(flags: argparse.Namespace) -> None:
    check_args(flags)
    run = start(flags, FALLBACKS, kind="classifier")
    args = run.args
    train_tf = build_train_transform(args)
    model, train_set, val_set = classifier_and_data(run, train_tf, head_init_std=2e-5, drop_path_rate=args.drop_path)
    run.place(model)  # a run that cannot fit stops here, in one line
    log.info(f"number of params (M): {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}")

    optimizer = build_optimizer(model, args, run.device)
    mixup_fn = build_mixup(args)
    criterion = build_criterion(args, mixup_fn)
    log.info(f"criterion: {criterion}")
    train_or_evaluate(run, model, optimizer, train_set, val_set, criterion, mixup_fn)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
