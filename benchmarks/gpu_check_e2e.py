"""gpu_check.sh part 5: end to end, the loaders feeding the training step, img/s.

Ours: main_pretrain.py's compiled step fed by each loader (``ours_fast``, ``ours_device``,
``ours_torchvision``). The official pipeline (``official``): its torchvision recipe on an
ImageFolder through a DataLoader as its main_pretrain.py builds them (DistributedSampler, pinned
memory, the same workers), into its own ``engine_pretrain.train_one_epoch`` (fp16, its loss
scaler, a host sync per step), timed over whole calls of it after a warm-up call.
"""

import contextlib
import itertools
import math
import time
import warnings
from argparse import Namespace
from collections.abc import Iterator
from unittest import mock

import torch
import torchvision.transforms as T
from timm.optim import param_groups_weight_decay
from torchvision import datasets

import models_mae
from benchmarks import gpu_check_official as official
from benchmarks.bench_pretrain import build_loader, build_step, endless_batches, sync, time_steps
from benchmarks.gpu_check_common import PartRecord, Sizes, as_in_training, data_path, image_folder, run_part
from util.data.device_decode import FALLBACKS
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD

warnings.filterwarnings("ignore", category=FutureWarning)  # the official code's torch.cuda.amp calls


class Batches:
    """``n`` batches at a time from one iterator, as a sized iterable (what train_one_epoch takes)."""

    def __init__(self, source: Iterator, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        return itertools.islice(self.source, self.n)


def official_loader(sizes: Sizes, images: int) -> torch.utils.data.DataLoader:
    """The official recipe (random resized crop 0.2-1 bicubic, flip, normalise) over the subset's
    ImageFolder, repeated to ``images`` so that one epoch outlasts the measurement."""
    transform = T.Compose([
        T.RandomResizedCrop(sizes.input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])  # fmt: skip
    folder = datasets.ImageFolder(image_folder(sizes), transform=transform)
    dataset = torch.utils.data.ConcatDataset([folder] * math.ceil(images / len(folder)))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=sizes.batch, num_workers=sizes.workers, pin_memory=True, drop_last=True
    )


@contextlib.contextmanager
def official_exit_as_error() -> Iterator[None]:
    """The official train_one_epoch calls sys.exit(1) on a non-finite loss: an error of this row, not
    the end of the part (our rows come after it)."""
    try:
        yield
    except SystemExit as e:
        raise RuntimeError(f"the official train_one_epoch exited with status {e.code} (a non-finite loss)") from e


def official_pipeline(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    reason = official.missing_reason()
    if reason:
        raise FileNotFoundError(reason)
    code = official.load()
    torch.manual_seed(0)
    with torch.device(device):  # initialised there (bench_pretrain.build_step says why)
        ours = models_mae.create_model(sizes.e2e_model, sizes.input_size)
    model = official.official_model(ours)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95))
    scaler = code.misc.NativeScalerWithGradNormCount()
    args = Namespace(accum_iter=1, mask_ratio=0.75, lr=1.5e-4, min_lr=0.0, warmup_epochs=40, epochs=800)
    loader = official_loader(sizes, (sizes.e2e_warmup + sizes.e2e_steps) * sizes.batch)
    batches = iter(loader)
    # On a CPU its per-step torch.cuda.synchronize() has no device to wait for (and would raise).
    no_sync = mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None) if device.type == "cpu" else None
    with no_sync or mock.patch.dict({}), official_exit_as_error():
        code.engine_pretrain.train_one_epoch(
            model, Batches(batches, sizes.e2e_warmup), optimizer, device, 0, scaler, args=args
        )
        sync(device)
        begin = time.perf_counter()
        code.engine_pretrain.train_one_epoch(
            model, Batches(batches, sizes.e2e_steps), optimizer, device, 0, scaler, args=args
        )
        elapsed = time.perf_counter() - begin
    record.row(
        "e2e",
        {
            "model": sizes.e2e_model,
            "pipeline": "official",
            "img_s": sizes.e2e_steps * sizes.batch / elapsed,
            "workers": sizes.workers,
        },
    )


def ours(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    args = Namespace(
        model=sizes.e2e_model, input_size=sizes.input_size, batch_size=sizes.batch, device=str(device),
        mask_ratio=0.75, grad_checkpointing=False, compile=True, data_path=data_path(sizes), seed=0,
        compile_backend="inductor" if device.type == "cuda" else "aot_eager",
    )  # fmt: skip
    torch.manual_seed(0)
    _, step = build_step(args, sizes.precision, plain=False)
    for loader in ("fast", "device", "torchvision"):

        def measure(loader: str = loader) -> None:
            FALLBACKS.reset()
            batches = endless_batches(build_loader(args, loader, sizes.workers), device)
            elapsed, waited = time_steps(step, batches.__next__, sizes.e2e_steps, sizes.e2e_warmup, device)
            batches.close()
            row = {
                "model": sizes.e2e_model,
                "pipeline": f"ours_{loader}",
                "img_s": sizes.e2e_steps * sizes.batch / elapsed,
            }
            row.update(workers=sizes.workers, data_wait=waited / elapsed)
            if loader == "device":
                row["cpu_fallbacks"] = FALLBACKS.count
            record.row("e2e", row)

        record.attempt(f"e2e ours_{loader}", measure)


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    as_in_training(device)
    record.attempt("e2e official", lambda: official_pipeline(record, sizes, device))
    record.attempt("e2e ours", lambda: ours(record, sizes, device))


if __name__ == "__main__":
    run_part("e2e", main)
