"""Scoring and selection: base tokens per window, counts, ratio validation, brute-force checks."""
from fractions import Fraction

import pytest
import torch

from token_pruning_cache.pruning_core.geometry import TokenGrid
from token_pruning_cache.pruning_core.selection import (max_prune_ratio, normalized, plan_by_similarity_to_base,
                                                        plan_random, pruned_count, random_base_tokens,
                                                        plan_by_local_similarity, select_base_tokens,
                                                        similarity_score, stand_ins_from_kept,
                                                        validate_prune_ratio)

GRIDS = [(8, 8), (64, 96), (65, 97), (17, 13), (1, 9), (3, 3), (5, 2)]
WINDOWS = [(2, 2), (2, 3), (3, 2), (3, 3)]


def effective_source(plan):
    """[B, N] flat index of the token whose layer output each token receives."""
    return plan.kept.gather(1, plan.source)


def window_of_token(grid, sy, sx):
    """Per flat index: (window row, window col), or None for border leftovers."""
    wy, wx = grid.windows(sy, sx)
    out = []
    for y in range(grid.h):
        for x in range(grid.w):
            r, c = y // sy, x // sx
            out.append((r, c) if r < wy and c < wx else None)
    return out


def assert_one_base_per_whole_window(base_row, grid, sy, sx):
    where = window_of_token(grid, sy, sx)
    wins = [where[i] for i in base_row.tolist()]
    assert None not in wins, "a base token sits in the border leftovers"
    wy, wx = grid.windows(sy, sx)
    assert sorted(wins) == [(r, c) for r in range(wy) for c in range(wx)]


# ---- ratio validation ------------------------------------------------------------------

def test_ratio_above_cap_names_the_cap():
    msg = validate_prune_ratio(0.76, 2, 2)
    assert msg is not None and "0.75" in msg and "0.76" in msg


def test_ratio_at_cap_is_fine():
    assert validate_prune_ratio(0.75, 2, 2) is None
    assert validate_prune_ratio(0.8, 3, 3) is None
    assert validate_prune_ratio(0.0, 2, 2) is None


def test_ratio_above_3x3_cap():
    msg = validate_prune_ratio(0.9, 3, 3)
    assert msg is not None and "0.888889" in msg


def test_single_token_window_rejected():
    msg = validate_prune_ratio(0.5, 1, 1)
    assert msg is not None and "window" in msg and "single token" in msg
    assert validate_prune_ratio(0.0, 1, 1) is None  # nothing to prune, nothing wrong


@pytest.mark.parametrize("ratio,sx,sy", [(-0.1, 2, 2), (1.5, 2, 2), (float("nan"), 2, 2), (0.5, 0, 2), (0.5, 2, -1)])
def test_bad_ratio_or_window_rejected(ratio, sx, sy):
    assert validate_prune_ratio(ratio, sx, sy)


def test_max_prune_ratio():
    assert max_prune_ratio(2, 2) == 0.75
    assert max_prune_ratio(3, 2) == pytest.approx(5 / 6)


# ---- counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 9, 100, 117, 4096, 65 * 97, 33 * 49])
def test_pruned_count_is_floor_r_n(n):
    for percent in range(0, 101):
        exact = (Fraction(percent, 100) * n).numerator // (Fraction(percent, 100) * n).denominator
        assert pruned_count(percent / 100, n, 0) == exact, percent


def test_pruned_count_capped_at_non_base_tokens():
    g = TokenGrid(65, 97)
    m = g.window_count(2, 2)
    assert pruned_count(0.75, g.n, m) == 4728  # border leftovers leave room: 4728 < 6305 − 1536
    assert pruned_count(0.9, g.n, m) == g.n - m  # ⌊0.9·6305⌋ = 5674 > 4769: capped
    assert pruned_count(0.5, g.n, m) == g.n // 2
    assert pruned_count(0.9, 10, 10) == 0


# ---- similarity score --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_similarity_score_equals_brute_force_row_sums(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 200, 16, generator=g) + 0.3).to(dtype)
    xn = normalized(x)
    assert xn.dtype == torch.float32
    score = similarity_score(xn)
    assert score.dtype == torch.float32 and score.shape == (3, 200)
    xd = x.double()
    xd = xd / xd.norm(dim=-1, keepdim=True)
    brute = (xd @ xd.transpose(1, 2)).sum(-1)
    torch.testing.assert_close(score.double(), brute, atol=2e-3, rtol=1e-4)


# ---- base tokens -------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("sy,sx", WINDOWS)
def test_select_base_tokens_is_window_argmax(h, w, sy, sx):
    grid = TokenGrid(h, w)
    score = torch.randn(2, grid.n, generator=torch.Generator().manual_seed(h * 100 + w))
    base = select_base_tokens(score, grid, sy, sx)
    assert base.shape == (2, grid.window_count(sy, sx))
    wy, wx = grid.windows(sy, sx)
    for b in range(2):
        assert_one_base_per_whole_window(base[b], grid, sy, sx)
        s = score[b].reshape(h, w)
        expected = []
        for r in range(wy):
            for c in range(wx):
                block = s[r * sy:(r + 1) * sy, c * sx:(c + 1) * sx]
                dy, dx = divmod(int(block.argmax()), sx)
                expected.append((r * sy + dy) * w + c * sx + dx)
        assert base[b].tolist() == expected


def test_border_tokens_never_base_even_when_they_score_highest():
    grid = TokenGrid(5, 7)  # 2×2 windows: row 4 and column 6 are leftovers
    score = torch.zeros(1, grid.n)
    score[0, 4 * 7:] = 100.0
    score[0, 6::7] = 100.0
    base = select_base_tokens(score, grid, 2, 2)
    assert_one_base_per_whole_window(base[0], grid, 2, 2)


@pytest.mark.parametrize("h,w", GRIDS)
def test_random_base_tokens_one_per_window_and_seeded(h, w):
    grid = TokenGrid(h, w)
    a = random_base_tokens(3, grid, 2, 2, torch.Generator().manual_seed(5), "cpu")
    b = random_base_tokens(3, grid, 2, 2, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(a, b)
    for row in a:
        assert_one_base_per_whole_window(row, grid, 2, 2)


# ---- pruning by similarity to base tokens ------------------------------------------------

@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.5), (17, 13, 0.7), (65, 97, 0.4), (64, 96, 0.75), (3, 5, 0.3)])
def test_plan_by_similarity_to_base_brute_force(h, w, ratio):
    grid = TokenGrid(h, w)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, grid.n, 8, generator=gen)
    xn = normalized(x)
    base = select_base_tokens(torch.randn(2, grid.n, generator=gen), grid, 2, 2)
    m = base.shape[1]
    k = pruned_count(ratio, grid.n, m)
    plan = plan_by_similarity_to_base(xn, base, k)
    assert plan.n_pruned == k and plan.n_kept == grid.n - k
    assert torch.equal(plan.base, base)
    mask = plan.pruned_mask()
    src = effective_source(plan)
    for b in range(2):
        is_base = torch.zeros(grid.n, dtype=torch.bool)
        is_base[base[b]] = True
        pruned = mask[b]
        assert int(pruned.sum()) == k
        assert not (pruned & is_base).any(), "a base token was pruned"
        # brute force N×M cosine similarity, in float64
        xd = x[b].double()
        xd = xd / xd.norm(dim=-1, keepdim=True)
        best = (xd @ xd[base[b]].T).max(dim=1).values  # [N] similarity to the nearest base token
        # every pruned token's stand-in is a base token, and the most similar one (up to float ties)
        assert is_base[src[b, pruned]].all()
        sim_to_stand_in = (xd * xd[src[b]]).sum(-1)
        assert (sim_to_stand_in[pruned] >= best[pruned] - 1e-5).all()
        # the pruned tokens are the non-base tokens closest to a base token
        kept_non_base = ~pruned & ~is_base
        if pruned.any() and kept_non_base.any():
            assert best[pruned].min() >= best[kept_non_base].max() - 1e-5
        # kept tokens are their own source
        assert torch.equal(src[b, ~pruned], (~pruned).nonzero().squeeze(-1))


@pytest.mark.parametrize("search", ["global", "local"])
@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.5), (17, 13, 0.7), (9, 6, 0.75)])
def test_stand_ins_from_kept_brute_force(h, w, ratio, search):
    """Kept-token recovery: same pruned set, each pruned token copies its most similar kept token
    (all kept tokens for "global"; the kept members of the 3x3 surrounding windows for "local")."""
    grid = TokenGrid(h, w)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, grid.n, 8, generator=gen)
    xn = normalized(x)
    base = select_base_tokens(torch.randn(2, grid.n, generator=gen), grid, 2, 2)
    k = pruned_count(ratio, grid.n, base.shape[1])
    plan = (plan_by_similarity_to_base(xn, base, k) if search == "global"
            else plan_by_local_similarity(xn, base, grid, 2, 2, k))
    new = stand_ins_from_kept(xn, plan, grid, 2, 2, search)
    assert torch.equal(new.kept, plan.kept) and torch.equal(new.base, plan.base)
    old_src, src = effective_source(plan), effective_source(new)
    wy, wx = grid.windows(2, 2)
    window = lambda t: (min(t // w // 2, wy - 1), min(t % w // 2, wx - 1))
    for b in range(2):
        pruned = plan.pruned_mask()[b]
        assert not pruned[src[b]].any(), "a stand-in must be a kept token"
        assert torch.equal(src[b, ~pruned], (~pruned).nonzero().squeeze(-1))
        xd = x[b].double()
        xd = xd / xd.norm(dim=-1, keepdim=True)
        sim = xd @ xd.T
        for t in pruned.nonzero().squeeze(-1).tolist():
            ty, tx = t // w, t % w
            if search == "global":
                allowed = ~pruned
            elif ty >= wy * 2 or tx >= wx * 2:  # border token: keeps its base stand-in
                assert src[b, t] == old_src[b, t]
                continue
            else:
                allowed = torch.zeros(grid.n, dtype=torch.bool)
                for u in range(grid.n):
                    uy, ux = u // w, u % w
                    in_window = uy < wy * 2 and ux < wx * 2
                    (wy_t, wx_t), (wy_u, wx_u) = window(t), (uy // 2, ux // 2)
                    allowed[u] = in_window and abs(wy_t - wy_u) <= 1 and abs(wx_t - wx_u) <= 1 and not pruned[u]
            assert allowed[src[b, t]]
            assert sim[t, src[b, t]] >= sim[t][allowed].max() - 1e-5
            assert sim[t, src[b, t]] >= sim[t, old_src[b, t]] - 1e-5  # never worse than the base stand-in


# ---- random plan -------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,sy,sx", [(8, 8, 2, 2), (17, 13, 2, 2), (65, 97, 3, 2), (5, 2, 2, 2)])
def test_plan_random_counts_and_stand_ins(h, w, sy, sx):
    grid = TokenGrid(h, w)
    m = grid.window_count(sy, sx)
    k = pruned_count(0.5, grid.n, m)
    plan = plan_random(3, grid, k, sy, sx, torch.Generator().manual_seed(0), "cpu")
    assert plan.n_pruned == k
    mask = plan.pruned_mask()
    assert mask.sum(dim=1).tolist() == [k] * 3
    src = effective_source(plan)
    wy, wx = grid.windows(sy, sx)
    for b in range(3):
        assert_one_base_per_whole_window(plan.base[b], grid, sy, sx)
        assert not mask[b, plan.base[b]].any()
        base_by_window = {(i // grid.w // sy, i % grid.w // sx): i for i in plan.base[b].tolist()}
        for i in mask[b].nonzero().squeeze(-1).tolist():
            y, x = divmod(i, grid.w)
            win = (min(y // sy, wy - 1), min(x // sx, wx - 1))  # border tokens: nearest window
            assert src[b, i].item() == base_by_window[win]


def test_plan_random_seeded_and_rows_differ():
    grid = TokenGrid(16, 16)
    a = plan_random(2, grid, 100, 2, 2, torch.Generator().manual_seed(3), "cpu")
    b = plan_random(2, grid, 100, 2, 2, torch.Generator().manual_seed(3), "cpu")
    c = plan_random(2, grid, 100, 2, 2, torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(a.kept, b.kept) and torch.equal(a.source, b.source)
    assert not torch.equal(a.pruned_mask(), c.pruned_mask())
    assert not torch.equal(a.pruned_mask()[0], a.pruned_mask()[1])


def test_plan_random_never_prunes_base_when_asked_too_much():
    grid = TokenGrid(6, 6)
    plan = plan_random(2, grid, grid.n, 2, 2, torch.Generator().manual_seed(0), "cpu")
    assert plan.n_pruned == grid.n - grid.window_count(2, 2)
    mask = plan.pruned_mask()
    assert not mask.gather(1, plan.base).any()


@pytest.mark.parametrize("h,w", [(1, 9), (1, 1), (3, 1)])
def test_plan_random_grid_smaller_than_window_prunes_nothing(h, w):
    grid = TokenGrid(h, w)
    plan = plan_random(2, grid, 3, 2, 2, None, "cpu")
    assert plan.n_pruned == 0
    x = torch.randn(2, grid.n, 4)
    assert torch.equal(plan.recover(plan.prune(x)), x)


@pytest.mark.parametrize("draw, kwargs", [(torch.rand, {}), (torch.randn, {}), (torch.randint, {"high": 4})])
def test_chunk_draw_repeats_one_chunk_of_rows(draw, kwargs):
    """The cond and uncond chunks of a CFG batch get the same rows; rows within a chunk differ;
    one chunk (or chunks that do not divide the batch) is a plain draw of the whole batch."""
    from token_pruning_cache.pruning_core.selection import chunk_draw
    g = lambda: torch.Generator().manual_seed(3)
    two = chunk_draw(draw, 6, 50, g(), "cpu", chunks=2, **kwargs)
    assert two.shape == (6, 50) and torch.equal(two[:3], two[3:]) and not torch.equal(two[0], two[1])
    assert torch.equal(two[:3], chunk_draw(draw, 3, 50, g(), "cpu", **kwargs))  # the first chunk is a plain draw
    assert torch.equal(chunk_draw(draw, 6, 50, g(), "cpu", chunks=4, **kwargs), chunk_draw(draw, 6, 50, g(), "cpu", **kwargs))


def test_random_plans_are_the_same_in_every_chunk():
    from token_pruning_cache.pruning_core.selection import plan_random
    grid = TokenGrid(8, 10)
    plan = plan_random(4, grid, 30, 2, 2, torch.Generator().manual_seed(0), "cpu", chunks=2)
    assert torch.equal(plan.kept[:2], plan.kept[2:]) and torch.equal(plan.source[:2], plan.source[2:])
    assert not torch.equal(plan.kept[0], plan.kept[1])
