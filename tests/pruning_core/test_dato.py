"""DaTo's defining step (pruning_core/dato.py): base tokens are the tokens whose prediction
changed most between the two previous evaluations, ``score = γ·D + α·ε``.

Every expectation is computed independently of the code under test: D by a loop over the
channels, the window argmax by a loop over the windows, the noise and the sign flip by
drawing from a generator seeded like the one handed to ``dato_plan``.
"""
from __future__ import annotations

import pytest
import torch

from token_pruning_cache.pruning_core.dato import DaToConfig, align_rows, dato_plan, dynamics_map
from token_pruning_cache.pruning_core.geometry import TokenGrid
from token_pruning_cache.pruning_core.selection import random_base_tokens


def window_argmax(score: torch.Tensor, grid: TokenGrid, sy: int = 2, sx: int = 2) -> torch.Tensor:
    """Brute force: per row, per whole window (row-major), the flat index of the highest score."""
    out = []
    for row in score:
        picks = []
        for wy in range(grid.h // sy):
            for wx in range(grid.w // sx):
                best, where = None, None
                for dy in range(sy):
                    for dx in range(sx):
                        i = (wy * sy + dy) * grid.w + wx * sx + dx
                        if best is None or row[i] > best:
                            best, where = row[i], i
                picks.append(where)
        out.append(picks)
    return torch.tensor(out, dtype=torch.long)


def tokens(b, grid, c=8, seed=0):
    return torch.randn((b, grid.n, c), generator=torch.Generator().manual_seed(seed))


def distinct_map(b, grid, seed=1):
    """A dynamics map without ties (a random permutation of 0..N-1 per row)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(grid.n, generator=g).float() for _ in range(b)])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# D
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dynamics_map_is_the_channel_mean_of_the_absolute_change(dtype):
    g = gen(3)
    eps = torch.randn((2, 4, 5, 7), generator=g).to(dtype)
    prev = torch.randn((2, 4, 5, 7), generator=g).to(dtype)
    d = dynamics_map(eps, prev)
    assert d.shape == (2, 35) and d.dtype == torch.float32
    want = torch.zeros(2, 5, 7)
    for c in range(4):
        want += (eps[:, c].float() - prev[:, c].float()).abs()
    want /= 4
    torch.testing.assert_close(d, want.reshape(2, 35))
    assert torch.equal(dynamics_map(eps, eps), torch.zeros(2, 35))


# --------------------------------------------------------------------------------------
# base tokens from D
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (6, 10)])
def test_without_noise_the_base_token_of_each_window_is_the_argmax_of_d(h, w):
    grid = TokenGrid(h, w)
    d = distinct_map(2, grid)
    cfg = DaToConfig(prune_ratio=0.4, noise_alpha=0.0)
    plan = dato_plan(tokens(2, grid), grid, cfg, d, grid, gen())
    assert torch.equal(plan.base, window_argmax(d, grid))
    # and not the argmin: the most dynamic token is the anchor (sign_flip off)
    assert not torch.equal(plan.base, window_argmax(-d, grid))
    # base tokens are never pruned
    assert not plan.pruned_mask().gather(1, plan.base).any()


def test_base_tokens_follow_d_not_the_features():
    """The same tokens with two different maps give different base tokens; the same map with
    different tokens gives the same base tokens."""
    grid = TokenGrid(8, 8)
    cfg = DaToConfig(prune_ratio=0.4, noise_alpha=0.0)
    d1, d2 = distinct_map(1, grid, seed=1), distinct_map(1, grid, seed=2)
    x1, x2 = tokens(1, grid, seed=0), tokens(1, grid, seed=5)
    a = dato_plan(x1, grid, cfg, d1, grid, gen()).base
    b = dato_plan(x1, grid, cfg, d2, grid, gen()).base
    c = dato_plan(x2, grid, cfg, d1, grid, gen()).base
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_noise_alpha_adds_seeded_gaussian_noise_to_the_score():
    grid = TokenGrid(8, 8)
    d = distinct_map(2, grid) / grid.n  # D in [0, 1): noise of weight 0.5 reorders windows
    for alpha in (0.5, 3.0):
        cfg = DaToConfig(prune_ratio=0.4, noise_alpha=alpha)
        plan = dato_plan(tokens(2, grid), grid, cfg, d, grid, gen(11))
        noise = torch.randn(d.shape, generator=gen(11))
        assert torch.equal(plan.base, window_argmax(d + alpha * noise, grid)), alpha
        assert not torch.equal(plan.base, window_argmax(d, grid)), f"alpha {alpha} changed nothing"
        # same seed, same plan; another seed, another plan
        assert torch.equal(dato_plan(tokens(2, grid), grid, cfg, d, grid, gen(11)).base, plan.base)
        assert not torch.equal(dato_plan(tokens(2, grid), grid, cfg, d, grid, gen(12)).base, plan.base)


def test_dynamics_weight_scales_d_against_the_noise():
    grid = TokenGrid(8, 8)
    d = distinct_map(1, grid) / grid.n
    x = tokens(1, grid)

    def base(gamma, alpha, seed=4):
        cfg = DaToConfig(prune_ratio=0.4, dynamics_weight=gamma, noise_alpha=alpha)
        return dato_plan(x, grid, cfg, d, grid, gen(seed)).base

    noise = torch.randn(d.shape, generator=gen(4))
    # gamma 0: only the noise decides
    assert torch.equal(base(0.0, 0.1), window_argmax(noise, grid))
    # gamma 2.5: gamma * D + alpha * noise, exactly
    assert torch.equal(base(2.5, 0.1), window_argmax(2.5 * d + 0.1 * noise, grid))
    # only the ratio gamma / alpha matters
    assert torch.equal(base(2.0, 0.2), base(1.0, 0.1))
    # a large weight drowns the noise: the argmax of D again
    assert torch.equal(base(1e6, 0.1), window_argmax(d, grid))
    assert not torch.equal(base(1.0, 0.1), base(0.0, 0.1))


def test_sign_flip_uses_the_seeded_generator_and_picks_the_least_dynamic_token():
    grid = TokenGrid(8, 8)
    d = distinct_map(1, grid)
    x = tokens(1, grid)
    cfg = DaToConfig(prune_ratio=0.4, noise_alpha=0.0, sign_flip=True)
    most, least = window_argmax(d, grid), window_argmax(-d, grid)
    for seed in range(12):
        flipped = torch.rand((), generator=gen(seed)).item() < 0.5  # the draw dato_plan makes first
        got = dato_plan(x, grid, cfg, d, grid, gen(seed)).base
        assert torch.equal(got, least if flipped else most), (seed, flipped)
    # one generator over many block calls: both outcomes, in the order the generator says
    g, ref = gen(0), gen(0)
    outcomes = []
    for _ in range(16):
        got = dato_plan(x, grid, cfg, d, grid, g).base
        flipped = torch.rand((), generator=ref).item() < 0.5
        assert torch.equal(got, least if flipped else most)
        outcomes.append(flipped)
    assert any(outcomes) and not all(outcomes)
    # off: never flipped
    off = DaToConfig(prune_ratio=0.4, noise_alpha=0.0, sign_flip=False)
    g = gen(0)
    assert all(torch.equal(dato_plan(x, grid, off, d, grid, g).base, most) for _ in range(8))


def test_dynamics_of_another_grid_are_resized_to_the_block_grid():
    latent, level = TokenGrid(8, 8), TokenGrid(4, 4)
    d = distinct_map(1, latent)
    cfg = DaToConfig(prune_ratio=0.4, noise_alpha=0.0)
    got = dato_plan(tokens(1, level), level, cfg, d, latent, gen()).base
    pooled = d.reshape(1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(1, 16)  # area average of 2x2 latent cells
    assert torch.equal(got, window_argmax(pooled, level))


@pytest.mark.parametrize("why", ["no map yet", "batch mismatch"])
def test_without_a_usable_map_the_base_tokens_are_random_per_window(why):
    grid = TokenGrid(8, 8)
    d = None if why == "no map yet" else distinct_map(3, grid)
    cfg = DaToConfig(prune_ratio=0.4, noise_alpha=0.0)
    got = dato_plan(tokens(2, grid), grid, cfg, d, None if d is None else grid, gen(9)).base
    assert torch.equal(got, random_base_tokens(2, grid, 2, 2, gen(9), torch.device("cpu")))


# --------------------------------------------------------------------------------------
# align_cfg
# --------------------------------------------------------------------------------------

def test_align_rows_copies_the_uncond_rows_to_the_cond_rows():
    base = torch.arange(4 * 3).reshape(4, 3)  # rows 0,1 one chunk, rows 2,3 the other
    cond_first = align_rows(base, [0, 1])
    assert torch.equal(cond_first[:2], base[2:]) and torch.equal(cond_first[2:], base[2:])
    uncond_first = align_rows(base, [1, 0])
    assert torch.equal(uncond_first[2:], base[:2]) and torch.equal(uncond_first[:2], base[:2])
    assert torch.equal(base, torch.arange(12).reshape(4, 3)), "the input must not be modified"
    for unchanged in ([0], [1], None, [], [0, 0], [0, 1, 1]):
        assert torch.equal(align_rows(base, unchanged), base), unchanged
    odd = torch.arange(9).reshape(3, 3)
    assert torch.equal(align_rows(odd, [0, 1]), odd)


def test_align_cfg_gives_cond_rows_the_uncond_base_tokens():
    grid = TokenGrid(8, 8)
    d = distinct_map(4, grid)  # four rows: [cond img0, cond img1, uncond img0, uncond img1]
    x = tokens(4, grid)
    plain = dato_plan(x, grid, DaToConfig(prune_ratio=0.4, noise_alpha=0.0), d, grid, gen(), [0, 1])
    aligned = dato_plan(x, grid, DaToConfig(prune_ratio=0.4, noise_alpha=0.0, align_cfg=True), d, grid, gen(),
                        [0, 1])
    want = window_argmax(d, grid)
    assert torch.equal(plain.base, want)
    assert torch.equal(aligned.base[:2], want[2:]) and torch.equal(aligned.base[2:], want[2:])
    assert not torch.equal(aligned.base, plain.base)
    # a cond-only call cannot be aligned
    cond_only = dato_plan(x, grid, DaToConfig(prune_ratio=0.4, noise_alpha=0.0, align_cfg=True), d, grid, gen(),
                          [0])
    assert torch.equal(cond_only.base, want)
