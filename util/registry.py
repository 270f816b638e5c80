"""Models by name, checked against the flags where they are built (timm's ``create_model`` is the
pattern): the name, the image size against the patch size, the image channels, and whatever the
caller adds (``models_mae.create_model`` the mask ratio); and recognised by their weights
(``Registry.fit``: official releases store no flags). ``models_mae.MODELS`` and ``models_vit.MODELS``
are registries."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from util.cli.errors import fail
from util.memory import model_bytes, require
from util.sizes import check_input_size, shown_size

# What a factory gets where only shapes are read, on the meta device: timm's weight_init="skip", which every
# registered model takes. Initialisation sets values, which the meta device does not hold, yet timm's took
# most of the time of such a build (a third of a second for ViT-H, on the CPU).
SHAPES_ONLY = {"weight_init": "skip"}


class Registry(dict[str, Callable[..., nn.Module]]):
    """Factories by their function names. Aliases (the official code's second names) are found by
    ``in`` and ``[]``, so that ``--model`` takes them, but are not iterated over, so that help
    texts and errors list each model once."""

    def __init__(self, factories: Iterable[Callable[..., nn.Module]], aliases: dict[str, str] | None = None):
        super().__init__((f.__name__, f) for f in factories)
        self.aliases = dict(aliases or {})

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self.aliases

    def __missing__(self, name: str) -> Callable[..., nn.Module]:
        if name not in self.aliases:
            raise KeyError(name)
        return self[self.aliases[name]]

    def get(self, name: str, default: object = None) -> object:
        return self[name] if name in self else default

    def factory(self, name: str) -> Callable[..., nn.Module]:
        """The factory of ``--model name``, or a one-line error that lists the known models."""
        if name not in self:
            fail(f"--model {name} is unknown; known models: {', '.join(self)}")
        return self[name]

    def create(
        self,
        name: str,
        input_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        check: Callable[[nn.Module], None] | None = None,
        size_source: str = "",
        **kwargs,
    ) -> nn.Module:
        """Model ``name`` for ``input_size`` images (one side, or height and width; None: the
        factory's default) of ``in_chans`` channels, or a one-line error that names the flag, or
        ``size_source`` (the checkpoint the size was read from). ``check`` sees the model built on
        the meta device first, uninitialised, before any memory is spent."""
        factory = self.factory(name)
        if in_chans < 1:
            fail(f"--in_chans must be at least 1, got {in_chans}")
        with torch.device("meta"):  # allocates nothing: the patch size, the caller's checks, the size
            if input_size is not None:
                patch = factory(**SHAPES_ONLY).patch_embed.patch_size[0]
                kwargs["img_size"] = check_input_size(input_size, patch, size_source)
            planned = factory(in_chans=in_chans, **{**kwargs, **SHAPES_ONLY})
            if check is not None:
                check(planned)
        _require_weights(planned, name, kwargs.get("img_size"), kwargs.get("num_classes"))
        return factory(in_chans=in_chans, **kwargs)

    def fit(
        self, state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None, **kwargs: Any
    ) -> tuple[str, int | tuple[int, int]] | None:
        """(name, image size) of the first model (of ``names``; default: all) whose state dict has
        exactly ``state``'s names and shapes, at that size and ``state``'s channels; or None. The one
        place where a model is recognised by its weights; ``kwargs`` go to the factories (e.g.
        ``num_classes=0, global_pool=True`` for models_vit; ``img_size``: a size the checkpoint
        stores, the only one then tried).

        Else the size is a square's side: weights cannot tell 8x16 patches from 16x8. It comes from
        untrusted weights, so nothing is built at it (a claimed 10^5 x 10^5 grid would compute float64
        sin-cos embeddings of that size even on the meta device): each candidate is built on the meta
        device at its default size, and its position embeddings' token count (the only size-dependent
        shape) is worked out for the side by arithmetic. Candidates are built uninitialised
        (``SHAPES_ONLY``)."""
        proj = state.get("patch_embed.proj.weight")
        if proj is None or proj.dim() != 4:
            return None
        wanted = _shapes(state)
        for name in self if names is None else names:
            with torch.device("meta"):
                model = self[name](in_chans=proj.shape[1], **{**kwargs, **SHAPES_ONLY})
            if "img_size" in kwargs:
                size = kwargs["img_size"] if _shapes(model.state_dict()) == wanted else None
            else:
                size = _side_where_shapes_equal(model, wanted)
            if size is not None:
                return name, size
        return None


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _side_where_shapes_equal(model: nn.Module, wanted: dict[str, tuple[int, ...]]) -> int | None:
    """The square image side at which ``model``'s state-dict shapes would equal ``wanted``, or None."""
    own = _shapes(model.state_dict())
    if own.keys() != wanted.keys() or len(wanted["pos_embed"]) != 3:
        return None
    prefix = own["pos_embed"][1] - model.patch_embed.num_patches  # the class token
    grid = math.isqrt(max(wanted["pos_embed"][1] - prefix, 0))
    tokens = grid * grid + prefix
    at_side = {k: (s[0], tokens, *s[2:]) if k.endswith("pos_embed") else s for k, s in own.items()}
    return grid * model.patch_embed.patch_size[0] if grid and at_side == wanted else None


def _require_weights(
    model: nn.Module, name: str, img_size: tuple[int, int] | None, num_classes: int | None = None
) -> None:
    """Refuse, in one line, weights that cannot fit where the real model will be built; a classifier's
    head grows with ``num_classes`` (``--nb_classes``), which is then named too."""
    device = torch.get_default_device()
    if device.type == "meta":  # the caller builds on the meta device too: nothing to allocate
        return
    what = f"building --model {name} at "
    what += "its default size" if img_size is None else f"--input_size {shown_size(img_size)}"
    advice = "give a smaller --input_size or --model"
    if num_classes is not None:
        what, advice = f"{what} with --nb_classes {num_classes}", f"{advice}, or fewer --nb_classes"
    require(model_bytes(model), what, advice, device)
