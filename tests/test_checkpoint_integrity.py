"""Checkpoint integrity: stored checksums are verified on load (zip CRC-32s, safetensors CRC-32s),
weights of a dtype that would be cast silently, forged shapes and non-finite values are refused,
URLs never share a cache file, and malformed training entries are one-line errors."""

import errno
import functools
import http.client
import importlib
import json
import math
import random
import shutil
import ssl
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same, free_port, serve

import models_mae
import models_vit
import util.memory
from util.checkpoint.encoder import load_mae_encoder, load_pretrained_encoder
from util.checkpoint.entries import check_training_entries
from util.checkpoint.files import atomic_save
from util.checkpoint.load import checksum_metadata, load_checkpoint, peek_checkpoint
from util.checkpoint.resume import find_resumable
from util.checkpoint.state import TrainState, save_checkpoint
from util.checkpoint.weights import load_model_strict
from util.cli.errors import UserError
from util.train.precision import LossScaler


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
# Zip checkpoints: every member against its CRC-32
def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """(start of the data, size) of each member, read from the zip's local headers."""
    blob = path.read_bytes()
    offsets = {}
    with zipfile.ZipFile(path) as archive:
        for m in archive.infolist():
            name_len = int.from_bytes(blob[m.header_offset + 26 : m.header_offset + 28], "little")
            extra_len = int.from_bytes(blob[m.header_offset + 28 : m.header_offset + 30], "little")
            offsets[m.filename] = (m.header_offset + 30 + name_len + extra_len, m.file_size)
    return offsets


def test_torch_save_writes_real_crcs(tmp_path):
    """The premise of the check: torch.save stores each member's true CRC-32."""
    path = tmp_path / "c.pth"
    atomic_save({"model": {"w": torch.randn(100)}, "epoch": 0}, str(path))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert any(m.CRC != 0 for m in archive.infolist())


def test_a_flipped_byte_in_any_member_is_named(tmp_path):
    good = tmp_path / "good.pth"
    w = torch.randn(256)
    atomic_save({"model": {"w": w, "b": torch.zeros(3)}, "epoch": 2, "args": Namespace(a=1)}, str(good))
    offsets = _member_offsets(good)
    assert any("/data/" in name for name in offsets) and any(name.endswith("data.pkl") for name in offsets)
    for name, (start, size) in offsets.items():
        damaged = tmp_path / "damaged.pth"
        shutil.copy(good, damaged)
        _flip(damaged, start + size // 2)
        _one_line_error(functools.partial(load_checkpoint, str(damaged)), str(damaged), f"entry {name}", "damaged")
    assert torch.equal(load_checkpoint(str(good))["model"]["w"], w)


def test_resume_auto_skips_a_checkpoint_with_a_flipped_tensor_byte(tmp_path, capsys):
    w0, w1 = torch.randn(1000), torch.randn(1000)
    atomic_save({"model": {"w": w0}, "epoch": 0}, str(tmp_path / "checkpoint-0.pth"))
    newest = tmp_path / "checkpoint-1.pth"
    atomic_save({"model": {"w": w1}, "epoch": 1}, str(newest))
    data = [v for k, v in _member_offsets(newest).items() if k.endswith("/data/0")][0]
    _flip(newest, data[0] + 2000)  # inside the tensor: torch.load alone would return it changed
    found = find_resumable(str(tmp_path))
    assert found.path.endswith("checkpoint-0.pth") and torch.equal(found.ckpt["model"]["w"], w0)
    assert "skipping" in capsys.readouterr().out


def test_a_checkpoint_written_without_crcs_still_loads(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"model": {"w": torch.ones(4)}}, tmp_path / "nocrc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint(str(tmp_path / "nocrc.pth"))["model"]["w"], torch.ones(4))


# ---------------------------------------------------------------------------------------------
# .safetensors: per-tensor CRC-32s in the metadata, verified when present
def _safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **metadata})


def _tensor_offset(path: Path, name: str) -> int:
    blob = path.read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    return 8 + header_len + json.loads(blob[8 : 8 + header_len])[name]["data_offsets"][0]


def test_safetensors_checksums_name_the_damaged_tensor(tmp_path):
    pytest.importorskip("safetensors")
    tensors = {"a": torch.randn(64), "b": torch.randn(8, 8).bfloat16(), "c": torch.tensor(3.0)}
    path = tmp_path / "w.safetensors"
    _safetensors(path, tensors, checksum_metadata(tensors))
    assert_same(load_checkpoint(str(path))["model"], tensors)
    _flip(path, _tensor_offset(path, "b") + 5)
    _one_line_error(lambda: load_checkpoint(str(path)), str(path), "tensor b", "damaged")


def test_safetensors_without_or_with_broken_checksums(tmp_path):
    pytest.importorskip("safetensors")
    tensors = {"a": torch.randn(4)}
    plain = tmp_path / "plain.safetensors"  # a file from elsewhere (the Hub): nothing to verify
    _safetensors(plain, tensors, {})
    assert torch.equal(load_checkpoint(str(plain))["model"]["a"], tensors["a"])
    broken = tmp_path / "broken.safetensors"
    _safetensors(broken, tensors, {"crc32": "[1, 2]"})
    _one_line_error(lambda: load_checkpoint(str(broken)), str(broken), "'crc32' metadata")
    partial = tmp_path / "partial.safetensors"  # a tensor the checksums do not cover
    _safetensors(partial, {**tensors, "extra": torch.ones(2)}, checksum_metadata(tensors))
    _one_line_error(lambda: load_checkpoint(str(partial)), "tensor extra")


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


# ---------------------------------------------------------------------------------------------
# URLs: each its own cache file
def test_two_urls_with_the_same_file_name_do_not_share_a_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    weights = {}
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
        weights[host] = torch.randn(5)
        torch.save({"model": {"w": weights[host]}}, tmp_path / host / "checkpoint.pth")
    with serve(tmp_path / "a") as (url_a, _), serve(tmp_path / "b") as (url_b, _):
        got_a = load_checkpoint(f"{url_a}/checkpoint.pth")["model"]["w"]
        got_b = load_checkpoint(f"{url_b}/checkpoint.pth")["model"]["w"]
        (tmp_path / "b" / "damaged.pth").write_bytes(b"<html>not found</html>")
        damaged = f"{url_b}/damaged.pth"
        message = _one_line_error(lambda: load_checkpoint(damaged), damaged, "downloaded copy was removed")
        # What to do with a URL (not a file's "use an earlier checkpoint or write it again"):
        assert message.endswith("removed: run again to download it afresh, or download it yourself and give the file")
    assert torch.equal(got_a, weights["a"]) and torch.equal(got_b, weights["b"])
    # Served from the cache once downloaded; the damaged download was not kept.
    assert torch.equal(load_checkpoint(f"{url_a}/checkpoint.pth")["model"]["w"], weights["a"])
    assert sorted(p.name for p in (tmp_path / "torch_home").rglob("*.pth")) == ["checkpoint.pth"] * 2


def _read_only_folder(monkeypatch) -> None:
    """torch.hub's temporary file cannot be made, as in a read-only folder (root writes into one)."""

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(torch.hub, "open", refuse, raising=False)  # its module's name for the builtin


@pytest.mark.parametrize("cache", ["under a file", "read-only"])
def test_a_cache_that_cannot_be_written_is_named_with_what_to_do(tmp_path, monkeypatch, cache):
    """It said that the checkpoint 'could not be downloaded' and to download it yourself: the server was fine."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "served").mkdir()
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "served" / "w.pth")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / ("a-file" if cache == "under a file" else "home")))
    if cache == "read-only":
        _read_only_folder(monkeypatch)
    with serve(tmp_path / "served") as (address, _):
        url = f"{address}/w.pth"
        message = _one_line_error(lambda: load_checkpoint(url), url, "cannot be downloaded into torch.hub's cache")
    why = "Not a directory" if cache == "under a file" else "Permission denied"
    assert message.endswith(
        f"({why}): set TORCH_HOME to a folder you can write, or download it yourself and give the file"
    )


def test_a_server_that_is_down_says_to_download_it_yourself(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = f"http://127.0.0.1:{free_port()}/w.pth"  # nothing listens there
    message = _one_line_error(lambda: load_checkpoint(url), url, "could not be downloaded (URLError", "refused")
    assert message.endswith("; download it yourself and give the file")


def test_a_connection_broken_during_the_download_is_not_taken_for_the_cache(tmp_path, monkeypatch):
    """An SSL error while the body is read (a flaky link, a proxy) is an OSError whose errno, SSL's error
    code 1, is EPERM's, as a read-only cache folder's: the line said to set TORCH_HOME to a folder you can
    write, and the cache was fine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "served").mkdir()
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "served" / "w.pth")

    def broken_link(*args, **kwargs):
        raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac")

    monkeypatch.setattr(http.client.HTTPResponse, "read", broken_link)  # headers are read otherwise
    with serve(tmp_path / "served") as (address, _):
        url = f"{address}/w.pth"
        message = _one_line_error(lambda: load_checkpoint(url), url, "could not be downloaded (SSLError", "record mac")
    assert message.endswith("; download it yourself and give the file")


# ---------------------------------------------------------------------------------------------
# Training entries, before resume uses them
def _training_checkpoint(tmp_path: Path) -> dict:
    model = torch.nn.Linear(2, 2)
    flags = dict(output_dir=str(tmp_path), keep_last=0, save_freq=1, epochs=1, device="cpu", mean=[0.5], std=[0.2])
    state = TrainState(model, torch.optim.AdamW(model.parameters()), LossScaler("fp32"), Namespace(**flags))
    model(torch.ones(1, 2)).sum().backward()
    state.optimizer.step()
    state.extra = {"max_accuracy": 12.5, "unevaluated": {"epoch": 0, "train_stats": {"loss": 1.0}}}
    state.log = [{"epoch": 0, "train_loss": 1.0}]
    state.meters = {"epoch": 0, "step": 3, "sums": [{"loss": [3.0, 3]}]}  # one rank's
    return load_checkpoint(save_checkpoint(state, 0, 3))


def test_a_checkpoint_this_code_writes_passes_and_keeps_the_random_state(tmp_path):
    ckpt = _training_checkpoint(tmp_path)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (random.random(), float(np.random.rand()), torch.rand(2))
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    check_training_entries(ckpt, "c.pth")  # tries the stored random states, then puts ours back
    assert_same((random.random(), float(np.random.rand()), torch.rand(2)), expected)
    ckpt["meters"]["sums"] = {"loss": [3.0, 3]}  # as checkpoints kept them before each rank's: rank 0's alone
    check_training_entries(ckpt, "c.pth")


NAN_STATE = {"state": {0: {"exp_avg": torch.tensor([math.nan])}}, "param_groups": [{"params": [0]}]}


@pytest.mark.parametrize(
    "entry, value",
    [
        ("epoch", "3"),
        ("epoch", -1),
        ("epoch", True),
        ("epoch", 1.5),
        ("step", "x"),
        ("step", -2),
        ("rng", "abc"),
        ("rng", [1]),
        ("rng", [{"python": 5}]),
        ("optimizer", []),
        ("optimizer", {"state": {}, "param_groups": 5}),
        ("optimizer", {"state": {0: "x"}, "param_groups": []}),
        ("optimizer", NAN_STATE),
        ("scaler", [1]),
        ("extra", []),
        ("extra", {"max_accuracy": "abc"}),
        ("extra", {"unevaluated": 3}),
        ("extra", {"finals": "checkpoint-1.pth"}),
        ("extra", {"finals": [1]}),
        ("log", {}),
        ("log", [1]),
        ("log", [{"a": torch.ones(1)}]),
        ("meters", []),
        ("meters", {"epoch": 0}),
        ("meters", {"epoch": 0, "step": 1, "sums": {"loss": [1.0]}}),
        ("meters", {"epoch": 0, "step": 1, "sums": []}),
        ("meters", {"epoch": 0, "step": 1, "sums": [{"loss": [1.0, 1]}, {"loss": ["a", 1]}]}),
        ("args", 5),
    ],
)
def test_each_malformed_training_entry_is_named(tmp_path, entry, value):
    ckpt = _training_checkpoint(tmp_path)
    ckpt[entry] = value
    _one_line_error(lambda: check_training_entries(ckpt, "c.pth"), "checkpoint c.pth", f"'{entry}'")


# ---------------------------------------------------------------------------------------------
# Stored flags: checked where every checkpoint is opened (load_checkpoint), whoever reads them
BAD_FLAGS = [
    (dict(mean="abc"), "--mean 'abc'"),
    (dict(std=[1, "x"]), "--std [1, 'x']"),
    (dict(input_size=-3), "--input_size -3"),
    (dict(input_size=0), "--input_size 0"),
    (dict(input_size="abc"), "--input_size 'abc'"),
    (dict(input_size=["a", "b"]), "--input_size ['a', 'b']"),
    (dict(input_size=32.5), "--input_size 32.5"),
    (dict(input_size=[32, 32, 32]), "--input_size [32, 32, 32]"),
    (dict(input_size=10**9), "--input_size 1000000000"),
    (dict(model=5), "--model 5"),
    (dict(mask_ratio=2.0), "--mask_ratio 2.0"),
    (dict(mask_ratio="x"), "--mask_ratio 'x'"),
    (dict(mask_ratio=True), "--mask_ratio True"),
    (dict(norm_pix_loss="yes"), "--norm_pix_loss 'yes'"),
    (dict(in_chans="x"), "--in_chans 'x'"),
    (dict(in_chans=0), "--in_chans 0"),
    (dict(nb_classes=-1), "--nb_classes -1"),
    (dict(global_pool="avg"), "--global_pool 'avg'"),
    (dict(crop_pct=1.5), "--crop_pct 1.5"),
]


@pytest.mark.parametrize("flags, named", BAD_FLAGS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_stored_flags_no_flag_could_give_are_named_when_the_checkpoint_is_opened(tmp_path, flags, named, suffix):
    args = {**vars(_training_checkpoint(tmp_path)["args"]), **flags}
    path = tmp_path / f"flags{suffix}"
    if suffix == ".pth":
        torch.save({"model": {"w": torch.ones(2)}, "args": Namespace(**args)}, path)
    else:
        pytest.importorskip("safetensors")
        _safetensors(path, {"w": torch.ones(2)}, {"args": json.dumps(args)})
    words = (f"checkpoint {path} stores", named, "give another checkpoint")
    _one_line_error(lambda: load_checkpoint(str(path)), *words)
    # peek_checkpoint reads the flags without loading the weights (knn_eval's later --encoders).
    _one_line_error(lambda: peek_checkpoint(str(path)), *words)


# As the official code's parsers give them (main_pretrain.py, main_finetune.py; linear probing as
# fine-tuning, global_pool False), with what its init_distributed_mode adds.
OFFICIAL_RUN = dict(batch_size=64, epochs=400, accum_iter=1, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0)
OFFICIAL_RUN |= dict(warmup_epochs=40, data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir")
OFFICIAL_RUN |= dict(log_dir="./output_dir", device="cuda", seed=0, resume="", start_epoch=0, num_workers=10)
OFFICIAL_RUN |= dict(pin_mem=True, world_size=8, local_rank=-1, dist_on_itp=False, dist_url="env://", rank=0, gpu=0)
OFFICIAL_RUN |= dict(distributed=True, dist_backend="nccl")
OFFICIAL_PRETRAIN = dict(OFFICIAL_RUN, model="mae_vit_large_patch16", input_size=224, mask_ratio=0.75)
OFFICIAL_PRETRAIN |= dict(norm_pix_loss=True)
OFFICIAL_FINETUNE = dict(OFFICIAL_RUN, model="vit_large_patch16", input_size=224, drop_path=0.1, clip_grad=None)
OFFICIAL_FINETUNE |= dict(layer_decay=0.75, color_jitter=None, aa="rand-m9-mstd0.5-inc1", smoothing=0.1, reprob=0.25)
OFFICIAL_FINETUNE |= dict(remode="pixel", recount=1, resplit=False, mixup=0, cutmix=0, cutmix_minmax=None)
OFFICIAL_FINETUNE |= dict(mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", finetune="mae_pretrain.pth")
OFFICIAL_FINETUNE |= dict(global_pool=True, nb_classes=1000, eval=False, dist_eval=False)


def _our_args(script: str, *argv: str) -> Namespace:
    """The args our entry point stores: parsed, then settled as run.start settles them."""
    module = importlib.import_module(script)
    args = module.get_args_parser().parse_args(["--data_path", "d", *argv])
    settled = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], in_chans=3, precision="fp32", lr=1e-4)
    return Namespace(**{**vars(args), **{k: v for k, v in settled.items() if getattr(args, k, None) is None}})


@pytest.mark.parametrize(
    "args",
    [
        Namespace(**OFFICIAL_PRETRAIN),
        Namespace(**OFFICIAL_FINETUNE),
        Namespace(**dict(OFFICIAL_FINETUNE, global_pool=False, model="vit_base_patch16")),
        Namespace(a=1),  # nothing that is read back
    ],
    ids=["official pretrain", "official finetune", "official linprobe", "foreign"],
)
def test_official_stored_flags_load(tmp_path, args):
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": args}, path)
    assert load_checkpoint(str(path))["args"] == args


@pytest.mark.parametrize(
    "script, argv",
    [
        ("main_pretrain", ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--norm_pix_loss"]),
        ("main_pretrain", ["--input_size", "32", "16", "--mask_ratio", "0"]),
        ("main_finetune", ["--crop_pct", "1", "--nb_classes", "10", "--in_chans", "1", "--mean", "0.5"]),
        ("main_linprobe", ["--input_size", "48", "--cls_token"]),
    ],
)
def test_our_stored_flags_load_from_pth_and_safetensors(tmp_path, script, argv):
    """And as export.py writes them: JSON metadata, where tuples become lists."""
    pytest.importorskip("safetensors")
    from util.interop.files import write_weights

    args = _our_args(script, *argv, "--device", "cpu")
    torch.save({"model": {"w": torch.ones(2)}, "args": args}, tmp_path / "ours.pth")
    assert load_checkpoint(str(tmp_path / "ours.pth"))["args"] == args
    write_weights(str(tmp_path / "ours.safetensors"), {"w": torch.ones(2)}, args)
    stored = load_checkpoint(str(tmp_path / "ours.safetensors"))["args"]
    assert vars(stored) == json.loads(json.dumps(vars(args)))


def test_an_encoder_read_from_a_global_pool_classifier_names_the_flag(tmp_path):
    """knn_eval --encoders with a fine-tuned checkpoint (fine-tuning pools by default) said 'lacks encoder
    weights ['norm.bias', 'norm.weight']; check --model and that it holds an MAE encoder' (seen with the
    fine-tuning checkpoints of every commit tried, 4b1813c to 664ce52): the model was right and the weights
    an encoder's; the line now names --global_pool and what to give instead."""
    classifier = models_vit.vit_mini_patch4(num_classes=3, img_size=16, global_pool=True)
    torch.save({"model": classifier.state_dict()}, tmp_path / "finetuned.pth")
    mae = models_mae.mae_vit_mini_patch4(img_size=16)
    _one_line_error(lambda: load_mae_encoder(mae, str(tmp_path / "finetuned.pth")), "--global_pool", "--cls_token")
    pooled_off = models_vit.vit_mini_patch4(num_classes=3, img_size=16, global_pool=False)
    torch.save({"model": pooled_off.state_dict()}, tmp_path / "cls.pth")
    load_mae_encoder(mae, str(tmp_path / "cls.pth"))  # a --cls_token classifier keeps the final norm: it loads
    assert_same(mae.norm.weight, pooled_off.norm.weight)


def test_a_flipped_byte_deep_inside_a_large_member_is_named(tmp_path):
    """Every member is read to its end: zipfile checks a CRC only there. The other tests' members fit the 4 KiB
    that zipfile reads ahead, so a check that read only a member's first chunk passed them."""
    path = tmp_path / "big.pth"
    atomic_save({"model": {"w": torch.randn(600_000)}, "epoch": 0}, str(path))  # 2.4 MB: beyond one 1 MiB read
    start, size = [v for k, v in _member_offsets(path).items() if k.endswith("/data/0")][0]
    _flip(path, start + size - 100)
    _one_line_error(lambda: load_checkpoint(str(path)), str(path), "data/0", "damaged")


def test_a_zeroed_checksum_does_not_turn_the_check_off(tmp_path):
    """A file is taken as written without checksums only where every member stores 0 (set_crc32_options(False));
    one member's CRC damaged to 0 must not turn the check of the others off, nor pass itself."""
    path = tmp_path / "c.pth"
    atomic_save({"model": {"w": torch.randn(256)}, "epoch": 0}, str(path))
    blob = bytearray(path.read_bytes())
    central = blob.index(b"PK\x01\x02")  # the first member's entry in the zip directory; its CRC-32 at +16
    blob[central + 16 : central + 20] = bytes(4)
    path.write_bytes(bytes(blob))
    start, size = [v for k, v in _member_offsets(path).items() if k.endswith("/data/0")][0]
    _flip(path, start + size // 2)
    _one_line_error(lambda: load_checkpoint(str(path)), str(path), "damaged")


def test_a_checksum_of_a_tensor_the_file_lacks_is_one_line(tmp_path):
    """Checksums that name a tensor the file does not hold (a file cut down after export): one line naming it."""
    pytest.importorskip("safetensors")
    path = tmp_path / "cut.safetensors"
    tensors = {"a": torch.randn(4)}
    _safetensors(path, tensors, checksum_metadata({**tensors, "gone": torch.ones(2)}))
    _one_line_error(lambda: load_checkpoint(str(path)), str(path), "tensor gone")
