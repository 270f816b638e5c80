"""A state dict against a model: it loads strictly, with finite weights of a usable dtype, or fails
naming what does not fit and the flags that decide it."""

import torch

from util.checkpoint.consistency import head_weight
from util.checkpoint.load import StateDict
from util.cli.errors import fail


def state_difference(
    own: StateDict, state: StateDict, may_miss: set[str] = frozenset(), may_be_left: set[str] | None = frozenset()
) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` ('' if nothing):
    keys of ``may_miss`` may be missing, those of ``may_be_left`` (any, if None) left over, and no
    shared key may differ in shape."""
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    named = (
        ("missing", sorted(set(own) - set(state) - may_miss)),
        ("unexpected", [] if may_be_left is None else sorted(set(state) - set(own) - may_be_left)),
        ("of another shape", wrong),
    )
    text = "; ".join(f"{len(keys)} {what} {keys[:4]}" for what, keys in named if keys)
    if not wrong:
        return text
    return f"{text} (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})"


def check_weights(own: StateDict, state: StateDict, source: str) -> None:
    """Every weight of ``state`` that the model has (``own``) loads as it is (``check_weight``), or
    fail naming it after ``source``. Call it before any use."""
    for key in sorted(set(own) & set(state)):
        check_weight(key, state[key], own[key].dtype, source)


# The one integer tensor our models hold: BatchNorm's step counter (the linear probe's head).
_INTEGER_BUFFERS = ("num_batches_tracked",)


def check_float_weights(state: StateDict, source: str) -> None:
    """Every weight is what loading one requires (``check_weight``: a float, whole, finite), or fail
    naming it after ``source``, where no model gives the dtypes: an export must not pass on weights the
    other entry points refuse (NaN from a diverged run, a quantized file). Our models and the official
    ones hold floats, but for the counters of ``_INTEGER_BUFFERS``, which must be int64 as torch keeps them."""
    for key, weight in sorted(state.items()):
        dtype = torch.int64 if key.rsplit(".", 1)[-1] in _INTEGER_BUFFERS else torch.float32
        check_weight(key, weight, dtype, source)


def check_weight(key: str, weight: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    """``weight`` (``key`` of ``source``) can stand where the model has a ``dtype`` tensor, or fail
    naming it: a float for a float (int8, bool or complex would be cast silently), holding the data
    its shape claims (zero strides can forge a huge tensor), and finite."""
    if dtype != weight.dtype and not (dtype.is_floating_point and weight.is_floating_point()):
        fail(
            f"{source}: weight {key} is {weight.dtype}, the model's is {dtype}; it cannot be loaded "
            f"without changing its values (a quantized or foreign checkpoint?): give one of {dtype} weights"
        )
    if weight.numel() * weight.element_size() > weight.untyped_storage().nbytes():
        fail(
            f"{source}: weight {key} claims shape {tuple(weight.shape)} but stores only "
            f"{weight.untyped_storage().nbytes()} bytes; the checkpoint is damaged or forged"
        )
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        fail(
            f"{source}: weight {key} holds {bad} NaN or infinite value(s) of {weight.numel()}: the file is "
            f"damaged or comes from a diverged run; use an earlier checkpoint"
        )


# The flags that decide whether a classifier has a weight; the other weights any model of --model has.
_FLAG_OF_WEIGHT = (("head.", "--nb_classes"), ("fc_norm.", "--global_pool"), ("norm.", "--global_pool"))


def flags_behind(own: StateDict, state: StateDict) -> str:
    """The flags to check where ``state`` does not fit a model whose state dict is ``own``: a weight
    present in one only is a head (--nb_classes) or a final norm (--global_pool); one of another shape
    at the same width, position embeddings (--input_size) or a head (--nb_classes); the patch embedding
    and an MAE's pixel prediction of other image channels only, --in_chans; any other, --model."""
    flags = set()
    for key in set(own) ^ set(state):
        flags.add(next((flag for prefix, flag in _FLAG_OF_WEIGHT if key.startswith(prefix)), "--model"))
    other_channels = _differ_only_in(own, state, "patch_embed.proj.weight", 1)
    for key in {k for k in set(own) & set(state) if own[k].shape != state[k].shape}:
        # A head's width is its linear weight's last side (the probe's other --nb_classes was named --model).
        ref = head_weight(own) if key.startswith("head.") else key
        same_width = ref in own and ref in state and own[ref].shape[-1] == state[ref].shape[-1]
        if same_width and key.endswith("pos_embed"):
            flags.add("--input_size")
        elif same_width and key.startswith("head."):
            flags.add("--nb_classes")
        elif other_channels and (
            key == "patch_embed.proj.weight" or key in _PIXELS and _differ_only_in(own, state, key, 0)
        ):
            flags.add("--in_chans")  # an MAE predicts patch_size^2 x channels values a patch
        else:
            flags.add("--model")
    known = ("--model", "--input_size", "--in_chans", "--nb_classes", "--global_pool")
    return " and ".join(flag for flag in known if flag in flags)


_PIXELS = ("decoder_pred.weight", "decoder_pred.bias")  # an MAE's pixel prediction: a row per pixel value


def _differ_only_in(own: StateDict, state: StateDict, key: str, dim: int) -> bool:
    """Whether weight ``key`` of ``own`` and ``state`` differ in side ``dim`` alone."""
    if key not in own or key not in state or own[key].dim() != state[key].dim():
        return False
    mine, theirs = list(own[key].shape), list(state[key].shape)
    return mine[dim] != theirs[dim] and mine[:dim] + mine[dim + 1 :] == theirs[:dim] + theirs[dim + 1 :]


def load_model_strict(model: torch.nn.Module, state: StateDict, path: str) -> None:
    """Load ``state`` (names, shapes and weights checked) into ``model``, or fail naming what differs
    and the flags that decide it."""
    own = model.state_dict()
    if diff := state_difference(own, state):
        fail(f"checkpoint {path} does not fit {type(model).__name__}: {diff}; check {flags_behind(own, state)}")
    check_weights(own, state, f"checkpoint {path}")
    model.load_state_dict(state)
