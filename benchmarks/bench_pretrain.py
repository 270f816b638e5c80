"""MAE pre-training speed: the model's training step, the data loader, and both together.

Run from the repository root, as a module or as a script (``python benchmarks/bench_pretrain.py ...``):

    python -m benchmarks.bench_pretrain --model mae_vit_base_patch16,mae_vit_large_patch16 --batch_size 256 \
        --precision bf16 --compile --mode all --loader fast,device,torchvision --num_workers 14
    python -m benchmarks.bench_pretrain --model mae_vit_tiny_patch4 --input_size 32 --batch_size 64 --mode model

Modes:
  model   synthetic images already on the device; one step = forward under autocast, backward,
          AdamW step, as main_pretrain.py trains. The fp32 eager step (the "plain" baseline) is
          always measured too, and every row gives its speed relative to it.
  loader  the pre-training data pipeline alone (decode, random resized crop, flip), as
          main_pretrain.py builds it for --loader fast, device or torchvision; each loader's
          images/s are given relative to the torchvision recipe's.
  e2e     the loader feeding the model step.
  all     the three above.

See benchmarks/README.md for what each number means.
"""

import argparse
import gc
import itertools
import json
import math
import os
import resource
import statistics
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository

import main_pretrain  # noqa: E402
import models_mae  # noqa: E402
from util.atomic import atomic_write, reported  # noqa: E402
from util.cli.args import check_at_least, resolve_precision  # noqa: E402
from util.cli.errors import fail, run_cli  # noqa: E402
from util.data.loaders import PRETRAIN_LOADERS, pretrain_data  # noqa: E402
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device  # noqa: E402
from util.outputs import check_json_output  # noqa: E402
from util.registry import SHAPES_ONLY  # noqa: E402
from util.train.precision import LossScaler, autocast, fast_cuda_math  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("model", "loader", "e2e", "all")
Step = Callable[[torch.Tensor], None]


# ---------------------------------------------------------------------------------------------
# FLOPs
def _block_flops(block: torch.nn.Module, tokens: int) -> int:
    """Forward FLOPs of one transformer block on a sequence of ``tokens`` tokens.

    A multiply-add counts as 2 FLOPs. Per token: qkv (3 D^2) and output projection (D^2), the
    MLP's two layers (2 D H, which is 8 D^2 for the usual H = 4 D), so 24 D^2 in all; and the
    attention scores Q K^T and the weighted sum of values, T D each, so 4 T D. Norms, softmax,
    biases and activations are left out, as is usual: they are a few percent at most.
    """
    dim = block.attn.qkv.in_features
    hidden = block.mlp.fc1.out_features
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 4 * tokens * tokens * dim
    return linear + attention


def mae_train_flops(model: models_mae.MaskedAutoencoderViT, batch: int, mask_ratio: float) -> int:
    """FLOPs of one training step (forward + backward) on ``batch`` images.

    The encoder runs on the visible patches plus the class token, the decoder on all patches
    plus the class token. Backward costs twice the forward (a gradient for the activations and
    one for the weights), so a step is 3x the forward, the usual convention for MFU.
    """
    patches = model.num_patches
    encoder_tokens = int(patches * (1 - mask_ratio)) + 1  # as random_masking keeps them
    decoder_tokens = patches + 1
    patch_dim = model.patch_size**2 * model.in_chans
    enc_dim, dec_dim = model.decoder_embed.in_features, model.decoder_embed.out_features

    forward = 2 * patches * patch_dim * enc_dim  # patch embedding: every patch, before masking
    forward += sum(_block_flops(b, encoder_tokens) for b in model.blocks)
    forward += 2 * encoder_tokens * enc_dim * dec_dim  # decoder_embed
    forward += sum(_block_flops(b, decoder_tokens) for b in model.decoder_blocks)
    forward += 2 * decoder_tokens * dec_dim * patch_dim  # decoder_pred (the class token's row is dropped after)
    return 3 * batch * forward


def vit_train_flops(model: torch.nn.Module, batch: int) -> int:
    """FLOPs of one fine-tuning step of a ViT classifier (models_vit) on ``batch`` images: the
    encoder on every patch and the class token, the patch embedding and the head; 3x the forward."""
    patches = model.patch_embed.num_patches
    tokens = patches + model.num_prefix_tokens
    proj = model.patch_embed.proj
    patch_dim = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    forward = 2 * patches * patch_dim * proj.out_channels
    forward += sum(_block_flops(b, tokens) for b in model.blocks)
    forward += 2 * model.head.in_features * model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
    return 3 * batch * forward


# ---------------------------------------------------------------------------------------------
# Building blocks
def build_step(args: Namespace, precision: str, plain: bool) -> tuple[models_mae.MaskedAutoencoderViT, Step]:
    """A fresh model and its training step, set up as main_pretrain.py sets them up; ``plain``
    leaves out ``--compile`` and ``--grad_checkpointing``. ``args.compile_backend``, where set,
    is torch.compile's backend (gpu_check.sh --cpu: aot_eager, which skips inductor's C++ builds)."""
    with torch.device(args.device):  # initialised where it trains: ViT-L/16's init took 3.4-4.9 s on a CPU
        model = models_mae.create_model(args.model, args.input_size)
    model.set_grad_checkpointing(args.grad_checkpointing and not plain)
    model.train()
    backend = getattr(args, "compile_backend", "inductor")
    forward = torch.compile(model, backend=backend) if args.compile and not plain else model
    return model, make_step(model, forward, args, precision)


def make_step(model: torch.nn.Module, forward: torch.nn.Module, args: Namespace, precision: str) -> Step:
    """main_pretrain.py's training step for ``model`` (called through ``forward``, e.g. compiled):
    AdamW as it builds it, autocast, the loss scaler; uint8 images are normalised on the device."""
    recipe = Namespace(weight_decay=0.05, lr=1.5e-4)  # the official pre-training's (lr: --blr at batch 256)
    optimizer = main_pretrain.build_optimizer(model, recipe, torch.device(args.device))
    scaler = LossScaler(precision)

    def step(imgs: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        imgs = normalize_on_device(imgs, IMAGENET_MEAN, IMAGENET_STD)  # the fast loader's uint8, as in training
        with autocast(precision, args.device):
            loss, _, _ = forward(imgs, mask_ratio=args.mask_ratio)
        scaler.scale(loss).backward()  # as the engine steps (main_pretrain's default: no --clip_grad)
        scaler.step(optimizer)
        scaler.update()

    return step


def build_loader(args: Namespace, loader: str, workers: int) -> torch.utils.data.DataLoader:
    """The pre-training loader as main_pretrain.py builds it for ``--loader``."""
    loader_args = Namespace(
        **{**vars(args), "loader": loader, "num_workers": workers, "pin_mem": True},
        mean=IMAGENET_MEAN, std=IMAGENET_STD,  # the recipe's normalisation (the benchmark has no --mean/--std)
    )  # fmt: skip
    return pretrain_data(loader_args)[1]


def endless_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[torch.Tensor]:
    """The loader's images moved to ``device``, epoch after epoch, reshuffled each epoch as in training."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        for imgs, _ in loader:
            yield imgs.to(device, non_blocking=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Step, next_batch: Callable[[], torch.Tensor], steps: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    """Seconds for ``steps`` steps after ``warmup`` untimed ones, and the part of them spent
    waiting for ``next_batch``. Warm-up absorbs compilation, cuDNN autotuning, allocator growth
    and the loader's worker start-up, none of which a long run pays per step."""
    for _ in range(warmup):
        step(next_batch())
    sync(device)  # the GPU is asynchronous: start the clock on an idle device
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        imgs = next_batch()
        waited += time.perf_counter() - t
        step(imgs)
    sync(device)
    return time.perf_counter() - start, waited


def reset_memory(device: torch.device) -> None:
    """Free the previous configuration's memory so that each row's peak is its own (GPU only:
    on CPU the peak RSS can only grow over the process's life)."""
    if "torch._dynamo" in sys.modules:  # imported by torch.compile only
        torch._dynamo.reset()  # compiled graphs hold on to the previous model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# The three measurements
def _step_row(
    mode: str, args: Namespace, model: models_mae.MaskedAutoencoderViT, precision: str, plain: bool, elapsed: float
) -> dict[str, Any]:
    device = torch.device(args.device)
    flops_per_s = mae_train_flops(model, args.batch_size, args.mask_ratio) * args.steps / elapsed
    return {
        "mode": mode,
        "model": args.model,
        "precision": precision,
        "compile": args.compile and not plain,
        "grad_ckpt": args.grad_checkpointing and not plain,
        "batch": args.batch_size,
        "images_per_s": args.steps * args.batch_size / elapsed,
        "tflops": flops_per_s / 1e12,
        # MFU against the bf16 peak whatever the precision, so rows compare on one scale.
        "mfu": flops_per_s / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        "peak_mem_mib": peak_memory_mib(device),
    }


def bench_model(args: Namespace, precision: str, plain: bool = False) -> dict[str, Any]:
    """Training steps on one synthetic batch that stays on the device."""
    device = torch.device(args.device)
    reset_memory(device)
    model, step = build_step(args, precision, plain)
    # Normalised images have zero mean and unit variance per channel; so has this.
    imgs = torch.randn(args.batch_size, model.in_chans, args.input_size, args.input_size, device=device)
    elapsed, _ = time_steps(step, lambda: imgs, args.steps, args.warmup, device)
    return _step_row("model", args, model, precision, plain, elapsed)


def bench_loader(args: Namespace, loader: str, workers: int) -> dict[str, Any]:
    """Batches drawn from the loader and moved to the device (where ``--loader device`` decodes
    them), with nothing consuming them."""
    device = torch.device(args.device)
    batches = endless_batches(build_loader(args, loader, workers), device)
    n_batches = math.ceil(args.loader_images / args.batch_size)
    elapsed, _ = time_steps(lambda imgs: None, batches.__next__, n_batches, args.warmup, device)
    batches.close()  # shuts the workers down
    images_per_s = n_batches * args.batch_size / elapsed
    return {
        "mode": "loader",
        "batch": args.batch_size,
        "loader": loader,
        "workers": workers,
        "images_per_s": images_per_s,
        # With no workers the main process does the work: one core.
        "images_per_s_per_core": images_per_s / max(workers, 1),
    }


def bench_e2e(args: Namespace, precision: str, loader: str, workers: int) -> dict[str, Any]:
    """The loader feeding the training step, as in a real run."""
    device = torch.device(args.device)
    reset_memory(device)
    model, step = build_step(args, precision, plain=False)
    batches = endless_batches(build_loader(args, loader, workers), device)
    elapsed, waited = time_steps(step, batches.__next__, args.steps, args.warmup, device)
    batches.close()
    row = _step_row("e2e", args, model, precision, False, elapsed)
    return {**row, "loader": loader, "workers": workers, "data_wait": waited / elapsed}


def run_model_mode(args: Namespace) -> list[dict[str, Any]]:
    """Every requested precision, plus the fp32 eager baseline that each row is compared with;
    with ``--compile`` or ``--grad_checkpointing``, every precision with and without them."""
    plain = bench_model(args, "fp32", plain=True)
    rows = [plain]
    options = args.compile or args.grad_checkpointing
    for precision in args.precisions:
        if precision != "fp32" and options:
            rows.append(bench_model(args, precision, plain=True))  # what the options are worth
        if precision != "fp32" or options:  # (plain fp32 is the baseline itself)
            rows.append(bench_model(args, precision))
    for row in rows:
        row["vs_plain"] = row["images_per_s"] / plain["images_per_s"]
    return rows


def run_loader_mode(args: Namespace) -> list[dict[str, Any]]:
    """Every loader at every worker count, ``--repeats`` times in turn (so that a change in the
    machine's load hits all of them alike); each row holds the median over the repeats and, where
    the torchvision pipeline was measured with as many workers, the ratio to it."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for loader in args.loaders:
            for workers in args.workers:
                runs.setdefault((loader, workers), []).append(bench_loader(args, loader, workers))
    rows = []
    for (_, workers), repeats in runs.items():
        row = dict(repeats[0])
        for key in ("images_per_s", "images_per_s_per_core"):
            row[key] = statistics.median(r[key] for r in repeats)
        row["repeats"] = len(repeats)
        baseline = runs.get(("torchvision", workers))
        if baseline is not None:
            row["vs_torchvision"] = row["images_per_s"] / statistics.median(r["images_per_s"] for r in baseline)
        rows.append(row)
    return rows


def run(args: Namespace) -> list[dict[str, Any]]:
    per_model = [Namespace(**{**vars(args), "model": name}) for name in args.models]
    rows: list[dict[str, Any]] = []
    if args.mode in ("model", "all"):
        rows += [row for margs in per_model for row in run_model_mode(margs)]
    if args.mode in ("loader", "all"):
        rows += run_loader_mode(args)
    if args.mode in ("e2e", "all"):
        for margs in per_model:
            rows += [bench_e2e(margs, p, lo, w) for p in args.precisions for lo in args.loaders for w in args.workers]
    return rows


# ---------------------------------------------------------------------------------------------
# Output
COLUMNS = [
    ("mode", "mode", "{}"),
    ("model", "model", "{}"),
    ("precision", "prec", "{}"),
    ("compile", "compile", "{}"),
    ("grad_ckpt", "grad ckpt", "{}"),
    ("batch", "batch", "{}"),
    ("loader", "loader", "{}"),
    ("workers", "workers", "{}"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("vs_plain", "vs fp32 eager", "{:.2f}x"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_mib", "peak MiB", "{:.0f}"),
    ("images_per_s_per_core", "images/s/core", "{:.1f}"),
    ("vs_torchvision", "vs torchvision", "{:.2f}x"),
    ("data_wait", "data wait", "{:.0%}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; '-' where a number does not apply to the row's mode."""
    header = [title for _, title, _ in COLUMNS]
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *cells, strict=True)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *cells]]
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":  # name and memory: an H100 (80 GB) and an H200 (141 GB) give different timings
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------
# Command line
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MAE pre-training benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="model", choices=MODES)
    p.add_argument(
        "--model", default="mae_vit_base_patch16", help=f"comma-separated, from: {', '.join(models_mae.MODELS)}"
    )
    p.add_argument("--batch_size", default=64, type=int)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument(
        "--precision",
        default=None,
        help="comma-separated, from fp32, bf16, fp16 (fp16 on CUDA only); default: bf16 on CUDA, fp32 on CPU. "
        "The fp32 eager baseline is measured in model mode whatever is asked",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (not the baseline); model mode measures every precision compiled and eager",
    )
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute block activations in backward (not the baseline); the recomputation is not counted in MFU",
    )
    p.add_argument("--no_tf32", action="store_true", help="true fp32 matmuls on GPU (main_pretrain.py allows TF32)")
    p.add_argument(
        "--threads",
        default=0,
        type=int,
        help="torch intra-op threads in the main process (0: torch's default, one per core); on a CPU shared with "
        "other jobs, fewer threads than cores avoids threads waiting on each other",
    )
    p.add_argument("--steps", default=20, type=int, help="timed training steps per configuration")
    p.add_argument("--warmup", default=5, type=int, help="untimed steps (or loader batches) before timing")
    p.add_argument(
        "--peak_tflops",
        default=790.0,
        type=float,
        help="peak bf16 TFLOP/s that MFU is relative to; 790 is what dense bf16 8192^3 matmuls reached on both "
        "kinds of GPU lent to this project, an H200 (769-798) and an H100 80GB (798), which share Hopper's matrix "
        "units (the data sheet says 989); pass the matmul_tflops that gpu_check.sh measured on the same machine",
    )
    p.add_argument(
        "--data_path",
        default=None,
        help="image folder, as main_pretrain.py reads it; required by the modes that load images (loader, e2e, "
        "all), e.g. demo/cifar10-2k",
    )
    p.add_argument(
        "--loader",
        default="fast",
        help="comma-separated, from: fast (as main_pretrain.py: faster JPEG decoding and resizing, uint8 batches "
        "normalised on the device), device (JPEGs decoded on the device), torchvision (the reference pipeline), "
        "memory (the data set decoded once into the device's memory, cropped there)",
    )
    p.add_argument(
        "--repeats",
        default=1,
        type=int,
        help="loader mode: measure every loader and worker count this many times, in turn, and report medians",
    )
    p.add_argument(
        "--num_workers",
        default=str(min(10, os.cpu_count() or 1)),
        help="loader worker processes; comma-separated for several runs (e.g. 1,2)",
    )
    p.add_argument("--loader_images", default=2000, type=int, help="images drawn (and timed) per loader run")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--json", default="bench_pretrain.json", help="where to write the rows ('' for nowhere)")
    return p


def check_args(args: Namespace) -> None:
    """Refuse impossible flags, naming the flag; fill ``args.precisions`` and ``args.workers``."""
    args.models = args.model.split(",")
    for name in args.models:
        with torch.device("meta"):
            models_mae.create_model(name, args.input_size, **SHAPES_ONLY)
    if not 0 <= args.mask_ratio < 1:  # 0 times the encoder on every patch
        fail(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    check_at_least(args, 1, "batch_size", "steps", "loader_images", "repeats")
    check_at_least(args, 0, "warmup", "threads")
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        fail(f"--device {args.device} was asked for but CUDA is not available; use --device cpu")
    args.precisions = (args.precision or ("bf16" if on_cuda else "fp32")).split(",")
    for precision in args.precisions:
        if precision not in PRECISIONS:
            fail(f"--precision {precision} is not one of {', '.join(PRECISIONS)}")
        resolve_precision(precision, args.device)  # refuses fp16 on CPU
    if args.mode != "model" and not args.data_path:
        fail(f"--mode {args.mode} loads images: give --data_path (an image folder, e.g. demo/cifar10-2k)")
    args.loaders = args.loader.split(",")
    for loader in args.loaders:
        if loader not in PRETRAIN_LOADERS:
            fail(f"--loader {loader} is not one of {', '.join(PRETRAIN_LOADERS)}")
    try:
        args.workers = [int(w) for w in args.num_workers.split(",")]
    except ValueError:
        fail(f"--num_workers {args.num_workers} is not a comma-separated list of integers")
    if min(args.workers) < 0:
        fail(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.json:  # before the benchmark's minutes, not after them
        check_json_output(args.json, "--json")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        fast_cuda_math(tf32=not args.no_tf32)  # as training runs, unless --no_tf32
    load_before = os.getloadavg()[0]
    print(f"{describe_device(device)}, torch {torch.__version__}, load average {load_before:.1f}")

    rows = run(args)
    print(format_table(rows))
    if args.json:
        report = {
            "device": describe_device(device),
            "torch": torch.__version__,
            "load_avg_1min": load_before,  # other processes on the machine skew CPU figures
            "args": vars(args),
            "rows": rows,
        }
        text = json.dumps(report, indent=1)
        with reported(args.json, "--json"):  # a full disk: one line, and an earlier file stays whole
            atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    run_cli(main)
