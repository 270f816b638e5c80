"""Score MAE encoders by weighted k-NN classification of their frozen features (util/eval/knn.py), and
optionally by a linear classifier on the cached features (util/eval/linear.py).

    python knn_eval.py --data_path ../shared/datasets/cifar10 --model mae_vit_mini_patch4 \
        --encoders out/pretrain/checkpoint-29.pth random pixels --output knn.json

Each entry of ``--encoders`` is a checkpoint (ours, or an official MAE release: full, encoder only,
or a classifier that kept the final ``norm``), ``random`` (the encoder as pre-training initialises
it, under ``--seed``) or ``pixels`` (the center-cropped image itself). The bank is ``<data_path>/train``,
the queries ``<data_path>/val`` (or ``test``). Under torchrun the scores equal the one-process scores.
``--model`` and ``--input_size`` default to the first checkpoint's: stored in its args, else (official
releases store none) those whose encoder has its weights' shapes.
"""

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable

import torch

import models_mae
from util.atomic import atomic_append, reported
from util.checkpoint.download import is_url
from util.checkpoint.encoder import load_mae_encoder
from util.checkpoint.flags import fill_from_checkpoints
from util.checkpoint.load import model_state, peek_checkpoint
from util.checkpoint.opening import SHARED_CHECKPOINT, Opened, open_checkpoint, open_on_every_rank
from util.cli.args import PRECISIONS, check_at_least, check_device, check_finite, check_seed, resolve_precision
from util.cli.errors import fail, listed_ranks, run_cli
from util.cli.log import log
from util.cli.redact import values_without_secrets
from util.data import normalization
from util.data.normalization import add_norm_args
from util.eval import knn
from util.outputs import check_json_output
from util.registry import SHAPES_ONLY
from util.train import distributed

# What --model and --input_size mean when not given and no checkpoint decides them (None: the model's size).
FALLBACKS = {"model": "mae_vit_mini_patch4", "input_size": None}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("k-NN evaluation of MAE encoders")
    parser.add_argument("--data_path", required=True, help="ImageFolder with train/ (the bank) and val/ or test/")
    known = ", ".join(models_mae.MODELS)
    first = "from the first checkpoint's args, else its weights"
    parser.add_argument("--model", help=f"one of: {known} (default: {first}, else {FALLBACKS['model']})")
    parser.add_argument("--input_size", type=int, help=f"image size (default: {first}, else the model's)")
    parser.add_argument("--encoders", nargs="+", required=True, metavar="ENCODER", help="checkpoints, random, pixels")
    parser.add_argument("--output", default="", help="append one JSON line per encoder to this file")
    parser.add_argument("--batch_size", default=256, type=int)
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--seed", default=0, type=int, help="seed of the random-init encoder")
    knn.add_knn_args(parser)
    add_norm_args(parser)
    parser.add_argument("--linear_epochs", default=0, type=int, metavar="N", help="linear classifier epochs (0: none)")
    parser.set_defaults(dist_on_itp=False, dist_url="env://")  # what init_distributed_mode reads
    return parser


NAMES = {"random": "the random-init encoder", "pixels": "the pixel baseline"}  # the other entries: checkpoints


def features_of(
    encoder: str, args: argparse.Namespace, opened: Opened | None = None
) -> Callable[[torch.Tensor], knn.Features]:
    """The feature function of one ``--encoders`` entry (``opened``: its checkpoint, if already read)."""
    if encoder == "pixels":
        return knn.pixel_features
    torch.manual_seed(args.seed)  # 'random' is the initialisation pre-training starts from
    model = models_mae.create_model(args.model, args.input_size)
    if encoder != "random":
        read_already = opened is not None and opened.path == encoder
        load_mae_encoder(model, opened if read_already else open_on_every_rank_of(encoder))
    model.to(args.device).eval()
    return lambda imgs: knn.pooled_features(model.forward_features(imgs))


def open_on_every_rank_of(encoder: str) -> Opened:
    """An ``--encoders`` checkpoint, the same file on every rank (or every rank stops in one line)."""
    return open_on_every_rank(lambda: open_checkpoint(encoder), encoder, "--encoders")


def peek_on_every_rank(encoder: str) -> Opened:
    """An ``--encoders`` checkpoint's flags and its weights' shapes (``peek_checkpoint``: a zip's weights are not
    read, other files' are), the same file on every rank, or every rank stops in one line. Read by each rank alone,
    a file one rank could not read stopped that rank alone, and the others ended saying another process stopped."""
    return open_on_every_rank(lambda: Opened(encoder, peek_checkpoint(encoder)), encoder, "--encoders")


def checked_flags_of(encoder: str) -> Opened:
    """A later ``--encoders`` checkpoint, refused unless RGB (``check_rgb``), as its path and flags alone: a
    .safetensors file is loaded whole to be checked, and kept, every later encoder's weights were in memory at
    once until the last was read (its own load comes when it is scored)."""
    opened = peek_on_every_rank(encoder)
    check_rgb(opened)
    return opened.flags_only()


def check_rgb(opened: Opened) -> None:
    """knn_eval.py has no --in_chans: the bank and queries are read as RGB, so an encoder of other channels is
    refused in one line, by the --in_chans it stores, else (an official release; an import of export.py --from hf
    made before it stored one) by its patch embedding's weights. Checked before its flags fill --model and its
    --mean/--std are counted as RGB's: the RGB model of its shapes was built instead, and its load blamed --model
    (or a stored 1-value --mean)."""
    advice = "knn_eval.py scores RGB encoders only: use the k-NN monitor of main_pretrain.py (--knn_data_path)"
    if (stored := getattr(opened.args, "in_chans", None)) is not None:
        if stored != 3:
            fail(f"checkpoint {opened.path} was pre-trained on {stored}-channel images (--in_chans {stored}); {advice}")
        return
    proj = model_state(opened.ckpt, opened.path).get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4 and proj.shape[1] != 3:
        channels = f"{proj.shape[1]}-channel images (its patch embedding's weights)"
        fail(f"checkpoint {opened.path} holds an encoder of {channels}; {advice}")


def check_encoder_files(checkpoints: list[str]) -> None:
    """Every local ``--encoders`` file exists on every rank, or every rank stops in the same line.
    Checked after joining the process group: a rank that stopped alone before it left the others
    waiting for it at the rendezvous (300 s, then a message that did not name the file)."""
    # A folder passes: opening it says what it is (an HF folder: convert it with export.py --from hf).
    missing = [path for path in checkpoints if not is_url(path) and not os.path.exists(path)]
    seen = distributed.gather(missing)
    for path in checkpoints:
        lacking = [rank for rank, theirs in enumerate(seen) if path in theirs]
        if len(lacking) == len(seen):
            fail(f"--encoders {path} is neither a checkpoint file nor 'random' or 'pixels'; check its path")
        if lacking:
            fail(
                f"--encoders {path}: rank(s) {listed_ranks(lacking)} of {len(seen)} see no such file: "
                f"every node of the job must see the same files; {SHARED_CHECKPOINT}"
            )


def main(args: argparse.Namespace) -> None:
    check_args(args)
    checkpoints = [e for e in args.encoders if e not in NAMES]
    distributed.init_distributed_mode(args)
    first = settle(args, checkpoints)
    data = knn.KnnData(
        args.data_path, args.input_size, args.knn_bank_size, args.knn_query_size, mean=args.mean, std=args.std
    )
    knn.settle_k(args, data)  # the k logged and stored is the k used
    log.info(f"k-NN (k={args.knn_k}, t={args.knn_t}) on {data} from {args.data_path}")
    for encoder in args.encoders:
        begin = time.time()
        source = NAMES.get(encoder, f"checkpoint {encoder}")
        scores = knn.evaluate(features_of(encoder, args, first), data, args, args.linear_epochs, source)
        seconds = time.time() - begin
        log.info(f"{encoder}: " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f"  ({seconds:.0f} s)")
        if args.output:
            # Rank 0 writes; its failure (a full disk) stops every rank in its line. Left to rank 0, the others
            # went on to the next encoder and said another process stopped and to resume, which knn_eval cannot
            # (or, after the last encoder, ended as if the job had succeeded).
            record = score_record(encoder, scores, seconds, args, data)
            distributed.on_rank_0_for_every_rank(functools.partial(append_record, args.output, record))
    distributed.cleanup()


def check_args(args: argparse.Namespace) -> None:
    """The flags' own checks, before any process waits for another or any file is read."""
    check_finite(args)
    check_at_least(args, 1, "batch_size")
    if args.input_size is not None:  # 0 would pass as a multiple of the patch size
        check_at_least(args, 1, "input_size")
    check_at_least(args, 0, "num_workers")
    check_seed(args.seed)
    check_device(args.device)
    knn.check_knn_args(args)
    check_at_least(args, 0, "linear_epochs", zero_means="no linear classifier")
    normalization.check_flags(args, 3, from_checkpoint=True)  # before any checkpoint is read; RGB images


def settle(args: argparse.Namespace, checkpoints: list[str]) -> Opened | None:
    """Fill what the flags leave to the checkpoints (--model, --input_size, --mean/--std) and check
    --output, on every rank alike; the first checkpoint, read once (its flags, then its weights)."""
    check_encoder_files(checkpoints)
    first = open_on_every_rank_of(checkpoints[0]) if checkpoints else None
    if first is not None:
        check_rgb(first)
    origins = fill_from_checkpoints(args, [first] if first else [], FALLBACKS)
    with torch.device("meta"):  # --model and --input_size checked before any image is read
        size_source = origins.get("input_size", "")
        model = models_mae.create_model(args.model, args.input_size, size_source=size_source, **SHAPES_ONLY)
        args.input_size = model.img_size
    if args.output:  # before the work, not after it; rank 0 writes it, and its refusal stops every rank
        # An encoder given as --output is no JSON lines file "to repair or remove": it is an input.
        inputs = [("--encoders", p) for p in checkpoints]
        distributed.on_rank_0_for_every_rank(lambda: check_json_output(args.output, "--output", True, inputs))
    args.precision = resolve_precision(args.precision, args.device)
    # One normalisation for every encoder (they share the images): the flags, else the first
    # checkpoint's; an encoder trained with other values is named in a warning.
    others = [checked_flags_of(e) for e in checkpoints[1:]]
    normalization.resolve(args, [(f"checkpoint {o.path}", o.args) for o in ([first] if first else []) + others])
    return first


def score_record(
    encoder: str, scores: dict[str, float], seconds: float, args: argparse.Namespace, data: knn.KnnData
) -> dict:
    """One ``--output`` line: an encoder's scores, and how they were taken."""
    return {
        "encoder": encoder,
        "model": args.model,
        **scores,
        "k": args.knn_k,
        "linear_epochs": args.linear_epochs,
        "t": args.knn_t,
        "bank": len(data.bank),
        "queries": len(data.queries),
        "data_path": args.data_path,
        "processes": distributed.world_size(),
        "seconds": round(seconds, 1),
        "command": " ".join(["python", *sys.argv]),
    }


def append_record(path: str, record: dict) -> None:
    """Add one encoder's scores to ``--output`` as a JSON line, writing the whole file anew: a full disk
    leaves the earlier lines."""
    with reported(path, "--output"):  # its encoder and command may be URLs, whose secrets stay out (redact.py)
        atomic_append(path, json.dumps(values_without_secrets(record)) + "\n")


# What a rank says when another stopped (a corrupt image in that rank's share): knn_eval has no --resume.
PEER_ADVICE = "that process's own error says why; run knn_eval.py again once it is fixed"

if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()), PEER_ADVICE)
