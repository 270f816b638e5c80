"""Tests of the masked autoencoder (models_mae.py): parameter names, masking, loss, decoder, init."""

import math
from functools import cache, partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import shapes

import models_mae
from models_mae import MaskedAutoencoderViT
from util.pos_embed import sincos_2d

OFFICIAL_MAE = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]


@cache
def meta_model(name: str) -> MaskedAutoencoderViT:
    """A factory's model with default arguments, built once on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return models_mae.MODELS[name]()


def small_mae(
    img_size: int = 16, patch_size: int = 4, in_chans: int = 3, norm_pix_loss: bool = False, seed: int = 0, **kw
) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    cfg = dict(embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    cfg.update(kw)
    model = MaskedAutoencoderViT(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=norm_pix_loss,
        **cfg,
    )
    return model.eval()


def hand_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Patch k covers rows (k // w) * p.. and columns (k % w) * p..; pixels in (row, col, channel) order."""
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    out = torch.empty(n, h * w, p * p * c, dtype=imgs.dtype)
    for k in range(h * w):
        r0, c0 = (k // w) * p, (k % w) * p
        for i in range(p):
            for j in range(p):
                for ch in range(c):
                    out[:, k, (i * p + j) * c + ch] = imgs[:, ch, r0 + i, c0 + j]
    return out


def hand_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """Mean over removed patches of the per-patch mean squared error, written with explicit loops."""
    target = hand_patchify(imgs.double(), p)
    pred = pred.double()
    total, count = 0.0, 0
    for n in range(target.shape[0]):
        for k in range(target.shape[1]):
            if mask[n, k] == 0:
                continue
            t = target[n, k]
            if norm_pix:
                m = t.sum() / t.numel()
                var = ((t - m) ** 2).sum() / (t.numel() - 1)  # unbiased
                t = (t - m) / math.sqrt(var + 1e-6)
            total += ((pred[n, k] - t) ** 2).sum().item() / t.numel()
            count += 1
    return torch.tensor(total / count, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# State dicts


def test_mini_factory_shapes():
    model = meta_model("mae_vit_mini_patch4")
    s = shapes(model)
    assert model.img_size == 32 and model.num_patches == 64
    assert s["pos_embed"] == [1, 65, 128] and s["decoder_pos_embed"] == [1, 65, 64]
    assert len(model.blocks) == 6 and len(model.decoder_blocks) == 2
    assert model.blocks[0].attn.num_heads == 4 and model.decoder_blocks[0].attn.num_heads == 2
    assert s["decoder_pred.weight"] == [4 * 4 * 3, 64]


@pytest.mark.parametrize(
    "name,img,patch,grid",
    [("mae_vit_tiny_patch16", 224, 16, 14), ("mae_vit_tiny_patch4", 32, 4, 8), ("mae_vit_tiny_patch2", 32, 2, 16)],
)
def test_tiny_factories_shapes(name, img, patch, grid):
    model = meta_model(name)
    s = shapes(model)
    assert model.img_size == img and model.patch_size == patch
    assert model.num_patches == grid * grid
    assert s["pos_embed"] == [1, grid * grid + 1, 192]
    assert s["decoder_pos_embed"] == [1, grid * grid + 1, 128]
    assert s["mask_token"] == [1, 1, 128]
    assert s["patch_embed.proj.weight"] == [192, 3, patch, patch]
    assert s["decoder_pred.weight"] == [patch * patch * 3, 128]
    assert len(model.blocks) == 12 and len(model.decoder_blocks) == 4
    assert model.blocks[0].attn.num_heads == 3 and model.decoder_blocks[0].attn.num_heads == 4
    assert s["blocks.0.attn.qkv.bias"] == [3 * 192]  # qkv bias present


@pytest.mark.parametrize("name", list(models_mae.MODELS))
def test_factories_use_layernorm_eps_1e6(name):
    norms = [m for m in meta_model(name).modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)


def test_factory_kwargs_override_defaults():
    model = models_mae.mae_vit_tiny_patch4(img_size=16, norm_pix_loss=True, decoder_depth=1)
    assert model.num_patches == 16
    assert model.norm_pix_loss
    assert len(model.decoder_blocks) == 1
    assert model.pos_embed.shape == (1, 17, 192)


# ---------------------------------------------------------------------------------------------
# patchify / unpatchify


def test_patchify_ordering_matches_hand_patchify():
    model = small_mae(img_size=12, patch_size=4)  # 3 x 3 grid of 4 x 4 patches, 3 channels
    imgs = torch.arange(2 * 3 * 12 * 12, dtype=torch.float32).reshape(2, 3, 12, 12)
    got = model.patchify(imgs)
    assert got.shape == (2, 9, 48)
    assert torch.equal(got, hand_patchify(imgs, 4))


def test_patchify_known_entries():
    model = small_mae(img_size=8, patch_size=2, in_chans=2)
    imgs = torch.randn(1, 2, 8, 8)
    x = model.patchify(imgs)
    # patch 6 -> grid row 1, col 2 -> pixel rows 2..3, cols 4..5; entry (i=1, j=0, ch=1) at (1*2+0)*2+1 = 5.
    assert x[0, 6, 5] == imgs[0, 1, 3, 4]
    # patch 15 (last) -> rows 6..7, cols 6..7; entry (i=0, j=1, ch=0) at (0*2+1)*2+0 = 2.
    assert x[0, 15, 2] == imgs[0, 0, 6, 7]
    # first entry of patch 1 is the top-left pixel of the second patch of the first row, channel 0
    assert x[0, 1, 0] == imgs[0, 0, 0, 2]


# Square RGB as the official models, and any channel count and height x width.
SHAPES = [(3, (16, 16)), (1, (8, 12)), (5, (12, 8)), (2, (4, 16))]


@pytest.mark.parametrize("in_chans,size", SHAPES)
def test_patchify_unpatchify_round_trip(in_chans, size):
    model = small_mae(img_size=size, patch_size=4, in_chans=in_chans)
    height, width = size
    imgs = torch.randn(2, in_chans, height, width)
    patches = model.patchify(imgs)
    assert patches.shape == (2, (height // 4) * (width // 4), 16 * in_chans)
    assert torch.equal(patches, hand_patchify(imgs, 4))
    assert torch.equal(model.unpatchify(patches), imgs)
    tokens = torch.randn(2, model.num_patches, 16 * in_chans)
    assert torch.equal(model.patchify(model.unpatchify(tokens)), tokens)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.randn(2, in_chans, width, height) if height != width else torch.randn(2, in_chans + 1, 8, 8))


@pytest.mark.parametrize("shape", [(2, 15, 48), (2, 16, 47)])
def test_unpatchify_bad_shape_rejected(shape):
    model = small_mae()
    with pytest.raises(ValueError):
        model.unpatchify(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("length", [16, 49, 64])
def test_random_masking_counts_and_kept_tokens(ratio, length):
    model = small_mae()
    torch.manual_seed(1)
    n, dim = 5, 3
    # Feature 0 carries the position index so that kept tokens can be traced back.
    x = torch.randn(n, length, dim)
    x[..., 0] = torch.arange(length, dtype=torch.float32)
    x_kept, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert mask.shape == (n, length)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    assert x_kept.shape == (n, keep, dim)
    for i in range(n):
        kept_positions = sorted(x_kept[i, :, 0].long().tolist())
        assert kept_positions == torch.nonzero(mask[i] == 0).flatten().tolist()
        assert torch.equal(x_kept[i], x[i, x_kept[i, :, 0].long()])
    assert torch.equal(ids_restore.sort(1).values, torch.arange(length).expand(n, length))


def test_random_masking_uniform_over_positions():
    model = small_mae()
    torch.manual_seed(123)
    n, length, ratio = 4000, 16, 0.75
    _, mask, _ = model.random_masking(torch.zeros(n, length, 1), ratio)
    freq = mask.sum(0) / n
    # Each position is removed with probability `ratio`; binomial standard error over n draws.
    se = math.sqrt(ratio * (1 - ratio) / n)
    assert (freq - ratio).abs().max() < 4.5 * se, freq
    # Chi-square of the removed/kept counts over positions (about length - 1 degrees of freedom):
    # below its 0.1% tail (37.7 for 15 degrees of freedom).
    counts = mask.sum(0)
    chi2 = ((counts - n * ratio) ** 2).sum().item() / (n * ratio * (1 - ratio))
    assert chi2 < 37.7


def test_random_masking_differs_between_samples_and_calls():
    model = small_mae()
    torch.manual_seed(7)
    x = torch.zeros(32, 64, 1)
    _, mask_a, _ = model.random_masking(x, 0.75)
    _, mask_b, _ = model.random_masking(x, 0.75)
    assert len({tuple(row.tolist()) for row in mask_a}) == 32
    assert not torch.equal(mask_a, mask_b)


def test_random_masking_kept_positions_are_independent_of_sample_index():
    # The first sample must not be masked differently (e.g. always the same pattern) from the last.
    model = small_mae()
    torch.manual_seed(11)
    _, mask, _ = model.random_masking(torch.zeros(2000, 9, 1), 0.5)  # keep int(4.5) = 4 of 9
    first, last = mask[:1000].mean(0), mask[1000:].mean(0)
    assert (first - last).abs().max() < 0.1
    assert torch.allclose(mask.mean(0), torch.full((9,), 5 / 9), atol=0.05)


def test_explicit_noise_reproduces_mask_and_keeps_smallest_noise():
    model = small_mae()
    torch.manual_seed(3)
    n, length, dim, ratio = 4, 16, 5, 0.75
    x = torch.randn(n, length, dim)
    noise = torch.rand(n, length)
    x_kept, mask, ids_restore = model.random_masking(x, ratio, noise=noise)
    x_kept2, mask2, ids_restore2 = model.random_masking(x, ratio, noise=noise.clone())
    assert torch.equal(mask, mask2) and torch.equal(x_kept, x_kept2) and torch.equal(ids_restore, ids_restore2)
    keep = int(length * (1 - ratio))
    for i in range(n):
        order = sorted(range(length), key=lambda k: noise[i, k].item())
        kept = order[:keep]
        expected = torch.ones(length)
        expected[kept] = 0
        assert torch.equal(mask[i], expected)
        # kept tokens in ascending-noise order
        assert torch.equal(x_kept[i], x[i, kept])
    # ids_restore puts the kept tokens back at their positions when followed by the removed ones.
    filler = torch.full((n, length - keep, dim), float("nan"))
    restored = torch.gather(torch.cat([x_kept, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert torch.isnan(restored[~visible]).all()


def test_forward_with_same_noise_is_deterministic():
    model = small_mae()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss1, pred1, mask1 = model(imgs, 0.5, noise)
    loss2, pred2, mask2 = model(imgs, 0.5, noise)
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2) and torch.equal(loss1, loss2)


def test_forward_removes_the_papers_75_percent_by_default():
    """The official default of forward's mask_ratio, which callers that pass none (derived scripts) rely on."""
    _, _, mask = small_mae()(torch.randn(2, 3, 16, 16))
    assert mask.sum(dim=1).tolist() == [12.0, 12.0]  # 75% of 16 patches


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_encoder_sees_only_visible_tokens(ratio):
    model = small_mae()
    imgs = torch.randn(2, 3, 16, 16)
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    try:
        latent, mask, _ = model.forward_encoder(imgs, ratio)
    finally:
        handle.remove()
    keep = int(16 * (1 - ratio))
    assert latent.shape == (2, 1 + keep, 32)
    assert seen == [torch.Size([2, 1 + keep, 32])]
    assert torch.equal(mask.sum(1), torch.full((2,), float(16 - keep)))


def test_encoder_output_ignores_removed_pixels():
    model = small_mae()
    torch.manual_seed(5)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    # Scramble every removed patch: the encoder output must not change.
    patch_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48))
    scrambled = imgs + patch_mask * 100 * torch.randn_like(imgs)
    latent2, mask2, _ = model.forward_encoder(scrambled, 0.75, noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent2, latent, rtol=0, atol=1e-5)
    # ...whereas changing a visible patch does.
    visible = model.unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, 48))
    latent3, _, _ = model.forward_encoder(imgs + visible, 0.75, noise)
    assert not torch.allclose(latent3, latent, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Decoder


def test_decoder_input_unshuffles_tokens_and_places_mask_tokens():
    model = small_mae()
    with torch.no_grad():
        model.mask_token.normal_(0, 1)  # distinct from anything the encoder produces
    torch.manual_seed(9)
    n, length, ratio = 3, 16, 0.75
    imgs = torch.randn(n, 3, 16, 16)
    noise = torch.rand(n, length)
    seen = []
    handle = model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            latent, mask, ids_restore = model.forward_encoder(imgs, ratio, noise)
            pred = model.forward_decoder(latent, ids_restore)
            emb = model.decoder_embed(latent)
    finally:
        handle.remove()
    assert pred.shape == (n, length, 4 * 4 * 3)
    (dec_in,) = seen
    assert dec_in.shape == (n, 1 + length, 16)

    keep = int(length * (1 - ratio))
    expected = torch.empty(n, 1 + length, 16)
    for i in range(n):
        order = sorted(range(length), key=lambda k: noise[i, k].item())
        expected[i, 0] = emb[i, 0]
        for j, pos in enumerate(order[:keep]):
            expected[i, 1 + pos] = emb[i, 1 + j]
        for pos in order[keep:]:
            assert mask[i, pos] == 1
            expected[i, 1 + pos] = model.mask_token[0, 0]
    expected += model.decoder_pos_embed
    torch.testing.assert_close(dec_in, expected, rtol=0, atol=1e-6)


def test_decoder_pred_matches_manual_decoder():
    model = small_mae()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.5, noise)
        latent, _, ids_restore = model.forward_encoder(imgs, 0.5, noise)
        x = model.decoder_embed(latent)
        tokens = model.mask_token.expand(2, 16, -1).clone()
        tokens[mask == 0] = x[:, 1:].reshape(-1, 16)[ids_restore_to_order(ids_restore, mask)]
        x = torch.cat([x[:, :1], tokens], 1) + model.decoder_pos_embed
        for block in model.decoder_blocks:
            x = block(x)
        manual = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    torch.testing.assert_close(pred, manual, rtol=0, atol=1e-5)


def ids_restore_to_order(ids_restore: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Indices into the flattened kept tokens [N * keep] for the visible positions in row-major order.

    ids_restore[n, l] is the rank of position l in the shuffle; visible positions have rank < keep.
    """
    n, length = mask.shape
    keep = int((mask[0] == 0).sum())
    rank = ids_restore[mask == 0].reshape(n, keep)
    return (rank + keep * torch.arange(n).unsqueeze(1)).flatten()


# ---------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("in_chans,size", [(3, (8, 8)), (1, (8, 12)), (5, (12, 8))])
def test_loss_equals_hand_computation_over_removed_patches(norm_pix, in_chans, size):
    model = small_mae(img_size=size, patch_size=2, in_chans=in_chans, norm_pix_loss=norm_pix)
    torch.manual_seed(4)
    imgs = torch.randn(3, in_chans, *size) * 2 + 1
    loss, pred, mask = model(imgs, 0.75)
    assert pred.shape == (3, model.num_patches, 4 * in_chans)
    assert mask.sum(dim=1).tolist() == [model.num_patches - int(model.num_patches * 0.25)] * 3
    want = hand_loss(imgs, pred.detach(), mask, 2, norm_pix)
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=1e-6)
    # The same loss with every patch counted differs: only removed patches enter.
    all_patches = hand_loss(imgs, pred.detach(), torch.ones_like(mask), 2, norm_pix)
    assert not torch.isclose(all_patches, want, rtol=1e-3)


def test_norm_pix_loss_uses_unbiased_variance():
    model = small_mae(img_size=8, patch_size=2, norm_pix_loss=True)
    torch.manual_seed(6)
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 16, 12)
    mask = torch.ones(2, 16)
    loss = model.forward_loss(imgs, pred, mask).double()
    target = hand_patchify(imgs.double(), 2)
    mean = target.mean(-1, keepdim=True)
    biased = ((target - mean) ** 2).mean(-1, keepdim=True)
    unbiased = biased * 12 / 11
    want = ((pred.double() - (target - mean) / (unbiased + 1e-6).sqrt()) ** 2).mean()
    other = ((pred.double() - (target - mean) / (biased + 1e-6).sqrt()) ** 2).mean()
    assert not torch.isclose(want, other, rtol=1e-3)  # the check below can tell the two apart
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_norm_pix_loss_eps_is_the_officials_1e_6():
    """Patches of a spread near sqrt(1e-6) (a nearly flat sky): the eps added to their variance sets their
    target's scale, so another eps (1e-4, say) changes the loss by far more than rounding. The hand loss uses 1e-6."""
    model = small_mae(img_size=8, patch_size=2, norm_pix_loss=True)
    torch.manual_seed(7)
    imgs = 0.5 + 1e-3 * torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 16, 12)
    mask = torch.ones(2, 16)
    loss = model.forward_loss(imgs, pred, mask).double()
    torch.testing.assert_close(loss, hand_loss(imgs, pred, mask, 2, norm_pix=True), rtol=1e-3, atol=0)


def test_norm_pix_loss_constant_patch_is_finite():
    model = small_mae(img_size=8, patch_size=2, norm_pix_loss=True)
    imgs = torch.full((1, 3, 8, 8), 0.5)  # every patch constant: variance 0, eps keeps it finite
    pred = torch.randn(1, 16, 12)
    mask = torch.zeros(1, 16)
    mask[0, 3] = 1
    loss = model.forward_loss(imgs, pred, mask)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, (pred[0, 3] ** 2).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_prediction_on_visible_patches(norm_pix):
    model = small_mae(norm_pix_loss=norm_pix)
    torch.manual_seed(8)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75)
    changed = pred + (1 - mask).unsqueeze(-1) * 50 * torch.randn_like(pred)
    torch.testing.assert_close(model.forward_loss(imgs, changed, mask), loss, rtol=1e-6, atol=0)
    # A change on one removed patch does move the loss.
    i, k = torch.nonzero(mask == 1)[0].tolist()
    bumped = pred.clone()
    bumped[i, k] += 1.0
    assert model.forward_loss(imgs, bumped, mask) > loss + 1e-4


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("in_chans,size", SHAPES)
def test_loss_gradient_reaches_only_removed_predictions(in_chans, size, norm_pix):
    model = small_mae(img_size=size, patch_size=4, in_chans=in_chans, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, in_chans, *size)
    n = model.num_patches
    pred = torch.randn(2, n, 16 * in_chans, requires_grad=True)
    mask = (torch.arange(n) % 4 != 0).float().expand(2, n)
    model.forward_loss(imgs, pred, mask).backward()
    per_patch = pred.grad.abs().sum(-1)
    assert (per_patch[mask == 0] == 0).all()
    assert (per_patch[mask == 1] > 0).all()


def test_backward_trains_tokens_but_not_position_embeddings():
    model = small_mae().train()
    loss, _, _ = model(torch.randn(2, 3, 16, 16), 0.75)
    loss.backward()
    assert model.cls_token.grad is not None and model.cls_token.grad.abs().sum() > 0
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None


# ---------------------------------------------------------------------------------------------
# Initialisation


@pytest.fixture(scope="module")
def wide_mae() -> MaskedAutoencoderViT:
    # Wide enough for statistics on the tokens and for xavier to differ clearly from torch's default.
    return small_mae(
        img_size=32, patch_size=4, embed_dim=1024, depth=1, num_heads=8, decoder_embed_dim=512, decoder_depth=1, seed=0
    )


def test_init_tokens_normal_std_002(wide_mae):
    for token, size in [(wide_mae.cls_token, 1024), (wide_mae.mask_token, 512)]:
        assert token.shape == (1, 1, size) and token.requires_grad
        se = 0.02 / math.sqrt(2 * size)  # standard error of a sample std
        assert abs(token.std().item() - 0.02) < 5 * se
        assert abs(token.mean().item()) < 5 * 0.02 / math.sqrt(size)


def test_init_linear_xavier_and_zero_bias(wide_mae):
    linears = [m for m in wide_mae.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 2  # qkv, proj, fc1, fc2 per block; decoder_embed, decoder_pred
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound
        assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_init_layernorm_identity(wide_mae):
    norms = [m for m in wide_mae.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 2
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_init_patch_embed_xavier_uniform_on_flattened_patch(wide_mae):
    w = wide_mae.patch_embed.proj.weight
    assert w.shape == (1024, 3, 4, 4)
    bound = math.sqrt(6 / (3 * 4 * 4 + 1024))  # fan_in = C * p * p, fan_out = embed_dim
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound


def test_init_pos_embed_is_fixed_sincos(wide_mae):
    for param, dim in [(wide_mae.pos_embed, 1024), (wide_mae.decoder_pos_embed, 512)]:
        assert not param.requires_grad
        assert param.shape == (1, 65, dim)
        expected = torch.from_numpy(sincos_2d(dim, 8, cls_token=True)).unsqueeze(0)
        assert torch.equal(param.data, expected)
        assert torch.equal(param[0, 0], torch.zeros(dim))
    trainable = {name for name, p in wide_mae.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable
    assert {"cls_token", "mask_token", "patch_embed.proj.weight"} <= trainable


def test_init_pos_embed_of_official_grid():
    model = models_mae.mae_vit_tiny_patch16()
    expected = np.asarray(sincos_2d(192, 14, cls_token=True))
    np.testing.assert_array_equal(model.pos_embed.detach().numpy()[0], expected)
    assert not model.pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_forward_rejects_mask_ratio_outside_unit_interval(ratio):
    model = small_mae()
    with pytest.raises(ValueError, match="mask ratio"):
        model(torch.randn(1, 3, 16, 16), mask_ratio=ratio)


def test_random_masking_rejects_ratio_leaving_nothing_visible():
    model = small_mae()
    with pytest.raises(ValueError):
        model.random_masking(torch.zeros(1, 16, 4), 1.0)
    with pytest.raises(ValueError):
        model.random_masking(torch.zeros(1, 16, 4), 0.95)  # int(16 * 0.05) = 0


@pytest.mark.parametrize("hw", [(12, 12), (20, 20), (18, 18), (16, 12)])
def test_forward_rejects_wrong_image_size_naming_sizes(hw):
    model = small_mae()  # takes 16 x 16, patch 4
    imgs = torch.randn(1, 3, *hw)
    with pytest.raises(ValueError) as info:
        model(imgs)
    msg = str(info.value)
    assert str(hw[0]) in msg and str(hw[1]) in msg and "16" in msg


def test_forward_rejects_wrong_channels_and_rank():
    model = small_mae()
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError):
        model(torch.randn(3, 16, 16))


def test_patchify_rejects_wrong_image_size():
    model = small_mae()
    with pytest.raises(ValueError, match="18"):
        model.patchify(torch.randn(1, 3, 18, 18))


@pytest.mark.parametrize("img,patch", [(30, 4), (225, 14), (10, 3)])
def test_constructor_rejects_image_not_multiple_of_patch(img, patch):
    with pytest.raises(ValueError) as info:
        MaskedAutoencoderViT(img_size=img, patch_size=patch, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8)
    assert str(img) in str(info.value) and str(patch) in str(info.value)


@pytest.mark.parametrize("shape", [(2, 15), (1, 16), (2, 16, 1), (16,)])
def test_noise_of_wrong_shape_rejected(shape):
    model = small_mae()
    with pytest.raises(ValueError, match="noise"):
        model(torch.randn(2, 3, 16, 16), 0.75, noise=torch.rand(shape))
    with pytest.raises(ValueError, match="noise"):
        model.random_masking(torch.zeros(2, 16, 4), 0.75, noise=torch.rand(shape))
