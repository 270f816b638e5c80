"""The reconstruction picture's columns: original | masked input | reconstruction of the removed
patches | reconstruction with the visible patches pasted back."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models_mae  # noqa: E402
from util.eval.pictures import MASKED_GRAY, fixed_noise, reconstruction_grid  # noqa: E402

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
    gray = round(MASKED_GRAY * 255)
    # Visible patches: gray in the reconstruction column (the model is never trained there) ...
    assert (recon[~removed] == gray).all()
    # ... removed patches: the prediction, exactly what the pasted column shows there.
    assert np.array_equal(recon[removed], pasted[removed])
    assert not (recon[removed] == gray).all()  # a prediction, not the gray fill
    # The masked input is the complement: the original where visible, gray where removed.
    assert np.array_equal(masked[~removed], original[~removed])
    assert (masked[removed] == gray).all()
    assert np.array_equal(pasted[~removed], original[~removed])
