"""Spatial clusters of tokens, and values pooled over them (CAT Pruning, docs/algorithms.md §4.4).

Vocabulary:
- *cluster*: a set of tokens of one ``h × w`` grid found once per run by k-means on the
  model prediction plus a *position code*, so clusters are spatially compact regions whose
  borders follow the image content a little.
- *label map*: ``[N]`` long, the cluster of every token (row-major like :class:`TokenGrid`).
- *cluster adjacency*: ``[k, k]`` bool, True where two clusters touch on the 4-neighbour grid
  (6-neighbour on a video grid: frames are a third axis, and clusters span frames).
- *pooled value*: per cluster, the per-channel max of a per-token signal over its members.

Everything is torch on the caller's device, with no loop over tokens and no host sync: the
official code ran sklearn on the CPU, built the position code and the grid graph with Python
loops over the 4096 positions and used PyG for pooling. Here k-means is Lloyd's algorithm
with a fixed iteration count and a k-means++ (or uniform) seeding drawn from a
``torch.Generator``, so a run is reproducible for a seed.
"""
from __future__ import annotations

import torch

from .geometry import TokenGrid

#: Weight of the prediction against the position code in the clustering features (official 0.05).
DEFAULT_FEATURE_WEIGHT = 0.05


def position_code(grid: TokenGrid, channels: int, device=None) -> torch.Tensor:
    """Token coordinates spread over ``channels`` channels, ``[N, channels]`` fp32.

    The first ``channels // 2`` channels hold ``row / s``, the others ``col / s`` with
    ``s = max(h, w)``. The official code used ``row/64, col/64`` on its fixed 64×64 grid; one
    common scale keeps clusters round in image space on non-square grids (``row/h, col/w``
    would stretch them along the long side) and equals the official code on square grids.
    Repeating each coordinate over half the channels (official: 32 + 32 of 64) keeps the
    position-vs-content balance of the official code for any channel count.

    On a video grid (``t > 1``) every frame gets the same spatial code, and ``s`` is the
    longest of the three sides (``t`` only counts when it exceeds ``h`` and ``w``); the frame
    coordinate is a separate code (:func:`frame_code`).
    """
    if channels < 2:
        raise ValueError("a position code needs at least 2 channels (row and column)")
    scale = float(max(grid.h, grid.w, grid.t))
    rows = torch.arange(grid.h, device=device, dtype=torch.float32) / scale
    cols = torch.arange(grid.w, device=device, dtype=torch.float32) / scale
    r = rows[:, None].expand(grid.h, grid.w).reshape(-1, 1)
    c = cols[None, :].expand(grid.h, grid.w).reshape(-1, 1)
    n_row = channels // 2
    code = torch.cat([r.expand(-1, n_row), c.expand(-1, channels - n_row)], dim=1)
    return code if grid.t == 1 else code.repeat(grid.t, 1)


def frame_code(grid: TokenGrid, channels: int, device=None) -> torch.Tensor:
    """``[N, channels]`` fp32 holding every token's ``frame / s`` (``s`` as in
    :func:`position_code`): one latent frame is as far as one token step in the image."""
    scale = float(max(grid.h, grid.w, grid.t))
    frames = torch.arange(grid.t, device=device, dtype=torch.float32) / scale
    return frames.repeat_interleave(grid.h * grid.w)[:, None].expand(-1, channels)


def clustering_features(feature: torch.Tensor, grid: TokenGrid,
                        feature_weight: float = DEFAULT_FEATURE_WEIGHT) -> torch.Tensor:
    """``feature_weight · feature + position code``, ``[N, C]`` → ``[N, C]`` fp32.

    ``feature``: per-token content (CAT: the prediction of the cond row at the clustering
    step). With a single channel the code cannot be added, so two coordinate channels are
    appended instead (``[N, 3]``).

    Video grids (``t > 1``): clusters span frames. The frame coordinate is appended as
    ``max(C // 2, 1)`` more channels (``[N, C + C//2]``), so time weighs exactly as much as each
    of the two image axes (``C/2`` channels each, the official balance) and the image axes keep
    the official balance against the content. Why clusters span frames: a token's prediction
    drifts together with the same region in the neighbouring latent frames (objects move a
    little per frame), so a spatio-temporal cluster groups tokens that change together; the
    official constants (20 clusters, per-cluster quotas of ``S/10`` and ``S/20``) then keep
    their meaning, where per-frame clusters would need ``20·t`` clusters or leave most
    frames with less than one.
    """
    f = feature.float().reshape(grid.n, -1) * feature_weight
    if f.shape[1] >= 2:
        out = f + position_code(grid, f.shape[1], device=f.device)
    else:
        out = torch.cat([f, position_code(grid, 2, device=f.device)], dim=1)
    if grid.t == 1:
        return out
    return torch.cat([out, frame_code(grid, max(f.shape[1] // 2, 1), device=f.device)], dim=1)


def _sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[N, k]`` (matmul form, clamped at 0)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(1)[None, :]
    return d.clamp_min_(0.0)


def group_counts(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[n_groups]`` long: how many elements of ``groups`` (values in ``[0, n_groups)``) fall in each.

    What ``torch.bincount(groups, minlength=n_groups)`` returns, without its host sync: on CUDA
    bincount reads the input's minimum and maximum back to the host to size its output, even
    when ``minlength`` fixes it.
    """
    counts = torch.zeros(n_groups, dtype=torch.long, device=groups.device)
    return counts.scatter_add_(0, groups, torch.ones_like(groups, dtype=torch.long))


def rank_within_groups(order: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rank of every element inside its group, following a global preference ``order``.

    ``order``: ``[N]`` permutation, most preferred first. ``groups``: ``[N]`` group of each
    element. Returns ``[N]`` long: 0 for the most preferred element of each group, 1 for the
    next, … . Two stable sorts, no loop over groups or elements.
    """
    n = order.numel()
    grouped = torch.sort(groups[order], stable=True)  # group-major, preference order inside
    members = order[grouped.indices]
    counts = group_counts(groups, n_groups)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=order.device) - starts[grouped.values]
    rank = torch.empty_like(pos)
    rank[members] = pos
    return rank


def _fill_empty_clusters(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster one token, stolen where it hurts least; returns new labels.

    Candidates are tokens that are not the closest member of their cluster (so no donor is
    emptied); the ones farthest from their centroid move first. There are always enough
    candidates: ``N − #non-empty ≥ k − #non-empty`` once ``N ≥ k``. No host sync: the
    number of empty clusters is never read back.
    """
    n = labels.numel()
    own = dist.gather(1, labels[:, None]).squeeze(1)  # distance to own centroid
    # One sort gives every token a unique "farness" (its position by distance, ties by index).
    farness = torch.empty_like(labels)
    farness[torch.argsort(own, stable=True)] = torch.arange(n, device=labels.device)
    nearest = torch.full((k,), n, dtype=labels.dtype, device=labels.device)
    nearest = nearest.scatter_reduce(0, labels, farness, reduce="amin")
    spare = farness != nearest[labels]  # every token but the closest member of its cluster
    donors = torch.topk(torch.where(spare, farness, -1), k).indices  # farthest spare first
    donor_rank = torch.full_like(labels, k)
    donor_rank[donors] = torch.arange(k, device=labels.device)
    empty = group_counts(labels, k) == 0
    empty_ids = torch.argsort((~empty).long(), stable=True)  # empty clusters first
    # The r-th donor moves to the r-th empty cluster; computed per token, so no scatter
    # collisions and the number of empty clusters is never read back to the host.
    moves = donor_rank < empty.sum()
    return torch.where(moves, empty_ids[donor_rank.clamp(max=k - 1)], labels)


def _init_centroids(x: torch.Tensor, k: int, generator: torch.Generator | None,
                    init: str) -> torch.Tensor:
    n = x.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    # All random numbers are drawn up front on the generator's device (CPU by default), so
    # the seeding is the same on every device and needs no host round trip per centroid.
    u = torch.rand(k, generator=generator, device=gen_device, dtype=torch.float64).to(x.device)
    if init == "random":
        # k distinct tokens: a seeded random permutation.
        perm = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
        return x[perm[:k]].clone()
    if init != "kmeans++":
        raise ValueError(f"unknown k-means init {init!r} (use 'kmeans++' or 'random')")
    first = (u[0] * n).long().clamp_(0, n - 1)
    centroids = x.new_empty(k, x.shape[1])
    centroids[0:1] = x.index_select(0, first.reshape(1))  # x[first] would read the 0-d index back to the host
    closest = _sq_distances(x, centroids[:1]).squeeze(1)
    # k ≤ a few dozen: a loop over centroids (never over tokens). Inverse-CDF sampling on D².
    for j in range(1, k):
        cdf = torch.cumsum(closest.double(), 0)
        total = cdf[-1]
        # If every token coincides with a centroid (total 0) fall back to a uniform draw.
        target = torch.where(total > 0, u[j] * total, u[j] * n)
        cdf = torch.where(total > 0, cdf, torch.arange(1, n + 1, device=x.device, dtype=cdf.dtype))
        pick = torch.searchsorted(cdf, target[None], right=True).clamp_(0, n - 1)
        centroids[j:j + 1] = x.index_select(0, pick)
        closest = torch.minimum(closest, _sq_distances(x, centroids[j:j + 1]).squeeze(1))
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None,
           init: str = "kmeans++") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` ``[N, D]`` → ``(labels [N] long, centroids [k, D] fp32)``.

    - ``k``: number of clusters, clamped to ``N``; every returned cluster is non-empty.
    - ``iters``: fixed number of assign/update rounds (no tolerance test: no host sync, same
      work every run).
    - ``generator``: source of the seeding randomness (any device; a CPU generator gives the
      same clusters on every device up to float rounding). None uses torch's global RNG.
    - ``init``: ``"kmeans++"`` (D²-weighted seeding) or ``"random"`` (k distinct tokens).

    Empty clusters are re-seeded after every assignment with the spare token farthest from
    its centroid. Centroid sums use a one-hot matmul rather than ``index_add_``, which is
    non-deterministic on CUDA.
    """
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one token")
    k = max(1, min(int(k), n))
    centroids = _init_centroids(x, k, generator, init)
    clusters = torch.arange(k, device=x.device)
    for step in range(iters + 1):
        dist = _sq_distances(x, centroids)
        labels = _fill_empty_clusters(dist.argmin(1), dist, k)
        if step == iters:
            break
        onehot = (labels[:, None] == clusters[None, :]).to(x.dtype)  # [N, k]
        counts = onehot.sum(0)
        centroids = (onehot.T @ x) / counts.clamp_min(1.0)[:, None]
    return labels, centroids


def spatial_clusters(feature: torch.Tensor, grid: TokenGrid, num_clusters: int,
                     generator: torch.Generator | None = None, iters: int = 20,
                     feature_weight: float = DEFAULT_FEATURE_WEIGHT,
                     init: str = "kmeans++") -> torch.Tensor:
    """Label map ``[N]`` of ``min(num_clusters, N)`` spatially coherent clusters.

    ``feature``: ``[N, C]`` per-token content; k-means runs on
    :func:`clustering_features` (``feature_weight · feature`` + position code).
    """
    labels, _ = kmeans(clustering_features(feature, grid, feature_weight), num_clusters,
                       iters=iters, generator=generator, init=init)
    return labels


def cluster_adjacency(labels: torch.Tensor, grid: TokenGrid, num_clusters: int) -> torch.Tensor:
    """``[k, k]`` bool, True where two different clusters share a 4-neighbour edge (on a video
    grid, 6 neighbours: the same position in the previous and next frame too).

    Symmetric with a False diagonal. Built from the horizontal and vertical (and frame to
    frame) neighbour pairs of the label map in one scatter.
    """
    lab = labels.reshape(grid.t, grid.h, grid.w)
    a = torch.cat([lab[:, :, :-1].reshape(-1), lab[:, :-1, :].reshape(-1), lab[:-1].reshape(-1)])
    b = torch.cat([lab[:, :, 1:].reshape(-1), lab[:, 1:, :].reshape(-1), lab[1:].reshape(-1)])
    k = num_clusters
    adj = torch.zeros(k * k, dtype=torch.bool, device=labels.device)
    adj.index_fill_(0, torch.cat([a * k + b, b * k + a]), True)
    adj = adj.reshape(k, k)
    adj.fill_diagonal_(False)
    return adj


def cluster_max_pool(values: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Per-cluster, per-channel max of token values: ``[N, C]`` → ``[k, C]`` (``[N]`` → ``[k]``).

    Empty clusters (there are none after :func:`kmeans`) would get ``-inf``.
    """
    squeeze = values.dim() == 1
    v = values[:, None] if squeeze else values
    out = torch.full((num_clusters, v.shape[1]), float("-inf"), dtype=v.dtype, device=v.device)
    out = out.scatter_reduce(0, labels[:, None].expand_as(v), v, reduce="amax", include_self=True)
    return out[:, 0] if squeeze else out


def smooth_over_clusters(pooled: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """One message-passing round over the cluster graph: ``[k, C]`` → ``[k, C]``.

    The official code used PyG ``SimpleConv`` with self loops and the aggregations
    ``[mean, mean, max]`` summed, i.e. ``2·mean + max`` over the closed neighbourhood (the
    cluster and the clusters it touches). We compute the same quantity divided by 3, so the
    result stays in the units of the input; cluster ranking by L2 norm is unchanged by a
    common factor. Dense ``[k, k]`` arithmetic: k is at most a few dozen.
    """
    k = pooled.shape[0]
    closed = adjacency | torch.eye(k, dtype=torch.bool, device=adjacency.device)
    p = pooled.float()
    mean = (closed.float() @ p) / closed.sum(1, keepdim=True).float()
    masked = torch.where(closed[:, :, None], p[None, :, :], torch.full_like(p[None], float("-inf")))
    return (2.0 * mean + masked.amax(1)) / 3.0
