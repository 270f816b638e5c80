"""The fast paths that are ours: activation checkpointing computes the plain path's loss and
gradients, and ``--compile`` trains through the compiled wrapper while its checkpoints keep the
plain model's names (they load into an uncompiled model, and a compiled run resumes from them).

Whether torch.compile, fused attention or fused AdamW compute what the plain kernels compute is
PyTorch's to test, not ours: those comparisons are left out (compiling alone took 90 s)."""

import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from helpers import load, make_dataset, preserved_signals, run_pretrain  # noqa: E402

import models_mae  # noqa: E402


def _loss_and_grads(model, imgs, noise):
    model.zero_grad(set_to_none=True)
    loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_fused_attention_is_on_by_default():
    model = models_mae.mae_vit_tiny_patch4()
    assert all(b.attn.fused_attn for b in [*model.blocks, *model.decoder_blocks]), "timm's fused attention is off"


def test_grad_checkpointing_matches_plain():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(norm_pix_loss=True)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    loss_a, grads_a = _loss_and_grads(model, imgs, noise)
    loss_b, grads_b = _loss_and_grads(checkpointed, imgs, noise)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_trains_through_the_wrapper_and_checkpoints_keep_plain_names(tmp_path, monkeypatch):
    """``--compile`` wraps the model in torch.compile; run with the "force_eager" stance, the
    wrapper is called but nothing is compiled (what the compiler makes of it is PyTorch's)."""
    data = make_dataset(tmp_path / "data", 6)  # 18 images: one step of 16
    out = tmp_path / "out"
    real_compile, compiled = torch.compile, []

    def spy(model, *a, **k):
        compiled.append(real_compile(model, *a, **k))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", spy)
    flags = ["--warmup_epochs", "0", "--vis_freq", "0", "--log_dir", "", "--compile"]
    with preserved_signals(), torch.compiler.set_stance("force_eager"):
        run_pretrain(data, out, *flags, "--epochs", "1")
        run_pretrain(data, out, *flags, "--epochs", "2", "--resume", str(out / "checkpoint-0.pth"))
    assert len(compiled) == 2, "--compile did not compile the model"
    assert all(next(iter(c.state_dict())).startswith("_orig_mod.") for c in compiled)

    first, last = load(out / "checkpoint-0.pth"), load(out / "checkpoint-1.pth")
    assert last["epoch"] == 1, "the compiled run did not resume from the compiled run's checkpoint"
    plain = models_mae.mae_vit_tiny_patch4()
    assert list(last["model"]) == list(plain.state_dict()), "checkpoint names differ from the plain model's"
    plain.load_state_dict(last["model"])  # strict
    assert any(not torch.equal(first["model"][k], v) for k, v in last["model"].items()), "no step was taken"
