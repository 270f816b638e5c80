"""The reconstruction picture's columns: original | masked input | reconstruction of the removed
patches | reconstruction with the visible patches pasted back."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models_mae  # noqa: E402
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.eval.pictures import fixed_noise, reconstruction_grid  # noqa: E402

SIZE, PATCH = 16, 4


def _columns_and_removed() -> tuple[list[np.ndarray], np.ndarray]:
    """The four [N*H, W, 3] columns of a tiny model's picture, and its [N*H, W] removed-pixel mask."""
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_tiny_patch4", SIZE)
    imgs = torch.randn(2, 3, SIZE, SIZE)
    noise = fixed_noise(2, model.num_patches)
    grid = reconstruction_grid(model, imgs, noise, mask_ratio=0.75)
    columns = np.split(grid, 4, axis=1)
    # The mask by hand: the 25% of patches with the smallest noise are kept.
    kept = noise.argsort(dim=1)[:, : model.num_patches // 4]
    removed = torch.ones(2, model.num_patches)
    removed.scatter_(1, kept, 0)
    grid_side = SIZE // PATCH
    pixels = removed.view(2, grid_side, grid_side).repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    return columns, pixels.reshape(2 * SIZE, SIZE).bool().numpy()


def test_reconstruction_column_shows_only_removed_patches():
    (original, masked, recon, pasted), removed = _columns_and_removed()
    gray = 128  # MASKED_GRAY * 255, rounded: mid-gray, as the README describes the removed patches
    # Visible patches: gray in the reconstruction column (the model is never trained there) ...
    assert (recon[~removed] == gray).all()
    # ... removed patches: the prediction, exactly what the pasted column shows there.
    assert np.array_equal(recon[removed], pasted[removed])
    assert not (recon[removed] == gray).all()  # a prediction, not the gray fill
    # The masked input is the complement: the original where visible, gray where removed.
    assert np.array_equal(masked[~removed], original[~removed])
    assert (masked[removed] == gray).all()
    assert np.array_equal(pasted[~removed], original[~removed])


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_nothing_removed_shows_the_models_copy(norm_pix_loss):
    # reconstruct.py's --mask_ratio 0 is documented to show the model's copy: the third column is
    # then the prediction of every patch (it was all gray), the masked and pasted ones the original.
    # A norm_pix_loss model predicts normalised patches: each gets its true patch's mean and spread back.
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_tiny_patch4", SIZE, norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, SIZE, SIZE)
    noise = fixed_noise(2, model.num_patches)
    original, masked, recon, pasted = np.split(reconstruction_grid(model, imgs, noise, mask_ratio=0.0), 4, axis=1)
    assert np.array_equal(masked, original) and np.array_equal(pasted, original)
    with torch.no_grad():
        pred = model(imgs, mask_ratio=0.0, noise=noise)[1]
    if norm_pix_loss:
        target = model.patchify(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    pred = model.unpatchify(pred)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    by_hand = ((pred * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(recon, torch.cat(list(by_hand), dim=1).permute(1, 2, 0).numpy())
