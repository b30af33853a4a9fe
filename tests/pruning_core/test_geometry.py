"""Token geometry on odd, non-square, thin and tiny grids."""
import pytest
import torch
import torch.nn.functional as F

from token_pruning_cache.pruning_core.geometry import (TokenGrid, downsample_factor, grid_from_shapes,
                                                       resize_token_map, window_base_offsets,
                                                       window_member_offsets)

GRIDS = [(64, 64), (64, 96), (65, 97), (17, 13), (1, 9), (9, 1), (1, 1), (3, 3), (2, 5)]
WINDOWS = [(2, 2), (2, 3), (3, 2), (3, 3), (4, 4)]


def conv_levels(h, w, n_levels=4):
    """Grid sizes after ComfyUI-style downsampling (3×3 conv, stride 2, padding 1)."""
    x = torch.zeros(1, 1, h, w)
    k = torch.zeros(1, 1, 3, 3)
    sizes = [(h, w)]
    for _ in range(n_levels - 1):
        x = F.conv2d(x, k, stride=2, padding=1)
        sizes.append(tuple(x.shape[-2:]))
    return sizes


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("sy,sx", WINDOWS)
def test_windows_count_whole_windows_only(h, w, sy, sx):
    g = TokenGrid(h, w)
    assert g.n == h * w
    assert g.windows(sy, sx) == (h // sy, w // sx)
    assert g.window_count(sy, sx) == (h // sy) * (w // sx)


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("sy,sx", WINDOWS)
def test_window_offsets_tile_the_cropped_grid_exactly(h, w, sy, sx):
    g = TokenGrid(h, w)
    base = window_base_offsets(g, sy, sx)
    members = window_member_offsets(g, sy, sx)
    wy, wx = g.windows(sy, sx)
    assert base.shape == (wy * wx,)
    assert members.shape == (sy * sx,)
    # brute force: window (r, c) covers rows r*sy..r*sy+sy-1, cols c*sx..c*sx+sx-1, row-major order
    expected = [[(r * sy + dy) * w + (c * sx + dx) for dy in range(sy) for dx in range(sx)]
                for r in range(wy) for c in range(wx)]
    got = (base[:, None] + members[None, :]).tolist()
    assert got == expected
    covered = {i for window in got for i in window}
    assert len(covered) == wy * wx * sy * sx  # windows do not overlap
    border = {y * w + x for y in range(h) for x in range(w) if y >= wy * sy or x >= wx * sx}
    assert covered.isdisjoint(border)
    assert len(covered) + len(border) == h * w


@pytest.mark.parametrize("h,w", [(64, 64), (64, 96), (65, 97), (17, 13), (1, 64), (3, 2), (128, 8)])
def test_grid_from_latent_matches_real_conv_downsampling(h, w):
    for level, (gh, gw) in enumerate(conv_levels(h, w)):
        grid = grid_from_shapes(gh * gw, original_shape=[2, 4, h, w])
        # a tiny latent can have the same token count at two levels (3×2 → 2×1 → 1×1 → 1×1):
        # the token count must match always, the exact shape wherever the levels differ
        assert grid.n == gh * gw
        if len({a * b for a, b in conv_levels(h, w)}) == len(conv_levels(h, w)):
            assert (grid.h, grid.w) == (gh, gw), f"level {level}"


def test_grid_from_shapes_odd_chain():
    assert grid_from_shapes(33 * 49, original_shape=[1, 4, 65, 97]) == TokenGrid(33, 49)
    assert grid_from_shapes(17 * 25, original_shape=[1, 4, 65, 97]) == TokenGrid(17, 25)
    assert grid_from_shapes(9 * 13, original_shape=[1, 4, 65, 97]) == TokenGrid(9, 13)
    # non-square, even: 512×768 image → 64×96 latent
    assert grid_from_shapes(32 * 48, original_shape=[1, 4, 64, 96]) == TokenGrid(32, 48)


def test_grid_from_shapes_prefers_activations():
    # 6 tokens could be 2×3 or 3×2; the activation shape decides
    assert grid_from_shapes(6, activations_shape=[1, 320, 3, 2], original_shape=[1, 4, 6, 4]) == TokenGrid(3, 2)
    # activation shape that does not match N is ignored, latent fallback used
    assert grid_from_shapes(33 * 49, activations_shape=[1, 320, 10, 10],
                            original_shape=[1, 4, 65, 97]) == TokenGrid(33, 49)


def test_grid_from_shapes_unplaceable_raises():
    with pytest.raises(ValueError, match="cannot place 1000 tokens"):
        grid_from_shapes(1000, original_shape=[1, 4, 64, 64])
    with pytest.raises(ValueError):
        grid_from_shapes(10)


@pytest.mark.parametrize("h,w", [(64, 64), (65, 97), (17, 13), (64, 96), (1, 64), (2, 64), (64, 1)])
def test_downsample_factor_per_level(h, w):
    for level, (gh, gw) in enumerate(conv_levels(h, w)):
        assert downsample_factor(TokenGrid(gh, gw), [1, 4, h, w]) == 1 << level, (gh, gw)


def test_resize_identity_returns_input():
    v = torch.rand(2, 6)
    assert resize_token_map(v, TokenGrid(2, 3), TokenGrid(2, 3)) is v


def test_resize_down_is_area_average():
    v = torch.rand(3, 64 * 96)
    out = resize_token_map(v, TokenGrid(64, 96), TokenGrid(32, 48))
    expected = v.reshape(3, 32, 2, 48, 2).mean(dim=(2, 4)).reshape(3, -1)
    assert out.shape == (3, 32 * 48)
    torch.testing.assert_close(out, expected)


def test_resize_up_is_nearest():
    v = torch.rand(2, 8 * 6)
    out = resize_token_map(v, TokenGrid(8, 6), TokenGrid(16, 12))
    expected = v.reshape(2, 8, 6).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, -1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("src,dst", [((65, 97), (33, 49)), ((33, 49), (65, 97)), ((17, 13), (9, 7)),
                                     ((1, 9), (1, 5)), ((64, 64), (65, 97)), ((64, 8), (32, 16))])
def test_resize_odd_grids_keep_constants_and_shape(src, dst):
    v = torch.full((2, src[0] * src[1]), 0.25, dtype=torch.float16)
    out = resize_token_map(v, TokenGrid(*src), TokenGrid(*dst))
    assert out.shape == (2, dst[0] * dst[1])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
