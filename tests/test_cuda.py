"""What only a GPU can show: the CUDA paths compute what the CPU paths compute.

Skipped without CUDA (CI has none), and where the suite hides the GPUs (tests/conftest.py: unless
MAE_TEST_CUDA=1). On a GPU machine: ``MAE_TEST_CUDA=1 python -m pytest -q tests/test_cuda.py``.
"""

import copy
import json
import os
import random
import subprocess
import sys
from argparse import Namespace
from collections.abc import Callable

import pytest
import torch
from helpers import DEMO, REPO, make_dataset, noisy_photo, read_log, run_pretrain
from torch.profiler import ProfilerActivity, profile

import models_mae
from util.checkpoint.state import TrainState
from util.data.device_decode import FALLBACKS, EncodedBatch, RandomResizedCropFlipOnDevice
from util.data.memory_loader import MemoryLoader
from util.data.sampling import SeededSampler
from util.train.precision import LossScaler, autocast
from util.train.steps import optimizer_step

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU, shown to the suite by MAE_TEST_CUDA=1 (tests/conftest.py)"
)


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
    """One update as the engines make it (util.train.steps.optimizer_step)."""
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


def test_a_cpu_runs_optimizer_state_resumes_into_fused_adamw_and_steps_with_the_fp16_scaler(tmp_path):
    """A checkpoint of a non-fused AdamW (a CPU run's; the official code's) holds CPU step counts, which torch
    kept on the CPU when the groups it loaded said non-fused: a fused CUDA AdamW's first step refused them."""
    torch.manual_seed(0)
    on_cpu = torch.nn.Linear(4, 4)
    cpu_optimizer = torch.optim.AdamW(on_cpu.parameters(), lr=0.1)
    on_cpu(torch.randn(2, 4)).sum().backward()
    cpu_optimizer.step()
    torch.save({"optimizer": cpu_optimizer.state_dict()}, tmp_path / "cpu.pth")
    layer = copy.deepcopy(on_cpu).cuda()
    state = TrainState(
        layer, torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True), LossScaler("fp16"), Namespace()
    )
    state.load_state_dict(torch.load(tmp_path / "cpu.pth", map_location="cpu", weights_only=True), "cpu.pth")
    assert {s["step"].device.type for s in state.optimizer.state.values()} == {"cuda"}
    before = layer.weight.detach().clone()
    # An fp32 loss: a 16-bit one would overflow at the scaler's first scale (2**16) and the step be skipped.
    state.scaler.scale(layer(torch.randn(2, 4, device="cuda")).sum()).backward()
    optimizer_step(layer, state.optimizer, state.scaler, clip_grad=1.0)  # unscale, clip, fused step (found_inf)
    assert not torch.equal(layer.weight, before), "the resumed step must update"
    assert [float(s["step"]) for s in state.optimizer.state.values()] == [2.0, 2.0]


@pytest.mark.parametrize("loader", ["fast", "device"])
def test_pretraining_on_the_gpu(tmp_path, loader):
    """bf16, fused AdamW, pinned memory, 2 workers and each loader, through main_pretrain; the
    device loader decodes every (plain) JPEG on the GPU, none on the CPU."""
    data = make_dataset(tmp_path / "data", 16)
    flags = ["--device", "cuda", "--precision", "bf16", "--num_workers", "2", "--epochs", "3", "--blr", "2e-3"]
    FALLBACKS.reset()
    run_pretrain(data, tmp_path / "out", *flags, "--loader", loader, "--print_freq", "1", "--vis_freq", "1")
    losses = [line["train_loss"] for line in read_log(tmp_path / "out")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "out" / "reconstruction-2.png").exists()
    assert FALLBACKS.count == 0


def test_plain_jpegs_are_decoded_on_the_gpu_not_on_the_cpu(tmp_path):
    sizes = [(500, 375), (375, 500), (640, 427), (33, 17)]
    paths = [noisy_photo(tmp_path / f"{i}.jpg", w, h) for i, (w, h) in enumerate(sizes)]
    paths.append(noisy_photo(tmp_path / "gray.jpg", 120, 90, mode="L"))
    paths += sorted(DEMO.glob("cat/*.jpg"))[:8]
    transform = RandomResizedCropFlipOnDevice(64)
    FALLBACKS.reset()
    images = EncodedBatch([transform(str(p)) for p in paths]).to("cuda")
    assert images.shape == (len(paths), 3, 64, 64) and images.device.type == "cuda"
    assert FALLBACKS.count == 0


def test_memory_loader_crops_on_the_gpu_as_on_the_cpu():
    """--loader memory resamples in float64 on the GPU, where training allows TF32 (whose 10-bit
    mantissa would move many pixels by one level), and in float32 on the CPU: the same crops."""
    images = torch.randint(0, 256, (64, 3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as util.train.run.start sets it
    try:
        batches = [next(iter(MemoryLoader(images.to(d), SeededSampler(64, 0), 32, 32)))[0] for d in ("cuda", "cpu")]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    on_gpu, on_cpu = batches
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == (32, 3, 32, 32)
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert diff.max() <= 1 and (diff == 0).double().mean() >= 0.999, (diff.max(), (diff > 0).double().mean())


def test_torchrun_one_process_nccl_compiled_with_accumulation_on_the_demo_data(tmp_path):
    """The launch path of a GPU node: torchrun, an NCCL process group, --compile and --accum_iter 2."""
    out = tmp_path / "out"
    argv = ["-m", "torch.distributed.run", "--nproc_per_node=1", "main_pretrain.py", "--device", "cuda"]
    argv += ["--data_path", str(DEMO.parent / "cifar10-2k-split"), "--output_dir", str(out), "--log_dir", str(out)]
    argv += ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--batch_size", "64", "--epochs", "2"]
    argv += ["--compile", "--accum_iter", "2", "--precision", "bf16", "--num_workers", "2", "--vis_freq", "0"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 2 and all(0 < line["train_loss"] < 10 for line in log), log
    assert (out / "checkpoint-1.pth").exists()


def test_torchrun_nccl_two_processes_if_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    data = make_dataset(tmp_path / "data", 16)
    argv = ["-m", "torch.distributed.run", "--nproc_per_node=2", "main_pretrain.py", "--device", "cuda"]
    argv += ["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    argv += ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--batch_size", "8"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_torchrun_two_processes_on_one_gpu_stop_in_one_line_before_nccl(tmp_path):
    """`CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=2`: both ranks take the one GPU and stop, saying so,
    where NCCL refused them ("Duplicate GPU detected") or hung. torchrun may end a rank before it says it."""
    data = make_dataset(tmp_path / "data", 4)
    argv = ["-m", "torch.distributed.run", "--nproc_per_node=2", "main_pretrain.py", "--device", "cuda"]
    argv += ["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    argv += ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--batch_size", "8"]
    one_gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": one_gpu}
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: ranks 0, 1 of 2 share one GPU (GPU " in result.stderr, result.stderr[-3000:]
    assert "Duplicate GPU" not in result.stderr and "another process of this job stopped" not in result.stderr


def _kernel_names(run: Callable[[], None]) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [event.key for event in prof.key_averages()]


def test_compiled_bf16_step_uses_flash_attention_and_matches_eager():
    """What main_pretrain --compile runs in bf16: the compiled forward and backward call the flash
    kernels of scaled_dot_product_attention (head width 64 and 32 here), torch's own or cuDNN's, and
    give eager's loss and gradients to bf16's precision."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4().cuda()
    compiled = torch.compile(model)
    imgs = torch.randn(16, 3, 32, 32, device="cuda")
    noise = torch.rand(16, model.num_patches, device="cuda")
    results = []
    for forward in (model, compiled):
        model.zero_grad(set_to_none=True)
        with autocast("bf16", "cuda"):
            loss = forward(imgs, mask_ratio=0.75, noise=noise)[0]
        loss.backward()
        results.append((loss.item(), model.blocks[0].attn.qkv.weight.grad.clone()))

    def step() -> None:
        with autocast("bf16", "cuda"):
            compiled(imgs, mask_ratio=0.75, noise=noise)[0].backward()

    names = _kernel_names(step)
    attention = [n for n in names if any(word in n.lower() for word in ("flash", "attention", "fmha", "sdpa"))]
    # torch's flash_fwd/flash_bwd kernels, or cuDNN's ..._sdpa_sm90_flash_fprop/bprop_...: torch puts cuDNN
    # first on Hopper where its cuDNN is newer than 9.15.0 (torch 2.11 with CUDA 13 comes with 9.19).
    assert any("flash" in n and ("fwd" in n or "fprop" in n) for n in names), attention
    assert any("flash" in n and ("bwd" in n or "bprop" in n) for n in names), attention
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    assert abs(compiled_loss - eager_loss) < 1e-2 * eager_loss
    assert torch.linalg.norm(compiled_grad - eager_grad) < 5e-2 * torch.linalg.norm(eager_grad)
