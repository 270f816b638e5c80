"""Pictures of reconstructions: original | masked | reconstruction of the removed patches |
reconstruction with the visible patches pasted back."""

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from util.atomic import atomic_write
from util.data.datasets import transformed
from util.data.images import load_rgb
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD

MASKED_GRAY = 0.5


def fixed_noise(num_images: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Masking noise from a private generator: the same mask every time it is asked for."""
    return torch.rand(num_images, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruction_grid(
    model: torch.nn.Module,
    imgs: torch.Tensor,
    noise: torch.Tensor,
    mask_ratio: float,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """A uint8 [N*H, 4*W, 3] picture of what ``model`` makes of ``imgs``, one row per image (the
    module's four columns); for a model that does not take RGB, one gray row per image and channel.
    ``imgs`` are normalised with the model's ``mean`` and ``std``, undone here. A ``norm_pix_loss``
    model's patches get each true patch's mean and spread back (as the paper's figures do)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs = imgs.to(device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise.to(device))
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    patch_area = model.patch_size**2 * model.in_chans
    recon = model.unpatchify(pred)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, patch_area).float())
    model.train(was_training)

    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    original, recon = imgs * std_t + mean_t, recon * std_t + mean_t
    masked = original * (1 - removed) + MASKED_GRAY * removed
    # The loss covers removed patches only, so the model's output at visible ones is untrained
    # (checkerboard speckles that read as a bug): the third column shows removed patches only.
    # With none removed (reconstruct.py's --mask_ratio 0) it shows the model's copy of every patch,
    # the one output such a picture has to show.
    shown = removed if removed.any() else torch.ones_like(removed)
    removed_only = MASKED_GRAY * (1 - shown) + recon * shown
    pasted = original * (1 - removed) + recon * removed
    row = torch.cat([original, masked, removed_only, pasted], dim=3)  # side by side
    if row.shape[1] != 3:  # no colours to show: every channel of every image as a gray row
        row = row.reshape(-1, 1, *row.shape[2:]).expand(-1, 3, -1, -1)
    grid = torch.cat(list(row), dim=1)  # images stacked vertically: [3, N*H, 4*W]
    return (grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def save_png(picture: np.ndarray, path: str, min_width: int = 512) -> None:
    """Save, upscaled by a whole factor (nearest) so that small images stay visible, in the format of
    ``path``'s extension (else PNG). Atomic: a failed write raises and leaves an earlier file as it was."""
    img = Image.fromarray(picture)
    factor = max(1, -(-min_width // img.width))
    if factor > 1:
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    Image.init()
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    atomic_write(path, lambda f: img.save(f, format=image_format))


def load_images(paths: Sequence[str], transform: Callable, loader: Callable[[str], Any] = load_rgb) -> torch.Tensor:
    """The files read by ``loader`` (``channels.image_loader``) and ``transform``ed, stacked; a
    transform's error names the file (the evaluation resize refuses too elongated images)."""
    return torch.stack([transformed(p, loader(p), transform) for p in paths])
