"""util.memory: runs are sized before they allocate. A model too large for the machine is refused
where it is built, in one line naming --input_size; a training step's peak is estimated from the
architecture and refused in one line naming the flags that shrink it."""

import argparse
import os

import pytest
import torch
from helpers import run_ranks

import models_mae
import models_vit
from util import memory
from util.cli.errors import UserError
from util.pos_embed import sincos_2d
from util.train import distributed, run

DDP = torch.nn.parallel.DistributedDataParallel

# Larger than any machine's memory: 625 million patches of the 4-pixel models.
BOMB = 100000


def _meta(create, *args, **kwargs):
    with torch.device("meta"):
        return create(*args, **kwargs)


def _tiny_vit(**kwargs) -> models_vit.VisionTransformer:
    """One block, width 8, 2 heads, MLP 32, on 8x8 images of 4x4 patches: 1 + 4 tokens."""
    return models_vit.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=2, **kwargs
    )


# ------------------------------------------------------------------------------------------
# Building a model


@pytest.mark.parametrize(
    "create,name,kwargs",
    [
        (models_vit.create_model, "vit_tiny_patch4", {"num_classes": 10}),
        (models_mae.create_model, "mae_vit_tiny_patch4", {}),
        (models_mae.create_model, "mae_vit_tiny_patch4", {"mask_ratio": 0.75}),
    ],
)
def test_a_model_larger_than_memory_is_refused_in_one_line_before_it_is_built(create, name, kwargs):
    with pytest.raises(
        UserError, match=r"needs about [0-9.]+ GiB, CPU memory has .* free; give a smaller --input_size"
    ):
        create(name, BOMB, **kwargs)


def test_the_refusal_names_the_model_and_the_size():
    with pytest.raises(UserError, match=r"^building --model vit_tiny_patch4 at --input_size 100000 needs about "):
        models_vit.create_model("vit_tiny_patch4", BOMB)


def test_a_sin_cos_embedding_larger_than_memory_is_refused_before_it_is_computed():
    with pytest.raises(UserError, match=r"^the \(625000001, 192\) sin-cos position embedding of a 25000x25000 patch"):
        sincos_2d(192, 25000, cls_token=True)


def test_models_that_fit_are_built_as_before():
    model = models_vit.create_model("vit_tiny_patch4", 32, num_classes=10)
    assert model.cls_token.device.type == "cpu" and model.patch_embed.num_patches == 64
    assert memory.model_bytes(model) == 4 * sum(p.numel() for p in model.parameters())  # fp32, no buffers


# ------------------------------------------------------------------------------------------
# The training estimate


@pytest.mark.parametrize("fused", [True, False])
def test_estimate_of_a_tiny_vit_equals_the_hand_computation(fused):
    model = _tiny_vit()
    model.blocks[0].attn.fused_attn = fused
    params = sum(p.numel() for p in model.parameters())  # all trainable, fp32
    # Per token of the block, fp32: the two norm inputs (2 x 8) and the saved inputs of qkv, attention
    # (q, k, v), proj (output and its reshaped copy), fc1, GELU and fc2: 7 x 8 + 2 x 32 = 120.
    per_token = (2 * 8 + 7 * 8 + 2 * 32) * 4
    # 5 tokens; fused attention keeps a log-sum-exp per head and token, else the scores and their softmax,
    # 2 heads x 5 x 5 each.
    one_block = 5 * per_token + (2 * 5 * 4 if fused else 2 * 2 * 5 * 5 * 4)
    stored = (1 + 1) * one_block  # the block's saved tensors and one block of gradients in flight
    around = 4 * 5 * 8 * 4 + 4 * 3 * 8 * 8 * 4  # embedding and norm tensors, the image-sized ones
    per_image = int((stored + around) * 1.15)  # the allocator's slack
    weights_grads_adamw = params * 4 * (1 + 1 + 2)
    assert memory.training_bytes(model, 3, 8) == weights_grads_adamw + 3 * per_image


def test_estimate_grows_with_batch_size_and_image_size():
    model = _meta(models_vit.create_model, "vit_tiny_patch4", 64)
    small, double = memory.training_bytes(model, 8, 64), memory.training_bytes(model, 16, 64)
    fixed = memory.training_bytes(model, 0, 64)
    assert double - fixed == 2 * (small - fixed)  # activations are per image
    # 4x the pixels is 4x the tokens: more than 4x the activations once attention's share grows, never less
    assert memory.training_bytes(model, 8, 128) - fixed >= 4 * (small - fixed) * 0.99


def test_low_precision_checkpointing_and_masking_shrink_the_estimate():
    vit = _meta(models_vit.create_model, "vit_tiny_patch4", 64)
    fp32 = memory.training_bytes(vit, 16, 64, "fp32")
    assert memory.training_bytes(vit, 16, 64, "bf16") < 0.75 * fp32
    assert memory.training_bytes(vit, 16, 64, "bf16") == memory.training_bytes(vit, 16, 64, "fp16")
    assert memory.training_bytes(vit, 16, 64, grad_checkpointing=True) < 0.8 * fp32
    # On a GPU checkpointing keeps two blocks' activations instead of all twelve.
    assert memory.training_bytes(vit, 16, 64, grad_checkpointing=True, device="cuda") < 0.35 * fp32
    mae = _meta(models_mae.create_model, "mae_vit_tiny_patch4", 64)
    assert memory.training_bytes(mae, 16, 64, mask_ratio=0.75) < memory.training_bytes(mae, 16, 64, mask_ratio=0.5)
    assert memory.training_bytes(mae, 16, 64) == memory.training_bytes(mae, 16, 64, mask_ratio=0.0)


def test_a_frozen_encoder_keeps_no_activations_and_no_optimizer_state():
    model = _meta(models_vit.create_model, "vit_tiny_patch4", 64)
    trained = memory.training_bytes(model, 16, 64)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    probed = memory.training_bytes(model, 16, 64)
    assert probed < trained / 4
    assert probed > memory.model_bytes(model)
    # Without images: the weights, and for the head alone its gradient and AdamW's two moments (fp32).
    head = sum(p.numel() * 4 for name, p in model.named_parameters() if name.startswith("head."))
    assert memory.training_bytes(model, 0, 64) == memory.model_bytes(model) + 3 * head


def test_sgd_keeps_less_state_than_adamw():
    model = _tiny_vit()
    params = sum(p.numel() for p in model.parameters())
    assert memory.training_bytes(model, 1, 8) - memory.training_bytes(model, 1, 8, optimizer="sgd") == 4 * params


def _ddp_gradients() -> None:
    """In a 1-rank gloo group: the model wrapped as training wraps it, two backward passes (DDP
    rebuilds its buckets after the first); prints how many storages hold the gradients and whether
    they equal those of the unwrapped model."""
    torch.distributed.init_process_group("gloo")
    model, plain = _tiny_vit(), _tiny_vit()
    plain.load_state_dict(model.state_dict())
    wrapped = run.wrap_for_training(model, argparse.Namespace(distributed=True, device="cpu", gpu=0, compile=False))
    images = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        for m in (model, plain):
            m.zero_grad(set_to_none=True)
        wrapped(images).sum().backward()
        plain(images).sum().backward()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        same = all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters(), strict=True))
        print(f"gradient storages: {len(storages)}, same gradients: {same}")
    del wrapped
    distributed.cleanup()


def test_ddp_gradients_are_views_into_its_buckets(tmp_path):
    """DDP keeps no second copy of the gradients (util.memory counts none): the tiny model's gradients,
    which fit one bucket, share one storage instead of one per parameter."""
    (output,) = run_ranks(_ddp_gradients, tmp_path, world_size=1, timeout=120)
    assert output.count("gradient storages: 1, same gradients: True") == 2, output


def _ddp_weights(out: str) -> None:
    """In each rank of a gloo group: 3 AdamW steps of the tiny MAE on this rank's own images, wrapped as training
    wraps it and wrapped by DDP's defaults (a gradient copy beside the buckets), from the same weights; each rank
    saves both models' weights and whether its gradients were views into DDP's buckets."""
    torch.distributed.init_process_group("gloo")
    rank, saved = torch.distributed.get_rank(), {}
    args = argparse.Namespace(distributed=True, device="cpu", gpu=0, compile=False)
    for name, wrap in (("ours", lambda m: run.wrap_for_training(m, args)), ("default", DDP)):
        torch.manual_seed(0)
        model = models_mae.mae_vit_tiny_patch4(norm_pix_loss=True)
        wrapped = wrap(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        draws = torch.Generator().manual_seed(rank)  # each rank trains on images of its own
        for _ in range(3):
            loss, _, _ = wrapped(torch.randn(4, 3, 32, 32, generator=draws), 0.75, torch.rand(4, 64, generator=draws))
            loss.backward()
            saved[f"{name}_views"] = getattr(wrapped, "gradient_as_bucket_view", False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        saved[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del wrapped
    torch.save(saved, f"{out}{rank}.pth")
    distributed.cleanup()


def test_ddp_with_gradients_in_its_buckets_trains_the_weights_of_ddps_default(tmp_path):
    """docs/pretraining.md, docs/official-differences.md: keeping the gradients in DDP's buckets (no second copy)
    gives bitwise the weights of DDP's default on CPU, here over 2 ranks whose gradients differ."""
    run_ranks(lambda: _ddp_weights(str(tmp_path / "rank")), tmp_path / "ranks", world_size=2, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pth") for r in range(2)]
    assert all(r["ours_views"] and not r["default_views"] for r in ranks), "training's DDP keeps no gradient copy"
    torch.manual_seed(0)
    start = models_mae.mae_vit_tiny_patch4(norm_pix_loss=True).state_dict()
    for rank in ranks:
        assert rank["ours"].keys() == rank["default"].keys() == start.keys()
        for key, value in rank["default"].items():
            assert torch.equal(rank["ours"][key], value), key
            assert torch.equal(ranks[0]["ours"][key], rank["ours"][key]), f"the ranks' {key} differ"
    assert not torch.equal(ranks[0]["ours"]["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def test_the_demo_checkpoint_fine_tuned_at_224_is_refused():
    # vit_tiny_patch4 at the default --input_size 224 (3,137 tokens), batch 64, fp32 on a CPU was
    # killed by the kernel at 23 GB: the estimate must be above that.
    model = _meta(models_vit.create_model, "vit_tiny_patch4", 224, num_classes=10, drop_path_rate=0.1)
    assert memory.training_bytes(model, 64, 224, "fp32") > 23e9


# ------------------------------------------------------------------------------------------
# check_training_fits


def _args(**overrides) -> argparse.Namespace:
    settled = dict(batch_size=2, input_size=32, precision="fp32", grad_checkpointing=False, mask_ratio=0.75)
    return argparse.Namespace(**{**settled, **overrides})


def test_an_impossible_run_is_refused_in_one_line_naming_the_flags():
    model = _meta(models_mae.create_model, "mae_vit_tiny_patch4", 32)
    with pytest.raises(UserError) as refused:
        memory.check_training_fits(model, _args(batch_size=10**7), "cpu")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("training --batch_size 10000000 at --input_size 32 in --precision fp32 needs about ")
    for flag in ("--batch_size", "--accum_iter", "--input_size", "--grad_checkpointing", "--precision bf16"):
        assert flag in message.split("; ", 1)[1]


def test_the_advice_leaves_out_what_is_already_used():
    model = _meta(models_vit.create_model, "vit_tiny_patch4", [32, 16])
    with pytest.raises(UserError) as refused:
        memory.check_training_fits(
            model, _args(batch_size=10**8, input_size=[32, 16], precision="bf16", grad_checkpointing=True), "cpu"
        )
    assert " at --input_size 32 16 in --precision bf16 " in str(refused.value)
    assert "--grad_checkpointing" not in str(refused.value) and "--precision" not in str(refused.value).split("; ")[1]


def test_a_normal_tiny_run_passes():
    model = models_mae.create_model("mae_vit_tiny_patch4", 32)  # on the CPU: its weights already count as used
    memory.check_training_fits(model, _args(batch_size=16), "cpu")
    classifier = _meta(models_vit.create_model, "vit_tiny_patch4", 32)
    no_mask_ratio = argparse.Namespace(batch_size=2, input_size=32, precision="fp32", grad_checkpointing=False)
    memory.check_training_fits(classifier, no_mask_ratio, "cpu")


def test_run_place_sizes_a_training_run_and_not_an_evaluation():
    """Run.place, which the three entry points call: the step of a run that trains is sized (pre-training has no
    --eval), an --eval run's is not (it takes no step), and either is moved with --grad_checkpointing as asked."""
    huge = dict(batch_size=10**7, grad_checkpointing=True)
    for args, sized in [(_args(**huge), True), (_args(**huge, eval=False), True), (_args(**huge, eval=True), False)]:
        model = models_vit.create_model("vit_tiny_patch4", 32)
        placed = run.Run(args, torch.device("cpu"), None, None)
        if sized:
            with pytest.raises(UserError, match="^training --batch_size 10000000 "):
                placed.place(model)
        else:
            placed.place(model)
        assert model.grad_checkpointing


def _shm_with(monkeypatch, free_bytes: int) -> None:
    """/dev/shm with ``free_bytes`` free (in 4 KiB blocks), whatever this machine's holds."""
    real = memory.os.statvfs

    def statvfs(path):
        if path != memory.SHARED_MEMORY:
            return real(path)
        return os.statvfs_result((4096, 4096, 10**6, free_bytes // 4096, free_bytes // 4096, 0, 0, 0, 0, 255))

    monkeypatch.setattr(memory.os, "statvfs", statvfs)


def test_loader_workers_without_room_in_dev_shm_stop_the_run_at_start(monkeypatch):
    """A container's 64 MB /dev/shm: 10 workers of 64 CIFAR crops fit, 8 workers of 64 float ImageNet crops
    (2 x 8 batches of 64 x 3 x 224 x 224 x 4 bytes = 588 MiB) do not, and such a run ended in a worker's bus
    error or waited for good; it now stops before its first batch, in one line."""
    from util.data.loaders import require_batch_memory

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    _shm_with(monkeypatch, 64 * 2**20)
    require_batch_memory(32, 3, 64, 10, value_bytes=1)  # 20 batches of 192 KiB
    require_batch_memory(224, 3, 64, 0)  # no workers: nothing goes through /dev/shm
    with pytest.raises(UserError) as refused:
        require_batch_memory(224, 3, 64, 8)
    batch_mib = 64 * 3 * 224 * 224 * 4 / 2**20  # 36.75
    assert str(refused.value) == (
        f"--num_workers 8: the loader workers hand their batches over in /dev/shm, which has 64 MiB free, and 16 "
        f"batches of {batch_mib:.0f} MiB need about {16 * batch_mib / 1024:.1f} GiB; lower --batch_size, "
        "--input_size or --num_workers, or make /dev/shm larger (docker run --shm-size)"
    )


@pytest.mark.parametrize("text", ["", "eight", "8.0", "0", "-8"])
def test_a_local_world_size_that_is_no_count_of_processes_counts_as_one(monkeypatch, text):
    # 2 workers of one 1 MiB batch each need 4 MiB a process: one process fits 5 MiB free, two do not.
    _shm_with(monkeypatch, 5 * 2**20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", text)
    memory.require_shared_memory(2**20, 2, "lower --batch_size")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"of 1 MiB each, for 2 processes of this node need about 8 MiB; lower"):
        memory.require_shared_memory(2**20, 2, "lower --batch_size")


def test_dev_shm_is_shared_by_the_processes_of_a_node(monkeypatch):
    # 2 workers of one 1 MiB batch each need 4 MiB a process: 8 processes of a node need 32 MiB of the 20 free.
    _shm_with(monkeypatch, 20 * 2**20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    memory.require_shared_memory(2**20, 2, "lower --batch_size")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(UserError, match=r"of 1 MiB each, for 8 processes of this node need about 32 MiB; lower"):
        memory.require_shared_memory(2**20, 2, "lower --batch_size")


def test_a_machine_without_dev_shm_is_not_checked(monkeypatch):
    def none(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(memory.os, "statvfs", none)
    memory.require_shared_memory(2**40, 16, "lower --batch_size")
