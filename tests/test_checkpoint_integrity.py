"""Checkpoint integrity: weights of a dtype that would be cast silently, forged shapes and
non-finite values are refused."""

import functools
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_same

import models_mae
import models_vit
import util.memory
from util.checkpoint.encoder import load_mae_encoder, load_pretrained_encoder
from util.checkpoint.load import load_model_strict
from util.cli.errors import UserError


def _vit(img_size: int = 16) -> torch.nn.Module:
    """The smallest classifier: a 4x4 grid of 8-wide tokens, one block."""
    return models_vit.VisionTransformer(
        img_size=img_size, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=3
    )


def _one_line_error(call, *words: str) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


# ---------------------------------------------------------------------------------------------
# Weights: a dtype that would be cast silently, forged shapes, non-finite values
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.int64])
def test_weights_of_another_kind_are_refused_naming_key_and_dtype(tmp_path, dtype):
    model = _vit()
    state = dict(model.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.ones_like(state["blocks.0.mlp.fc1.weight"], dtype=dtype)
    words = ("blocks.0.mlp.fc1.weight", str(dtype))
    _one_line_error(lambda: load_model_strict(_vit(), state, "r.pth"), "checkpoint r.pth", *words)
    torch.save({"model": state}, tmp_path / "enc.pth")
    _one_line_error(lambda: load_pretrained_encoder(_vit(), str(tmp_path / "enc.pth")), "--finetune", *words)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_weights_of_another_precision_load(dtype):
    source = _vit()
    state = {k: v.to(dtype) for k, v in source.state_dict().items()}
    target = _vit()
    load_model_strict(target, state, "r.pth")
    assert_same(target.state_dict(), {k: v.float() for k, v in state.items()})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_at_load_naming_the_key(tmp_path, value):
    state = dict(_vit().state_dict())
    for key in ("blocks.0.attn.qkv.bias", "pos_embed"):
        bad = {**state, key: state[key].clone()}
        bad[key].view(-1)[1] = value
        _one_line_error(functools.partial(load_model_strict, _vit(), bad, "r.pth"), key, "1 NaN or infinite")
        torch.save({"model": bad}, tmp_path / "enc.pth")
        # pos_embed also where it is resized: NaN must not be interpolated away first.
        _one_line_error(lambda: load_pretrained_encoder(_vit(img_size=32), str(tmp_path / "enc.pth")), key)


@pytest.mark.parametrize("tokens, width", [(10**10, 0), (10**10 + 1, 8), (10**8 + 1, 8)])
def test_a_tiny_file_claiming_a_huge_position_embedding_is_refused_before_allocating(tmp_path, tokens, width):
    """A zero-stride tensor costs a few bytes in the file whatever shape it claims."""
    state = dict(_vit().state_dict())
    state["pos_embed"] = torch.zeros(1, 1, width).expand(1, tokens, width)
    path = tmp_path / "bomb.pth"
    torch.save({"model": state}, path)
    assert path.stat().st_size < 100_000
    _one_line_error(lambda: load_pretrained_encoder(_vit(), str(path)), str(path), "pos_embed")
    mae = models_mae.MaskedAutoencoderViT(
        img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
        decoder_num_heads=2,
    )  # fmt: skip
    _one_line_error(lambda: load_mae_encoder(mae, str(path)), str(path), "pos_embed")


def test_a_position_embedding_resize_is_sized_before_it_allocates(tmp_path, monkeypatch):
    state = dict(_vit(img_size=64).state_dict())  # a 16x16 grid, stored in full
    torch.save({"model": state}, tmp_path / "big.pth")
    monkeypatch.setattr(util.memory, "available_bytes", lambda device="cpu": 1000)
    _one_line_error(
        lambda: load_pretrained_encoder(_vit(), str(tmp_path / "big.pth")), "position embedding", "needs about"
    )
    monkeypatch.undo()
    model = _vit()
    load_pretrained_encoder(model, str(tmp_path / "big.pth"))
    assert model.pos_embed.shape == (1, 17, 8)
