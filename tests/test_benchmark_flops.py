"""The benchmark: its analytic FLOP count, a two-step run of its model mode and a run of its loader mode on CPU;
the benchmarks a user runs start as scripts too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_pretrain import mae_train_flops, main
from models_mae import MaskedAutoencoderViT
from util.cli.errors import UserError


def tiny_model() -> MaskedAutoencoderViT:
    # 8x8 images of 4x4 patches: L = 4 patches of 4*4*3 = 48 values.
    return MaskedAutoencoderViT(
        img_size=8,
        patch_size=4,
        in_chans=3,
        embed_dim=8,
        depth=2,
        num_heads=2,
        decoder_embed_dim=4,
        decoder_depth=1,
        decoder_num_heads=2,
        mlp_ratio=4.0,
    )


def test_flops_match_hand_count():
    # mask ratio 0.5: int(4 * 0.5) = 2 visible patches + class token = 3 encoder tokens;
    # the decoder runs on 4 patches + class token = 5 tokens.
    patch_embed = 2 * 4 * 48 * 8  # 4 patches, 48 -> 8: 3072
    # per block: 24 D^2 per token + 4 T D per token, times T tokens
    encoder_block = 24 * 8**2 * 3 + 4 * 3 * 8 * 3  # 4608 + 288 = 4896
    decoder_embed = 2 * 3 * 8 * 4  # 3 tokens, 8 -> 4: 192
    decoder_block = 24 * 4**2 * 5 + 4 * 5 * 4 * 5  # 1920 + 400 = 2320
    decoder_pred = 2 * 5 * 4 * 48  # 5 tokens, 4 -> 48: 1920
    forward = patch_embed + 2 * encoder_block + decoder_embed + decoder_block + decoder_pred
    assert forward == 17296
    # a step is forward + backward (2x forward); batch of 2
    assert mae_train_flops(tiny_model(), batch=2, mask_ratio=0.5) == 3 * 17296 * 2 == 103776


def test_flops_match_torch_flop_counter():
    # An independent count of the forward's matmuls. The math attention kernel is forced
    # because the counter does not see inside the fused CPU attention kernel.
    model = tiny_model()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 8, 8), mask_ratio=0.5)
    assert counter.get_total_flops() * 3 == mae_train_flops(model, batch=2, mask_ratio=0.5)


def test_model_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--mode", "model", "--model", "mae_vit_tiny_patch4", "--input_size", "32", "--batch_size", "4"]
    # fp32 only (bf16 autocast on a CPU without native bf16 is about 8x slower than fp32, too
    # slow for a unit test); with --grad_checkpointing it is measured besides the plain baseline.
    argv += ["--steps", "2", "--warmup", "1", "--device", "cpu", "--precision", "fp32", "--grad_checkpointing"]
    # One thread: with two on a CPU that other jobs keep busy, the step runs some 40x slower.
    argv += ["--threads", "1"]
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():  # main() seeds the global generator
            rows = main([*argv, "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # leave the other tests their threads
    assert [(r["mode"], r["precision"], r["compile"], r["grad_ckpt"]) for r in rows] == [
        ("model", "fp32", False, False),
        ("model", "fp32", False, True),
    ]
    assert rows[0]["vs_plain"] == 1.0
    assert all(r["images_per_s"] > 0 and r["peak_mem_mib"] > 0 and r["mfu"] is None for r in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_loader_mode_compares_loaders_with_the_recipe(tmp_path):
    from helpers import make_dataset

    data = make_dataset(tmp_path / "data", 8)
    argv = ["--mode", "loader", "--loader", "fast,torchvision", "--data_path", str(data), "--input_size", "32"]
    argv += ["--batch_size", "8", "--num_workers", "0", "--loader_images", "16", "--warmup", "1", "--repeats", "3"]
    with torch.random.fork_rng():
        rows = main([*argv, "--device", "cpu", "--json", ""])
    assert [(r["loader"], r["workers"], r["repeats"]) for r in rows] == [("fast", 0, 3), ("torchvision", 0, 3)]
    fast, recipe = rows
    assert recipe["vs_torchvision"] == 1.0
    assert fast["vs_torchvision"] == pytest.approx(fast["images_per_s"] / recipe["images_per_s"])
    with pytest.raises(UserError, match="--loader pil"):
        main([*argv[:3], "pil", *argv[4:], "--device", "cpu", "--json", ""])


def test_a_json_that_cannot_be_written_is_refused_before_the_benchmark(tmp_path, monkeypatch):
    # Was: the benchmark ran its minutes, then open() failed (File name too long, No such file or directory).
    from benchmarks import bench_pretrain

    monkeypatch.setattr(bench_pretrain, "run", lambda args: pytest.fail("the benchmark ran before --json was checked"))
    argv = ["--mode", "model", "--model", "mae_vit_tiny_patch4", "--device", "cpu", "--precision", "fp32"]
    too_long = tmp_path / ("b" * 256 + ".json")
    with pytest.raises(UserError, match=r"^--json .*: the path is too long .*; give a shorter path$"):
        main([*argv, "--json", str(too_long)])
    with pytest.raises(UserError, match=r"^--json .*: the folder .*absent does not exist; create it first$"):
        main([*argv, "--json", str(tmp_path / "absent" / "bench.json")])


@pytest.mark.parametrize("mode", ["loader", "e2e", "all"])
def test_modes_that_load_images_require_data_path(mode):
    # No default: the development machine's data folder exists nowhere else.
    with pytest.raises(UserError, match=f"--mode {mode} loads images: give --data_path"):
        main(["--mode", mode, "--device", "cpu", "--json", ""])


@pytest.mark.parametrize("script", ["bench_pretrain.py", "make_jpeg_subset.py"])
def test_benchmark_runs_as_a_script_from_another_folder(script, tmp_path):
    # Documented as `python -m benchmarks.X`; `python benchmarks/X.py` is what users type too, and it stopped at
    # `import models_mae` (No module named ...), since a script's own folder, not the repository, is on sys.path.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
