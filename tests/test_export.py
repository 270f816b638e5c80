"""export.py and .safetensors checkpoints: timm loads the encoder export with strict key matching
and gives our classifier's features; safetensors keeps weights bit for bit and the args; the
entry points read .safetensors files; damaged files and bad flags are one-line errors.

Feature tolerance: both sides run timm's ViT code on the same weights in float32, so the features
are expected to be identical; the tests allow an absolute difference of 1e-6.
"""

import argparse
import errno
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import budgeted_open, demo_files, folder_of_length, one_line_error, pretrain_args
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

import export
import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
import reconstruct
from util import atomic
from util.checkpoint.encoder import load_mae_encoder, load_pretrained_encoder
from util.checkpoint.load import load_checkpoint, model_state
from util.cli.errors import UserError
from util.data.loaders import eval_transform
from util.eval.pictures import load_images
from util.interop import hf
from util.interop import timm as interop_timm

timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

ATOL = 1e-6
CPU = ["--device", "cpu", "--precision", "fp32", "--num_workers", "0"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A tiny MAE pre-training run (norm_pix_loss, so that reading it from the args matters)
    on a train/val split the fine-tuning tests reuse."""
    root = tmp_path_factory.mktemp("export")
    train = demo_files(8)
    for split, files in (("train", train), ("val", [f for f in demo_files(11) if f not in train])):
        for f in files:
            dest = root / "data" / split / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    args = pretrain_args(root / "data", root / "pre", "--epochs", "1", "--warmup_epochs", "0", "--norm_pix_loss")
    args.vis_freq, args.log_dir = 0, ""
    torch.manual_seed(0)
    main_pretrain.main(args)
    return root, root / "pre" / "checkpoint-0.pth"


def _images() -> torch.Tensor:
    return load_images([str(f) for f in demo_files(2)], eval_transform(32))


def _export(src: Path, to: str, out: Path, *extra: str) -> None:
    export.main(
        export.get_args_parser().parse_args(["--checkpoint", str(src), "--to", to, "--output", str(out), *extra])
    )


def _timm_from_printed(capsys) -> torch.nn.Module:
    """Build the timm model with the very call export.py printed."""
    call = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert call.startswith("timm.create_model(") and "pretrained=True, num_classes=0" in call
    return eval(call, {"timm": timm})


def _assert_strict_keys(model: torch.nn.Module, path: Path) -> None:
    """timm loads strictly already; the key sets are compared here too, for a clear message."""
    exported = set(model_state(load_checkpoint(str(path)), str(path)))
    own = set(model.state_dict())
    assert exported == own, f"missing {sorted(own - exported)}, unexpected {sorted(exported - own)}"


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_loads_mae_export_with_our_features(pre, tmp_path, capsys, suffix):
    _, ckpt = pre
    out = tmp_path / f"encoder{suffix}"
    _export(ckpt, "timm", out)
    theirs = _timm_from_printed(capsys).eval()
    _assert_strict_keys(theirs, out)
    # The explicit call the README shows, too.
    explicit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(out), custom_load=False),
    ).eval()
    ours = models_vit.vit_tiny_patch4(num_classes=0, global_pool=False)  # class token after norm, as timm's default
    load_pretrained_encoder(ours, str(ckpt))
    ours.eval()
    imgs = _images()
    with torch.no_grad():
        expected = ours(imgs)
        assert expected.shape == (len(imgs), 192)
        torch.testing.assert_close(theirs(imgs), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(explicit(imgs), expected, atol=ATOL, rtol=0)


# Encoders timm builds only from what the printed call gives it. Was: for --in_chans 1 (docs/own-data.md), a call
# without in_chans, which timm refused (weights of 1 channel, model of 3); for --input_size 16 24, 'does not fit
# vit_tiny_patch4, the model it stores (at any square image size); give --model', which no --model fixes; for
# --input_size 32 8 at patch 4 (8x2 patches, as many as a 16 px square's 4x4, whose shapes the weights fit too),
# '16x16 px', img_size=16, so timm placed the position embeddings on a 4x4 grid and refused 32x8 images.
TIMM_CASES = {
    "grayscale": ((16, 16), 1, "img_size=16, in_chans=1", {"mean": [0.5], "std": [0.25]}),
    "non-square": ((16, 24), 3, "img_size=(16, 24)", {}),
    "non-square of a square's patch count": ((32, 8), 3, "img_size=(32, 8)", {}),
}


@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_loads_the_export_of_an_mae_from_the_printed_call(case, tmp_path, capsys):
    (height, width), in_chans, call, stored = TIMM_CASES[case]
    size = height if height == width else [height, width]  # as a checkpoint stores --input_size
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch4(img_size=(height, width), in_chans=in_chans)
    ckpt = tmp_path / "mae.pth"
    saved = argparse.Namespace(model="mae_vit_tiny_patch4", input_size=size, in_chans=in_chans, **stored)
    torch.save({"model": mae.state_dict(), "args": saved}, ckpt)
    out = tmp_path / "encoder.safetensors"
    _export(ckpt, "timm", out)
    printed = capsys.readouterr().out
    ours = models_vit.vit_tiny_patch4(img_size=(height, width), in_chans=in_chans, num_classes=0, global_pool=False)
    assert f"({len(ours.state_dict())} tensors, {height}x{width} px)" in printed and call in printed, printed
    print(printed)  # for _timm_from_printed
    theirs = _timm_from_printed(capsys).eval()
    _assert_strict_keys(theirs, out)
    load_pretrained_encoder(ours, str(ckpt))
    imgs = torch.rand(2, in_chans, height, width)
    with torch.no_grad():
        torch.testing.assert_close(theirs(imgs), ours.eval()(imgs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(models_vit.MODELS))
def test_every_classifier_has_a_timm_model_of_the_same_shapes(name):
    """A model added to the registry without its timm counterpart would export a file timm cannot load."""
    timm_name, kwargs = interop_timm.TIMM_NAMES[name]
    with torch.device("meta"):
        theirs = timm.create_model(timm_name, num_classes=0, img_size=32, **kwargs)
        ours = models_vit.MODELS[name](num_classes=0, global_pool=False, img_size=32)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_official_encoder_only_mini_model_is_recognised_by_shape(tmp_path, capsys):
    """An encoder-only release without args (the mae_pretrain_vit_base.pth format), mini model."""
    torch.manual_seed(1)
    mae = models_mae.mae_vit_mini_patch4()
    src = tmp_path / "mae_pretrain_vit_mini.pth"
    torch.save({"model": {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}}, src)
    out = tmp_path / "mini.safetensors"
    _export(src, "timm", out)
    theirs = _timm_from_printed(capsys).eval()
    _assert_strict_keys(theirs, out)
    ours = models_vit.vit_mini_patch4(num_classes=0, global_pool=False)
    load_pretrained_encoder(ours, str(src))
    with torch.no_grad():
        torch.testing.assert_close(theirs(_images()), ours.eval()(_images()), atol=ATOL, rtol=0)


def test_a_release_saved_inside_data_parallel_exports_as_the_bare_one(tmp_path, capsys):
    """Every name 'module.'-prefixed (a DistributedDataParallel's state dict saved): was 'no known ViT'."""
    torch.manual_seed(1)
    encoder = {k: v for k, v in models_mae.mae_vit_tiny_patch4(img_size=32).state_dict().items() if "decoder" not in k}
    encoder.pop("mask_token")
    torch.save({"model": encoder}, tmp_path / "bare.pth")
    torch.save({"model": {f"module.{k}": v for k, v in encoder.items()}}, tmp_path / "wrapped.pth")
    for name in ("bare", "wrapped"):
        _export(tmp_path / f"{name}.pth", "timm", tmp_path / f"{name}.safetensors")
    theirs = _timm_from_printed(capsys)
    _assert_strict_keys(theirs, tmp_path / "wrapped.safetensors")
    bare, wrapped = (load_checkpoint(str(tmp_path / f"{n}.safetensors"))["model"] for n in ("bare", "wrapped"))
    assert bare.keys() == wrapped.keys() and all(torch.equal(bare[k], wrapped[k]) for k in bare)


def test_global_pool_classifier_exports_fc_norm_for_timm_avg_pool(tmp_path, capsys):
    """A fine-tuned classifier with global pooling has fc_norm and no norm: timm needs
    global_pool='avg' (export prints it), and the pre-logits features equal ours."""
    torch.manual_seed(2)
    clf = models_vit.vit_tiny_patch4(num_classes=3, global_pool=True).eval()
    src = tmp_path / "checkpoint-0.pth"
    torch.save({"model": clf.state_dict(), "args": argparse.Namespace(model="vit_tiny_patch4", input_size=32)}, src)
    out = tmp_path / "clf.pth"
    _export(src, "timm", out)
    theirs = _timm_from_printed(capsys).eval()
    assert theirs.global_pool == "avg"
    _assert_strict_keys(theirs, out)
    with torch.no_grad():
        expected = clf.forward_head(clf.forward_features(_images()), pre_logits=True)
        torch.testing.assert_close(theirs(_images()), expected, atol=ATOL, rtol=0)


def test_linear_probe_checkpoint_exports(tmp_path, capsys):
    """A linear probe's head is a BatchNorm, whose step counter is an integer tensor: docs/checkpoints.md
    promises that export.py reads probing checkpoints too, so it must not be refused as a foreign weight."""
    torch.manual_seed(3)
    probe = models_vit.vit_tiny_patch4(num_classes=3, global_pool=False)
    main_linprobe.add_probe_head(probe)
    src = tmp_path / "checkpoint-0.pth"
    torch.save({"model": probe.state_dict(), "args": argparse.Namespace(model="vit_tiny_patch4", input_size=32)}, src)
    _export(src, "timm", tmp_path / "probe_encoder.safetensors")
    theirs = _timm_from_printed(capsys).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_images()), probe.eval().forward_features(_images())[:, 0], atol=ATOL, rtol=0)
    _export(src, "safetensors", tmp_path / "probe.safetensors")
    back = model_state(load_checkpoint(str(tmp_path / "probe.safetensors")), "probe.safetensors")
    assert back["head.0.num_batches_tracked"].dtype == torch.int64
    assert all(torch.equal(back[k], v) for k, v in probe.state_dict().items())


# ---------------------------------------------------------------------------------------------
def test_safetensors_round_trip_is_bitwise_with_args(pre, tmp_path):
    _, ckpt = pre
    out = tmp_path / "mae.safetensors"
    _export(ckpt, "safetensors", out)
    original = torch.load(ckpt, weights_only=False)
    back = load_checkpoint(str(out))
    assert set(back) == {"model", "args"}
    assert set(back["model"]) == set(original["model"])  # safetensors stores names sorted
    for k, v in original["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    for flag in ("model", "input_size", "norm_pix_loss", "mask_ratio"):
        assert getattr(back["args"], flag) == getattr(original["args"], flag), flag
    assert back["args"].norm_pix_loss is True


def test_reconstruct_reads_safetensors_like_pth(pre, tmp_path):
    """Model, size and norm_pix_loss come from the metadata: the picture is byte-identical."""
    _, ckpt = pre
    st = tmp_path / "mae.safetensors"
    _export(ckpt, "safetensors", st)
    images = [str(f) for f in demo_files(1)]
    for src, png in ((ckpt, "pth.png"), (st, "st.png")):
        reconstruct.main(
            reconstruct.get_args_parser().parse_args(
                [*images, "--checkpoint", str(src), "--output", str(tmp_path / png), "--device", "cpu"]
            )
        )
    assert (tmp_path / "pth.png").read_bytes() == (tmp_path / "st.png").read_bytes()


def _finetune(data: Path, out: Path, *extra: str) -> argparse.Namespace:
    argv = ["--data_path", str(data), "--nb_classes", "3", "--model", "vit_tiny_patch4", "--input_size", "32"]
    argv += ["--batch_size", "8", "--output_dir", str(out), "--log_dir", "", "--warmup_epochs", "0", *CPU, *extra]
    return main_finetune.get_args_parser().parse_args(argv)


def test_finetune_and_eval_resume_accept_safetensors(pre, tmp_path, capsys):
    root, ckpt = pre
    data = root / "data"
    st = tmp_path / "mae.safetensors"
    _export(ckpt, "safetensors", st)
    # --finetune: the same start, hence the same fine-tuned weights, as from the .pth.
    for src, out in ((ckpt, "from-pth"), (st, "from-st")):
        torch.manual_seed(0)
        main_finetune.main(_finetune(data, tmp_path / out, "--finetune", str(src), "--epochs", "1", "--seed", "0"))
    a = torch.load(tmp_path / "from-pth" / "checkpoint-0.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "from-st" / "checkpoint-0.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --eval --resume: a classifier checkpoint exported to safetensors evaluates the same.
    clf = tmp_path / "clf.safetensors"
    _export(tmp_path / "from-pth" / "checkpoint-0.pth", "safetensors", clf)
    capsys.readouterr()
    accuracy = []
    for src in (tmp_path / "from-pth" / "checkpoint-0.pth", clf):
        main_finetune.main(_finetune(data, tmp_path / f"eval-{src.suffix[1:]}", "--eval", "--resume", str(src)))
        accuracy.append([line for line in capsys.readouterr().out.splitlines() if "Acc@1" in line][-1])
    assert accuracy[0] == accuracy[1]


def test_knn_encoders_read_safetensors_and_timm_exports(pre, tmp_path):
    """knn_eval --encoders loads through load_mae_encoder: a full and an encoder-only
    (--to timm) .safetensors give the .pth's encoder weights exactly."""
    _, ckpt = pre
    _export(ckpt, "safetensors", tmp_path / "mae.safetensors")
    _export(ckpt, "timm", tmp_path / "encoder.safetensors")
    reference = models_mae.mae_vit_tiny_patch4()
    load_mae_encoder(reference, str(ckpt))
    for src in ("mae.safetensors", "encoder.safetensors"):
        model = models_mae.mae_vit_tiny_patch4()
        load_mae_encoder(model, str(tmp_path / src))
        for k, v in reference.state_dict().items():
            if not k.startswith(("decoder", "mask_token")):
                assert torch.equal(model.state_dict()[k], v), (src, k)


# ---------------------------------------------------------------------------------------------
def test_truncated_safetensors_is_a_one_line_error(pre, tmp_path):
    _, ckpt = pre
    st = tmp_path / "mae.safetensors"
    _export(ckpt, "safetensors", st)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or not a safetensors file"):
        load_checkpoint(str(cut))
    argv = [str(demo_files(1)[0]), "--checkpoint", str(cut), "--output", str(tmp_path / "r.png")]
    message = one_line_error(lambda: reconstruct.main(reconstruct.get_args_parser().parse_args(argv)))
    assert str(cut) in message and "truncated" in message


def test_export_errors_name_the_file_or_flag(pre, tmp_path):
    _, ckpt = pre
    out = tmp_path / "e.safetensors"
    out.write_bytes(b"")
    with pytest.raises(UserError, match=rf"--output {out} exists; give --force"):
        _export(ckpt, "timm", out)
    _export(ckpt, "timm", out, "--force")
    with pytest.raises(UserError, match=r"--to safetensors writes a \.safetensors file"):
        _export(ckpt, "safetensors", tmp_path / "e.pth")
    # Were: "exists; pass --force", then "cannot write ...: Is a directory"; "its folder does not exist".
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(UserError, match=rf"^--output {tmp_path / 'dir.pth'} is a folder; give a file name such as"):
        _export(ckpt, "timm", tmp_path / "dir.pth")
    with pytest.raises(UserError, match=r"^--output .*: the folder .*absent does not exist; create it first$"):
        _export(ckpt, "timm", tmp_path / "absent" / "e.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"backbone.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(UserError, match=rf"checkpoint {foreign} holds weights that are not an MAE"):
        _export(foreign, "timm", tmp_path / "f.pth")
    with pytest.raises(UserError, match=r"not a PyTorch checkpoint"):
        _export(_garbage(tmp_path), "timm", tmp_path / "g.pth")
    assert str(foreign) in one_line_error(lambda: _export(foreign, "timm", tmp_path / "h.pth"))


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    return path


def test_training_resume_from_safetensors_loads_weights_only_and_says_so(tmp_path, capsys):
    """A .safetensors file has no optimizer state or progress: training starts from its weights
    at --start_epoch, with a warning that this is not an exact resume."""
    from util.checkpoint.resume import open_resume, resume
    from util.checkpoint.state import Position, TrainState
    from util.train.precision import LossScaler

    torch.manual_seed(0)
    source, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    _export(tmp_path / "w.pth", "safetensors", tmp_path / "w.safetensors")
    args = argparse.Namespace(start_epoch=3, resume=str(tmp_path / "w.safetensors"), output_dir=str(tmp_path))
    state = TrainState(model, torch.optim.AdamW(model.parameters()), LossScaler("fp32"), args)
    assert resume(state, open_resume(state.args)) == Position(3, 0)
    assert torch.equal(model.weight, source.weight) and torch.equal(model.bias, source.bias)
    assert "holds weights only" in capsys.readouterr().out
    assert not state.optimizer.state_dict()["state"]


# ---------------------------------------------------------------------------------------------
# The model inferred from weight shapes: Registry.fit, the one home of it
@pytest.mark.parametrize("name", list(models_mae.MODELS))
def test_fit_recognises_each_mae_at_another_size(name):
    """Each factory built (on the meta device) for 1-channel images of another size than its
    default is found, with that size."""
    size = 112 if name.endswith("patch16") else 56
    with torch.device("meta"):
        state = models_mae.MODELS[name](img_size=size, in_chans=1).state_dict()
    assert models_mae.MODELS.fit(state) == (name, size)


def test_fit_finds_none_for_other_names_or_shapes():
    with torch.device("meta"):
        state = models_mae.mae_vit_mini_patch4(img_size=48).state_dict()
    assert models_mae.MODELS.fit(state, names=["mae_vit_mini_patch4"]) == ("mae_vit_mini_patch4", 48)
    assert models_mae.MODELS.fit(state, names=["mae_vit_tiny_patch4"]) is None
    assert models_mae.MODELS.fit({k: v for k, v in state.items() if k != "decoder_pred.bias"}) is None
    assert models_mae.MODELS.fit({**state, "extra": torch.zeros(1)}) is None
    # The decoder's position embedding for another grid than the encoder's.
    assert models_mae.MODELS.fit({**state, "decoder_pos_embed": torch.zeros(1, 65, 64)}) is None
    # 8 x 16 patches: the weights of no square image.
    assert models_mae.MODELS.fit({**state, "pos_embed": torch.zeros(1, 129, 128)}) is None


def test_encoder_for_weights_recognises_classifier_and_mae_encoders():
    """models_vit encoders at 48 px, with a class token (norm) or global pooling (fc_norm), with a head or
    not, and an MAE's (its decoder and mask token set aside)."""
    with torch.device("meta"):
        states = [
            models_vit.vit_tiny_patch4(img_size=48, num_classes=classes, global_pool=global_pool).state_dict()
            for classes in (0, 10)
            for global_pool in (False, True)
        ]
        states.append(models_mae.mae_vit_tiny_patch4(img_size=48).state_dict())
    for state in states:
        assert models_vit.encoder_for_weights(state) == ("vit_tiny_patch4", 48)
        assert models_vit.encoder_for_weights(state, ["vit_mini_patch4"]) is None


@pytest.mark.parametrize(
    "registry,kwargs",
    [
        (models_mae.MODELS, {"in_chans": 5}),
        (models_vit.MODELS, {"in_chans": 5, "num_classes": 0, "global_pool": True}),
        (models_vit.MODELS, {"in_chans": 1, "num_classes": 3, "global_pool": False}),
    ],
    ids=["mae", "vit pooled", "vit with head"],
)
def test_models_built_without_initialisation_have_the_same_shapes(registry, kwargs):
    """What Registry.fit compares (state-dict names and shapes, the patch grid) is the same whether a
    model is built with weight_init="skip", as fit builds it, or initialised, for every registered name."""

    def seen(model):
        grid = (model.patch_embed.num_patches, model.patch_embed.patch_size)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}, grid

    for name in registry:
        with torch.device("meta"):
            assert seen(registry[name](weight_init="skip", **kwargs)) == seen(registry[name](**kwargs)), name


def test_fit_runs_no_weight_initialisation(monkeypatch):
    """Initialisation only sets values, which the meta device does not hold; timm's took most of fit's
    time (about a second for the encoders). Recognising a model must not run it."""
    with torch.device("meta"):
        mae = models_mae.mae_vit_huge_patch14().state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("weights initialised while recognising a model")

    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "initialize_weights", refuse)
    monkeypatch.setattr(TimmVisionTransformer, "init_weights", refuse)
    assert models_mae.MODELS.fit(mae) == ("mae_vit_huge_patch14", 224)
    assert models_vit.encoder_for_weights(mae) == ("vit_huge_patch14", 224)
    assert models_mae.MODELS.fit({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}) is None


def test_mae_weight_init_takes_timms_skip_only():
    model = models_mae.mae_vit_mini_patch4(weight_init="skip")  # the layers' own values; no sin-cos table
    assert not model.pos_embed.any() and not model.cls_token.any()
    assert models_mae.mae_vit_mini_patch4().pos_embed.any()
    with pytest.raises(ValueError, match="^weight_init must be '' or 'skip', got 'jax'$"):
        models_mae.mae_vit_mini_patch4(weight_init="jax")


@pytest.mark.parametrize("tokens", [65537, 10**10 + 1], ids=["256x256 grid", "10**5 x 10**5 grid"])
def test_a_position_embedding_claiming_a_huge_grid_allocates_nothing(tmp_path, tokens):
    """A 2 KB checkpoint whose pos_embed is (1, tokens, 0): recognising the model must not build it
    at that grid (its sin-cos embeddings are computed in float64 even on the meta device)."""
    import tracemalloc

    state = models_mae.mae_vit_mini_patch4().state_dict()
    state["pos_embed"] = torch.zeros(1, tokens, 0)
    src = tmp_path / "bomb.pth"
    torch.save({"model": state}, src)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=rf"checkpoint {src}: no models_mae model has its shapes"):
            _export(src, "hf", tmp_path / "hf")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated"


# ---------------------------------------------------------------------------------------------
# A full disk: one line naming --output; the old output intact, or none at all
@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A mini MAE checkpoint (with args) and its HF export, to export again."""
    root = tmp_path_factory.mktemp("full_disk")
    torch.manual_seed(0)
    args = argparse.Namespace(model="mae_vit_mini_patch4", input_size=32, norm_pix_loss=False, mask_ratio=0.75)
    torch.save({"model": models_mae.mae_vit_mini_patch4().state_dict(), "args": args}, root / "checkpoint-0.pth")
    _export(root / "checkpoint-0.pth", "hf", root / "hf")
    return root


TARGETS = {  # name: (--to or --from hf, --output's name)
    "timm-pth": (["--to", "timm"], "encoder.pth"),
    "timm-safetensors": (["--to", "timm"], "encoder.safetensors"),
    "safetensors": (["--to", "safetensors"], "mae.safetensors"),
    "hf": (["--to", "hf"], "mae_hf"),
    "from-hf-pth": (["--from", "hf"], "back.pth"),
    "from-hf-safetensors": (["--from", "hf"], "back.safetensors"),
}


def _contents(path: Path) -> dict[str, bytes]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {f.name: f.read_bytes() for f in files}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("target", TARGETS)
def test_full_disk_is_one_line_and_leaves_the_old_output_or_none(mini, tmp_path, monkeypatch, target, existing):
    direction, name = TARGETS[target]
    src = mini / ("hf" if direction[0] == "--from" else "checkpoint-0.pth")
    out = tmp_path / name
    argv = ["--checkpoint", str(src), *direction, "--output", str(out), "--force"]
    if existing:
        export.main(export.get_args_parser().parse_args(argv))
        before = _contents(out)

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Every file that util.atomic writes takes 1000 bytes, then the disk is full.
    monkeypatch.setattr(atomic, "open", budgeted_open(1000, full, lambda path, mode: "w" in mode), raising=False)
    with pytest.raises(UserError) as err:
        export.main(export.get_args_parser().parse_args(argv))
    kept = "the old one is kept as it was" if existing else "nothing was written"
    assert (
        str(err.value)
        == f"cannot write --output {out}: No space left on device; {kept}; free some space or give another --output"
    )
    if existing:
        assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([name] if existing else []), "nothing partial beside it"


def _refuse_loading(monkeypatch) -> None:
    """Loading --checkpoint (ours, or an HF folder) fails the test: the checks before it must decide."""

    def loaded(*_):
        raise AssertionError("--checkpoint was loaded before --output was checked")

    monkeypatch.setattr(export, "load_checkpoint", loaded)
    monkeypatch.setattr(hf, "read_hf_folder", loaded)


def _export_argv(mini: Path, target: str, out: Path) -> argparse.Namespace:
    direction = TARGETS[target][0]
    src = mini / ("hf" if direction[0] == "--from" else "checkpoint-0.pth")
    return export.get_args_parser().parse_args(["--checkpoint", str(src), *direction, "--output", str(out)])


@pytest.mark.parametrize("target", TARGETS)
def test_an_output_name_over_name_max_is_refused_before_loading(mini, tmp_path, monkeypatch, target):
    # Was: the checkpoint loaded and converted, then 'cannot write --output ...: File name too long'.
    out = tmp_path / ("x" * 256 + os.path.splitext(TARGETS[target][1])[1])
    _refuse_loading(monkeypatch)
    with pytest.raises(UserError, match=rf"^--output {out}: the path is too long .*; give a shorter path$"):
        export.main(_export_argv(mini, target, out))
    assert list(tmp_path.iterdir()) == [], "no probe left behind"


def _longest_written_after(folder_length: int, target: str) -> int:
    """The length of the longest path the export writes, in a folder of ``folder_length`` bytes: the
    temporary of its file; for --to hf, its longest file's temporary in the folder's staging copy
    (util.atomic.atomic_write_folder)."""
    name = TARGETS[target][1]
    if target == "hf":
        staging = atomic.temporary_path("." + name)
        longest = max(hf.WRITTEN_NAMES, key=len)
        return folder_length + len(f"/{staging}/{atomic.temporary_path(longest)}")
    return folder_length + len("/" + atomic.temporary_path(name))


@pytest.mark.parametrize("target", TARGETS)
def test_an_output_path_over_path_max_is_refused_before_loading(mini, tmp_path, monkeypatch, target):
    # 4096 bytes with the NUL end a path (PATH_MAX): here --output itself fits, what is written on the way
    # to it does not. Was: loaded and converted, then 'cannot write --output ...: File name too long'.
    folder = folder_of_length(tmp_path, 4096 - _longest_written_after(0, target))
    assert _longest_written_after(len(str(folder)), target) == 4096
    out = folder / TARGETS[target][1]
    _refuse_loading(monkeypatch)
    with pytest.raises(UserError, match=rf"^--output {out}: the path is too long .*; give a shorter path$"):
        export.main(_export_argv(mini, target, out))
    assert list(folder.iterdir()) == [], "no probe left behind"


@pytest.mark.parametrize("target", TARGETS)
def test_an_output_path_that_just_fits_path_max_is_exported(mini, tmp_path, target):
    folder = folder_of_length(tmp_path, 4095 - _longest_written_after(0, target))
    out = folder / TARGETS[target][1]
    export.main(_export_argv(mini, target, out))
    assert sorted(p.name for p in folder.iterdir()) == [out.name]


def test_exported_safetensors_carry_checksums_that_loading_verifies(tmp_path):
    from util.checkpoint.load import load_checkpoint
    from util.cli.errors import UserError
    from util.interop.files import safetensors_bytes

    state = {"w": torch.arange(64.0)}
    data = bytearray(safetensors_bytes(state, {}))
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], state["w"])
    data[-8] ^= 1  # a bit inside the tensor's bytes, which follow the header
    path.write_bytes(data)
    with pytest.raises(UserError, match="w"):
        load_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------
# Weights the loaders refuse (util.checkpoint.weights.check_weight) are not exported either
def _damaged(state: dict[str, torch.Tensor], damage: str, key: str) -> dict[str, torch.Tensor]:
    if damage == "int32":
        return {k: v.to(torch.int32) for k, v in state.items()}
    bad = state[key].clone()
    bad.view(-1)[3] = math.nan
    return {**state, key: bad}


@pytest.mark.parametrize("damage", ["nan", "int32"])
@pytest.mark.parametrize("target", TARGETS)
def test_weights_the_loaders_refuse_are_not_exported(mini, tmp_path, target, damage):
    from safetensors.torch import load_file, save_file

    direction, name = TARGETS[target]
    if direction[0] == "--from":
        src, source = tmp_path / "hf", "HF folder"
        src.mkdir()
        shutil.copy(mini / "hf" / "config.json", src)
        hf_state = load_file(str(mini / "hf" / "model.safetensors"))
        save_file(
            _damaged(hf_state, damage, "vit.encoder.layer.0.attention.attention.query.weight"),
            src / "model.safetensors",
        )
    else:
        src, source = tmp_path / "damaged.pth", "checkpoint"
        ckpt = load_checkpoint(str(mini / "checkpoint-0.pth"))
        torch.save({**ckpt, "model": _damaged(ckpt["model"], damage, "blocks.0.attn.qkv.weight")}, src)
    out = tmp_path / name
    argv = ["--checkpoint", str(src), *direction, "--output", str(out)]
    message = one_line_error(export.main, export.get_args_parser().parse_args(argv))
    what = "holds 1 NaN or infinite value(s)" if damage == "nan" else "is torch.int32, the model's is torch.float32"
    key = "blocks.0.attn.qkv.weight" if damage == "nan" else "blocks.0.attn.proj.bias"  # the first, sorted
    assert message.startswith(f"{source} {src}: weight {key} {what}"), message
    assert not out.exists()


@pytest.mark.parametrize(
    "to, stored, expected",
    [
        ("timm", "vit_base_patch16", "does not fit vit_base_patch16, the model it stores (at any square image size)"),
        ("timm", "mae_vit_unknown", "stores --model mae_vit_unknown, which has no models_vit classifier"),
        ("hf", "mae_vit_base_patch16", "does not fit mae_vit_base_patch16, the model it stores, at 32 px"),
        ("hf", "vit_unknown", "stores --model vit_unknown, which is not an MAE"),
    ],
)
def test_a_stored_model_the_weights_do_not_fit_blames_the_checkpoint_not_a_flag(mini, tmp_path, to, stored, expected):
    ckpt = load_checkpoint(str(mini / "checkpoint-0.pth"))
    src = tmp_path / "other.pth"
    torch.save({**ckpt, "args": argparse.Namespace(**{**vars(ckpt["args"]), "model": stored})}, src)
    out = tmp_path / ("hf" if to == "hf" else "e.pth")
    message = one_line_error(_export, src, to, out)
    assert message.startswith(f"checkpoint {src} ") and expected in message and "give --model" in message, message
    assert f"--model {stored} is" not in message and "fit --model" not in message


@pytest.mark.parametrize("stored", ["mae_vit_base_patch16", "mae_vit_base_patch16_dec512d8b"])
def test_the_classifier_of_an_official_alias_is_found(stored):
    """The official main_pretrain.py takes both names and stores the one given: both are ViT-B/16's
    encoder (shapes on the meta device: a real ViT-B checkpoint is 340 MB)."""
    with torch.device("meta"):
        encoder = models_vit.MODELS["vit_base_patch16"](num_classes=0, global_pool=False).state_dict()
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head")}
    found = interop_timm.vit_name({"args": argparse.Namespace(model=stored)}, encoder, None, "official.pth")
    assert found == ("vit_base_patch16", 224)
