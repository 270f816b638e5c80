"""Tests of the fixed 2-D sine-cosine position embeddings and their resizing (util/pos_embed.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from util.pos_embed import get_2d_sincos_pos_embed, resize_pos_embed, sincos_1d, sincos_2d


def hand_sincos_2d(dim: int, grid: int, row: int, col: int, ch: int) -> float:
    """Entry (row, col), channel ``ch`` of the MAE 2-D embedding, written out from the formula.

    The first half of the channels encodes the column, the second half the row; within each
    half the first quarter of all channels holds sin(pos * w_k), the second cos(pos * w_k), with
    w_k = 1 / 10000^(2k / (dim / 2)).
    """
    half, quarter = dim // 2, dim // 4
    pos = col if ch < half else row
    k = ch % half
    func = math.sin if k < quarter else math.cos
    k %= quarter
    omega = 1.0 / 10000 ** (2 * k / half)
    return func(pos * omega)


# ---------------------------------------------------------------------------------------------
# sincos_1d


def test_sincos_1d_known_values():
    # dim 4: w = (1, 1/100); columns are sin(p), sin(p/100), cos(p), cos(p/100).
    out = sincos_1d(4, np.array([0.0, 1.0, 2.0]))
    expected = np.array(
        [
            [0.0, 0.0, 1.0, 1.0],
            [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
            [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)],
        ]
    )
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_sincos_1d_flattens_positions_in_order():
    positions = np.arange(6).reshape(2, 3)
    out = sincos_1d(8, positions)
    assert out.shape == (6, 8)
    np.testing.assert_allclose(out, sincos_1d(8, np.arange(6)))


def test_sincos_1d_odd_dim_rejected():
    with pytest.raises(ValueError, match="7"):
        sincos_1d(7, np.arange(3))


# ---------------------------------------------------------------------------------------------
# sincos_2d


def test_sincos_2d_dim8_grid2_known_rows():
    emb = sincos_2d(8, 2)
    assert emb.shape == (4, 8)
    assert emb.dtype == np.float32
    s1, s01, c1, c01 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    expected = np.array(
        [
            [0, 0, 1, 1, 0, 0, 1, 1],  # (row 0, col 0)
            [s1, s01, c1, c01, 0, 0, 1, 1],  # (row 0, col 1): first half encodes the column
            [0, 0, 1, 1, s1, s01, c1, c01],  # (row 1, col 0): second half encodes the row
            [s1, s01, c1, c01, s1, s01, c1, c01],  # (row 1, col 1)
        ],
        dtype=np.float64,
    )
    np.testing.assert_allclose(emb, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim,grid", [(8, 2), (16, 3), (32, 5)])
def test_sincos_2d_matches_hand_formula_everywhere(dim, grid):
    emb = sincos_2d(dim, grid)
    assert emb.shape == (grid * grid, dim)
    for row in range(grid):
        for col in range(grid):
            for ch in range(dim):
                got = emb[row * grid + col, ch]
                want = hand_sincos_2d(dim, grid, row, col, ch)
                assert got == pytest.approx(want, abs=1e-6), (row, col, ch)


def test_sincos_2d_cls_token_row_is_zero_and_rest_shifted():
    plain = sincos_2d(16, 4)
    with_cls = sincos_2d(16, 4, cls_token=True)
    assert with_cls.shape == (17, 16)
    assert with_cls.dtype == np.float32
    np.testing.assert_array_equal(with_cls[0], np.zeros(16, dtype=np.float32))
    np.testing.assert_array_equal(with_cls[1:], plain)


def test_sincos_2d_positions_are_distinct():
    emb = sincos_2d(32, 6)
    dists = np.linalg.norm(emb[:, None, :] - emb[None, :, :], axis=-1)
    np.fill_diagonal(dists, np.inf)
    assert dists.min() > 1e-3


@pytest.mark.parametrize("dim", [6, 10, 3])
def test_sincos_2d_dim_not_multiple_of_4_rejected(dim):
    with pytest.raises(ValueError, match=str(dim)):
        sincos_2d(dim, 2)


# ---------------------------------------------------------------------------------------------
# resize_pos_embed


def _with_prefix(grid_values: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    return torch.cat([prefix, grid_values], dim=1)


def test_resize_same_grid_returns_unchanged():
    pe = torch.randn(1, 1 + 16, 8)
    out = resize_pos_embed(pe, 4)
    assert out.shape == pe.shape
    assert torch.equal(out, pe)


@pytest.mark.parametrize("new_grid", [8, 6, 2])
def test_resize_keeps_prefix_and_shape(new_grid):
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 16, 12)
    out = resize_pos_embed(pe, new_grid)
    assert out.shape == (1, 1 + new_grid * new_grid, 12)
    assert torch.equal(out[:, :1], pe[:, :1])


def test_resize_without_prefix_and_with_two_prefix_tokens():
    torch.manual_seed(0)
    grid = torch.randn(1, 9, 4)
    out0 = resize_pos_embed(grid, 6, num_prefix_tokens=0)
    assert out0.shape == (1, 36, 4)
    prefix = torch.randn(1, 2, 4)
    out2 = resize_pos_embed(_with_prefix(grid, prefix), 6, num_prefix_tokens=2)
    assert torch.equal(out2[:, :2], prefix)
    torch.testing.assert_close(out2[:, 2:], out0)


def test_resize_constant_grid_stays_constant():
    values = torch.arange(6, dtype=torch.float32)  # one constant per channel
    pe = _with_prefix(values.expand(1, 16, 6), torch.full((1, 1, 6), -5.0))
    out = resize_pos_embed(pe, 7)
    torch.testing.assert_close(out[0, 1:], values.expand(49, 6), rtol=0, atol=1e-5)


def test_resize_keeps_row_major_orientation():
    # Channel 0 depends on the column only, channel 1 on the row only.
    g = 4
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    grid = torch.stack([cols.float(), rows.float()], dim=-1).reshape(1, g * g, 2)
    pe = _with_prefix(grid, torch.zeros(1, 1, 2))
    new = 8
    out = resize_pos_embed(pe, new)[0, 1:].reshape(new, new, 2)
    # Column channel constant down each column, increasing along a row; row channel the converse.
    torch.testing.assert_close(out[..., 0], out[:1, :, 0].expand(new, new), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., 1], out[:, :1, 1].expand(new, new), rtol=0, atol=1e-5)
    assert (out[0, 1:, 0] - out[0, :-1, 0] >= -1e-6).all()
    assert (out[1:, 0, 1] - out[:-1, 0, 1] >= -1e-6).all()
    assert out[0, -1, 0] > out[0, 0, 0] + 2
    assert out[-1, 0, 1] > out[0, 0, 1] + 2


def test_resize_upsampling_keeps_corner_values_approximately():
    # A smooth field sampled on a 4x4 grid, upsampled 2x (bicubic, align_corners=False):
    # the new corner cells sit a quarter of an old cell beyond the old corner centres, so their
    # values stay within a fraction of one old cell's change of the old corners.
    g, new, dim = 4, 8, 3
    rows, cols = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="ij")
    field = torch.stack([0.3 * rows + 0.2 * cols, torch.sin(0.4 * rows) + 0.1 * cols, 0.05 * rows * cols], -1)
    pe = _with_prefix(field.reshape(1, g * g, dim), torch.ones(1, 1, dim))
    out = resize_pos_embed(pe, new)[0, 1:].reshape(new, new, dim)
    for (r0, c0), (r1, c1) in [((0, 0), (0, 0)), ((0, g - 1), (0, new - 1)), ((g - 1, 0), (new - 1, 0))]:
        torch.testing.assert_close(out[r1, c1], field[r0, c0], rtol=0, atol=0.15)
    torch.testing.assert_close(out[-1, -1], field[-1, -1], rtol=0, atol=0.15)


def test_resize_downsample_then_shape_and_prefix():
    pe = torch.from_numpy(sincos_2d(16, 8, cls_token=True))[None]
    out = resize_pos_embed(pe, 4)
    assert out.shape == (1, 17, 16)
    assert torch.equal(out[:, 0], pe[:, 0])


def test_resize_keeps_dtype():
    pe = torch.randn(1, 1 + 16, 4, dtype=torch.float64)
    out = resize_pos_embed(pe, 6)
    assert out.dtype == torch.float64
    assert torch.equal(out[:, 0], pe[:, 0])


def test_resize_non_square_grid_rejected():
    with pytest.raises(ValueError, match="15"):
        resize_pos_embed(torch.zeros(1, 1 + 15, 4), 4)


@pytest.mark.parametrize("tokens", [1, 0])  # with the class token: no grid token, or fewer than none
def test_resize_of_no_grid_tokens_is_rejected(tokens):
    """A checkpoint's count: -1 grid tokens took a complex square root (TypeError: complex doesn't define
    __round__), 0 a 0x0 grid to interpolate from."""
    with pytest.raises(ValueError, match=f"has {tokens - 1} grid tokens, not a square grid"):
        resize_pos_embed(torch.zeros(1, tokens, 4), 4)


# ---------------------------------------------------------------------------------------------
# h x w grids: the embedding, and resizing to and from them
def test_sincos_of_equal_sides_is_the_square_function():
    for dim, side in ((8, 2), (32, 5), (192, 14)):
        assert np.array_equal(sincos_2d(dim, (side, side)), sincos_2d(dim, side))
        assert np.array_equal(
            get_2d_sincos_pos_embed(dim, (side, side), cls_token=True), get_2d_sincos_pos_embed(dim, side, True)
        )


def test_sincos_of_2x3_grid_known_values_and_axes():
    emb = sincos_2d(8, (2, 3))  # 2 rows, 3 columns
    assert emb.shape == (6, 8)
    s, c = math.sin, math.cos
    # Token (row 1, column 2) is number 1 * 3 + 2: the first half encodes the column, the second the row.
    expected = [s(2), s(0.02), c(2), c(0.02), s(1), s(0.01), c(1), c(0.01)]
    np.testing.assert_allclose(emb[1 * 3 + 2], expected, rtol=0, atol=1e-6)
    grid = emb.reshape(2, 3, 8)
    # Column channels: equal down a column, different along a row; row channels the converse.
    assert np.array_equal(grid[0, :, :4], grid[1, :, :4])
    assert not np.allclose(grid[0, 0, :4], grid[0, 1, :4])
    assert np.array_equal(grid[:, 0, 4:], grid[:, 2, 4:])
    assert not np.allclose(grid[0, 0, 4:], grid[1, 0, 4:])
    # A 3 x 2 grid is another grid, not the same tokens reordered into the same array.
    assert sincos_2d(8, (3, 2)).shape == (6, 8) and not np.array_equal(sincos_2d(8, (3, 2)), emb)


def _keys_cubic(t: float, a: float = -0.75) -> list[float]:
    """Weights of the 4 neighbours (at -1, 0, 1, 2) of a point t in [0, 1) past the left one."""

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def hand_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bicubic resampling (align_corners=False, edges repeated), written out."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5  # the output cell's centre in input cells
        left = math.floor(src)
        for k, weight in zip(range(left - 1, left + 3), _keys_cubic(src - left), strict=True):
            m[i, min(max(k, 0), n_in - 1)] += weight
    return m


def test_resize_square_to_non_square_matches_hand_bicubic():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 4 * 4, 6)
    out = resize_pos_embed(pos_embed, (6, 3))
    assert out.shape == (1, 1 + 6 * 3, 6)
    assert torch.equal(out[:, 0], pos_embed[:, 0])  # the class token as it was
    grid = pos_embed[0, 1:].reshape(4, 4, 6).double().numpy()
    rows, cols = hand_bicubic_matrix(4, 6), hand_bicubic_matrix(4, 3)
    expected = np.einsum("ir,rcd,jc->ijd", rows, grid, cols)
    np.testing.assert_allclose(out[0, 1:].reshape(6, 3, 6).numpy(), expected, rtol=0, atol=1e-5)


def test_resize_non_square_grid_needs_its_shape():
    pos_embed = torch.randn(1, 1 + 2 * 4, 8)
    with pytest.raises(ValueError, match="8 grid tokens"):
        resize_pos_embed(pos_embed, (3, 3))  # 8 tokens: 2x4 or 4x2, no square
    assert resize_pos_embed(pos_embed, (2, 4)) is pos_embed  # already fits
    out = resize_pos_embed(pos_embed, (4, 8), old_grid=(2, 4))
    grid = pos_embed[:, 1:].reshape(1, 2, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[:, 1:], expected.reshape(1, 32, 8))
