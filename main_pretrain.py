"""MAE pre-training.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /path/to/imagenet --model mae_vit_large_patch16 \
        --batch_size 64 --accum_iter 8 --epochs 800 --warmup_epochs 40 --norm_pix_loss --blr 1.5e-4

Flags, defaults and checkpoint format follow the official MAE code.
"""

import argparse
import time

import torch
from timm.optim import param_groups_weight_decay

import models_mae
from engine_pretrain import log_reconstructions, train_one_epoch
from util.checkpoint.consistency import check_same_data
from util.checkpoint.resume import resume
from util.checkpoint.state import TrainState
from util.cli.args import (
    add_in_chans_arg,
    add_input_size_arg,
    add_run_args,
    add_schedule_args,
    check_at_least,
    check_common,
)
from util.cli.errors import fail, run_cli
from util.cli.log import log
from util.data.channels import image_loader
from util.data.datasets import ImageFiles
from util.data.loaders import PRETRAIN_LOADERS, eval_transform, pretrain_data
from util.data.normalization import add_norm_args
from util.eval import knn
from util.eval.pictures import fixed_noise, load_images
from util.outputs import check_outside_data
from util.train import distributed
from util.train.checkpointer import Checkpointer, training
from util.train.precision import LossScaler
from util.train.progress import RunLog
from util.train.run import finish, gives_back_output_dir, start, wrap_for_training

# What --model, --input_size and --in_chans mean when not given and no checkpoint decides them.
FALLBACKS = {"model": "mae_vit_large_patch16", "input_size": 224, "in_chans": 3}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training")
    add_schedule_args(parser, batch_size=64, epochs=400, weight_decay=0.05, blr=1e-3, min_lr=0.0, warmup_epochs=40)
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help=f"one of: {', '.join(models_mae.MODELS)} (default: the --resume checkpoint's, else {FALLBACKS['model']})",
    )
    add_input_size_arg(g)
    add_in_chans_arg(g)
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    g.add_argument("--norm_pix_loss", action="store_true", help="use per-patch normalized pixels as targets")
    add_run_args(parser)
    add_norm_args(parser)
    parser.add_argument(
        "--loader",
        default="fast",
        choices=PRETRAIN_LOADERS,
        help="fast: the official augmentation with faster JPEG decoding and resizing, uint8 batches "
        "normalised on the device; device: the same, with JPEGs decoded, cropped and resized on the training "
        "device (nvJPEG on a GPU) while workers only read files; torchvision: the reference pipeline; memory: "
        "small data sets of equal-sized RGB images (CIFAR-10) decoded once into the training device's memory, "
        "cropped, resized and flipped there per batch",
    )
    v = parser.add_argument_group("reconstruction pictures")
    v.add_argument("--vis_freq", default=10, type=int, metavar="N", help="every N epochs, the first and last; 0: never")
    v.add_argument("--vis_images", default=8, type=int, help="how many images the picture shows")
    k = knn.add_knn_args(parser)
    k.add_argument(
        "--knn_data_path",
        default="",
        help="labelled ImageFolder (train/ and val/) to score the encoder by k-NN during pre-training; '': never",
    )
    k.add_argument("--knn_freq", default=10, type=int, metavar="N", help="k-NN score every N epochs and after the last")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The flags' own checks, before anything starts (the SLURM launcher runs them before submitting)."""
    check_common(args)
    # The range of every patch count (the model's own count is known only once a checkpoint may have given
    # --input_size: models_mae.check_mask_ratio); here, so that the SLURM launcher refuses it before the queue.
    if not 0 < args.mask_ratio < 1:
        fail(f"--mask_ratio {args.mask_ratio} must remove at least one patch and keep one: use a value in (0, 1)")
    # Its reconstruction pictures would become training images (classifiers write no images).
    check_outside_data(args.output_dir, args.data_path, "--output_dir")
    check_at_least(args, 0, "vis_freq", zero_means="never")
    check_at_least(args, 1, "vis_images")
    if args.knn_data_path:
        knn.check_knn_args(args)
        check_at_least(args, 1, "knn_freq")


def build_model(args: argparse.Namespace, size_source: str = "") -> models_mae.MaskedAutoencoderViT:
    return models_mae.create_model(
        args.model,
        args.input_size,
        args.in_chans,
        args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss,
        size_source=size_source,
    )


def build_optimizer(
    model: models_mae.MaskedAutoencoderViT, args: argparse.Namespace, device: torch.device
) -> torch.optim.AdamW:
    """The official pre-training optimizer: AdamW, betas (0.9, 0.95), no weight decay on biases and norms."""
    param_groups = param_groups_weight_decay(model, args.weight_decay)
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def build_knn_data(args: argparse.Namespace) -> knn.KnnData | None:
    if not args.knn_data_path:
        return None
    data = knn.KnnData(
        args.knn_data_path,
        args.input_size,
        args.knn_bank_size,
        args.knn_query_size,
        "--knn_data_path",
        mean=args.mean,
        std=args.std,
        in_chans=args.in_chans,
    )
    log.info(f"k-NN monitor: {data} from {args.knn_data_path}, every {args.knn_freq} epochs")
    knn.k_used(args.knn_k, data)  # said once, as knn_eval.py says it (args keep the flag: the checkpoints store it)
    return data


def knn_monitor(
    model: models_mae.MaskedAutoencoderViT, data: knn.KnnData, epoch: int, run_log: RunLog, args: argparse.Namespace
) -> dict[str, float]:
    """k-NN accuracy of the encoder's class token and mean patch token, as ``knn_cls_top1`` etc."""
    begin = time.time()
    model.eval()  # the training loop sets train mode again
    scores = knn.evaluate(lambda imgs: knn.pooled_features(model.forward_features(imgs)), data, args)
    run_log.scalars((epoch + 1) * 1000, **{f"knn/{name}": value for name, value in scores.items()})
    scores = {f"knn_{name}": value for name, value in scores.items()}  # log.txt's keys
    shown = "  ".join(f"{name} {value:.2f}" for name, value in scores.items())
    k = min(args.knn_k, len(data.bank))  # the k the vote used (args keep the flag: the checkpoints store it)
    log.info(f"k-NN (k={k}, t={args.knn_t}) after epoch {epoch}: {shown}  ({time.time() - begin:.0f} s)")
    return scores


def knn_due(epoch: int, knn_data: knn.KnnData | None, args: argparse.Namespace) -> bool:
    """Whether the k-NN monitor scores the end of ``epoch``: every --knn_freq epochs and after the last."""
    return knn_data is not None and ((epoch + 1) % args.knn_freq == 0 or epoch == args.epochs - 1)


def close_epoch(
    model: models_mae.MaskedAutoencoderViT,
    epoch: int,
    train_stats: dict[str, float],
    knn_data: knn.KnnData | None,
    picture: tuple[torch.Tensor, torch.Tensor] | None,
    checkpointer: Checkpointer,
) -> None:
    """Save the trained ``epoch``, log its line, draw its picture, and stop if asked. Where the k-NN monitor
    scores it, it is saved (and a stop taken) before it is scored: a k-NN image that cannot be read costs no
    training, and the resumed run scores the epoch."""
    args = checkpointer.state.args
    if knn_due(epoch, knn_data, args):
        checkpointer.end_epoch_before_evaluating(epoch, train_stats)
        checkpointer.stop_if_requested()
        score_epoch(model, knn_data, picture, checkpointer)
    else:
        stats = {f"train_{k}": v for k, v in train_stats.items()}
        checkpointer.end_epoch(epoch, {**stats, "epoch": epoch})
        picture_if_due(model, picture, epoch, checkpointer.run_log, args)
        checkpointer.stop_if_requested()


def score_epoch(
    model: models_mae.MaskedAutoencoderViT,
    knn_data: knn.KnnData | None,
    picture: tuple[torch.Tensor, torch.Tensor] | None,
    checkpointer: Checkpointer,
) -> None:
    """The k-NN scores of the epoch its checkpoint left unevaluated (none where the resumed run has no
    --knn_data_path), its log.txt line and its reconstruction picture: what the uninterrupted run writes."""
    args = checkpointer.state.args
    epoch, train_stats = checkpointer.take_unevaluated()
    stats = {f"train_{k}": v for k, v in train_stats.items()}
    if knn_due(epoch, knn_data, args):
        stats.update(knn_monitor(model, knn_data, epoch, checkpointer.run_log, args))
    checkpointer.log_evaluated({**stats, "epoch": epoch})
    picture_if_due(model, picture, epoch, checkpointer.run_log, args)


def picture_if_due(
    model: models_mae.MaskedAutoencoderViT,
    picture: tuple[torch.Tensor, torch.Tensor] | None,
    epoch: int,
    run_log: RunLog,
    args: argparse.Namespace,
) -> None:
    """The reconstruction picture every --vis_freq epochs, the first and the last."""
    if picture and distributed.is_main_process() and (epoch % args.vis_freq == 0 or epoch == args.epochs - 1):
        log_reconstructions(model, *picture, epoch, run_log, args)


def fixed_picture(
    dataset: ImageFiles, num_patches: int, args: argparse.Namespace, fixed_by: str = ""
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Evenly spaced images of the data set, center-cropped, and a fixed mask for them: the
    reconstruction picture shows the same images under the same mask at every epoch. ``fixed_by``:
    the checkpoint whose weights set the channels (``util.data.images.load_channels``)."""
    if not args.vis_freq:
        return None
    files = dataset.files[:: max(len(dataset) // args.vis_images, 1)][: args.vis_images]
    transform = eval_transform(args.input_size, args.mean, args.std, args.in_chans)
    imgs = load_images(files, transform, image_loader(args.in_chans, fixed_by))
    return imgs, fixed_noise(len(files), num_patches, seed=args.seed)


@gives_back_output_dir
def main(flags: argparse.Namespace) -> None:
    check_args(flags)
    run = start(flags, FALLBACKS, kind="mae")
    args, device = run.args, run.device
    model = build_model(args, run.size_source)

    knn_data = build_knn_data(args)  # flags and folders checked before the (longer) data scan
    # A resumed checkpoint fixes the channels: an image of others is not told to give --in_chans.
    fixed_by = run.channels_fixed_by()
    dataset, loader = pretrain_data(args, fixed_by)
    log.info(f"{len(dataset)} images in {dataset.root}, {len(loader)} iterations per epoch")

    run.place(model)  # a run that cannot fit stops here, in one line
    optimizer = build_optimizer(model, args, device)
    state = TrainState(model, optimizer, LossScaler(args.precision), args)
    position = resume(state, run.resume_from)
    check_same_data(state, dataset, position)
    run.release_checkpoints()  # loaded: the file's copy of the weights and moments is not needed any more
    wrapped_model = wrap_for_training(model, args)  # DDP and/or compiled: what the steps call

    picture = fixed_picture(dataset, model.num_patches, args, fixed_by)
    with training(state, position, len(loader)) as checkpointer:
        if checkpointer.resumed_unevaluated(position):  # its k-NN scoring failed, or a stop came before it
            score_epoch(model, knn_data, picture, checkpointer)
        for epoch in range(position.epoch, args.epochs):
            start_step = position.steps_done(epoch)
            loader.sampler.set_epoch(epoch, skip=start_step * args.batch_size)  # skips what was trained
            train_stats = train_one_epoch(wrapped_model, loader, state, epoch, checkpointer, start_step)
            close_epoch(model, epoch, train_stats, knn_data, picture, checkpointer)
    del wrapped_model  # before the process group goes: distributed.cleanup says why
    finish()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
