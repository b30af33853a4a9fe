"""CAT on video token grids (frames x height x width): geometry, per-token signals, clusters that
span frames, the frame-to-frame adjacency, selections and merges (docs/dit-families.md)."""
import pytest
import torch

from token_pruning_cache.pruning_core.cat import (CATConfig, CATState, merge_prediction, prediction_tokens,
                                                  video_latent_mask)
from token_pruning_cache.pruning_core.cluster import (cluster_adjacency, clustering_features, frame_code,
                                                      position_code, spatial_clusters)
from token_pruning_cache.pruning_core.geometry import TokenGrid, video_token_grid


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_image_grid_is_the_one_frame_video_grid():
    assert TokenGrid(4, 6) == TokenGrid(4, 6, 1) and hash(TokenGrid(4, 6)) == hash(TokenGrid(4, 6, 1))
    assert TokenGrid(4, 6).dims == (4, 6) and TokenGrid(4, 6, 3).dims == (3, 4, 6)
    assert TokenGrid(4, 6, 3).n == 72


def test_video_token_grid_rounds_up_to_whole_patches():
    assert video_token_grid((1, 16, 21, 60, 104), (1, 2, 2)) == TokenGrid(30, 52, 21)  # Wan 480p 81 frames
    assert video_token_grid((1, 16, 5, 9, 7), (1, 2, 2)) == TokenGrid(5, 4, 5)
    assert video_token_grid((1, 128, 4, 6, 6), (1, 1, 1)) == TokenGrid(6, 6, 4)  # LTX-Video
    assert video_token_grid((1, 16, 1, 8, 12), (1, 2, 2)) == TokenGrid(4, 6, 1)  # Qwen-Image


def test_video_prediction_tokens_follow_the_patch_embedding_order():
    """Token ``f·h·w + y·w + x`` holds the latent values of frame ``f``, rows ``2y..2y+1``, columns
    ``2x..2x+1``: the order of Wan's/HunyuanVideo's ``Conv3d`` patch embedding flattened."""
    x = torch.randn(2, 3, 4, 6, 8, generator=_gen(0))
    grid = TokenGrid(3, 4, 4)
    tok = prediction_tokens(x, grid)
    assert tok.shape == (2, 48, 12)
    for f, y, xx in [(0, 0, 0), (3, 2, 1), (2, 1, 3)]:
        i = f * 12 + y * 4 + xx
        patch = x[:, :, f, 2 * y:2 * y + 2, 2 * xx:2 * xx + 2]
        assert torch.equal(tok[:, i], patch.reshape(2, -1))
    # a 1x1x1 patchifier (LTX-Video): every latent voxel is a token
    assert torch.equal(prediction_tokens(x, TokenGrid(6, 8, 4)), x.flatten(2).transpose(1, 2))
    # one-frame latents (Qwen-Image) give the image grid's tokens
    img = torch.randn(1, 16, 8, 12, generator=_gen(1))
    assert torch.equal(prediction_tokens(img.unsqueeze(2), TokenGrid(4, 6)), prediction_tokens(img, TokenGrid(4, 6)))
    # odd sides are replicate-padded up to whole patches
    assert prediction_tokens(torch.zeros(1, 2, 3, 5, 7), TokenGrid(3, 4, 3)).shape == (1, 36, 8)


def test_video_merge_takes_the_new_prediction_under_selected_tokens():
    grid = TokenGrid(3, 4, 2)
    new, prev = torch.randn(1, 2, 2, 5, 7, generator=_gen(2)), torch.randn(1, 2, 2, 5, 7, generator=_gen(3))
    selection = torch.tensor([0, 5, 12, 23])
    merged = merge_prediction(new, prev, selection, grid)
    mask = video_latent_mask(selection, grid, 2, 5, 7)[0, 0]
    for f in range(2):
        for r in range(5):
            for c in range(7):
                i = f * 12 + (r // 2) * 4 + c // 2
                assert bool(mask[f, r, c]) == (i in selection.tolist())
    assert torch.equal(merged, torch.where(mask, new, prev))


def test_position_code_on_one_frame_is_the_image_code():
    for grid in (TokenGrid(5, 7), TokenGrid(8, 8), TokenGrid(1, 9)):
        video = TokenGrid(grid.h, grid.w, 1)
        assert torch.equal(position_code(video, 16), position_code(grid, 16))
        feat = torch.randn(grid.n, 16, generator=_gen(4))
        assert torch.equal(clustering_features(feat, video), clustering_features(feat, grid))


def test_video_clustering_features_append_a_frame_code_of_half_the_channels():
    grid = TokenGrid(4, 6, 3)
    feat = torch.randn(grid.n, 16, generator=_gen(5))
    f = clustering_features(feat, grid)
    assert f.shape == (72, 24)
    # every frame has the same spatial code; the frame code is frame / max(h, w, t)
    spatial = position_code(grid, 16)
    assert torch.equal(spatial[:24], spatial[24:48]) and torch.equal(spatial[:24], position_code(TokenGrid(4, 6), 16))
    assert torch.allclose(f[:, :16], 0.05 * feat + spatial)
    assert torch.equal(f[:, 16:], frame_code(grid, 8))
    assert float(frame_code(grid, 1)[24 * 2, 0]) == pytest.approx(2 / 6)
    # one channel: three coordinates appended
    assert clustering_features(torch.randn(grid.n, 1, generator=_gen(6)), grid).shape == (72, 4)


def test_video_adjacency_links_frames():
    grid = TokenGrid(2, 2, 2)
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # one cluster per frame
    adj = cluster_adjacency(frames, grid, 2)
    assert bool(adj[0, 1]) and bool(adj[1, 0]) and not bool(adj[0, 0])
    # not linked across frames unless at the same position: clusters 0 (frame 0, left) and 1 (frame 1, right)
    labels = torch.tensor([0, 2, 0, 2, 3, 1, 3, 1])
    adj = cluster_adjacency(labels, grid, 4)
    assert not bool(adj[0, 1]) and bool(adj[0, 3]) and bool(adj[2, 1]) and bool(adj[0, 2])


def test_video_clusters_span_frames_and_stay_compact():
    """With a content-free prediction the clusters are blobs of the (t, h, w) box: several of them
    cover more than one frame, and none is spread over the whole clip."""
    grid = TokenGrid(8, 8, 8)
    labels = spatial_clusters(torch.zeros(grid.n, 16), grid, 20, generator=_gen(7))
    assert torch.bincount(labels, minlength=20).min() > 0
    frame = torch.arange(grid.n) // 64
    spans = [len(set(frame[labels == k].tolist())) for k in range(20)]
    assert sum(s > 1 for s in spans) >= 10, spans
    assert max(spans) < 8, spans


def test_cat_state_on_a_video_grid_selects_s_tokens_and_refreshes_every_token():
    grid = TokenGrid(4, 4, 3)  # 48 tokens
    cfg = CATConfig(keep_ratio=0.3)
    state = CATState(grid, cfg)
    s = cfg.selection_size(grid.n)
    state.set_reference(torch.randn(1, grid.n, 8, generator=_gen(8)), row=0)
    seen = set(state.first_selection(torch.randn(1, grid.n, 8, generator=_gen(9)), row=0).tolist())
    assert len(seen) == s
    cluster_part = int(0.25 * s + 1e-9)
    for k in range(-(-(grid.n - s) // (s - cluster_part))):
        sel = state.next_selection(torch.randn(1, grid.n, 8, generator=_gen(10 + k)), row=0)
        assert sel.numel() == s and torch.equal(sel, torch.sort(sel).values)
        seen |= set(sel.tolist())
    assert seen == set(range(grid.n))
    with pytest.raises(ValueError, match="3x4x4 grid"):
        state.next_selection(torch.zeros(1, 16, 8))
