"""CAT Pruning policy: noise relative magnitude, first/later selections, staleness, merges (§4.4)."""
import pytest
import torch

from token_pruning_cache.pruning_core.cat import (CATConfig, CATState, carry_selection, first_selection, gather_tokens,
                                                  later_selection, latent_mask, merge_prediction, merge_tokens,
                                                  token_mask,
                                                  noise_relative_magnitude, prediction_tokens, rank_clusters,
                                                  selection_size, update_staleness)
from token_pruning_cache.pruning_core.geometry import TokenGrid


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pred(batch, grid, c=16, seed=0):
    return torch.randn(batch, grid.n, c, generator=_gen(seed))


def _check_selection(idx, n, s):
    assert idx.dtype == torch.long and idx.shape == (s,)
    assert idx.min() >= 0 and idx.max() < n
    assert torch.unique(idx).numel() == s
    assert torch.equal(idx, torch.sort(idx).values)


def _run(grid, batch=2, steps=6, cfg=CATConfig(), row=1, region=None):
    """Reference + first selection + ``steps`` later selections on random drifting predictions."""
    state = CATState(grid, cfg)
    ref = _pred(batch, grid, seed=1)
    state.set_reference(ref, row=row)
    sels = []
    for t in range(steps + 1):
        pred = ref + 0.1 * _pred(batch, grid, seed=10 + t)
        if region is not None:
            pred[:, region] += 2.0
        sels.append(state.first_selection(pred, row=row) if t == 0 else state.next_selection(pred, row=row))
    return state, sels


def test_selection_size():
    assert selection_size(0.3, 4096) == 1228
    assert selection_size(0.29, 100) == 29  # no float flooring to 28
    assert selection_size(0.01, 10) == 1
    assert selection_size(1.0, 35) == 35


def test_config_problems():
    assert CATConfig().problem() is None
    assert CATConfig(keep_ratio=0.0).problem()
    assert CATConfig(staleness_decay=1.0).problem()
    with pytest.raises(ValueError):
        CATState(TokenGrid(4, 4), CATConfig(cluster_share=1.5))


def test_noise_relative_magnitude_uses_one_row():
    ref = torch.zeros(3, 4, 2)
    pred = torch.zeros(3, 4, 2)
    pred[1, 2] = torch.tensor([3.0, 4.0])
    pred[0, 0] = 7.0
    assert noise_relative_magnitude(pred, ref, row=1).tolist() == [0.0, 0.0, 5.0, 0.0]
    assert noise_relative_magnitude(pred[1], ref[1]).tolist() == [0.0, 0.0, 5.0, 0.0]
    assert noise_relative_magnitude(pred, ref, row=None)[2] == pytest.approx(5.0 / 3)


@pytest.mark.parametrize("h,w", [(64, 64), (65, 97), (5, 7), (4, 6), (1, 5)])
def test_counts_exact_on_any_grid(h, w):
    grid = TokenGrid(h, w)
    state, sels = _run(grid, steps=3)
    s = selection_size(0.3, grid.n)
    assert state.n_select == s
    for idx in sels:
        _check_selection(idx, grid.n, s)


@pytest.mark.parametrize("batch,row", [(1, 0), (2, 1), (3, 2), (3, None)])
def test_any_batch_size(batch, row):
    grid = TokenGrid(12, 10)
    _, sels = _run(grid, batch=batch, steps=2, row=row)
    for idx in sels:
        _check_selection(idx, grid.n, selection_size(0.3, grid.n))


@pytest.mark.parametrize("ratio,share", [(0.05, 0.25), (0.5, 0.0), (0.5, 1.0), (1.0, 0.25), (0.9, 0.6)])
def test_counts_exact_for_other_shares(ratio, share):
    grid = TokenGrid(9, 11)
    _, sels = _run(grid, steps=3, cfg=CATConfig(keep_ratio=ratio, cluster_share=share, num_clusters=7))
    for idx in sels:
        _check_selection(idx, grid.n, selection_size(ratio, grid.n))


def test_deterministic_for_a_seed():
    grid = TokenGrid(16, 24)
    a_state, a = _run(grid, cfg=CATConfig(seed=3))
    b_state, b = _run(grid, cfg=CATConfig(seed=3))
    assert torch.equal(a_state.labels, b_state.labels)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c_state, _ = _run(grid, cfg=CATConfig(seed=4))
    assert not torch.equal(a_state.labels, c_state.labels)


def test_every_token_refreshed_within_a_bounded_number_of_steps():
    grid = TokenGrid(32, 32)
    # A persistent hot region keeps the cluster part busy; staleness must still reach everyone.
    region = torch.arange(grid.n).reshape(32, 32)[:10, :10].reshape(-1)
    state, sels = _run(grid, steps=12, region=region)
    later = sels[1:]
    bound = 6  # ≈ 1 / (0.75·0.3) rounded up, plus one step of slack
    for start in range(len(later) - bound + 1):
        seen = torch.zeros(grid.n, dtype=torch.bool)
        for idx in later[start:start + bound]:
            seen[idx] = True
        assert seen.all(), f"tokens not refreshed in steps {start}..{start + bound - 1}"
    assert state.steps_selected == 13


def test_staleness_update():
    f = torch.tensor([0.0, 1.0, 2.0, 0.5])
    assert update_staleness(f, torch.tensor([0, 2]), 0.5).tolist() == [1.0, 0.5, 2.0, 0.25]
    assert f.tolist() == [0.0, 1.0, 2.0, 0.5]  # out of place


def test_first_selection_walks_clusters_by_rank():
    # 4 clusters of 10 tokens, g increasing with the index: 10c + 9 is the best of cluster c.
    labels = torch.arange(40) // 10
    g = torch.arange(40, dtype=torch.float32)
    position = torch.tensor([3, 0, 2, 1])  # cluster 1 ranked first, then 3, 2, 0
    # S = 20 → quota 2 per cluster gives only 8: the rest are the largest-g others.
    idx = first_selection(g, labels, position, 20)
    _check_selection(idx, 40, 20)
    for c in range(4):
        assert {10 * c + 9, 10 * c + 8} <= set(idx.tolist())
    # S = 3 → quota 1: the best token of each of the three top-ranked clusters.
    assert first_selection(g, labels, position, 3).tolist() == [19, 29, 39]
    assert first_selection(g, labels, position, 1).tolist() == [19]


def test_first_selection_cut_at_S_in_rank_order():
    labels = torch.arange(400) // 100  # 4 clusters of 100
    g = torch.rand(400, generator=_gen(0))
    position = rank_clusters(torch.tensor([1.0, 4.0, 3.0, 2.0]))  # order 1, 2, 3, 0
    idx = first_selection(g, labels, position, 25)  # quota 2; 12 clusters would be needed
    # Not enough clusters: all 8 quota tokens, then the 17 largest-g others.
    quota_tokens = {int(100 * c + torch.topk(g[100 * c:100 * c + 100], 2).indices[i]) for c in range(4) for i in range(2)}
    assert quota_tokens <= set(idx.tolist())
    labels = torch.arange(400) // 20  # 20 clusters of 20
    values = torch.rand(20, generator=_gen(1))
    position = rank_clusters(values)
    idx = first_selection(g, labels, position, 50)  # quota 5 → the 10 best clusters
    best = torch.argsort(values, descending=True)[:10]
    assert set((labels[idx]).tolist()) == set(best.tolist())


def test_later_selection_quotas():
    # 5 clusters of 100, S = 200: cluster budget 50, q0 = ⌊40·0.25⌋ = 10 → top cluster 30 by g
    # + 15 stalest, second cluster 20 by g → cut to 5 more.
    labels = torch.arange(500) // 100
    g = torch.rand(500, generator=_gen(0))
    freq = torch.rand(500, generator=_gen(1))
    position = torch.tensor([4, 1, 0, 3, 2])  # cluster 2 first, then 1
    idx = later_selection(g, freq, labels, position, 200, cluster_share=0.25)
    _check_selection(idx, 500, 200)
    chosen = set(idx.tolist())
    top_g = torch.topk(g[200:300], 30).indices + 200
    assert set(top_g.tolist()) <= chosen
    second = torch.topk(g[100:200], 5).indices + 100
    assert set(second.tolist()) <= chosen
    # The staleness part: the stalest tokens outside the cluster part fill the rest.
    mask = torch.zeros(500, dtype=torch.bool)
    mask[idx] = True
    assert freq[~mask].min() >= freq[mask & (labels != 2) & (labels != 1)].max()
    # Zero cluster share = pure staleness.
    idx = later_selection(g, freq, labels, position, 200, cluster_share=0.0)
    assert torch.equal(idx, torch.sort(torch.argsort(freq)[:200]).values)


def _smooth(batch, grid, c=16, seed=0):
    """Spatially smooth random predictions (bilinear from a 4×4 grid), like real model outputs."""
    low = torch.randn(batch, c, 4, 4, generator=_gen(seed))
    up = torch.nn.functional.interpolate(low, size=(grid.h, grid.w), mode="bilinear", align_corners=False)
    return up.reshape(batch, c, grid.n).transpose(1, 2)


def test_cluster_part_favours_the_most_changed_region():
    grid = TokenGrid(32, 32)
    state = CATState(grid, CATConfig(keep_ratio=0.3, cluster_share=0.25))
    ref = _smooth(2, grid, seed=1)
    state.set_reference(ref, row=1)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    hot = ((yy - 24) ** 2 + (xx - 8) ** 2 < 36).reshape(-1)  # a disc, ~11 % of the image
    sels = []
    for t in range(7):
        pred = ref + 0.02 * _pred(2, grid, seed=20 + t)
        pred[:, hot] += 1.0 + 0.1 * torch.randn(2, int(hot.sum()), 16, generator=_gen(40 + t))
        sels.append(state.first_selection(pred, row=1) if t == 0 else state.next_selection(pred, row=1))
    # First selection: the hot clusters come first, so nearly all of the disc is taken at once.
    assert hot[sels[0]].float().mean() > 2.5 * hot.float().mean()
    assert hot[sels[0]].sum() > 0.8 * hot.sum()
    # Later selections: the disc is refreshed far more often than the rest of the image.
    counts = torch.zeros(grid.n)
    for idx in sels[1:]:
        counts[idx] += 1
    assert counts[hot].mean() > 1.5 * counts[~hot].mean()


def test_later_selection_cluster_part_lands_in_the_changed_region():
    grid = TokenGrid(32, 32)
    labels = (torch.arange(32)[:, None] // 8 * 4 + torch.arange(32)[None, :] // 8).reshape(-1)  # 16 blocks 8×8
    hot = labels == 5
    g = 0.01 * torch.rand(grid.n, generator=_gen(0))
    g[hot] += 1.0
    freq = hot.float()  # the hot block was just refreshed: staleness alone would avoid it
    values = torch.zeros(16)
    values[5] = 1.0
    s = selection_size(0.3, grid.n)  # 307; cluster budget 76; top cluster quota 45 + 22 stalest
    idx = later_selection(g, freq, labels, rank_clusters(values), s, cluster_share=0.25)
    plain = later_selection(g, freq, labels, rank_clusters(values), s, cluster_share=0.0)
    assert hot[plain].sum() == 0
    assert hot[idx].sum() == 64  # its 45 largest g, then its 19 remaining tokens as "stalest"


def test_prediction_tokens_patchify():
    grid = TokenGrid(2, 3)
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    tok = prediction_tokens(x, grid)
    assert tok.shape == (1, 6, 8)
    assert tok[0, 0].tolist() == [0.0, 1.0, 6.0, 7.0, 24.0, 25.0, 30.0, 31.0]
    assert prediction_tokens(x, TokenGrid(4, 6)).shape == (1, 24, 2)  # one pixel per token
    assert prediction_tokens(torch.zeros(2, 4, 5, 7), TokenGrid(3, 4)).shape == (2, 12, 16)  # padded
    assert prediction_tokens(tok, grid) is tok


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_merge_tokens_and_prediction(batch):
    n, c = 10, 4
    cached = torch.randn(batch, n, c, generator=_gen(0)).half()
    idx = torch.tensor([1, 4, 7])
    fresh = torch.randn(batch, 3, c, generator=_gen(1))
    before = cached.clone()
    out = merge_tokens(fresh, cached, idx)
    assert torch.equal(cached, before)  # out of place
    assert out.dtype == cached.dtype and out.shape == cached.shape
    assert torch.equal(out[:, idx], fresh.half())
    rest = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    assert torch.equal(out[:, rest], cached[:, rest])
    assert torch.equal(gather_tokens(out, idx), fresh.half())



@pytest.mark.parametrize("hw", [(6, 8), (5, 7)])
def test_merge_prediction_takes_the_new_prediction_under_selected_tokens(hw):
    """A token of a 3x4 grid covers a 2x2 latent patch (cropped at odd sides)."""
    h, w = hw
    grid = TokenGrid(3, 4)
    new, prev = torch.randn(2, 4, h, w, generator=_gen(3)), torch.randn(2, 4, h, w, generator=_gen(4))
    selection = torch.tensor([0, 6, 11])  # (0,0), (1,2), (2,3)
    merged = merge_prediction(new, prev, selection, grid)
    fresh = torch.zeros(h, w, dtype=torch.bool)
    for t in selection.tolist():
        r, c = divmod(t, grid.w)
        fresh[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
    assert torch.equal(merged, torch.where(fresh, new, prev))
    assert torch.equal(latent_mask(selection, grid, h, w)[0, 0], fresh)


def test_state_rejects_another_grid_and_needs_reference():
    state = CATState(TokenGrid(4, 6))
    with pytest.raises(RuntimeError):
        state.first_selection(torch.zeros(1, 24, 4))
    with pytest.raises(ValueError):
        state.set_reference(torch.zeros(1, 25, 4))
    state.set_reference(torch.zeros(1, 24, 4))
    idx = state.first_selection(torch.randn(1, 24, 4, generator=_gen(0)))
    _check_selection(idx, 24, 7)
    assert token_mask(state.selection, 24).sum() == 7


def test_carry_selection_keeps_the_most_covered_coarse_tokens():
    """Odd sides round up; coverage counts only the real fine tokens under a coarse token, so an
    edge token covering one selected token (1/1) outranks a full 2x2 window with 2 of 4 selected."""
    grid = TokenGrid(5, 7)
    selection = torch.tensor([0, 8, 34])  # (0,0), (1,1), (4,6)
    coarse, kept = carry_selection(selection, grid, 1)
    assert (coarse.h, coarse.w) == (3, 4)
    assert kept.tolist() == [11]  # (2,3): 1 of its 1 token selected
    _, kept = carry_selection(selection, grid, 2)
    assert kept.tolist() == [0, 11]  # then (0,0): 2 of 4
    _, kept = carry_selection(selection, grid, 4)
    assert kept.tolist() == [0, 1, 2, 11]  # ties at coverage 0 go to the lower index without a staleness
    _, everything = carry_selection(selection, grid, 99)
    assert everything.tolist() == list(range(12))


def test_carry_selection_breaks_ties_by_staleness():
    grid = TokenGrid(4, 4)
    selection = torch.tensor([0])  # covers a quarter of coarse token 0, nothing else
    freq = torch.tensor([0.0, 1.0, 0.0, 0.5])
    _, kept = carry_selection(selection, grid, 3, freq)
    assert kept.tolist() == [0, 2, 3]  # 0 by coverage, then the stalest 2 (0.0) and 3 (0.5)


@pytest.mark.parametrize("hw", [(8, 8), (9, 13), (64, 64)])
def test_state_carries_the_keep_ratio_to_every_coarser_level(hw):
    grid = TokenGrid(*hw)
    cfg = CATConfig(keep_ratio=0.3)
    state, _ = _run(grid, steps=2, cfg=cfg)
    levels = state.coarser_selections(3)
    h, w = hw
    for level, (g, kept) in enumerate(levels, start=1):
        h, w = (h + 1) // 2, (w + 1) // 2
        assert (g.h, g.w) == (h, w)
        _check_selection(kept, g.n, selection_size(0.3, g.n))
        assert state.level_freq[level].shape == (g.n,)
    # the defining property on the first level: no dropped coarse token covers more of the selection
    fine = torch.nn.functional.pad(token_mask(state.selection, grid.n).float().reshape(grid.h, grid.w),
                                   (0, grid.w % 2, 0, grid.h % 2), value=float("nan"))
    g1, kept1 = levels[0]
    coverage = fine.reshape(g1.h, 2, g1.w, 2).nanmean(dim=(1, 3)).flatten()
    dropped = torch.ones(g1.n, dtype=torch.bool).index_fill_(0, kept1, False)
    assert coverage[kept1].min() >= coverage[dropped].max()


def test_state_rotates_tied_coarse_tokens_by_staleness():
    state = CATState(TokenGrid(4, 4), CATConfig(keep_ratio=0.5, staleness_decay=0.5))
    state.selection = torch.tensor([0])
    picks = [state.coarser_selections(1)[0][1].tolist() for _ in range(3)]
    assert picks == [[0, 1], [0, 2], [0, 3]]  # coarse 0 by coverage; the tied others take turns


def test_state_needs_a_selection_to_carry():
    with pytest.raises(RuntimeError, match="no selection"):
        CATState(TokenGrid(4, 4)).coarser_selections(1)
