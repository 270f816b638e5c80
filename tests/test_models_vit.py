"""Tests of the ViT classifiers (models_vit.py): parameter names, pooling, and loading MAE encoders."""

from functools import cache, partial

import pytest
import torch
import torch.nn as nn
from helpers import load_spec, shapes

import models_mae
import models_vit
from models_vit import VisionTransformer

OFFICIAL_VIT = ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"]


@cache
def meta_vit(name: str, global_pool: bool) -> VisionTransformer:
    """A factory's classifier, built once on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return models_vit.MODELS[name](global_pool=global_pool)


def small_vit(global_pool, seed: int = 0, num_classes: int = 5) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        global_pool=global_pool, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=num_classes
    )
    # Make every norm and the head non-trivial so that using the wrong one shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.Linear)):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
        model.cls_token.normal_(0, 1)
    return model.eval()


def manual_tokens(model: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, position embedding and blocks, without the final norm."""
    x = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # [N, L, D], row-major patches
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    for block in model.blocks:
        x = block(x)
    return x


# ---------------------------------------------------------------------------------------------
# State dicts


@pytest.mark.parametrize("name", OFFICIAL_VIT)
@pytest.mark.parametrize("global_pool,suffix", [(True, "gp"), (False, "cls")])
def test_official_factory_state_dict_matches_spec(name, global_pool, suffix):
    spec = load_spec()
    assert shapes(meta_vit(name, global_pool)) == spec[f"{name}_{suffix}"]


@pytest.mark.parametrize("as_string,as_bool", [("avg", True), ("token", False)])
def test_timm_pool_strings_accepted(as_string, as_bool):
    with torch.device("meta"):
        from_string = models_vit.vit_tiny_patch4(global_pool=as_string)
        from_bool = models_vit.vit_tiny_patch4(global_pool=as_bool)
    assert shapes(from_string) == shapes(from_bool)
    assert from_string.global_pool == as_string and from_bool.global_pool == as_string


def test_default_is_class_token():
    with torch.device("meta"):
        model = models_vit.vit_tiny_patch4()
    assert model.global_pool == "token"
    assert "norm.weight" in model.state_dict() and "fc_norm.weight" not in model.state_dict()


@pytest.mark.parametrize("name", list(models_vit.MODELS))
def test_factories_qkv_bias_and_layernorm_eps(name):
    model = meta_vit(name, True)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert all(block.attn.qkv.bias is not None for block in model.blocks)


@pytest.mark.parametrize(
    "name,grid,patch",
    [("vit_tiny_patch16", 14, 16), ("vit_tiny_patch4", 8, 4), ("vit_tiny_patch2", 16, 2)],
)
def test_tiny_factories_shapes(name, grid, patch):
    with torch.device("meta"):
        model = models_vit.MODELS[name](num_classes=10)
    s = shapes(model)
    assert s["pos_embed"] == [1, grid * grid + 1, 192]
    assert s["patch_embed.proj.weight"] == [192, 3, patch, patch]
    assert s["head.weight"] == [10, 192]
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 3


def _encoder_names(mae_names: set[str]) -> set[str]:
    return {k for k in mae_names if not k.startswith("decoder_") and k != "mask_token"}


@pytest.mark.parametrize("size", ["tiny_patch16", "tiny_patch4", "mini_patch4"])
@pytest.mark.parametrize("global_pool", [True, False])
def test_small_mae_encoders_match_classifiers(size, global_pool):
    with torch.device("meta"):
        mae = models_mae.MODELS[f"mae_vit_{size}"]()
        vit = models_vit.MODELS[f"vit_{size}"](global_pool=global_pool, num_classes=10)
    mae_s, vit_s = shapes(mae), shapes(vit)
    encoder = _encoder_names(set(mae_s))
    if global_pool:
        # The classifier replaces the final norm by fc_norm after pooling.
        assert encoder - set(vit_s) == {"norm.weight", "norm.bias"}
        assert set(vit_s) - encoder == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    else:
        assert encoder - set(vit_s) == set()
        assert set(vit_s) - encoder == {"head.weight", "head.bias"}
    for name in encoder & set(vit_s):
        assert mae_s[name] == vit_s[name], name


@pytest.mark.parametrize("global_pool", [True, False])
def test_tiny_mae_checkpoint_loads_into_classifier(global_pool):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch4()
    # timm's random init is slow on CPU and irrelevant here: build on meta and take the tensors over
    # (load_state_dict still checks every shape).
    with torch.device("meta"):
        vit = models_vit.vit_tiny_patch4(global_pool=global_pool, num_classes=10)
    state = {k: v for k, v in mae.state_dict().items() if k in _encoder_names(set(mae.state_dict()))}
    result = vit.load_state_dict(state, strict=False, assign=True)
    if global_pool:
        assert set(result.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
        assert set(result.unexpected_keys) == {"norm.weight", "norm.bias"}
    else:
        assert set(result.missing_keys) == {"head.weight", "head.bias"}
        assert result.unexpected_keys == []
    loaded = vit.state_dict()
    for name in set(state) & set(loaded):
        assert torch.equal(loaded[name], state[name]), name


def test_loaded_encoder_computes_same_features_as_mae_encoder():
    # A small MAE and a classifier of the same shape: after loading, the classifier's features
    # (class-token mode: blocks then norm) equal the MAE encoder's with nothing masked, when the
    # noise keeps the patches in their order.
    torch.manual_seed(0)
    mae = models_mae.MaskedAutoencoderViT(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    with torch.no_grad():
        for m in mae.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    vit = VisionTransformer(global_pool=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).eval()
    vit.load_state_dict(
        {k: v for k, v in mae.state_dict().items() if not k.startswith("decoder_") and k != "mask_token"}, strict=False
    )
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.arange(16, dtype=torch.float32).expand(2, 16)
    with torch.no_grad():
        latent, mask, _ = mae.forward_encoder(imgs, 0.0, noise)
        features = vit.forward_features(imgs)
    assert mask.sum() == 0
    torch.testing.assert_close(features, latent, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Pooling


@pytest.mark.parametrize("global_pool", [True, "avg"])
def test_global_pool_is_fc_norm_of_mean_patch_token(global_pool):
    model = small_vit(global_pool)
    assert isinstance(model.norm, nn.Identity)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(imgs)
        tokens = manual_tokens(model, imgs)
        features = model.forward_features(imgs)
        want = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))
        with_cls = model.head(model.fc_norm(tokens.mean(dim=1)))
        no_fc_norm = model.head(tokens[:, 1:].mean(dim=1))
    assert out.shape == (3, 5)
    torch.testing.assert_close(features, tokens, rtol=1e-5, atol=1e-5)  # no final norm before pooling
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # The check above tells the right pooling from its near misses.
    assert not torch.allclose(with_cls, want, atol=1e-3)
    assert not torch.allclose(no_fc_norm, want, atol=1e-3)


@pytest.mark.parametrize("global_pool", [False, "token"])
def test_class_token_pool_uses_normed_class_token(global_pool):
    model = small_vit(global_pool)
    assert isinstance(model.fc_norm, nn.Identity)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(imgs)
        tokens = manual_tokens(model, imgs)
        features = model.forward_features(imgs)
        want = model.head(model.norm(tokens)[:, 0])
        mean_patch = model.head(model.norm(tokens)[:, 1:].mean(1))
    assert out.shape == (3, 5)
    torch.testing.assert_close(features, model.norm(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mean_patch, want, atol=1e-3)


def test_output_depends_on_image():
    # Both poolings respond to the image (the head does not, e.g., see only the class token embedding).
    for gp in (True, False):
        model = small_vit(gp)
        with torch.no_grad():
            a = model(torch.zeros(1, 3, 16, 16))
            b = model(torch.ones(1, 3, 16, 16))
        assert not torch.allclose(a, b, atol=1e-4)


def test_pre_logits_and_num_classes_zero():
    model = small_vit(True, num_classes=0)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(imgs)
        want = model.fc_norm(manual_tokens(model, imgs)[:, 1:].mean(1))
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
