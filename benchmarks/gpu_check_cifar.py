"""gpu_check.sh part 3: what the CIFAR-10 study of recipes/cifar10_gpu needs to plan its epochs.

Its pre-training step (``mae_vit_tiny_patch2`` at 32 px, batch 1024, bf16; ours eager and compiled,
interleaved, with MFU: ``plan.py --mfu``); ``--loader memory`` alone, over a synthetic uint8 data set
the size of CIFAR-10's training set made on the device (no data travels); the step fed by it,
compiled (``ours_memory``) and eager as the study runs it (``ours_memory_eager``); and its
fine-tuning step (``vit_tiny_patch2``, batch 512, eager, then compiled), as main_finetune.py trains
with the study's mixup, cutmix and label smoothing.
"""

import math
from argparse import Namespace

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import main_finetune
import models_mae
import models_vit
from benchmarks.bench_pretrain import endless_batches, mae_train_flops, reset_memory, time_steps, vit_train_flops
from benchmarks.gpu_check_common import PartRecord, Sizes, as_in_training, run_part, time_for
from benchmarks.gpu_check_step import MASK_RATIO, Impl, compile_backend, interleave, ours, peak_tflops, row
from util.data.memory_loader import MemoryLoader
from util.data.sampling import SeededSampler
from util.memory import require
from util.train.precision import LossScaler, autocast
from util.train.steps import optimizer_step

LOADER_BATCHES = 20  # timed, after as many warm-up batches as the step part's warm-up steps
COMPILE_SECONDS = {"cuda": 45, "cpu": 5}  # what the compiled fine-tuning row needs: inductor's compilation


def pretrain_impls(record: PartRecord, sizes: Sizes, device: torch.device, peak: float) -> list[Impl]:
    """The study's pre-training step, eager and compiled, on one batch and the same weights."""
    name, size, batch = sizes.cifar_model, sizes.cifar_size, sizes.cifar_batch
    reset_memory(device)
    torch.manual_seed(0)
    weights = models_mae.create_model(name, size).state_dict()
    impls = [ours(name, size, sizes, device, weights, compiled) for compiled in (False, True)]
    imgs = torch.randn(batch, 3, size, size, device=device)
    interleave(impls, imgs, sizes)
    flops = mae_train_flops(impls[0].model, batch, MASK_RATIO)
    for impl in impls:
        record.row("step", row(impl, name, size, batch, flops, peak))
    return impls


def memory_loader(sizes: Sizes, device: torch.device) -> MemoryLoader:
    """``--loader memory`` over random uint8 images (the crops cost the same whatever the pixels)."""
    shape = (sizes.cifar_images, 3, sizes.cifar_size, sizes.cifar_size)
    require(math.prod(shape), f"{shape[0]} synthetic {shape[2]}-px images", "free the GPU's memory", device)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return MemoryLoader(images, SeededSampler(len(images), seed=0), sizes.cifar_batch, sizes.cifar_size)


def loader_row(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    batches = endless_batches(memory_loader(sizes, device), device)
    elapsed, _ = time_steps(lambda imgs: None, batches.__next__, LOADER_BATCHES, sizes.warmup, device)
    fields = {"loader": "memory", "workers": 0, "input_size": sizes.cifar_size, "batch": sizes.cifar_batch}
    rate = LOADER_BATCHES * sizes.cifar_batch / elapsed
    record.row("loader", {**fields, "img_s": rate, "images": sizes.cifar_images})


def e2e_row(record: PartRecord, impl: Impl, sizes: Sizes, device: torch.device) -> None:
    """The pre-training step fed by the memory loader (uint8 batches, normalised in the step): ``ours_memory``
    compiled, ``ours_memory_eager`` as the study's commands run it."""
    batches = endless_batches(memory_loader(sizes, device), device)
    elapsed, waited = time_steps(impl.step, batches.__next__, sizes.e2e_steps, sizes.e2e_warmup, device)
    rate = sizes.e2e_steps * sizes.cifar_batch / elapsed
    pipeline = "ours_memory" if impl.name == "ours_compiled" else "ours_memory_eager"
    fields = {"model": sizes.cifar_model, "pipeline": pipeline, "img_s": rate, "workers": 0}
    record.row("e2e", {**fields, "data_wait": waited / elapsed, "input_size": sizes.cifar_size})


def finetune_step(sizes: Sizes, device: torch.device, compiled: bool) -> Impl:
    """main_finetune.py's step with the study's recipe (recipes/cifar10_gpu/finetune.sh): drop path 0.1,
    layer decay 0.75, fused AdamW, mixup 0.8 and cutmix 1.0 on the device with smoothing 0.1, bf16."""
    torch.manual_seed(0)
    model = models_vit.create_model(
        sizes.cifar_ft_model, sizes.cifar_size, 3, num_classes=10, global_pool=True, drop_path_rate=0.1
    ).to(device)
    optimizer = main_finetune.build_optimizer(model, Namespace(weight_decay=0.05, layer_decay=0.75, lr=1e-3), device)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion, scaler = SoftTargetCrossEntropy(), LossScaler(sizes.precision)
    forward = torch.compile(model, backend=compile_backend(device)) if compiled else model
    labels = torch.randint(0, 10, (sizes.cifar_ft_batch,), device=device)

    def step(imgs: torch.Tensor) -> None:
        samples, targets = mixup(imgs, labels)
        with autocast(sizes.precision, str(device)):
            loss = criterion(forward(samples), targets)
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, None)

    return Impl("ours_compiled" if compiled else "ours_eager", "fine-tuning", model, step)


def finetune_row(record: PartRecord, sizes: Sizes, device: torch.device, peak: float, compiled: bool) -> None:
    reset_memory(device)
    impl = finetune_step(sizes, device, compiled)
    imgs = torch.randn(sizes.cifar_ft_batch, 3, sizes.cifar_size, sizes.cifar_size, device=device)
    interleave([impl], imgs, sizes)
    flops = vit_train_flops(impl.model, sizes.cifar_ft_batch)
    record.row("step", row(impl, sizes.cifar_ft_model, sizes.cifar_size, sizes.cifar_ft_batch, flops, peak))


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    as_in_training(device)
    peak = peak_tflops(record, sizes, device)
    impls = record.attempt("pre-training step", lambda: pretrain_impls(record, sizes, device, peak)) or []
    record.attempt("memory loader", lambda: loader_row(record, sizes, device))
    for impl in reversed(impls):  # the compiled step first: the row the issue asks for
        record.attempt(f"e2e {impl.name}", lambda impl=impl: e2e_row(record, impl, sizes, device))
    record.attempt("fine-tuning step", lambda: finetune_row(record, sizes, device, peak, compiled=False))
    if time_for(record, "fine-tuning step compiled", COMPILE_SECONDS[device.type]):
        record.attempt("fine-tuning step compiled", lambda: finetune_row(record, sizes, device, peak, compiled=True))


if __name__ == "__main__":
    run_part("cifar", main)
