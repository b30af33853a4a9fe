"""SiTo plans end to end: counts, base tokens, brute-force SimScore, per-row independence, dtypes."""
import pytest
import torch

from token_pruning_cache.pruning_core.geometry import TokenGrid
from token_pruning_cache.pruning_core.selection import pruned_count
from token_pruning_cache.pruning_core.sito import SiToConfig, sito_plan

NO_NOISE = dict(noise_alpha=0.0)


def features(batch, grid, c=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # a shared offset makes cosines mostly positive, as real block inputs are
    return (torch.randn(batch, grid.n, c, generator=g) + 0.5).to(dtype)


def effective_source(plan):
    return plan.kept.gather(1, plan.source)


def brute_sim_score(x_row):
    xd = x_row.double()
    xd = xd / xd.norm(dim=-1, keepdim=True)
    return (xd @ xd.T).sum(-1)


def check_plan(plan, x, grid, cfg):
    b = x.shape[0]
    m = grid.window_count(cfg.sy, cfg.sx)
    k = pruned_count(cfg.prune_ratio, grid.n, m)
    assert plan.n_tokens == grid.n and plan.n_pruned == k
    assert plan.base.shape == (b, m)
    mask = plan.pruned_mask()
    assert mask.sum(1).tolist() == [k] * b
    assert not mask.gather(1, plan.base).any(), "a base token was pruned"
    src = effective_source(plan)
    wy, wx = grid.windows(cfg.sy, cfg.sx)
    for r in range(b):
        ys, xs = plan.base[r] // grid.w, plan.base[r] % grid.w
        assert (ys < wy * cfg.sy).all() and (xs < wx * cfg.sx).all(), "base token in the border leftovers"
        windows = ((ys // cfg.sy) * wx + xs // cfg.sx).tolist()
        assert sorted(windows) == list(range(m)), "not exactly one base token per window"
        is_base = torch.zeros(grid.n, dtype=torch.bool)
        is_base[plan.base[r]] = True
        assert is_base[src[r, mask[r]]].all(), "a stand-in is not a base token"
        # stand-in = most similar candidate base token (brute force, float64): every base token
        # for the global search, those of the 3×3 windows around the token's own for the local one
        xd = x[r].double()
        xd = xd / xd.norm(dim=-1, keepdim=True)
        sims = xd @ xd[plan.base[r]].T  # [N, M], base tokens in window order
        if cfg.search == "local":
            ty = (torch.arange(grid.h)[:, None] // cfg.sy).clamp(max=wy - 1).expand(grid.h, grid.w).reshape(-1)
            tx = (torch.arange(grid.w)[None, :] // cfg.sx).clamp(max=wx - 1).expand(grid.h, grid.w).reshape(-1)
            by, bx = torch.arange(m) // wx, torch.arange(m) % wx
            near = ((ty[:, None] - by[None, :]).abs() <= 1) & ((tx[:, None] - bx[None, :]).abs() <= 1)
            sims = sims.masked_fill(~near, float("-inf"))
        best = sims.max(1).values
        assert ((xd * xd[src[r]]).sum(-1)[mask[r]] >= best[mask[r]] - 1e-4).all()
    return mask


@pytest.mark.parametrize("h,w", [(8, 8), (64, 96), (65, 97), (17, 13), (3, 2), (2, 9)])
@pytest.mark.parametrize("ratio,sy,sx", [(0.5, 2, 2), (0.75, 2, 2), (0.3, 2, 3), (0.8, 3, 3)])
@pytest.mark.parametrize("search", ["local", "global"])
def test_plan_is_valid_on_any_grid(h, w, ratio, sy, sx, search):
    grid = TokenGrid(h, w)
    cfg = SiToConfig(prune_ratio=ratio, sx=sx, sy=sy, search=search)
    assert cfg.problem() is None
    x = features(2, grid)
    plan = sito_plan(x, grid, cfg, torch.Generator().manual_seed(0))
    if grid.window_count(sy, sx) == 0:
        assert plan is None
        return
    check_plan(plan, x, grid, cfg)


@pytest.mark.parametrize("h,w", [(8, 8), (17, 13), (33, 49)])
def test_base_tokens_are_window_argmax_of_brute_force_simscore(h, w):
    grid = TokenGrid(h, w)
    cfg = SiToConfig(prune_ratio=0.5, **NO_NOISE)
    x = features(2, grid, seed=h)
    plan = sito_plan(x, grid, cfg)
    wy, wx = grid.windows(2, 2)
    for r in range(2):
        s = brute_sim_score(x[r]).reshape(h, w)
        windows = s[: wy * 2, : wx * 2].reshape(wy, 2, wx, 2).permute(0, 2, 1, 3).reshape(wy * wx, 4)
        chosen = s.flatten()[plan.base[r]]
        # chosen token scores the window maximum (tolerance: fp32 vs fp64 near-ties)
        torch.testing.assert_close(chosen, windows.max(1).values, atol=1e-3, rtol=0)


def test_nothing_to_prune_returns_none():
    x = features(1, TokenGrid(1, 9))
    assert sito_plan(x, TokenGrid(1, 9), SiToConfig()) is None  # no whole 2×2 window
    assert sito_plan(features(1, TokenGrid(1, 1)), TokenGrid(1, 1), SiToConfig()) is None
    assert sito_plan(features(1, TokenGrid(8, 8)), TokenGrid(8, 8), SiToConfig(prune_ratio=0.0)) is None


def test_ratio_above_cap_is_reported_and_plan_stays_valid():
    cfg = SiToConfig(prune_ratio=0.76)
    assert "0.75" in cfg.problem()
    assert SiToConfig(prune_ratio=0.8, sx=3, sy=3).problem() is None
    assert "single token" in SiToConfig(prune_ratio=0.5, sx=1, sy=1).problem()
    # sito_plan itself caps K at the non-base tokens and never prunes a base token
    grid = TokenGrid(8, 8)
    x = features(1, grid)
    plan = sito_plan(x, grid, cfg)
    assert plan.n_pruned == 64 - 16
    assert not plan.pruned_mask().gather(1, plan.base).any()


def test_rows_are_independent_without_noise():
    grid = TokenGrid(17, 13)
    cfg = SiToConfig(prune_ratio=0.6, **NO_NOISE)
    x = features(4, grid, seed=7)
    together = effective_source(sito_plan(x, grid, cfg))
    for r in range(4):
        alone = effective_source(sito_plan(x[r:r + 1], grid, cfg))
        assert torch.equal(together[r:r + 1], alone)


def test_first_row_matches_alone_with_same_seed():
    grid = TokenGrid(16, 16)
    cfg = SiToConfig(prune_ratio=0.5, noise_alpha=50.0)  # noise large enough to matter
    x = features(3, grid, seed=8)
    together = sito_plan(x, grid, cfg, torch.Generator().manual_seed(11))
    alone = sito_plan(x[:1], grid, cfg, torch.Generator().manual_seed(11))
    assert torch.equal(effective_source(together)[:1], effective_source(alone))
    assert torch.equal(together.base[:1], alone.base)


def test_seeded_generator_is_deterministic_and_seed_matters():
    grid = TokenGrid(16, 16)
    cfg = SiToConfig(prune_ratio=0.5, noise_alpha=50.0)
    x = features(2, grid, seed=9)

    def plan(seed):
        return sito_plan(x, grid, cfg, torch.Generator().manual_seed(seed))

    a, b, c = plan(1), plan(1), plan(2)
    assert torch.equal(a.base, b.base) and torch.equal(a.kept, b.kept) and torch.equal(a.source, b.source)
    assert not torch.equal(a.base, c.base)


def test_sim_beta_scales_without_changing_noise_free_plan():
    grid = TokenGrid(12, 10)
    x = features(2, grid, seed=10)
    a = sito_plan(x, grid, SiToConfig(prune_ratio=0.5, sim_beta=1.0, **NO_NOISE))
    b = sito_plan(x, grid, SiToConfig(prune_ratio=0.5, sim_beta=3.0, **NO_NOISE))
    assert torch.equal(a.base, b.base)
    assert torch.equal(effective_source(a), effective_source(b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    grid = TokenGrid(33, 49)
    cfg = SiToConfig(prune_ratio=0.5)
    x = features(2, grid, dtype=dtype)
    plan = sito_plan(x, grid, cfg, torch.Generator().manual_seed(0))
    mask = check_plan(plan, x, grid, cfg)
    y = plan.prune(x)
    assert y.dtype == dtype
    out = plan.recover(y * 2)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out[~mask], x[~mask] * 2)
    # noise-free base choice from half inputs agrees with the fp32 choice on the same values
    # (scores are fp32 either way), up to rare near-ties
    cfg0 = SiToConfig(prune_ratio=0.5, **NO_NOISE)
    half = sito_plan(x, grid, cfg0)
    full = sito_plan(x.float(), grid, cfg0)
    assert (half.base == full.base).float().mean() > 0.99


def test_prune_identity_recover_reproduces_kept_tokens():
    grid = TokenGrid(64, 96)
    x = features(2, grid, c=32)
    plan = sito_plan(x, grid, SiToConfig(prune_ratio=0.7), torch.Generator().manual_seed(0))
    out = plan.recover(plan.prune(x))
    mask = plan.pruned_mask()
    assert torch.equal(out[~mask], x[~mask])
    src = effective_source(plan)
    for r in range(2):
        assert torch.equal(out[r, mask[r]], x[r, src[r, mask[r]]])


@pytest.mark.parametrize("h,w", [(8, 8), (17, 13), (65, 97)])
def test_local_search_with_a_wide_radius_is_the_global_search(h, w):
    from token_pruning_cache.pruning_core.selection import (normalized, plan_by_local_similarity,
                                                            plan_by_similarity_to_base, select_base_tokens,
                                                            similarity_score)
    grid = TokenGrid(h, w)
    x = features(2, grid, seed=h + w)
    xn = normalized(x)
    base = select_base_tokens(similarity_score(xn), grid, 2, 2)
    k = pruned_count(0.5, grid.n, grid.window_count(2, 2))
    wide = plan_by_local_similarity(xn, base, grid, 2, 2, k, radius=max(h, w))
    full = plan_by_similarity_to_base(xn, base, k)
    assert torch.equal(wide.pruned_mask(), full.pruned_mask())
    assert torch.equal(wide.recover(wide.prune(x)), full.recover(full.prune(x)))


@pytest.mark.parametrize("search", ["local", "global"])
@pytest.mark.parametrize("h,w,sy,sx", [(17, 13, 2, 2), (12, 9, 3, 3)])
def test_kept_recovery_keeps_the_pruned_set_and_never_copies_a_less_similar_token(h, w, sy, sx, search):
    grid = TokenGrid(h, w)
    x = features(2, grid)
    base_cfg = SiToConfig(prune_ratio=0.5, sx=sx, sy=sy, search=search)
    kept_cfg = SiToConfig(prune_ratio=0.5, sx=sx, sy=sy, search=search, recovery="kept")
    assert kept_cfg.problem() is None
    a = sito_plan(x, grid, base_cfg, torch.Generator().manual_seed(0))
    b = sito_plan(x, grid, kept_cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a.kept, b.kept) and torch.equal(a.base, b.base)
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    mask = a.pruned_mask()
    sim_a = (xn * xn.gather(1, effective_source(a).unsqueeze(-1).expand_as(xn))).sum(-1)
    sim_b = (xn * xn.gather(1, effective_source(b).unsqueeze(-1).expand_as(xn))).sum(-1)
    assert (sim_b[mask] >= sim_a[mask] - 1e-5).all()
    assert (sim_b[mask] > sim_a[mask] + 1e-6).any(), "kept recovery found no better stand-in at all"
    assert not mask.gather(1, effective_source(b)).any()


def test_unknown_recovery_is_a_problem():
    assert "recovery" in SiToConfig(recovery="nearest").problem()


@pytest.mark.parametrize("h,w", [(17, 13), (8, 8)])
def test_merge_recovery_keeps_sitos_selection_and_averages_the_groups(h, w):
    grid = TokenGrid(h, w)
    x = features(2, grid)
    a = sito_plan(x, grid, SiToConfig(prune_ratio=0.5), torch.Generator().manual_seed(0))
    b = sito_plan(x, grid, SiToConfig(prune_ratio=0.5, recovery="merge"), torch.Generator().manual_seed(0))
    assert not a.merge and b.merge
    assert torch.equal(a.kept, b.kept) and torch.equal(a.source, b.source) and torch.equal(a.base, b.base)
    # each kept token enters as the mean of itself and the pruned tokens that copy it
    sums = torch.stack([torch.zeros(b.n_kept, x.shape[-1]).index_add_(0, b.source[r], x[r]) for r in range(2)])
    torch.testing.assert_close(b.prune(x), sums / b.group_sizes().unsqueeze(-1))
    assert b.group_sizes().max() > 1, "nothing was merged"


def test_sim_beta_zero_takes_base_tokens_from_the_noise_alone():
    """sim_beta 0: the base token of each window is the argmax of the noise (random per window,
    ToMe's anchors), whatever the features; the pruned set is still SiTo's similarity matching."""
    from token_pruning_cache.pruning_core.selection import select_base_tokens
    grid = TokenGrid(12, 10)
    cfg = SiToConfig(prune_ratio=0.5, sim_beta=0.0, noise_alpha=0.1)
    a = sito_plan(features(2, grid, seed=1), grid, cfg, torch.Generator().manual_seed(4))
    b = sito_plan(features(2, grid, seed=2), grid, cfg, torch.Generator().manual_seed(4))
    noise = torch.randn((2, grid.n), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.base, select_base_tokens(noise, grid, 2, 2)) and torch.equal(a.base, b.base)
    assert not torch.equal(a.kept, b.kept)  # the features still decide what is pruned
