"""gpu_check.sh part 3: the training step, the official code against ours, on the same batch and
weights, the impls interleaved step by step (so that the GPU's clocks and temperature hit all alike).

Impls: ``official_as_shipped`` (its model with timm 0.3.2's explicit attention, fp16 autocast, its
loss scaler with the gradient norm, non-fused AdamW, ``loss.item()`` and a synchronize every step:
its engine_pretrain.py's step), the same with ``fused_attn=True`` (what current timm gives it), the
official model in our loop (``official_in_our_loop``), ``ours_eager`` and ``ours_compiled``
(main_pretrain.py's step: bf16, fused AdamW, no host sync). Before any timing, the official and our
model must give the same fp32 loss on the same weights and masking noise.
"""

import functools
import json
import math
import statistics
import time
import warnings
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

import models_mae
from benchmarks import gpu_check_official as official
from benchmarks.bench_pretrain import build_step, mae_train_flops, make_step, reset_memory, sync
from benchmarks.gpu_check_common import PartRecord, Sizes, as_in_training, matmul_tflops, run_part, time_for
from util import memory
from util.cli.errors import UserError
from util.registry import SHAPES_ONLY

MASK_RATIO = 0.75
T = TypeVar("T")
# A compilation (CPU-bound: the same on either kind) and 23 steps, sized on an H200. An H100's largest batch is
# about 0.55x an H200's (78 GiB against 139) at the same matmul rate, so its steps take less: 70 s holds for both.
LARGEST_BATCH_SECONDS = 70
# The share of the free memory the largest batch's estimated peak may fill; the rest is for what the batch-256
# peak does not count (the caching allocator's fragmentation, cuBLAS and compiled kernels' workspaces).
LARGEST_BATCH_SHARE = 0.92
# torch.cuda.amp.autocast and GradScaler, as the official code calls them, are deprecated aliases.
warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass
class Impl:
    name: str
    variant: str
    model: nn.Module
    step: Callable[[torch.Tensor], None]
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def persistent_bytes(self) -> int:
        """Weights and AdamW's two moments, all fp32: what stays allocated between steps."""
        return 3 * sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)


def official_step(model: nn.Module, code: official.OfficialCode, device: torch.device) -> Callable:
    """engine_pretrain.train_one_epoch's step as shipped (accum_iter 1)."""
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95))
    scaler = code.misc.NativeScalerWithGradNormCount()

    def step(imgs: torch.Tensor) -> None:
        with torch.cuda.amp.autocast():
            loss, _, _ = model(imgs, mask_ratio=MASK_RATIO)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the official step's loss is {loss.item()}")
        scaler(loss, optimizer, parameters=model.parameters(), update_grad=True)
        optimizer.zero_grad()
        sync(device)  # torch.cuda.synchronize() (none on a CPU, where it has no device to wait for)

    return step


def bench_args(name: str, input_size: int, device: torch.device, compiled: bool) -> Namespace:
    return Namespace(
        model=name, input_size=input_size, device=str(device), mask_ratio=MASK_RATIO, grad_checkpointing=False,
        compile=compiled, compile_backend=compile_backend(device),
    )  # fmt: skip


def compile_backend(device: torch.device) -> str:
    """inductor (torch.compile's default mode) on the GPU; aot_eager at toy sizes, where inductor's C++ builds
    alone would take minutes of a small CPU."""
    return "inductor" if device.type == "cuda" else "aot_eager"


def ours(name: str, input_size: int, sizes: Sizes, device: torch.device, weights: dict | None, compiled: bool) -> Impl:
    model, step = build_step(bench_args(name, input_size, device, compiled), sizes.precision, plain=not compiled)
    if weights is not None:
        model.load_state_dict(weights)
    return Impl("ours_compiled" if compiled else "ours_eager", "", model, step)


def official_impls(record: PartRecord, ref: nn.Module, sizes: Sizes, imgs: torch.Tensor, name: str) -> list[Impl]:
    """The official rows, after checking that its model computes our loss; [] where it cannot run."""
    reason = official.missing_reason()
    if reason:
        record.error(f"{name}: official rows left out: {reason}")
        return []
    code = official.load()
    loss_ours, loss_official = official.same_loss(ref, official.official_model(ref), imgs, MASK_RATIO)
    check = {"ours": loss_ours, "official": loss_official}
    record.set(f"loss_check_{name}", check)
    if not abs(loss_ours - loss_official) <= 1e-4 * abs(loss_ours):
        raise AssertionError(f"official and our model give different losses on the same weights and noise: {check}")
    device = imgs.device
    impls = []
    for fused in (False, True):
        model = official.official_model(ref, fused_attn=fused)
        impls.append(
            Impl("official_as_shipped", "fused_attn=True" if fused else "", model, official_step(model, code, device))
        )
    model = official.official_model(ref)
    our_loop = make_step(model, model, bench_args(name, sizes.input_size, device, False), sizes.precision)
    impls.append(Impl("official_in_our_loop", "", model, our_loop))
    for impl in impls:
        impl.extra["loss_check"] = check
    return impls


def timed_step(impl: Impl, imgs: torch.Tensor, device: torch.device) -> None:
    """One step, its time (CUDA events on a GPU) and its peak memory above what the other impls hold."""
    if device.type == "cuda":
        for p in impl.model.parameters():  # ours drop them at the step's start, the official code at its end:
            p.grad = None  # dropped before ``base`` here, every impl's peak counts its gradients alike
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        impl.step(imgs)
        end.record()
        end.synchronize()
        impl.times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated(device) - base + impl.persistent_bytes()
        impl.peak_bytes = max(impl.peak_bytes, peak)
    else:
        begin = time.perf_counter()
        impl.step(imgs)
        impl.times.append(time.perf_counter() - begin)


def interleave(impls: list[Impl], imgs: torch.Tensor, sizes: Sizes) -> None:
    for impl in impls:  # compilation, autotuning, the allocator's growth
        for _ in range(sizes.warmup):
            impl.step(imgs)
    sync(imgs.device)
    for i in range(sizes.steps):
        shift = i % len(impls)  # no impl always runs right after the same other one
        for impl in impls[shift:] + impls[:shift]:
            timed_step(impl, imgs, imgs.device)


def row(impl: Impl, name: str, input_size: int, batch: int, flops: int, peak_tflops: float) -> dict:
    median = statistics.median(impl.times)
    return {
        "model": name,
        "impl": impl.name,
        "input_size": input_size,
        "batch": batch,
        "img_s": batch / median,
        "img_s_min": batch / max(impl.times),
        "img_s_max": batch / min(impl.times),
        "tflops": flops / median / 1e12,
        "mfu": flops / median / (peak_tflops * 1e12),
        "peak_mem_gib": impl.peak_bytes / 2**30 if impl.peak_bytes else None,
        "variant": impl.variant,
        "steps": len(impl.times),
        **impl.extra,
    }


def bench_model(record: PartRecord, name: str, sizes: Sizes, device: torch.device, peak: float) -> list[dict]:
    reset_memory(device)
    torch.manual_seed(0)
    with torch.device(device):  # initialised there (bench_pretrain.build_step says why)
        ref = models_mae.create_model(name, sizes.input_size)
    imgs = torch.randn(sizes.batch, ref.in_chans, sizes.input_size, sizes.input_size, device=device)
    weights = ref.state_dict()
    impls = record.attempt(f"{name} official", lambda: official_impls(record, ref, sizes, imgs, name)) or []
    impls += [ours(name, sizes.input_size, sizes, device, weights, compiled) for compiled in (False, True)]
    interleave(impls, imgs, sizes)
    flops = mae_train_flops(ref, sizes.batch, MASK_RATIO)
    rows = [row(impl, name, sizes.input_size, sizes.batch, flops, peak) for impl in impls]
    for r in rows:
        record.row("step", r)
    return rows


def first_that_fits(measure: Callable[[int], T], batches: list[int], device: torch.device) -> tuple[int, T, list[str]]:
    """``measure(batch)`` for each batch in turn until one neither runs out of GPU memory nor is refused
    by ``util.memory.require``: that batch, its result and a line per batch that did not fit."""
    failures = []
    for batch in batches:
        try:
            return batch, measure(batch), failures
        except (torch.cuda.OutOfMemoryError, UserError) as e:
            failures.append(f"batch {batch}: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
        # Out of the except block, whose traceback held the failed try's tensors: now they can go.
        reset_memory(device)
    raise RuntimeError(f"no batch fitted: {'; '.join(failures)}")


def batch_tries(per_image: float, fixed: float, free: float) -> list[int]:
    """The batches (multiples of 64) the largest-batch row tries in turn: the largest whose estimated peak
    (``fixed`` bytes and ``per_image`` per image) fills ``LARGEST_BATCH_SHARE`` of ``free`` bytes, then 80% of
    it. From the free memory, not the card's total: an H100 has 78 GiB against an H200's 139, and whatever is
    still allocated (the CUDA context, an earlier row's leftovers) is not this row's to take."""
    estimate = int((LARGEST_BATCH_SHARE * free - fixed) / per_image) // 64 * 64
    return [b for b in dict.fromkeys([estimate, int(0.8 * estimate) // 64 * 64]) if b >= 64]


def largest_batch(record: PartRecord, name: str, rows: list[dict], sizes: Sizes, device: torch.device, peak: float):
    """Ours compiled at the largest batch (a multiple of 64) that the batch-256 peak says fits in 92% of the GPU's
    free memory; at 80% of that batch where it does not fit after all."""
    measured = next(r for r in rows if r["impl"] == "ours_compiled")
    reset_memory(device)
    with torch.device("meta"):
        model = models_mae.create_model(name, sizes.input_size, **SHAPES_ONLY)
    fixed = 4 * memory.model_bytes(model)  # weights, grads, AdamW
    per_image = (measured["peak_mem_gib"] * 2**30 - fixed) / sizes.batch
    free = memory.available_bytes(device)
    tries = batch_tries(per_image, fixed, free)
    if not tries:
        raise RuntimeError(f"{free / 2**30:.1f} GiB free hold no batch of 64 at {per_image / 2**20:.0f} MiB an image")

    def measure(batch: int) -> Impl:
        need = fixed + per_image * batch
        memory.require(need, f"the {name} step at batch {batch}", "a smaller batch is tried next", device)
        impl = ours(name, sizes.input_size, sizes, device, None, compiled=True)
        impl.variant = "largest batch"
        imgs = torch.randn(batch, impl.model.in_chans, sizes.input_size, sizes.input_size, device=device)
        interleave([impl], imgs, sizes)
        return impl

    batch, impl, failures = first_that_fits(measure, tries, device)
    flops = mae_train_flops(impl.model, batch, MASK_RATIO)
    fields = {"did_not_fit": failures, "free_gib": free / 2**30}  # what the batches were sized from, on this GPU
    record.row("step", {**row(impl, name, sizes.input_size, batch, flops, peak), **fields})


def peak_tflops(record: PartRecord, sizes: Sizes, device: torch.device) -> float:
    """The environment part's matmul peak where it ran, else measured here."""
    env = Path(record.path).with_name("env.json")
    measured = json.loads(env.read_text())["values"].get("matmul_tflops") if env.is_file() else None
    return measured or matmul_tflops(device, sizes.matmul_n)


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    as_in_training(device)
    peak = peak_tflops(record, sizes, device)
    record.set("peak_tflops", peak)
    rows = {}
    for name in sizes.step_models:
        rows[name] = record.attempt(name, lambda name=name: bench_model(record, name, sizes, device, peak))
    name = sizes.largest_batch_model  # last: a recompilation, and the row the issue asks for least
    if name and rows.get(name) and time_for(record, f"{name} largest batch", LARGEST_BATCH_SECONDS):
        biggest = functools.partial(largest_batch, record, name, rows[name], sizes, device, peak)
        record.attempt(f"{name} largest batch", biggest)


if __name__ == "__main__":
    run_part("step", main)
