"""What only a GPU can show: the CUDA paths compute what the CPU paths compute.

Skipped without CUDA (CI has none). On a GPU machine: ``python -m pytest -q tests/test_cuda.py``.
"""

import copy
import random
import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_dataset, noisy_photo, read_log, run_pretrain

import models_mae
from util.data.device_decode import EncodedBatch, RandomResizedCropFlipOnDevice
from util.train.precision import LossScaler, autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_loader_decodes_on_the_gpu_as_on_the_cpu(tmp_path):
    """nvJPEG and libjpeg-turbo may round the inverse DCT and chroma upsampling differently:
    close, not equal."""
    paths = [noisy_photo(tmp_path / f"{i}.jpg", w, h) for i, (w, h) in enumerate([(500, 375), (375, 500), (640, 427)])]
    transform = RandomResizedCropFlipOnDevice(224)
    random.seed(0)
    batch = EncodedBatch([transform(str(p)) for p in paths])
    on_gpu, on_cpu = batch.to("cuda"), batch.to("cpu")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == (3, 3, 224, 224)
    diff = (on_gpu.cpu().float() - on_cpu.float()).abs()
    assert diff.mean() < 2.0, diff.mean()


def _tiny_step_loss(precision: str) -> float:
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4().cuda()
    imgs = torch.randn(8, 3, 32, 32, device="cuda")
    noise = torch.rand(8, model.num_patches, device="cuda")
    with autocast(precision, "cuda"):
        loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
    return loss.item()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_loss_is_close_to_fp32(precision):
    fp32 = _tiny_step_loss("fp32")
    assert abs(_tiny_step_loss(precision) - fp32) < 2e-2 * fp32


def _step(scaler: LossScaler, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One update as util.train.loop makes it."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_fp16_scaler_skips_an_overflowing_step_and_backs_off():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4).cuda()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    scaler = LossScaler("fp16")
    before = copy.deepcopy(layer.state_dict())
    scale = scaler.state_dict()["scale"]
    loss = layer(torch.randn(2, 4, device="cuda")).sum() * float("inf")
    _step(scaler, loss, optimizer)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed after an overflowing step"
    assert scaler.state_dict()["scale"] == scale / 2
    optimizer.zero_grad(set_to_none=True)  # as the training loop does after every step
    _step(scaler, layer(torch.randn(2, 4, device="cuda")).sum(), optimizer)
    assert not torch.equal(layer.weight, before["weight"]), "a finite step must update"


def test_fused_adamw_matches_foreach_on_the_gpu():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4().cuda()
    other = copy.deepcopy(model)
    imgs = torch.randn(4, 3, 32, 32, device="cuda")
    noise = torch.rand(4, model.num_patches, device="cuda")
    for m, fused in ((model, True), (other, False)):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=fused, foreach=not fused)
        for _ in range(3):
            optimizer.zero_grad()
            m(imgs, mask_ratio=0.75, noise=noise)[0].backward()
            optimizer.step()
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("loader", ["fast", "device"])
def test_pretraining_on_the_gpu(tmp_path, loader):
    """bf16, fused AdamW, pinned memory, 2 workers and each loader, through main_pretrain."""
    data = make_dataset(tmp_path / "data", 16)
    flags = ["--device", "cuda", "--precision", "bf16", "--num_workers", "2", "--epochs", "3", "--blr", "2e-3"]
    run_pretrain(data, tmp_path / "out", *flags, "--loader", loader, "--print_freq", "1", "--vis_freq", "1")
    losses = [line["train_loss"] for line in read_log(tmp_path / "out")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "out" / "reconstruction-2.png").exists()


def test_torchrun_nccl_two_processes_if_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    data = make_dataset(tmp_path / "data", 16)
    argv = ["-m", "torch.distributed.run", "--nproc_per_node=2", "main_pretrain.py", "--device", "cuda"]
    argv += ["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    argv += ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--batch_size", "8"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
