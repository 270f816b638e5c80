"""export.py --to hf / --from hf: our MAE <-> transformers' ViTMAEForPreTraining.

Export: transformers loads the folder with no missing, unexpected or mismatched keys, its config
states our architecture, and with the same images and the same masking noise it gives our loss,
prediction and mask (norm_pix_loss on and off, two mask ratios, HF's sdpa and eager attention).
Import: a folder from our export comes back bit for bit; a model built and saved by transformers
(in each of HF's name spellings) becomes a checkpoint whose model gives HF's outputs and that the
--finetune and --resume loaders accept. Broken folders are one-line errors naming the folder.
Image processor: the exported preprocessor_config.json loads with AutoImageProcessor and prepares
images as our evaluation transform; an imported one gives the checkpoint its mean and std.

Tolerance: float32, absolute 1e-5. Observed with transformers 5.23 on CPU: sdpa attention gives
bitwise-equal outputs (max difference 0); eager attention differs in the prediction by ~2e-6
(another order of the softmax-weighted sum), the mask is always identical.
"""

import argparse
import json
import re
import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import demo_files, one_line_error

import export
import models_mae
import models_vit
from util.checkpoint.load import load_checkpoint, model_state
from util.checkpoint.weights import load_model_strict
from util.cli.errors import UserError
from util.data.loaders import eval_transform
from util.eval.pictures import load_images

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ATOL = 1e-5
NAME = "mae_vit_mini_patch4"
FOLDER_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]  # what --to hf writes


def _images() -> torch.Tensor:
    return load_images([str(f) for f in demo_files(2)], eval_transform(32))


def _noise(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, length, generator=torch.Generator().manual_seed(seed))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every tensor (biases, norms and position embeddings too), so that a
    tensor mapped to the wrong place, or recomputed by the loader, changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _run(argv: list[str]) -> None:
    export.main(export.get_args_parser().parse_args(argv))


def _hf(folder: Path, attn: str = "sdpa") -> torch.nn.Module:
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(
        str(folder), output_loading_info=True, attn_implementation=attn
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


def _assert_same_outputs(ours: torch.nn.Module, hf: torch.nn.Module, mask_ratio: float) -> None:
    imgs = _images()
    noise = _noise(len(imgs), ours.num_patches)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio, noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    """Our mini MAE at 32 px with random weights, saved as main_pretrain would (with args)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = models_mae.mae_vit_mini_patch4(norm_pix_loss=True)
    _perturb(model, 0)
    args = argparse.Namespace(model=NAME, input_size=32, norm_pix_loss=True, mask_ratio=0.75)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, root / "checkpoint-0.pth")
    _run(["--checkpoint", str(root / "checkpoint-0.pth"), "--to", "hf", "--output", str(root / "hf")])
    return model.eval(), root


# ---------------------------------------------------------------------------------------------
# Ours -> HF
def test_hf_loads_export_strictly_with_our_config(mae):
    model, root = mae
    assert sorted(p.name for p in (root / "hf").iterdir()) == FOLDER_FILES
    hf = _hf(root / "hf")
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (128, 6, 4, 512)
    assert (c.image_size, c.patch_size, c.num_channels, c.qkv_bias, c.hidden_act) == (32, 4, 3, True, "gelu")
    assert (c.decoder_hidden_size, c.decoder_num_hidden_layers, c.decoder_num_attention_heads) == (64, 2, 2)
    assert c.decoder_intermediate_size == 256
    assert (c.layer_norm_eps, c.mask_ratio, c.norm_pix_loss) == (1e-6, 0.75, True)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    # HF's position embeddings are weights in the file: ours arrive as they are.
    assert torch.equal(hf.vit.embeddings.position_embeddings, model.pos_embed)
    assert torch.equal(hf.decoder.decoder_pos_embed, model.decoder_pos_embed)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_gives_our_loss_prediction_and_mask(mae, attn):
    model, root = mae
    hf = _hf(root / "hf", attn)
    # HF reads norm_pix_loss and mask_ratio from its config at each call: vary both sides alike.
    for norm_pix, ratio in ((True, 0.75), (False, 0.75), (True, 0.5)):
        hf.config.norm_pix_loss, hf.config.mask_ratio, model.norm_pix_loss = norm_pix, ratio, norm_pix
        _assert_same_outputs(model, hf, ratio)
    model.norm_pix_loss = True


def test_export_without_args_infers_the_model_and_takes_flags(mae, tmp_path, capsys):
    """An official-style checkpoint ({'model': ...}, no args): the model is found by its shapes,
    mask_ratio / norm_pix_loss default to 0.75 / off, or come from the flags."""
    model, _ = mae
    src = tmp_path / "mae_visualize_vit_mini.pth"
    torch.save({"model": model.state_dict()}, src)
    _run(["--checkpoint", str(src), "--to", "hf", "--output", str(tmp_path / "a")])
    assert f"wrote {NAME} (32 px, mask_ratio 0.75, norm_pix_loss False)" in capsys.readouterr().out
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["mask_ratio"], config["norm_pix_loss"]) == (0.75, False)
    argv = ["--checkpoint", str(src), "--to", "hf", "--output", str(tmp_path / "a"), "--force"]
    _run([*argv, "--mask_ratio", "0.6", "--norm_pix_loss"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["mask_ratio"], config["norm_pix_loss"]) == (0.6, True)
    assert _hf(tmp_path / "a").config.mask_ratio == 0.6
    # Imported back, the checkpoint stores config.json's settings as its run's flags.
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "a"), "--output", str(tmp_path / "back.pth")])
    back = load_checkpoint(str(tmp_path / "back.pth"))["args"]
    assert (back.mask_ratio, back.norm_pix_loss) == (0.6, True)


def test_the_flags_come_before_the_settings_the_checkpoint_stores(mae, tmp_path):
    _, root = mae  # stored: mask_ratio 0.75, norm_pix_loss on
    argv = ["--checkpoint", str(root / "checkpoint-0.pth"), "--to", "hf", "--output", str(tmp_path / "a")]
    _run([*argv, "--mask_ratio", "0.6", "--no-norm_pix_loss"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["mask_ratio"], config["norm_pix_loss"]) == (0.6, False)


# ---------------------------------------------------------------------------------------------
# HF -> ours
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_then_import_is_bitwise_with_args(mae, tmp_path, suffix):
    model, root = mae
    out = tmp_path / f"back{suffix}"
    _run(["--from", "hf", "--checkpoint", str(root / "hf"), "--output", str(out)])
    ckpt = load_checkpoint(str(out))
    state = model_state(ckpt, str(out))
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    args = ckpt["args"]
    assert (args.model, args.input_size, args.norm_pix_loss, args.mask_ratio) == (NAME, 32, True, 0.75)


def test_the_runs_mean_and_std_come_back_from_our_folder_and_none_from_others(mae, tmp_path):
    """config.json has no place for --mean/--std; our folder's weights carry the run's flags as metadata.
    They were dropped on import: the checkpoint was read with ImageNet's values (refused for other channel
    counts: '--in_chans 5 needs --mean and --std with 5 value(s) each')."""
    model, _ = mae
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    args = argparse.Namespace(model=NAME, input_size=32, norm_pix_loss=True, mask_ratio=0.75, mean=mean, std=std)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "own.pth")
    _run(["--checkpoint", str(tmp_path / "own.pth"), "--to", "hf", "--output", str(tmp_path / "hf")])
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "back.pth")])
    back = load_checkpoint(str(tmp_path / "back.pth"))["args"]
    assert (back.mean, back.std) == (mean, std)
    _hf_built_by_transformers().save_pretrained(str(tmp_path / "saved"))
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "saved"), "--output", str(tmp_path / "hub.pth")])
    hub = load_checkpoint(str(tmp_path / "hub.pth"))["args"]
    assert not hasattr(hub, "mean") and not hasattr(hub, "std")


def _hf_built_by_transformers(seed: int = 1) -> torch.nn.Module:
    """A ViTMAEForPreTraining made by transformers itself, of the mini model's architecture."""
    config = transformers.ViTMAEConfig(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        image_size=32,
        patch_size=4,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=256,
        layer_norm_eps=1e-6,
        norm_pix_loss=True,
        mask_ratio=0.75,
    )
    torch.manual_seed(seed)
    hf = transformers.ViTMAEForPreTraining(config)
    _perturb(hf, seed)
    return hf.eval()


def test_model_from_transformers_imports_with_equal_outputs(tmp_path, capsys):
    hf = _hf_built_by_transformers()
    hf.save_pretrained(str(tmp_path / "saved"))
    out = tmp_path / "from_hf.pth"
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "saved"), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "note:" not in printed
    _assert_hints_need_no_model(printed, out)
    ckpt = load_checkpoint(str(out))
    args = ckpt["args"]
    assert (args.model, args.input_size, args.norm_pix_loss, args.mask_ratio) == (NAME, 32, True, 0.75)
    # What main_pretrain --resume does: the named model, strict loading.
    ours = models_mae.MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    load_model_strict(ours, model_state(ckpt, str(out)), str(out))
    _assert_same_outputs(ours.eval(), hf, 0.75)
    # What main_finetune --finetune does: the encoder into the classifier, the head initialised.
    from util.checkpoint.encoder import load_pretrained_encoder

    clf = models_vit.vit_mini_patch4(num_classes=3, img_size=32)
    load_pretrained_encoder(clf, str(out))
    assert torch.equal(clf.blocks[5].attn.qkv.weight, ours.blocks[5].attn.qkv.weight)
    assert torch.equal(clf.pos_embed, ours.pos_embed)


def _assert_hints_need_no_model(printed: str, out: Path) -> None:
    """The commands printed after --from hf give no --model or --input_size: the checkpoint stores both, and
    both entry points take them from it (the hints repeated them, as if they had to be typed)."""
    import main_finetune
    import main_pretrain
    from util.checkpoint.flags import fill_from_checkpoints
    from util.checkpoint.opening import open_checkpoint

    hints = [line.strip() for line in printed.splitlines() if line.startswith("  python ")]
    assert hints == [
        f"python main_finetune.py --finetune {out} ...",
        f"python main_pretrain.py --resume {out} ...",
    ]
    for entry_point, model in ((main_finetune, "vit_mini_patch4"), (main_pretrain, NAME)):
        args = argparse.Namespace(model=None, input_size=None)
        fallbacks = {flag: entry_point.FALLBACKS[flag] for flag in vars(args)}
        fill_from_checkpoints(args, [open_checkpoint(str(out))], fallbacks)
        assert (args.model, args.input_size) == (model, 32)


def test_every_hf_spelling_and_file_format_imports_the_same(tmp_path, capsys):
    """transformers 5's save_pretrained names, the Hub's (transformers 4) names as our export
    writes them, transformers 5's module names, safetensors shards with their index, and a
    pytorch_model.bin: one state dict."""
    from safetensors.torch import load_file, save_file

    hf = _hf_built_by_transformers(2)
    hf.save_pretrained(str(tmp_path / "saved"))
    config = (tmp_path / "saved" / "config.json").read_text()
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert any(".decoder_encoder.layer." in k for k in saved) or any(".decoder_layers." in k for k in saved)
    variants = {
        "native": {k: v.contiguous() for k, v in hf.state_dict().items()},  # q_proj, vit.layers.N, ...
        "hub": {k.replace("decoder_encoder.layer.", "decoder_layers."): v for k, v in saved.items()},
    }
    for name, state in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        save_file(state, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    # Shards with their index, as save_pretrained writes large models.
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "config.json").write_text(config)
    names = sorted(saved)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: saved[k] for k in part}, str(tmp_path / "shards" / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(config)
    torch.save(saved, tmp_path / "bin" / "pytorch_model.bin")
    # HF's default layer_norm_eps (1e-12) is in many Hub configs: imported with a note.
    (tmp_path / "eps").mkdir()
    (tmp_path / "eps" / "config.json").write_text(json.dumps({**json.loads(config), "layer_norm_eps": 1e-12}))
    shutil.copyfile(tmp_path / "saved" / "model.safetensors", tmp_path / "eps" / "model.safetensors")
    # A config.json without it has ViTMAEConfig's default, the same 1e-12: the same note.
    (tmp_path / "no_eps").mkdir()
    no_eps = {k: v for k, v in json.loads(config).items() if k != "layer_norm_eps"}
    (tmp_path / "no_eps" / "config.json").write_text(json.dumps(no_eps))
    shutil.copyfile(tmp_path / "saved" / "model.safetensors", tmp_path / "no_eps" / "model.safetensors")
    states = {}
    for folder in ("saved", "native", "hub", "shards", "bin", "eps", "no_eps"):
        out = tmp_path / f"{folder}.pth"
        _run(["--from", "hf", "--checkpoint", str(tmp_path / folder), "--output", str(out)])
        states[folder] = model_state(load_checkpoint(str(out)), str(out))
    printed = capsys.readouterr().out
    for folder in ("eps", "no_eps"):
        assert f"note: {tmp_path / folder} states layer_norm_eps 1e-12; {NAME} computes with 1e-06" in printed
    for folder, state in states.items():
        assert state.keys() == states["saved"].keys(), folder
        assert all(torch.equal(state[k], v) for k, v in states["saved"].items()), folder


# ---------------------------------------------------------------------------------------------
# The image processor: preprocessor_config.json states the size and normalisation the model was trained with
def _square_images() -> list:
    """A colour image to shrink and a grayscale one to enlarge (our loader makes it RGB) to the model's 32 px."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    colour = torch.randint(0, 256, (48, 48, 3), generator=gen, dtype=torch.uint8).numpy()
    gray = torch.randint(0, 256, (20, 20), generator=gen, dtype=torch.uint8).numpy()
    return [Image.fromarray(colour), Image.fromarray(gray)]


def _processed(processor, img) -> torch.Tensor:
    return processor(img, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("norm", [None, ([0.3, 0.4, 0.5], [0.2, 0.25, 0.3])], ids=["imagenet", "run's"])
def test_processor_prepares_images_as_our_eval_transform(mae, tmp_path, norm):
    """AutoImageProcessor loads the folder (it failed: no preprocessor_config.json) and gives our evaluation's
    tensor: resize to 32 px, normalised with the run's --mean/--std, else ImageNet's. Our evaluation
    crops the centre of the shorter side's resize: on a square image at crop_pct 1, the whole image. With
    Pillow's resize (ViTImageProcessor in transformers 4, ViTImageProcessorPil in 5) exactly; with
    transformers 5's default, torchvision's resize of uint8 images, within 2 levels of 255 (observed)."""
    model, _ = mae
    mean, std = norm or ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    saved = {"mean": mean, "std": std} if norm else {}
    args = argparse.Namespace(model=NAME, input_size=32, norm_pix_loss=True, mask_ratio=0.75, **saved)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "run.pth")
    _run(["--checkpoint", str(tmp_path / "run.pth"), "--to", "hf", "--output", str(tmp_path / "hf")])
    default = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    pil_class = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    pil = pil_class.from_pretrained(str(tmp_path / "hf"))
    for processor in (default, pil):
        assert (list(processor.image_mean), list(processor.image_std)) == (mean, std)
        assert (processor.size["height"], processor.size["width"]) == (32, 32)
    ours = eval_transform(32, mean, std, crop_pct=1.0)
    levels = 1 / 255 / min(std)  # one level of an 8-bit pixel, normalised
    for img in _square_images():
        expected = ours(img.convert("RGB"))  # what our loader gives the transform
        torch.testing.assert_close(_processed(pil, img), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(_processed(default, img), expected, atol=2 * levels + 1e-5, rtol=0)


def test_a_folder_saved_by_transformers_brings_the_processors_mean_and_std_back(mae, tmp_path):
    """Ours -> HF -> loaded and saved again by transformers (whose files carry no metadata of ours) -> ours:
    the run's --mean/--std come back from preprocessor_config.json (they were lost: ImageNet's were used)."""
    model, _ = mae
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    args = argparse.Namespace(model=NAME, input_size=32, norm_pix_loss=True, mask_ratio=0.75, mean=mean, std=std)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "own.pth")
    _run(["--checkpoint", str(tmp_path / "own.pth"), "--to", "hf", "--output", str(tmp_path / "hf")])
    _hf(tmp_path / "hf").save_pretrained(str(tmp_path / "resaved"))
    transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "resaved"))
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "resaved"), "--output", str(tmp_path / "back.pth")])
    back = load_checkpoint(str(tmp_path / "back.pth"))
    assert (back["args"].mean, back["args"].std) == (mean, std)
    assert all(torch.equal(model_state(back, "back")[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "settings",
    [
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]},
        {"rescale_factor": 1 / 127.5, "image_mean": 1.0, "image_std": 1.0},  # pixels in [-1, 1]
        {"do_rescale": False, "image_mean": [120, 110, 100], "image_std": [60, 62, 64]},
        {"do_normalize": False, "image_mean": [0.5, 0.4, 0.3]},
    ],
)
def test_the_processors_normalisation_becomes_ours(hf_parts, tmp_path, settings):
    """Whatever scaling the processor applies, the imported --mean/--std normalise our pixels in [0, 1] into
    the very tensor it gives (on an image of the model's size, which neither side resizes)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    config, weights = hf_parts
    folder = _write_folder(tmp_path / "hub", config, weights)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, **settings)
    processor.save_pretrained(str(folder))
    _run(["--from", "hf", "--checkpoint", str(folder), "--output", str(tmp_path / "out.pth")])
    args = load_checkpoint(str(tmp_path / "out.pth"))["args"]
    img = Image.open(demo_files(1)[0]).convert("RGB")
    ours = TF.normalize(TF.to_tensor(img), args.mean, args.std)
    torch.testing.assert_close(_processed(processor, img), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("image_mean", "0.5", "a number or a list of numbers"),
        ("image_mean", [0.5, None, 0.5], "a number or a list of numbers"),
        ("image_mean", [], "a number or a list of numbers"),
        ("image_std", [0.2, 0, 0.2], "a positive number or a list of positive numbers"),
        ("image_std", float("nan"), "a positive number or a list of positive numbers"),
        ("image_mean", [0.5, 0.5], "one value per channel (3, config.json's)"),
        ("do_normalize", "true", "true or false"),
        ("do_rescale", 1, "true or false"),
        ("rescale_factor", -1, "a positive number"),
        ("rescale_factor", 5e-324, "about 1/255"),
    ],
)
def test_a_corrupt_preprocessor_config_is_a_one_line_error_naming_it_and_the_key(
    hf_parts, tmp_path, key, value, expected
):
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "bad", config, weights)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, key: value}))
    message = _import_error(folder, tmp_path)
    assert message.startswith(f"HF folder {folder}: preprocessor_config.json has {key} {json.dumps(value)}")
    assert expected in message


@pytest.mark.parametrize(
    "settings, shown",
    [
        ({"image_std": 1e-50}, "mean 0.5 0.5 0.5 std 1e-50 1e-50 1e-50"),  # 0 in float32: torchvision refuses it
        ({"image_mean": [0.5, 1e300, 0.5]}, "mean 0.5 1e+300 0.5 std 0.5 0.5 0.5"),
        ({"rescale_factor": 1e-300, "image_mean": 0.5}, "mean 1.96078e+297"),
    ],
)
def test_a_processor_whose_normalisation_leaves_float32_is_refused(hf_parts, tmp_path, settings, shown):
    """Finite values that no image normalised in float32 survives: the imported checkpoint would have failed
    every tool later (torchvision's ValueError for a std rounded to 0, or pixels of inf)."""
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "far", config, weights)
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    message = _import_error(folder, tmp_path)
    assert message.startswith(f"HF folder {folder}: preprocessor_config.json normalises pixels in [0, 1] with {shown}")
    assert "leave float32's range" in message


@pytest.mark.parametrize(
    "name, key, expected",
    [
        ("preprocessor_config.json", "image_mean", "a number or a list of numbers"),
        ("preprocessor_config.json", "image_std", "a positive number or a list of positive numbers"),
        ("preprocessor_config.json", "rescale_factor", "a positive number"),
        ("config.json", "mask_ratio", "a number in [0, 1)"),
        ("config.json", "layer_norm_eps", "a positive number"),
    ],
)
def test_an_integer_past_floats_range_is_a_one_line_error(hf_parts, tmp_path, name, key, expected):
    """JSON's integers have no bound and Python's json reads them whole: 1 and 400 zeros, which no float
    holds (math.isfinite raised OverflowError, a traceback), is refused as any other value that is no number."""
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "huge", config, weights)
    huge = "1" + "0" * 400
    entries = config if name == "config.json" else {}
    (folder / name).write_text(json.dumps({**entries, key: "HUGE"}).replace('"HUGE"', huge))
    message = _import_error(folder, tmp_path)
    assert message.startswith(f"HF folder {folder}: {name} has {key} {huge[:197]}...; it must be {expected}")


@pytest.mark.parametrize("text, expected", [("[0.5]", "is not a JSON object"), ("{", "is not readable JSON")])
def test_a_preprocessor_config_that_is_no_json_object_is_a_one_line_error(hf_parts, tmp_path, text, expected):
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "bad", config, weights)
    (folder / "preprocessor_config.json").write_text(text)
    assert _import_error(folder, tmp_path).startswith(f"HF folder {folder}: preprocessor_config.json {expected}")


def test_other_channel_counts_get_a_processor_of_their_values_or_none(tmp_path, capsys):
    """A 1-channel MAE's processor holds its run's one mean and std and does not make images RGB; one that
    stores none gets no processor (ImageNet's values are RGB's) and a note; stored values that fit no
    channel count of the model are refused."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_mini_patch4(in_chans=1)
    base = {"model": NAME, "input_size": 32, "norm_pix_loss": False, "mask_ratio": 0.75}
    stored = {"gray": {"mean": [0.5], "std": [0.25]}, "none": {}, "rgb": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    for name, saved in stored.items():
        args = argparse.Namespace(**base, **saved)
        torch.save({"model": model.state_dict(), "args": args}, tmp_path / f"{name}.pth")
    _run(["--checkpoint", str(tmp_path / "gray.pth"), "--to", "hf", "--output", str(tmp_path / "gray")])
    processor = json.loads((tmp_path / "gray" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"], processor["do_convert_rgb"]) == ([0.5], [0.25], False)
    # Imported back: a 1-channel model's flags, its channels with them (knn_eval.py read one without as RGB's).
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "gray"), "--output", str(tmp_path / "back.pth")])
    back = load_checkpoint(str(tmp_path / "back.pth"))["args"]
    assert (back.in_chans, back.mean, back.std) == (1, [0.5], [0.25])
    _run(["--checkpoint", str(tmp_path / "none.pth"), "--to", "hf", "--output", str(tmp_path / "none")])
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["config.json", "model.safetensors"]
    assert "no preprocessor_config.json written" in capsys.readouterr().out
    argv = ["--checkpoint", str(tmp_path / "rgb.pth"), "--to", "hf", "--output", str(tmp_path / "rgb")]
    message = one_line_error(lambda: _run(argv))
    assert message.startswith(f"checkpoint {tmp_path / 'rgb.pth'} stores --mean 0.5 0.5 0.5 --std 0.25 0.25 0.25")
    assert not (tmp_path / "rgb").exists()


@pytest.mark.parametrize("std", [[1e-50] * 3, [0.25, 0.0, 0.25]], ids=["rounds to 0 in float32", "zero"])
def test_stored_values_no_image_normalises_finitely_get_no_processor(tmp_path, std):
    """A stored std that float32 rounds to 0 (no run of ours trains with it: check_norm refuses it) would have
    given a processor whose every image is infinite; it is refused as a std of 0 is."""
    model = models_mae.mae_vit_mini_patch4()
    args = argparse.Namespace(model=NAME, input_size=32, mask_ratio=0.75, norm_pix_loss=False, mean=[0.5] * 3, std=std)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "c.pth")
    argv = ["--checkpoint", str(tmp_path / "c.pth"), "--to", "hf", "--output", str(tmp_path / "hf")]
    message = one_line_error(lambda: _run(argv))
    shown = " ".join(f"{v:.6g}" for v in std)
    assert message.startswith(f"checkpoint {tmp_path / 'c.pth'} stores --mean 0.5 0.5 0.5 --std {shown}, not one")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------
# Errors
# mae_vit_tiny_patch4's architecture: a config that names another of our models than its weights.
TINY_ARCH = {
    "hidden_size": 192,
    "num_hidden_layers": 12,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "decoder_hidden_size": 128,
    "decoder_num_hidden_layers": 4,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 512,
}


def _write_folder(path: Path, config: dict | None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_broken_or_foreign_hf_folders_are_one_line_errors_naming_them(mae, tmp_path):
    _, root = mae
    good = json.loads((root / "hf" / "config.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(root / "hf" / "model.safetensors"))
    encoder_only = {k: v for k, v in weights.items() if k.startswith("vit.")}
    cases = {
        "no_config": (None, weights, "has no config.json"),
        "bert": ({"model_type": "bert", "architectures": ["BertModel"]}, None, "holds a bert (BertModel) model, not"),
        "no_weights": (good, None, "lacks its weights (pytorch_model.bin)"),
        "encoder_only": (good, encoder_only, "holds no MAE decoder weights"),
        "other_config": (
            {**good, **TINY_ARCH},
            weights,
            "its weights do not fit its config.json (mae_vit_tiny_patch4",
        ),
        "unknown_arch": ({**good, "num_hidden_layers": 5}, weights, "no models_mae model has its architecture"),
    }
    for name, (config, state, message) in cases.items():
        folder = _write_folder(tmp_path / name, config, state)
        with pytest.raises(UserError, match=rf"HF folder {re.escape(str(folder))}[: ].*{re.escape(message)}"):
            _run(["--from", "hf", "--checkpoint", str(folder), "--output", str(tmp_path / f"{name}.pth")])
    extra = _write_folder(tmp_path / "extra", good, {**weights, "classifier.weight": torch.zeros(2)})
    with pytest.raises(UserError, match=rf"HF folder {extra} holds weights that are not .*classifier.weight"):
        _run(["--from", "hf", "--checkpoint", str(extra), "--output", str(tmp_path / "x.pth")])
    with pytest.raises(UserError, match="reads a transformers model folder"):
        _run(["--from", "hf", "--checkpoint", str(root / "checkpoint-0.pth"), "--output", str(tmp_path / "y.pth")])
    with pytest.raises(UserError, match=rf"^HF folder {tmp_path / 'absent'} does not exist; check its path$"):
        _run(["--from", "hf", "--checkpoint", str(tmp_path / "absent"), "--output", str(tmp_path / "a.pth")])
    with pytest.raises(UserError, match=r"--from hf writes our checkpoint, \.pth or \.safetensors"):
        _run(["--from", "hf", "--checkpoint", str(root / "hf"), "--output", str(tmp_path / "z.bin")])
    argv = ["--from", "hf", "--checkpoint", str(tmp_path / "bert"), "--output", str(tmp_path / "c.pth")]
    assert str(tmp_path / "bert") in one_line_error(lambda: _run(argv))


def test_from_hf_never_writes_over_the_weights_it_imports(mae, tmp_path):
    """--output naming the folder's model.safetensors or one of its shards is refused even with --force
    (it replaced the folder's weights with ours, and the folder no longer loaded); a new file in the
    folder is written."""
    from safetensors.torch import load_file, save_file

    model, root = mae
    single = tmp_path / "single"
    shutil.copytree(root / "hf", single)
    weights = load_file(str(single / "model.safetensors"))
    sharded = _write_folder(tmp_path / "sharded", json.loads((single / "config.json").read_text()))
    shard = "model-00001-of-00001.safetensors"
    save_file(weights, str(sharded / shard), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(weights, shard)}))
    for folder, name in ((single, "model.safetensors"), (sharded, shard)):
        before = (folder / name).read_bytes()
        refused = rf"^--output {re.escape(str(folder / name))} is --checkpoint's weight file"
        with pytest.raises(UserError, match=refused):
            _run(["--from", "hf", "--checkpoint", str(folder), "--output", str(folder / name), "--force"])
        assert (folder / name).read_bytes() == before
    out = single / "ours.pth"
    _run(["--from", "hf", "--checkpoint", str(single), "--output", str(out)])
    state = model_state(load_checkpoint(str(out)), str(out))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_to_hf_needs_a_decoder_and_a_free_folder(mae, tmp_path):
    other = ["--model", "mae_vit_base_patch16"]
    model, root = mae
    encoder = tmp_path / "mae_pretrain_vit_mini.pth"
    torch.save(
        {"model": {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask"))}}, encoder
    )
    with pytest.raises(UserError, match=rf"checkpoint {encoder} holds no MAE decoder"):
        _run(["--checkpoint", str(encoder), "--to", "hf", "--output", str(tmp_path / "e")])
    with pytest.raises(UserError, match=rf"--output {root / 'hf'} exists; give --force"):
        _run(["--checkpoint", str(root / "checkpoint-0.pth"), "--to", "hf", "--output", str(root / "hf")])
    with pytest.raises(UserError, match=r"is a file; --to hf writes a folder .*: name one$"):
        _run(["--checkpoint", str(root / "checkpoint-0.pth"), "--to", "hf", "--output", str(encoder), "--force"])
    with pytest.raises(UserError, match=r"--mask_ratio and --norm_pix_loss set the config of --to hf.*leave them out$"):
        _run(["--checkpoint", str(encoder), "--to", "timm", "--output", str(tmp_path / "t.pth"), "--mask_ratio", "0.5"])
    # Was: silently unused (the file held the checkpoint's model, its metadata the checkpoint's --model).
    with pytest.raises(UserError, match=r"^--model names the model of --to timm and --to hf; --to safetensors copies"):
        _run(["--checkpoint", str(encoder), "--to", "safetensors", "--output", str(tmp_path / "s.safetensors")] + other)
    with pytest.raises(UserError, match=r"^--model names the model of --to timm and --to hf; --from hf takes the"):
        _run(["--from", "hf", "--checkpoint", str(root / "hf"), "--output", str(tmp_path / "f.pth")] + other)
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "f.pth").exists()
    with pytest.raises(UserError, match=r"does not fit mae_vit_tiny_patch4 at 32 px"):
        _run(
            [
                "--checkpoint",
                str(root / "checkpoint-0.pth"),
                "--to",
                "hf",
                "--output",
                str(tmp_path / "w"),
                "--model",
                "vit_tiny_patch4",
            ]
        )
    assert not (tmp_path / "e").exists() and not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# Hostile folders: every config.json value checked against one typed table, shard indexes that
# point outside their folder, sizes that would allocate before failing.
@pytest.fixture(scope="module")
def hf_parts(mae):
    """The exported mini model's config.json (a dict) and weights (HF names)."""
    from safetensors.torch import load_file

    _, root = mae
    return json.loads((root / "hf" / "config.json").read_text()), load_file(str(root / "hf" / "model.safetensors"))


def _import_error(folder: Path, tmp_path: Path) -> str:
    """The one-line error of importing ``folder`` (fails the test if it imports)."""
    with pytest.raises(UserError) as err:
        _run(["--from", "hf", "--checkpoint", str(folder), "--output", str(tmp_path / "out.pth")])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.pth").exists()
    return str(err.value)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("architectures", 5, "a list of strings"),
        ("num_channels", "3", "a positive integer"),
        ("num_channels", -3, "a positive integer"),
        ("num_channels", 3.0, "a positive integer"),
        ("hidden_size", True, "a positive integer"),  # a JSON boolean is no integer, though Python's bool is one
        ("num_hidden_layers", 10**30, "a positive integer"),
        ("mask_ratio", "abc", "a number in [0, 1)"),
        ("mask_ratio", 2.0, "a number in [0, 1)"),
        ("mask_ratio", float("nan"), "a number in [0, 1)"),
        ("norm_pix_loss", "false", "true or false"),
        ("qkv_bias", "false", "true or false"),
        ("layer_norm_eps", -1e-6, "a positive number"),
        ("layer_norm_eps", float("inf"), "a positive number"),
        ("hidden_act", ["gelu"], "a string"),
        ("image_size", [32, 16], "a positive integer, or [height, width] equal ones"),
        ("patch_size", "4", "a positive integer, or [height, width] equal ones"),
    ],
)
def test_wrongly_typed_config_values_are_one_line_errors_naming_config_json_and_key(
    hf_parts, tmp_path, key, value, expected
):
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "bad", {**config, key: value}, weights)
    message = _import_error(folder, tmp_path)
    assert message.startswith(f"HF folder {folder}: config.json has {key} {json.dumps(value)}; it must be {expected}")


def test_square_sizes_may_be_given_as_pairs(hf_parts, tmp_path):
    """HF allows (height, width) sizes: equal ones are our square models' sizes."""
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "pairs", {**config, "image_size": [32, 32], "patch_size": [4, 4]}, weights)
    _run(["--from", "hf", "--checkpoint", str(folder), "--output", str(tmp_path / "p.pth")])
    assert load_checkpoint(str(tmp_path / "p.pth"))["args"].input_size == 32


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_a_one_line_error(hf_parts, tmp_path, name):
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "deep", config)
    (folder / name).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert f"HF folder {folder}: {name} is nested too deeply" in _import_error(folder, tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{outside}", "sub/../../outside.safetensors", "..", 3])
def test_a_shard_index_names_files_inside_its_folder_only(hf_parts, tmp_path, shard):
    """A valid model outside the folder is not read through the index, by a relative or an
    absolute path; a weight_map value that is no string is an error too."""
    from safetensors.torch import save_file

    config, weights = hf_parts
    outside = tmp_path / "outside.safetensors"
    save_file(weights, str(outside), metadata={"format": "pt"})
    folder = _write_folder(tmp_path / "sharded", config)
    shard = str(outside) if shard == "{outside}" else shard
    first = sorted(weights)[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(weights, shard)}))
    expected = (
        f"HF folder {folder}: model.safetensors.index.json has weight_map[{json.dumps(first)}] {json.dumps(shard)}; "
        f"it must be a file name in the folder"
    )
    assert _import_error(folder, tmp_path).startswith(expected)


def _peak_traced_bytes(run) -> int:
    """Peak of the memory Python and numpy allocate while ``run()`` runs (torch's meta tensors take none)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("image_size", [1024, 60000])
def test_config_image_size_the_weights_cannot_take_is_refused_before_allocating(hf_parts, tmp_path, image_size):
    """image_size 1024 would build the model's 65,537 x 128 sin-cos position embedding (in float64,
    even on the meta device) only to find that the weights are for 32 px; 60000 would need hundreds
    of GiB. The position embedding in the weights settles it first, by arithmetic."""
    config, weights = hf_parts
    folder = _write_folder(tmp_path / "big", {**config, "image_size": image_size}, weights)
    messages = []
    peak = _peak_traced_bytes(lambda: messages.append(_import_error(folder, tmp_path)))
    expected = f"its weights do not fit its config.json ({NAME} at {image_size} px); they are {NAME}'s at 32 px"
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the error"
    assert messages[0] == f"HF folder {folder}: {expected}"


def test_export_does_not_import_the_reconstruct_script(mae, tmp_path, monkeypatch):
    """The model inferred from weight shapes has one home (util.registry.Registry.fit)."""
    model, _ = mae
    src = tmp_path / "no_args.pth"
    torch.save({"model": model.state_dict()}, src)  # no args: the model is inferred
    monkeypatch.delitem(sys.modules, "reconstruct", raising=False)
    _run(["--checkpoint", str(src), "--to", "hf", "--output", str(tmp_path / "hf")])
    assert "reconstruct" not in sys.modules


def test_force_replaces_a_whole_folder_and_refuses_one_with_other_files(mae, tmp_path):
    """--to hf writes the folder complete or not at all: an existing one is replaced as a whole, so
    files of another kind in it (a README, shards of another model) are not silently dropped."""
    _, root = mae
    src, out = root / "checkpoint-0.pth", tmp_path / "hf"
    _run(["--checkpoint", str(src), "--to", "hf", "--output", str(out)])
    _run(["--checkpoint", str(src), "--to", "hf", "--output", str(out), "--force"])
    assert sorted(p.name for p in out.iterdir()) == FOLDER_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "nothing left beside it"
    (out / "README.md").write_text("my notes")
    with pytest.raises(UserError, match=rf"^--output {re.escape(str(out))} holds other files \(README.md\)"):
        _run(["--checkpoint", str(src), "--to", "hf", "--output", str(out), "--force"])
    assert (out / "README.md").read_text() == "my notes"


def test_force_on_a_link_to_a_folder_replaces_the_link_and_leaves_nothing_beside_it(mae, tmp_path):
    """The link is renamed aside and removed as the earlier folder is (a hidden '.hf.old<pid>' link was left),
    and the folder it named keeps its files."""
    _, root = mae
    src, target, link = root / "checkpoint-0.pth", tmp_path / "target", tmp_path / "hf"
    _run(["--checkpoint", str(src), "--to", "hf", "--output", str(target)])
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    link.symlink_to(target, target_is_directory=True)
    _run(["--checkpoint", str(src), "--to", "hf", "--output", str(link), "--force"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "target"], "nothing left beside them"
    assert link.is_dir() and not link.is_symlink()
    assert sorted(p.name for p in link.iterdir()) == FOLDER_FILES
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_converting_builds_models_for_their_shapes_only(mae, tmp_path, monkeypatch):
    """Both ways, the models export.py builds on the meta device give only a config's architecture (up to
    seven of them to find a folder's): initialising them, sin-cos tables and all, only cost time."""
    _, root = mae

    def refuse(*args, **kwargs):
        raise AssertionError("weights initialised to convert a checkpoint")

    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "initialize_weights", refuse)
    _run(["--checkpoint", str(root / "checkpoint-0.pth"), "--to", "hf", "--output", str(tmp_path / "hf")])
    _run(["--from", "hf", "--checkpoint", str(tmp_path / "hf"), "--output", str(tmp_path / "back.pth")])
    assert (tmp_path / "back.pth").is_file()
