"""The official code's public names that downstream scripts import, called as the official scripts
call them (facebookresearch/mae: main_pretrain.py, main_finetune.py, models_mae.py, util/)."""

import math
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import demo_files, load_spec, shapes
from timm.layers import trunc_normal_

import main_pretrain
import models_mae
import models_vit
import reconstruct
from benchmarks import bench_pretrain
from util.lars import LARS
from util.lr_decay import param_groups_lrd
from util.lr_sched import adjust_learning_rate
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed

# The official factories and the "recommended" aliases the official file gives them.
OFFICIAL_MAE = {
    "mae_vit_base_patch16_dec512d8b": "mae_vit_base_patch16",
    "mae_vit_large_patch16_dec512d8b": "mae_vit_large_patch16",
    "mae_vit_huge_patch14_dec512d8b": "mae_vit_huge_patch14",
}


# ---------------------------------------------------------------------------------------------
# models_mae factories
@pytest.mark.parametrize("official,alias", OFFICIAL_MAE.items())
def test_official_factory_builds_the_official_state_dict(official, alias):
    # As the official main_pretrain.py builds the model.
    with torch.device("meta"):
        model = models_mae.__dict__[official](norm_pix_loss=True)
    assert model.norm_pix_loss
    assert shapes(model) == load_spec()[alias]
    assert getattr(models_mae, official) is getattr(models_mae, alias)


def test_only_official_factory_names():
    # mae_vit_base and the like were never official names.
    for name in ("mae_vit_base", "mae_vit_large", "mae_vit_huge"):
        assert not hasattr(models_mae, name)
        assert name not in models_mae.MODELS


def test_main_pretrain_takes_official_model_name():
    # Sizes as run.start settles them without a checkpoint.
    argv = ["--model", "mae_vit_large_patch16_dec512d8b", "--input_size", "224", "--in_chans", "3"]
    args = main_pretrain.get_args_parser().parse_args(argv)
    with torch.device("meta"):
        model = main_pretrain.build_model(args)
    assert shapes(model) == load_spec()["mae_vit_large_patch16"]


def test_reconstruct_takes_official_model_name(tmp_path, monkeypatch):
    # The ViT-B factory behind the official name is swapped for the tiny one, so that the whole
    # command runs in a second; what is tested is that reconstruct resolves the official name.
    monkeypatch.setitem(models_mae.MODELS, "mae_vit_base_patch16", models_mae.mae_vit_tiny_patch4)
    torch.save({"model": models_mae.mae_vit_tiny_patch4().state_dict()}, tmp_path / "ckpt.pth")
    out = tmp_path / "out.png"
    argv = [str(demo_files(1)[0]), "--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(out)]
    argv += ["--model", "mae_vit_base_patch16_dec512d8b", "--input_size", "32", "--device", "cpu"]
    reconstruct.main(reconstruct.get_args_parser().parse_args(argv))
    assert out.is_file()


def test_benchmark_takes_official_model_names():
    args = bench_pretrain.get_args_parser().parse_args(
        ["--model", "mae_vit_base_patch16_dec512d8b,mae_vit_huge_patch14_dec512d8b", "--device", "cpu"]
    )
    bench_pretrain.check_args(args)
    assert args.models == ["mae_vit_base_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b"]


# ---------------------------------------------------------------------------------------------
# models_vit factories, util.lr_sched, util.lars: the official fine-tuning and probing scripts' calls
@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"])
@pytest.mark.parametrize("global_pool", [True, False])
def test_official_classifier_factories_take_the_official_keywords(name, global_pool):
    # As the official main_finetune.py and main_linprobe.py build the classifier.
    with torch.device("meta"):
        model = models_vit.__dict__[name](num_classes=1000, drop_path_rate=0.1, global_pool=global_pool)
        probe = models_vit.__dict__[name](num_classes=1000, global_pool=global_pool)
    assert model.head.out_features == probe.head.out_features == 1000
    assert ("fc_norm.weight" in shapes(model)) == global_pool
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())


def _official_encoder_into(model: torch.nn.Module, head_std: float) -> None:
    """The official scripts' --finetune: an MAE's weights, head dropped if it does not fit, position
    table resized, loaded leniently, the head drawn anew."""
    checkpoint_model = models_mae.__dict__["mae_vit_mini_patch4"](norm_pix_loss=True).state_dict()
    state_dict = model.state_dict()
    for k in ["head.weight", "head.bias"]:
        if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
            del checkpoint_model[k]
    interpolate_pos_embed(model, checkpoint_model)
    msg = model.load_state_dict(checkpoint_model, strict=False)
    fc_norm = {"fc_norm.weight", "fc_norm.bias"} if model.global_pool == "avg" else set()
    assert set(msg.missing_keys) == {"head.weight", "head.bias", *fc_norm}
    trunc_normal_(model.head.weight, std=head_std)


def test_official_fine_tuning_calls():
    # main_finetune.py's model, optimizer and engine_finetune.py's schedule call, in that order.
    model = models_vit.__dict__["vit_mini_patch4"](num_classes=10, drop_path_rate=0.1, global_pool=True)
    _official_encoder_into(model, head_std=2e-5)
    param_groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75)
    optimizer = torch.optim.AdamW(param_groups, lr=1e-3)
    args = Namespace(lr=1e-3, min_lr=1e-6, warmup_epochs=5, epochs=50)
    data_iter_step, iterations, epoch = 3, 10, 2
    lr = adjust_learning_rate(optimizer, data_iter_step / iterations + epoch, args)
    assert lr == pytest.approx(1e-3 * 2.3 / 5)
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(lr)  # the head's group: scale 1
    assert min(g["lr"] for g in optimizer.param_groups) == pytest.approx(lr * 0.75 ** (len(model.blocks) + 1))
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()


def test_official_linear_probing_calls():
    # main_linprobe.py: the class-token classifier, its head behind a BatchNorm, all else frozen, LARS on the head.
    model = models_vit.__dict__["vit_mini_patch4"](num_classes=10, global_pool=False)
    _official_encoder_into(model, head_std=0.01)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for _, p in model.named_parameters():
        p.requires_grad = False
    for _, p in model.head.named_parameters():
        p.requires_grad = True
    optimizer = LARS(model.head.parameters(), lr=0.1, weight_decay=0.0)
    adjust_learning_rate(optimizer, 0.5, Namespace(lr=0.1, min_lr=0.0, warmup_epochs=1, epochs=2))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    frozen = model.blocks[0].attn.qkv.weight.clone()
    head = model.head[1].weight.clone()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert torch.equal(model.blocks[0].attn.qkv.weight, frozen) and not torch.equal(model.head[1].weight, head)


# ---------------------------------------------------------------------------------------------
# util.lr_decay
def test_param_groups_lrd_with_official_keywords():
    model = models_vit.vit_tiny_patch4(num_classes=10, global_pool=True)
    # As the official main_finetune.py calls it.
    official = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    ours = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65)
    assert [(g["lr_scale"], g["weight_decay"], g["names"]) for g in official] == [
        (g["lr_scale"], g["weight_decay"], g["names"]) for g in ours
    ]
    by_name = {name: g for g in official for name in g["names"]}
    assert by_name["pos_embed"]["weight_decay"] == by_name["cls_token"]["weight_decay"] == 0.0
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65**13)  # 12 blocks + 1
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    torch.optim.AdamW(official, lr=1e-3)  # the official script's next line

    # The official defaults: weight_decay 0.05, layer_decay 0.75, no name-based exclusions.
    defaults = {name: g for g in param_groups_lrd(model) for name in g["names"]}
    assert defaults["pos_embed"]["weight_decay"] == 0.05
    assert defaults["blocks.11.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# util.pos_embed
def test_get_2d_sincos_pos_embed_known_values():
    # dim 8: the first 4 channels encode the column, the last 4 the row, each as
    # sin(p), sin(p / 100), cos(p), cos(p / 100). Row 0 is the class token's.
    emb = get_2d_sincos_pos_embed(embed_dim=8, grid_size=2, cls_token=True)
    assert emb.shape == (5, 8)
    np.testing.assert_array_equal(emb[0], 0)
    row0_col1 = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1]
    row1_col0 = [0, 0, 1, 1, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    np.testing.assert_allclose(emb[1 + 0 * 2 + 1], row0_col1, atol=1e-7)
    np.testing.assert_allclose(emb[1 + 1 * 2 + 0], row1_col0, atol=1e-7)


def test_get_2d_sincos_pos_embed_as_the_official_model_calls_it():
    model = models_mae.mae_vit_tiny_patch16()
    pos_embed = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], int(model.patch_embed.num_patches**0.5), True)
    torch.testing.assert_close(torch.from_numpy(pos_embed).float().unsqueeze(0), model.pos_embed.data)


def test_interpolate_pos_embed_resizes_14x14_to_16x16_in_place():
    # As the official main_finetune.py loads a 224-px MAE encoder into a 256-px classifier.
    checkpoint_model = models_mae.mae_vit_tiny_patch16().state_dict()
    checkpoint_model["pos_embed"][:, :1].normal_()  # a class-token row that is not zero
    before = checkpoint_model["pos_embed"].clone()
    model = models_vit.vit_tiny_patch16(img_size=256, num_classes=10, global_pool=True)
    assert interpolate_pos_embed(model, checkpoint_model) is None

    after = checkpoint_model["pos_embed"]
    assert after.shape == model.pos_embed.shape == (1, 1 + 16 * 16, 192)
    torch.testing.assert_close(after[:, :1], before[:, :1], rtol=0, atol=0)
    grid = before[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(after[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 192))
    missing = model.load_state_dict(checkpoint_model, strict=False).missing_keys
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_interpolate_pos_embed_leaves_a_fitting_checkpoint_alone():
    model = models_vit.vit_tiny_patch16(num_classes=10)
    pos_embed = torch.randn(1, 1 + 14 * 14, 192)
    checkpoint_model = {"pos_embed": pos_embed}
    interpolate_pos_embed(model, checkpoint_model)
    assert checkpoint_model["pos_embed"] is pos_embed
    empty: dict = {}
    interpolate_pos_embed(model, empty)
    assert empty == {}
