"""Masked autoencoder with a Vision Transformer backbone (He et al., 2021).

The encoder sees only the visible patches (plus the class token); a light decoder receives the
encoded patches together with a shared, learned mask token at every removed position and
predicts the pixels of all patches. The loss is the mean squared error on removed patches only.
Parameter names follow the official checkpoints so that they load as they are.
"""

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed
from torch.utils.checkpoint import checkpoint

from util.cli.errors import fail
from util.pos_embed import sincos_2d
from util.registry import Registry
from util.sizes import image_size


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        weight_init: str = "",
    ):
        """``weight_init="skip"`` (timm's VisionTransformer option) leaves the weights as the layers
        made them, for builds that only read shapes (``util.registry``'s, on the meta device)."""
        super().__init__()
        if weight_init not in ("", "skip"):
            raise ValueError(f"weight_init must be '' or 'skip', got {weight_init!r}")
        # img_size is one side (square) or (height, width); a square size stays an int, as the official model has it.
        height, width = image_size(img_size)
        for side in (height, width):
            if side % patch_size:
                raise ValueError(f"image size {side} is not a multiple of the patch size {patch_size}")
        self.img_size = height if height == width else (height, width)
        self.grid_size = (height // patch_size, width // patch_size)
        self.patch_size, self.in_chans = patch_size, in_chans
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False

        def blocks(dim: int, heads: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(n))

        # Encoder. Position embeddings are fixed sin-cos values, stored as frozen parameters
        # (as the official code does) so that checkpoints carry them under the same names.
        self.patch_embed = PatchEmbed((height, width), patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = blocks(embed_dim, num_heads, depth)
        self.norm = norm_layer(embed_dim)

        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = blocks(decoder_embed_dim, decoder_num_heads, decoder_depth)
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        if weight_init != "skip":
            self.initialize_weights()

    def initialize_weights(self) -> None:
        for pos_embed in (self.pos_embed, self.decoder_pos_embed):
            pos_embed.data.copy_(torch.from_numpy(sincos_2d(pos_embed.shape[-1], self.grid_size, cls_token=True)))
        # The patch projection is a linear map of the flattened patch: initialise it as one.
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them:
        less memory for large models and batches, at about one more forward's compute."""
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch flattened as (row, column, channel)."""
        self._check_images(imgs)
        (n, c), (h, w), p = imgs.shape[:2], self.grid_size, self.patch_size
        x = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, h, p, w, p))
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W], the inverse of :meth:`patchify`: on this model's grid,
        or on a square grid for other token counts (as the official code, which knows only squares)."""
        p, c = self.patch_size, self.in_chans
        h, w = self.grid_size
        if h * w != x.shape[1]:
            h = w = int(round(x.shape[1] ** 0.5))
        if h * w != x.shape[1] or x.shape[2] != p * p * c:
            raise ValueError(
                f"cannot unpatchify {tuple(x.shape)}: expected [N, {self.num_patches} or a square, {p * p * c}]"
            )
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_images(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"images of shape {tuple(imgs.shape)} do not fit this model, which takes "
                f"[N, {expected[0]}, {expected[1]}, {expected[2]}] (patch size {self.patch_size})"
            )

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a uniformly random subset of patches per sample, by sorting per-patch noise.

        Patches with the smallest noise are kept. Returns the kept tokens [N, keep, D], the
        binary mask [N, L] (1 = removed) and the permutation that restores the original order.
        """
        n, length, dim = x.shape
        num_keep = int(length * (1 - mask_ratio))
        if num_keep < 1:
            raise ValueError(f"mask ratio {mask_ratio} leaves no visible patch out of {length}")
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [{n}, {length}]")
        # i.i.d. noise makes every order of the patches equally likely, so the argsort is a uniform
        # random permutation and its first num_keep entries a uniform random subset: for the whole
        # batch at once, and with the same count per sample, so that the kept tokens stack.
        ids_shuffle = torch.argsort(noise, dim=1)
        # The argsort of a permutation is its inverse: ids_restore[i] is where patch i went in the
        # shuffled order, which the decoder needs to put every token back at its patch position.
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :num_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        # The mask is simple to write in shuffled order (kept first) and is then unshuffled.
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :num_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Positions are added before masking: once shuffled, a token's position is known only
        # from what it carries.
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [N, L, D]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, keep, D]
        return self._encode(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch, no masking: [N, 1 + L, D] tokens after the final norm, the
        class token first (what k-NN monitoring and feature extraction read)."""
        self._check_images(imgs)
        return self._encode(self.patch_embed(imgs) + self.pos_embed[:, 1:])

    def _encode(self, patches: torch.Tensor) -> torch.Tensor:
        # The class token is no patch: it is never masked and joins after the masking.
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        return self.norm(self._run_blocks(self.blocks, torch.cat([cls, patches], dim=1)))  # [N, 1 + patches, D]

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # [N, 1 + keep, D_dec]
        n, length = ids_restore.shape
        # One shared mask token per removed patch, appended after the kept ones: that is the
        # shuffled order random_masking left them in, kept patches first.
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # [N, L - keep, D_dec]
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, D_dec], shuffled order
        # Unshuffle: the token for patch i sits at ids_restore[i], so this gather puts every token,
        # encoded or mask, back at its patch position. The class token is set aside because it is
        # not one of the L shuffled patches that ids_restore indexes.
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        # Positions are added now, in patch order: they are all that tells the mask tokens apart.
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [N, 1 + L, D_dec]
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1 + L, p*p*C]
        return x[:, 1:]  # [N, L, p*p*C]: the class token predicts no pixels

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch mean squared pixel error."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            # Unbiased variance, as the official code computes it, so that losses compare.
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        # Only removed patches count: the encoder saw the visible ones, so rebuilding them is
        # mostly copying, which dilutes the signal (the paper reports slightly lower accuracy with
        # it). Dividing by the removed count keeps the loss's scale independent of the mask ratio.
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        self._check_images(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _init_linear(m: nn.Module) -> None:
    """Xavier-uniform linear weights with zero biases, the initialisation of the official code
    (PyTorch's own default for nn.Linear is another, Kaiming-uniform one; its LayerNorms start as
    the identity, as the official code sets them)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# Factories. The official three share one decoder (512-d, 8 blocks, 16 heads).
_norm = partial(nn.LayerNorm, eps=1e-6)
_official_decoder = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
# The tiny decoder (128-d, 4 blocks, 4 heads of 32) keeps the decoder, which runs on all
# tokens, at about a third of a step's FLOPs for the 192-d encoder at patch 4 (about 42% at
# patch 2, where the decoder sees 4x the tokens); the paper's ablation shows
# that a narrow decoder loses little, while some depth helps linear probing.
_tiny_decoder = dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)
# The mini model is sized for pre-training on a 2-core CPU (recipes/cifar10_cpu): a 128-d,
# 6-block encoder and a 64-d, 2-block decoder, about a fifth of the tiny model's step FLOPs, so
# that tens of CIFAR-10 epochs fit in an hour or two.
_mini_decoder = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)


def _mae(decoder: dict[str, int], kwargs: dict[str, Any], **arch: int) -> MaskedAutoencoderViT:
    """An MAE with the official norms and ``decoder`` (``kwargs`` may override the decoder, not ``arch``)."""
    return MaskedAutoencoderViT(norm_layer=_norm, **arch, **{**decoder, **kwargs})


def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(_tiny_decoder, kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3)


def mae_vit_tiny_patch4(**kwargs) -> MaskedAutoencoderViT:
    kwargs.setdefault("img_size", 32)
    return _mae(_tiny_decoder, kwargs, patch_size=4, embed_dim=192, depth=12, num_heads=3)


# Patch 2 gives a 32-px image 256 patches, as the public CIFAR-10 MAE reference (ViT-Tiny, patch 2)
# has them; recipes/cifar10_gpu pre-trains it.
def mae_vit_tiny_patch2(**kwargs) -> MaskedAutoencoderViT:
    kwargs.setdefault("img_size", 32)
    return _mae(_tiny_decoder, kwargs, patch_size=2, embed_dim=192, depth=12, num_heads=3)


def mae_vit_mini_patch4(**kwargs) -> MaskedAutoencoderViT:
    kwargs.setdefault("img_size", 32)
    return _mae(_mini_decoder, kwargs, patch_size=4, embed_dim=128, depth=6, num_heads=4)


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(_official_decoder, kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(_official_decoder, kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return _mae(_official_decoder, kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16)


# The official file names its factories by their decoder too, with the names above as aliases;
# scripts written against it use either.
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14


_OFFICIAL = [mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14]
MODELS = Registry(
    [mae_vit_tiny_patch16, mae_vit_tiny_patch4, mae_vit_tiny_patch2, mae_vit_mini_patch4, *_OFFICIAL],
    aliases={f"{f.__name__}_dec512d8b": f.__name__ for f in _OFFICIAL},
)


def encoder_name(model: str) -> str:
    """The classifier (models_vit) name of MAE ``model``, an official alias too:
    mae_vit_base_patch16 and mae_vit_base_patch16_dec512d8b -> vit_base_patch16."""
    return MODELS.aliases.get(model, model).removeprefix("mae_")


def check_mask_ratio(mask_ratio: float, num_patches: int, remove_one: bool = True) -> None:
    """The encoder needs a visible patch, and the loss (taken over removed patches) a removed one.
    A picture (``remove_one=False``: reconstruct.py) needs no removed patch: at 0 it shows the model's copy."""
    if remove_one and num_patches < 2:  # no ratio can do both: the range below would be (0, 0]
        fail(
            "--input_size makes each image a single patch; pre-training needs 2 or more (one removed for the "
            "loss, one kept for the encoder): give a larger --input_size"
        )
    keep = int(num_patches * (1 - mask_ratio)) if 0 <= mask_ratio < 1 else 0  # as models_mae draws it
    # The largest ratio that keeps a patch, rounded down: rounded up (64 patches: 0.9844), it would keep none.
    top = math.floor((1 - 1 / num_patches) * 10**6) / 10**6
    # Where that bound is exact in decimal (400 patches: 0.9975), 1 - top is a hair under 1 / num_patches in
    # float, and the count above keeps none of them: the advice would name a ratio it refuses.
    if int(num_patches * (1 - top)) < 1:
        top = round(top - 1e-6, 6)
    if remove_one and not 1 <= keep < num_patches:
        fail(
            f"--mask_ratio {mask_ratio} must remove at least one of the {num_patches} patches and keep one: "
            f"use a value in (0, {top:g}]"
        )
    if keep < 1:
        fail(
            f"--mask_ratio {mask_ratio} must keep at least one of the {num_patches} patches visible: "
            f"use a value in [0, {top:g}]"
        )


def create_model(
    name: str,
    input_size: int | Sequence[int] | None = None,
    in_chans: int = 3,
    mask_ratio: float | None = None,
    **kwargs,
) -> MaskedAutoencoderViT:
    """The MAE ``name`` (``--model``) for ``--input_size``/``--in_chans`` images, checked once:
    a known name, sides that are multiples of the patch size, and (when given) a ``--mask_ratio``
    that keeps a patch for the encoder and removes one for the loss. Errors name the flag (or
    ``size_source``, the checkpoint the size was read from: see ``Registry.create``)."""
    check = None if mask_ratio is None else lambda model: check_mask_ratio(mask_ratio, model.num_patches)
    return MODELS.create(name, input_size, in_chans, check, **kwargs)
