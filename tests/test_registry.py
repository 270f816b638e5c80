"""util.registry: models_mae.create_model and models_vit.create_model check the name, the image
size against the patch size, the channels and (for MAE) the mask ratio, once, in one line."""

import pytest
import torch
from helpers import demo_files
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

import main_pretrain
import models_mae
import models_vit
import reconstruct
from util.cli.errors import UserError, fail
from util.registry import Registry


def _meta(create, *args, **kwargs):
    with torch.device("meta"):
        return create(*args, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("mae_vit_gigantic", 224), {}, r"^--model mae_vit_gigantic is unknown; known models: mae_vit_tiny_patch16, "),
        (("mae_vit_tiny_patch4", 30), {}, r"^--input_size 30 is not a multiple .* 4; give .* such as --input_size 32$"),
        (("mae_vit_tiny_patch4", (32, 30)), {}, r"^--input_size 32 30 \(height width\) is not .* --input_size 32 32$"),
        (("mae_vit_tiny_patch4", 32, 0), {}, r"^--in_chans must be at least 1, got 0$"),
        (("mae_vit_tiny_patch4", 32), {"mask_ratio": 1.0}, r"^--mask_ratio 1.0 must remove at least one of the 64"),
        (("mae_vit_tiny_patch4", 8), {"mask_ratio": 0.8}, r"^--mask_ratio 0.8 must remove .* of the 4 patches"),
    ],
)
def test_bad_requests_are_one_line_errors(args, kwargs, message):
    with pytest.raises(UserError, match=message):
        _meta(models_mae.create_model, *args, **kwargs)


def test_mae_sizes_channels_and_aliases():
    model = _meta(models_mae.create_model, "mae_vit_tiny_patch4", [32, 16], 5, 0.75, norm_pix_loss=True)
    assert model.grid_size == (8, 4) and model.in_chans == 5 and model.norm_pix_loss
    assert _meta(models_mae.create_model, "mae_vit_mini_patch4").img_size == 32  # the factory's default
    official = _meta(models_mae.create_model, "mae_vit_base_patch16_dec512d8b", 224)
    assert type(official) is models_mae.MaskedAutoencoderViT and official.patch_size == 16


def test_registries_list_each_model_once_and_take_official_names():
    """What --help and the unknown-model message list: each factory once, under the name it has in
    its module; the official file's names resolve to the same factories but are not listed."""
    small = ["tiny_patch16", "tiny_patch4", "tiny_patch2", "mini_patch4"]
    official = ["base_patch16", "large_patch16", "huge_patch14"]
    assert list(models_mae.MODELS) == [f"mae_vit_{s}" for s in small + official]
    assert list(models_vit.MODELS) == [f"vit_{s}" for s in small + official]
    for registry, module in ((models_mae.MODELS, models_mae), (models_vit.MODELS, models_vit)):
        assert all(factory is getattr(module, name) for name, factory in registry.items())
    for size in official:
        name, alias = f"mae_vit_{size}_dec512d8b", f"mae_vit_{size}"
        assert name in models_mae.MODELS and name not in list(models_mae.MODELS)
        assert models_mae.MODELS[name] is models_mae.MODELS[alias] is models_mae.MODELS.get(name)
    assert "dec512d8b" not in main_pretrain.get_args_parser().format_help()
    with pytest.raises(KeyError):
        models_mae.MODELS["mae_vit_gigantic"]


def test_vit_sizes_and_kwargs():
    model = _meta(models_vit.create_model, "vit_tiny_patch4", (16, 32), 1, num_classes=7, global_pool=True)
    assert tuple(model.patch_embed.grid_size) == (4, 8) and model.head.out_features == 7
    assert model.patch_embed.proj.in_channels == 1 and model.global_pool == "avg"
    with pytest.raises(UserError, match=r"^--input_size 30 is not a multiple of the model's patch size 16; .* 32$"):
        _meta(models_vit.create_model, "vit_base_patch16", 30)
    with pytest.raises(UserError, match=r"^--model mae_vit_tiny_patch4 is unknown; known models: vit_tiny_patch16"):
        _meta(models_vit.create_model, "mae_vit_tiny_patch4", 32)


def test_checks_run_on_the_meta_device_before_any_memory_is_spent():
    devices = []

    def tiny(**kwargs):
        model = models_mae.mae_vit_tiny_patch4(**kwargs)
        devices.append(model.cls_token.device.type)
        return model

    registry = Registry([tiny])
    with pytest.raises(UserError, match="^refused$"):
        registry.create("tiny", 32, check=lambda model: fail("refused"))
    assert devices == ["meta", "meta"]  # the patch size, then the model the check sees; no real one
    assert registry.create("tiny", 32).cls_token.device.type == "cpu"


def test_only_the_real_build_is_initialised(monkeypatch):
    """The meta builds that plan a model (its patch size, the checks, the memory) read shapes only:
    initialising them, which took most of their time (timm's: a third of a second for ViT-H), is
    skipped; the model returned is initialised as ever, with the caller's weight_init."""
    seen = []

    def counted(original):
        return lambda self, *args, **kwargs: seen.append(self.cls_token.device.type) or original(self, *args, **kwargs)

    init = models_mae.MaskedAutoencoderViT.initialize_weights
    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "initialize_weights", counted(init))
    monkeypatch.setattr(TimmVisionTransformer, "init_weights", counted(TimmVisionTransformer.init_weights))
    mae = models_mae.create_model("mae_vit_mini_patch4", 32, mask_ratio=0.75)
    vit = models_vit.create_model("vit_mini_patch4", 32, num_classes=3, weight_init="jax")
    assert seen == ["cpu", "cpu"] and mae.pos_embed.any() and not vit.head.weight.any()  # jax: a zero head


def test_a_picture_needs_no_removed_patch(tmp_path):
    # Training refuses --mask_ratio 0 (the loss is taken over removed patches); a reconstruction
    # picture with nothing removed is fine.
    torch.save({"model": models_mae.mae_vit_tiny_patch4().state_dict()}, tmp_path / "ckpt.pth")
    out = tmp_path / "out.png"
    argv = [str(demo_files(1)[0]), "--checkpoint", str(tmp_path / "ckpt.pth"), "--output", str(out)]
    reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--mask_ratio", "0", "--device", "cpu"]))
    assert out.is_file()


def test_reconstruct_checks_its_flags_before_loading(tmp_path):
    argv = [str(demo_files(1)[0]), "--checkpoint", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "o.png")]
    with pytest.raises(UserError, match=r"^--model mae_vit_gigantic is unknown; known models: "):
        reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--model", "mae_vit_gigantic"]))
    with pytest.raises(UserError, match=r"^--mask_ratio must be in \[0, 1\), got 1.0$"):
        reconstruct.main(reconstruct.get_args_parser().parse_args([*argv, "--mask_ratio", "1.0"]))
