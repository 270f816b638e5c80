"""Hugging Face transformers interop: our MAE <-> a ``ViTMAEForPreTraining`` folder.

A folder is ``config.json`` plus the weights (``model.safetensors``; Hub downloads may instead hold
``pytorch_model.bin`` or safetensors shards with an index), and mostly ``preprocessor_config.json``,
the image processor: the image size and the normalisation the model was trained with. Folders are
read here, with safetensors and json only (transformers is needed to load an export, not to write
or read one); hf_convert.py makes them of our checkpoints and export.py writes them. A folder is
untrusted input: every entry of its JSON files that is used is checked against one typed table
(``CONFIG_FIELDS``, ``INDEX_FIELDS``, ``PREPROCESSOR_FIELDS``) before anything is built.

Names. Ours are the official MAE's: timm ViT blocks with one fused ``qkv`` projection. HF splits
it into query, key and value. HF has renamed its modules over versions, and all three spellings
occur in folders: the Hub's (transformers 4: ``vit.encoder.layer.N.attention.attention.query``,
``decoder.decoder_layers.N...``), the module names of transformers 5 (``vit.layers.N.attention.
q_proj``) and what transformers 5's ``save_pretrained`` writes (Hub names, except for the decoder
layers: ``decoder.decoder_encoder.layer.N``). We write the Hub's, which transformers 4 loads as
they are and transformers 5 converts on loading, and read all three.

Position embeddings are stored in the state dict on both sides (frozen parameters), so the
export carries ours; HF's own sin-cos formula gives the same values (it rotates the row and
column halves to match the official layout), but a freshly built HF model does not compute them.
"""

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from util.checkpoint.load import load_checkpoint, model_state
from util.cli.errors import UserError, fail
from util.data import normalization

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
WRITTEN_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME)  # the files export.py --to hf writes
_INDEX_NAME = "model.safetensors.index.json"
_BIN_NAME = "pytorch_model.bin"

# Whole tensors with one name on each side (ours -> HF's Hub name).
_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
}
# The decoder's are ours under "decoder.".
_TOP |= {k: f"decoder.{k}" for k in ("mask_token", "decoder_pos_embed")}
_TOP |= {f"decoder_{m}.{p}": f"decoder.decoder_{m}.{p}" for m in ("embed", "norm", "pred") for p in ("weight", "bias")}
_TOP_BACK = {hf: ours for ours, hf in _TOP.items()}
# Inside a block (ours -> Hub's); the fused qkv is split into the three names of _QKV.
_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# Every spelling of a block's modules that HF folders use, to ours ('q', 'k', 'v' are fused later).
_BLOCK_BACK = {hf: ours for ours, hf in _BLOCK.items()} | dict(zip(_QKV, "qkv", strict=True))
# transformers 5's module names: the q/k/v/o projections, and the MLP's under our names.
_BLOCK_BACK |= {f"attention.{x}_proj": x for x in "qkv"} | {"attention.o_proj": "attn.proj"}
_BLOCK_BACK |= {name: name for name in ("mlp.fc1", "mlp.fc2")}
_OUR_BLOCK = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(
    r"^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$"
)


# config.json and the shard index, checked against one typed table each
# JSON's true/false arrive as Python bools, which are ints: neither counts nor numbers.
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number: a float's, as every number here is used (JSON's integers have no bound, and
    math.isfinite raises OverflowError on one past float's range: 1 followed by 400 zeros)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class Rule(NamedTuple):
    """What a JSON value must be (``expected``, as errors say it), and the value to use of one that is."""

    expected: str
    ok: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda v: v


# Integers in configs are layer counts, widths and sizes: far below this. The bound keeps a
# meta-device build's shape arithmetic within int64.
_MAX_INT = 2**20
_POSITIVE_INT = Rule(f"a positive integer (at most {_MAX_INT})", lambda v: _is_int(v) and 0 < v <= _MAX_INT)
_RATIO = Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, float)  # some patches stay visible
_POSITIVE_NUMBER = Rule("a positive number", lambda v: _is_number(v) and v > 0, float)
_BOOLEAN = Rule("true or false (a JSON boolean, not a string)", lambda v: isinstance(v, bool))
_STRING = Rule("a string", lambda v: isinstance(v, str))
_STRING_OR_NULL = Rule("a string", lambda v: v is None or isinstance(v, str))
_STRINGS = Rule(
    "a list of strings",
    lambda v: v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
    lambda v: v or [],
)
# HF allows (height, width) sizes; our models take square images and patches.
_SQUARE_SIZE = Rule(
    "a positive integer, or [height, width] equal ones (our MAE models are square)",
    lambda v: _POSITIVE_INT.ok(v[0] if isinstance(v, list) and len(v) == 2 and v[0] == v[1] else v),
    lambda v: v[0] if isinstance(v, list) else v,
)
_NUMBERS = Rule(
    "a number or a list of numbers",
    lambda v: _is_number(v) or (isinstance(v, list) and bool(v) and all(map(_is_number, v))),
    lambda v: [float(x) for x in (v if isinstance(v, list) else [v])],
)
_POSITIVE_NUMBERS = Rule(
    "a positive number or a list of positive numbers",
    lambda v: _NUMBERS.ok(v) and all(x > 0 for x in _NUMBERS.convert(v)),
    _NUMBERS.convert,
)
_SHARD_MAP = Rule("an object from weight names to shard file names", lambda v: isinstance(v, dict) and bool(v))

_REQUIRED = object()
Field = tuple[Any, Rule]  # (default, rule)
# What a folder's config.json says it is, checked first, so that a foreign model is called one.
IDENTITY_FIELDS: dict[str, Field] = {"model_type": (None, _STRING_OR_NULL), "architectures": ([], _STRINGS)}
# The entries we use, with ViTMAEConfig's defaults for those a config.json leaves out.
CONFIG_FIELDS: dict[str, Field] = {
    "hidden_size": (768, _POSITIVE_INT),
    "num_hidden_layers": (12, _POSITIVE_INT),
    "num_attention_heads": (12, _POSITIVE_INT),
    "intermediate_size": (3072, _POSITIVE_INT),
    "image_size": (224, _SQUARE_SIZE),
    "patch_size": (16, _SQUARE_SIZE),
    "num_channels": (3, _POSITIVE_INT),
    "qkv_bias": (True, _BOOLEAN),
    "hidden_act": ("gelu", _STRING),
    "decoder_hidden_size": (512, _POSITIVE_INT),
    "decoder_num_hidden_layers": (8, _POSITIVE_INT),
    "decoder_num_attention_heads": (16, _POSITIVE_INT),
    "decoder_intermediate_size": (2048, _POSITIVE_INT),
    "layer_norm_eps": (1e-12, _POSITIVE_NUMBER),
    "mask_ratio": (0.75, _RATIO),
    "norm_pix_loss": (False, _BOOLEAN),
}
INDEX_FIELDS: dict[str, Field] = {"weight_map": (_REQUIRED, _SHARD_MAP)}
# The image processor's normalisation, with ViTImageProcessor's defaults for the entries a file leaves out:
# pixels are scaled by rescale_factor (when do_rescale), then normalised (when do_normalize).
PREPROCESSOR_FIELDS: dict[str, Field] = {
    "do_rescale": (True, _BOOLEAN),
    "rescale_factor": (1 / 255, _POSITIVE_NUMBER),
    "do_normalize": (True, _BOOLEAN),
    "image_mean": ([0.5], _NUMBERS),  # one value: every channel's
    "image_std": ([0.5], _POSITIVE_NUMBERS),
}
# The entries that fix the architecture (compared when importing): all but the norms' eps and the loss's.
ARCH_KEYS = tuple(k for k in CONFIG_FIELDS if k not in ("layer_norm_eps", "mask_ratio", "norm_pix_loss"))


def checked(data: Any, fields: dict[str, Field], what: str) -> dict[str, Any]:
    """``data`` (a JSON object) with each entry of ``fields`` checked and normalised, and the
    defaults of absent ones filled in (other entries as they are); or a one-line error that names
    ``what`` (the folder and file), the entry and the rule it breaks."""
    if not isinstance(data, dict):
        fail(f"{what} is not a JSON object")
    out = dict(data)
    for key, (default, rule) in fields.items():
        if key not in data and default is _REQUIRED:
            fail(f"{what} has no {key}")
        if key not in data:
            out[key] = default
        elif rule.ok(data[key]):
            out[key] = rule.convert(data[key])
        else:
            fail(f"{what} has {key} {_shown(data[key])}; it must be {rule.expected}")
    return out


def _shown(value: Any) -> str:
    """A JSON value as the file spells it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 200 else f"{text[:197]}..."


# JSON files of a model folder are a few KB (an index of a large model some 100 KB): refuse
# reading a huge one whole.
_JSON_LIMIT = 64 * 2**20


def read_json(path: str, what: str) -> Any:
    """The JSON in ``path``, or a one-line error naming ``what`` (folder and file)."""
    try:
        size = os.path.getsize(path)
        if size > _JSON_LIMIT:
            fail(f"{what} is {size / 2**20:.0f} MiB, not a model folder's JSON (a few KB)")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        fail(f"{what} is nested too deeply to be a model folder's JSON")
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
        fail(f"{what} is not readable JSON ({e})")


# Ours -> HF
def hf_config(model: nn.Module, image_size: int, mask_ratio: float, norm_pix_loss: bool) -> dict[str, Any]:
    """The ``ViTMAEConfig`` (as config.json's dict) of a ``models_mae.MaskedAutoencoderViT`` for
    square images of side ``image_size``, read off the built model so that it states what the
    weights were trained with. The model may be built at any size (its default: only the
    position embeddings' length depends on it)."""
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        # HF has one layer_norm_eps for every norm of encoder and decoder.
        raise ValueError(f"the model's layer norms use several eps ({sorted(eps)}); a ViTMAEConfig has one")
    for block in [*model.blocks, *model.decoder_blocks]:
        act = block.mlp.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise ValueError(f"the model's MLP activation is {act}, not the exact GELU of HF's 'gelu'")
    first, dec = model.blocks[0], model.decoder_blocks[0]
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_size": model.cls_token.shape[-1],
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": first.attn.num_heads,
        "intermediate_size": first.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": eps.pop(),
        "image_size": image_size,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "qkv_bias": first.attn.qkv.bias is not None,
        "decoder_hidden_size": model.mask_token.shape[-1],
        "decoder_num_hidden_layers": len(model.decoder_blocks),
        "decoder_num_attention_heads": dec.attn.num_heads,
        "decoder_intermediate_size": dec.mlp.fc1.out_features,
        "mask_ratio": float(mask_ratio),
        "norm_pix_loss": bool(norm_pix_loss),
    }


def preprocessor_config(image_size: int, mean: list[float], std: list[float], rgb: bool) -> dict[str, Any]:
    """The ``ViTImageProcessor`` (as preprocessor_config.json's dict) for our model of square images
    of side ``image_size``: converted to RGB where the model takes RGB (``rgb``), as our loader
    converts every file; resized as a whole, bicubic as in our transforms, to the model's size;
    scaled to [0, 1] and normalised with the ``mean`` and ``std`` it was trained with. (Our
    evaluation resizes the shorter side and crops the centre, which ViTImageProcessor cannot: the
    same on a square image where the crop is the whole image.) Only entries that ViTImageProcessor
    reads, in transformers 4 and 5 alike."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": rgb,
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,  # PIL's BICUBIC, the resampling of our transforms
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
    }


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MAE state dict under the Hub's ViTMAEForPreTraining names (qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _OUR_BLOCK.match(key)
        if not m or (m.group(3) != "attn.qkv" and m.group(3) not in _BLOCK):
            raise ValueError(f"{key} has no counterpart in ViTMAEForPreTraining")
        part, index, module, kind = m.groups()
        prefix = f"vit.encoder.layer.{index}" if part == "blocks" else f"decoder.decoder_layers.{index}"
        if module == "attn.qkv":
            # timm's qkv rows are [query; key; value], each head after head: HF's three projections.
            for name, chunk in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{name}.{kind}"] = chunk
        else:
            out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
    return out


# HF -> ours
def read_hf_folder(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(config, checked against ``CONFIG_FIELDS`` with HF's defaults filled in; weights; the run's flags
    that a weight file written by export.py --to hf stores, checked, else None) of a
    ViTMAEForPreTraining folder, or fail naming the folder and what is wrong with it."""
    if not os.path.exists(folder):
        fail(f"HF folder {folder} does not exist; check its path")
    if not os.path.isdir(folder):
        fail(f"--checkpoint {folder}: --from hf reads a transformers model folder (config.json + weights), not a file")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        fail(f"HF folder {folder} has no {CONFIG_NAME}; it is not a transformers model folder")
    what = f"HF folder {folder}: {CONFIG_NAME}"
    config = checked(read_json(config_path, what), IDENTITY_FIELDS, what)
    kind, archs = config["model_type"], config["architectures"]
    if kind != "vit_mae" or (archs and "ViTMAEForPreTraining" not in archs):
        described = f"{kind} ({', '.join(archs)})" if archs else str(kind)
        fail(f"HF folder {folder} holds a {described} model, not a ViTMAEForPreTraining (model_type vit_mae)")
    config = checked(config, CONFIG_FIELDS, what)

    state: dict[str, torch.Tensor] = {}
    run_args = None
    for path in _weight_files(folder):
        # load_checkpoint reads safetensors without pickle and .bin files with weights_only.
        ckpt = load_checkpoint(path)
        state.update(model_state(ckpt, path))
        run_args = run_args or ckpt.get("args")
    if not any(k.startswith("decoder.") for k in state):
        fail(
            f"HF folder {folder} holds no MAE decoder weights (a ViTMAEModel encoder?); "
            f"--from hf needs a ViTMAEForPreTraining"
        )
    return config, state, run_args


def read_preprocessor(folder: str, channels: int) -> tuple[list[float], list[float]] | None:
    """The (mean, std) for pixels in [0, 1], one value per channel, that the folder's
    preprocessor_config.json normalises with; None without the file. Checked against
    ``PREPROCESSOR_FIELDS`` and ``channels`` (config.json's num_channels), or a one-line error naming
    the file and the entry. A processor that scales pixels by another factor than 1/255, or does
    not normalise, is turned into the mean and std that give its pixels from ours."""
    path = os.path.join(folder, PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        return None
    what = f"HF folder {folder}: {PREPROCESSOR_NAME}"
    data = read_json(path, what)
    fields = checked(data, PREPROCESSOR_FIELDS, what)
    mean, std = (_per_channel(fields[key], data.get(key), key, channels, what) for key in ("image_mean", "image_std"))
    if not fields["do_normalize"]:
        mean, std = [0.0] * channels, [1.0] * channels
    # HF computes (x * factor - m) / s on pixels x of 0..255; ours (x / 255 - M) / S: equal for
    # M = m / scale, S = s / scale (scale 1 for the usual factor 1/255).
    scale = 255 * fields["rescale_factor"] if fields["do_rescale"] else 255.0
    mean, std = [m / scale for m in mean], [s / scale for s in std]
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        factor = _shown(data["rescale_factor"])
        fail(f"{what} has rescale_factor {factor}, which leaves no finite mean and std; it must be about 1/255")
    if not normalization.finite_in_float32(mean, std):  # the checkpoint would be refused by every tool
        shown = f"mean {normalization.show_values(mean)} std {normalization.show_values(std)}"
        fail(
            f"{what} normalises pixels in [0, 1] with {shown}, which leave float32's range, in which images are "
            f"normalised; its image_mean, image_std and rescale_factor must be of the pixels' scale"
        )
    return mean, std


def _per_channel(values: list[float], given: Any, key: str, channels: int, what: str) -> list[float]:
    """``values`` (checked; ``given``: as the file spells them), one per channel: a single value is
    every channel's, as in transformers."""
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        fail(f"{what} has {key} {_shown(given)}; it must hold one value per channel ({channels}, {CONFIG_NAME}'s)")
    return values


def _weight_files(folder: str) -> list[str]:
    """The folder's weight files: model.safetensors, else the shards its index names (files in
    the folder only), else pytorch_model.bin; or fail naming those that are absent."""
    files = [os.path.join(folder, WEIGHTS_NAME)]
    index_path = os.path.join(folder, _INDEX_NAME)
    if not os.path.isfile(files[0]) and os.path.isfile(index_path):
        what = f"HF folder {folder}: {_INDEX_NAME}"
        weight_map = checked(read_json(index_path, what), INDEX_FIELDS, what)["weight_map"]
        for name, shard in sorted(weight_map.items()):  # a file name in the folder, never a path that leaves it
            if not isinstance(shard, str) or shard in ("", ".", "..") or re.search(r"[/\\\0]", shard):
                where = f"weight_map[{json.dumps(name)}] {_shown(shard)}"
                fail(f"{what} has {where}; it must be a file name in the folder (no folder part, no ..)")
        files = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
    elif not os.path.isfile(files[0]):
        files = [os.path.join(folder, _BIN_NAME)]
    absent = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if absent:
        fail(f"HF folder {folder} lacks its weights ({', '.join(absent)}); download the whole model folder")
    return files


def files_read(folder: str) -> list[str]:
    """The weight files an import of ``folder`` reads (``_weight_files``), for an output check made
    before it: none where the folder's weights cannot be told, since the import then stops on them
    before anything is written."""
    try:
        return _weight_files(folder)
    except UserError:
        return []


def from_hf_state(state: dict[str, torch.Tensor], folder: str) -> dict[str, torch.Tensor]:
    """A ViTMAEForPreTraining state dict (any of HF's spellings) under our names, qkv fused."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in state.items():
        if key in _TOP_BACK:
            out[_TOP_BACK[key]] = value
            continue
        m = _HF_BLOCK.match(key)
        module = _BLOCK_BACK.get(m.group(3)) if m else None
        if module is None:
            foreign.append(key)
            continue
        part = "blocks" if m.group(1).startswith("vit.") else "decoder_blocks"
        index, kind = m.group(2), m.group(4)
        if module in ("q", "k", "v"):
            qkv.setdefault((part, index, kind), {})[module] = value
        else:
            out[f"{part}.{index}.{module}.{kind}"] = value
    if foreign:
        examples = ", ".join(sorted(foreign)[:3])
        fail(f"HF folder {folder} holds weights that are not a ViTMAEForPreTraining's ({examples})")
    for (part, index, kind), parts in qkv.items():
        if absent := sorted({"q", "k", "v"} - set(parts)):
            fail(f"HF folder {folder}: layer {index} of the {part} lacks its {'/'.join(absent)} projection {kind}")
        out[f"{part}.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
