"""Seeded k-means with a position code, cluster graph, pooling and smoothing (CAT §4.4)."""
import pytest
import torch

from token_pruning_cache.pruning_core.cluster import (cluster_adjacency, cluster_max_pool, clustering_features,
                                                      kmeans, position_code, rank_within_groups,
                                                      smooth_over_clusters, spatial_clusters)
from token_pruning_cache.pruning_core.geometry import TokenGrid


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _prediction(grid, c=16, seed=0):
    return torch.randn(grid.n, c, generator=_gen(seed + 100))


def test_position_code_layout():
    grid = TokenGrid(3, 5)
    code = position_code(grid, 4)
    assert code.shape == (15, 4)
    # token 7 = row 1, col 2; one common scale max(h, w) = 5
    assert torch.allclose(code[7], torch.tensor([0.2, 0.2, 0.4, 0.4]))
    assert torch.allclose(clustering_features(torch.zeros(15, 4), grid), code)
    assert clustering_features(torch.zeros(15, 1), grid).shape == (15, 3)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_deterministic_per_seed(init):
    grid = TokenGrid(32, 32)
    feat = _prediction(grid)
    a = spatial_clusters(feat, grid, 20, generator=_gen(0), init=init)
    b = spatial_clusters(feat, grid, 20, generator=_gen(0), init=init)
    c = spatial_clusters(feat, grid, 20, generator=_gen(1), init=init)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("h,w,k", [(64, 64, 20), (65, 97, 20), (5, 7, 20), (4, 6, 20), (2, 2, 20), (8, 8, 64)])
def test_every_cluster_non_empty(h, w, k):
    grid = TokenGrid(h, w)
    labels = spatial_clusters(_prediction(grid), grid, k, generator=_gen(0), iters=10)
    k_eff = min(k, grid.n)
    assert labels.shape == (grid.n,)
    assert labels.min() >= 0 and labels.max() < k_eff
    assert (torch.bincount(labels, minlength=k_eff) > 0).all()


def test_empty_clusters_are_reseeded():
    # 40 identical points and 2 distinct ones: most seeds coincide, so Lloyd alone empties clusters.
    x = torch.zeros(42, 2)
    x[40] = torch.tensor([5.0, 5.0])
    x[41] = torch.tensor([-5.0, 3.0])
    labels, centroids = kmeans(x, 6, iters=5, generator=_gen(0), init="random")
    assert (torch.bincount(labels, minlength=6) > 0).all()
    assert torch.isfinite(centroids).all()


def test_position_code_makes_clusters_spatially_coherent():
    # Two blobs of content (a disc and the rest) with per-token noise. The position code makes
    # clusters compact regions: almost every token shares its cluster with its 4-neighbours.
    # (At the official weight 0.05 the content only bends the borders; see the next test.)
    grid = TokenGrid(32, 48)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(48), indexing="ij")
    blob = ((yy - 16) ** 2 + (xx - 30) ** 2 < 120).reshape(-1)
    feat = 0.3 * torch.randn(grid.n, 16, generator=_gen(3)) + 4.0 * blob[:, None]
    labels = spatial_clusters(feat, grid, 12, generator=_gen(0))
    lab = labels.reshape(grid.h, grid.w)
    same_h = (lab[:, 1:] == lab[:, :-1]).float().mean()
    same_v = (lab[1:, :] == lab[:-1, :]).float().mean()
    assert same_h > 0.85 and same_v > 0.85
    assert (torch.bincount(labels, minlength=12) > 0).all()
    # Content alone (position code drowned by a huge feature weight) scatters the labels.
    scattered = spatial_clusters(feat, grid, 12, generator=_gen(0), feature_weight=100.0).reshape(grid.h, grid.w)
    assert (scattered[:, 1:] == scattered[:, :-1]).float().mean() < 0.5


def test_blob_content_splits_along_the_blob_border():
    # Strong content weight: two clusters follow the two blobs exactly.
    grid = TokenGrid(16, 16)
    feat = torch.zeros(grid.h, grid.w, 4)
    feat[4:12, 4:12] = 40.0  # a square blob in the middle
    labels = spatial_clusters(feat.reshape(grid.n, 4), grid, 2, generator=_gen(0)).reshape(16, 16)
    inside = labels[4:12, 4:12]
    assert (inside == inside[0, 0]).all()
    outside = labels.clone()
    outside[4:12, 4:12] = -1
    assert ((outside == -1) | (outside != inside[0, 0])).all()


def test_cluster_adjacency_grid_graph():
    grid = TokenGrid(3, 4)
    labels = torch.tensor([[0, 0, 1, 1],
                           [0, 0, 1, 1],
                           [2, 2, 2, 3]]).reshape(-1)
    adj = cluster_adjacency(labels, grid, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for a, b in [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]:
        expected[a, b] = expected[b, a] = True
    assert torch.equal(adj, expected)


def test_cluster_max_pool_is_per_channel_max():
    labels = torch.tensor([0, 1, 0, 2, 1])
    v = torch.tensor([[1.0, -5.0], [2.0, 0.0], [-3.0, 4.0], [7.0, 7.0], [0.5, 9.0]])
    out = cluster_max_pool(v, labels, 3)
    assert torch.equal(out, torch.tensor([[1.0, 4.0], [2.0, 9.0], [7.0, 7.0]]))
    assert torch.equal(cluster_max_pool(v[:, 0], labels, 3), torch.tensor([1.0, 2.0, 7.0]))


def test_smoothing_is_two_means_plus_max_over_closed_neighbourhood():
    pooled = torch.tensor([[3.0], [0.0], [6.0]])
    adj = torch.tensor([[False, True, False], [True, False, True], [False, True, False]])
    out = smooth_over_clusters(pooled, adj)
    # cluster 1 sees {0, 1, 2}: mean 3, max 6 → (2·3 + 6) / 3 = 4
    assert torch.allclose(out[:, 0], torch.tensor([(2 * 1.5 + 3) / 3, 4.0, (2 * 3 + 6) / 3]))


def test_rank_within_groups():
    order = torch.tensor([4, 0, 3, 1, 2])
    groups = torch.tensor([0, 1, 0, 1, 0])
    # group 0 in preference order: 4, 0, 2; group 1: 3, 1
    assert rank_within_groups(order, groups, 2).tolist() == [1, 1, 2, 0, 0]
