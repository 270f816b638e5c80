"""Layer-wise learning-rate decay for ViT fine-tuning (BEiT; used by MAE).

Layer 0 is the embedding (patch embedding, position embedding, class token), block i is layer
i + 1, and everything after the blocks (final norm, head) is the top layer L = depth + 1.
A parameter of layer l gets lr * decay^(L - l). Weight decay is off for 1-D parameters (biases,
norms) and for the names in ``no_weight_decay_list`` (position embedding, class token).
"""

from collections.abc import Iterable

import torch


def layer_id_for_vit(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed", "dist_token", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(
    model: torch.nn.Module,
    weight_decay: float = 0.05,
    no_weight_decay_list: Iterable[str] = (),
    layer_decay: float = 0.75,
) -> list[dict]:
    """Optimizer parameter groups, one per (layer, decay or not), each with its ``lr_scale``.

    The parameter names are the official ones, which downstream scripts pass by keyword."""
    skip = set(no_weight_decay_list)
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in skip)
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            scale, wd = layer_decay ** (num_layers - layer), weight_decay if decay else 0.0
            groups[key] = {"lr_scale": scale, "weight_decay": wd, "params": [], "names": []}
        group = groups[key]
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())
