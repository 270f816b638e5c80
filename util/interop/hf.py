"""Hugging Face transformers interop: our MAE <-> a ``ViTMAEForPreTraining`` folder.

A folder is ``config.json`` plus the weights (``model.safetensors``; Hub downloads may instead hold
``pytorch_model.bin`` or safetensors shards with an index). Files are read and written here with
safetensors and json only: transformers is needed to load an export, not to write or read one.

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
import os
import re
import shutil
from typing import Any

import torch
import torch.nn as nn

from util.cli.errors import fail

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
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
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
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
_BLOCK_BACK |= {
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_OUR_BLOCK = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(
    r"^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$"
)

# ViTMAEConfig's defaults, for the entries a config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_num_attention_heads": 16,
    "decoder_intermediate_size": 2048,
    "layer_norm_eps": 1e-12,
    "mask_ratio": 0.75,
    "norm_pix_loss": False,
}
# The entries that fix the architecture (compared when importing): all but the norms' eps and the loss's.
ARCH_KEYS = tuple(k for k in _HF_DEFAULTS if k not in ("layer_norm_eps", "mask_ratio", "norm_pix_loss"))


# ---------------------------------------------------------------------------------------------
# Ours -> HF
def hf_config(model: nn.Module, mask_ratio: float, norm_pix_loss: bool) -> dict[str, Any]:
    """The ``ViTMAEConfig`` (as config.json's dict) of a ``models_mae.MaskedAutoencoderViT``,
    read off the built model so that it states what the weights were trained with."""
    if not isinstance(model.img_size, int):
        raise ValueError(f"the model takes {model.img_size} images; transformers' ViTMAE takes square ones only")
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
        "image_size": model.img_size,
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


def write_hf_folder(
    folder: str, state: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str]
) -> None:
    """Write config.json and model.safetensors into ``folder`` (created if needed).

    Both are written to a temporary folder beside it first: a new folder appears complete or not
    at all; in an existing one each file is replaced whole.
    """
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(folder))
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(folder))}.tmp{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        # Own, contiguous storage per tensor: safetensors refuses views (the qkv chunks are views).
        tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", **metadata})
        # safetensors may create the file private (0600); give it the permissions config.json gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(tmp, WEIGHTS_NAME), 0o666 & ~umask)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if not os.path.exists(folder):
            os.replace(tmp, folder)
            return
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # the weights first: a config never names absent ones
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# HF -> ours
def read_hf_folder(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config with HF's defaults filled in, weights) of a ViTMAEForPreTraining folder, or fail
    naming the folder and what is wrong with it."""
    from util.checkpoint.load import load_checkpoint, model_state

    if not os.path.isdir(folder):
        fail(f"--checkpoint {folder}: --from hf reads a transformers model folder (config.json + weights), not a file")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        fail(f"HF folder {folder} has no {CONFIG_NAME}; it is not a transformers model folder")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"HF folder {folder}: {CONFIG_NAME} is not readable JSON ({e})")
    if not isinstance(config, dict):
        fail(f"HF folder {folder}: {CONFIG_NAME} is not a JSON object")
    kind, archs = config.get("model_type"), config.get("architectures") or []
    if kind != "vit_mae" or (archs and "ViTMAEForPreTraining" not in archs):
        what = f"{kind} ({', '.join(archs)})" if archs else str(kind)
        fail(f"HF folder {folder} holds a {what} model, not a ViTMAEForPreTraining (model_type vit_mae)")

    files = [os.path.join(folder, WEIGHTS_NAME)]
    if not os.path.isfile(files[0]) and os.path.isfile(os.path.join(folder, _INDEX_NAME)):
        try:
            with open(os.path.join(folder, _INDEX_NAME)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            fail(f"HF folder {folder}: {_INDEX_NAME} is not a safetensors index ({type(e).__name__}: {e})")
        files = [os.path.join(folder, s) for s in shards]
    elif not os.path.isfile(files[0]):
        files = [os.path.join(folder, _BIN_NAME)]
    if not all(os.path.isfile(f) for f in files):
        absent = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        fail(f"HF folder {folder} lacks its weights ({', '.join(absent)}); download the whole model folder")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        # load_checkpoint reads safetensors without pickle and .bin files with weights_only.
        state.update(model_state(load_checkpoint(path), path))
    if not any(k.startswith("decoder.") for k in state):
        fail(
            f"HF folder {folder} holds no MAE decoder weights (a ViTMAEModel encoder?); "
            f"--from hf needs a ViTMAEForPreTraining"
        )
    return {**_HF_DEFAULTS, **config}, state


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


def square(value: Any, what: str, folder: str) -> int:
    """HF allows (height, width) sizes; our models are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            fail(f"HF folder {folder}: {what} {value} is not square; our MAE models take square images and patches")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        fail(f"HF folder {folder}: {what} {value!r} is not a positive integer")
    return value
