"""CAT Pruning — cluster-aware token pruning (Cheng et al., arXiv 2502.00433), as pure functions.

Vocabulary (docs/algorithms.md §4):
- *selection*: the ``S = ⌊keep_ratio·N⌋`` image tokens recomputed on a pruned step, as sorted
  flat indices ``[S]``. One selection per step, shared by every block and every batch row
  (both CFG halves); the other tokens reuse cached values.
- *noise relative magnitude* ``g_i = ‖n_t[i] − n_ref[i]‖₂`` over channels: how far a token's
  prediction has drifted since the reference step (no normalisation, as in the official code).
- *cluster*: a spatial region from k-means made once, at the clustering step (see
  :mod:`.cluster`). Clusters are ranked by the L2 norm of their max-pooled ``Δ = n_t − n_ref``.
- *staleness*: the decayed selection frequency ``f ← decay·f + 1[selected]``; the lowest ``f``
  is the stalest token.

Step roles in a run (official SD3 schedule, 0-based, 28 steps): full steps 0…5; step 6 stores
the reference prediction (:meth:`CATState.set_reference`); step 7 is still full and makes the
clustering and the first selection (:meth:`CATState.first_selection`); every later step runs
pruned with the selection made at the previous step and makes the next one
(:meth:`CATState.next_selection`). The schedule itself belongs to the caller.

Deviations from the official code, on purpose:
- any grid ``(h, w)``, any batch size; the driving row is an argument (official: row 1 of 2);
- torch k-means (seeded, on the prediction's device) instead of sklearn on the CPU, no Python
  loops over tokens, no host round trips per cluster;
- the selection is always padded to exactly ``S`` with the next-stalest tokens (the official
  compile version's choice; the eager version returned fewer), so shapes are static;
- ties are broken deterministically: by ``g`` (larger first), then by token index;
- the eager version's reset of ``f`` ("no cluster selected twice") is not reproduced: with
  the decay, ``f`` stays bounded by ``1 / (1 − decay)`` and needs no reset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cluster import (DEFAULT_FEATURE_WEIGHT, cluster_adjacency, cluster_max_pool, group_counts,
                      rank_within_groups, smooth_over_clusters, spatial_clusters)
from .geometry import TokenGrid

#: First selection: each cluster gives at most ``⌊S / FIRST_QUOTA_DIV⌋`` tokens (official 10).
FIRST_QUOTA_DIV = 10
#: Later selections: base quota per cluster is ``⌊⌊S/5⌋ · 0.25⌋`` (official constants).
LATER_QUOTA_DIV = 5
LATER_QUOTA_FRACTION = 0.25
#: Quota multipliers of the best-ranked clusters in later selections (then 1 for the rest).
TOP_CLUSTER_MULTIPLIERS = (3, 2)


@dataclass(frozen=True)
class CATConfig:
    keep_ratio: float = 0.3  # fraction of image tokens recomputed per pruned step (official α)
    num_clusters: int = 20  # k-means clusters, capped at the token count
    cluster_share: float = 0.25  # share of S picked cluster by cluster; the rest by staleness
    staleness_decay: float = 0.5  # per-step decay of the selection frequency f
    seed: int = 0  # k-means seeding
    feature_weight: float = DEFAULT_FEATURE_WEIGHT  # prediction weight against the position code
    kmeans_iters: int = 20  # fixed Lloyd iterations

    def problem(self) -> str | None:
        """A user-facing reason this configuration cannot run, or None."""
        if not 0.0 < self.keep_ratio <= 1.0:
            return f"keep_ratio {self.keep_ratio} must be in (0, 1]: the share of tokens recomputed per pruned step"
        if self.num_clusters < 1:
            return f"num_clusters {self.num_clusters} must be at least 1"
        if not 0.0 <= self.cluster_share <= 1.0:
            return f"cluster_share {self.cluster_share} must be between 0 and 1"
        if not 0.0 <= self.staleness_decay < 1.0:
            return f"staleness_decay {self.staleness_decay} must be in [0, 1)"
        if self.kmeans_iters < 0:
            return f"kmeans_iters {self.kmeans_iters} must be non-negative"
        return None

    def selection_size(self, n_tokens: int) -> int:
        """``S = ⌊keep_ratio·N⌋``, at least 1 and at most N (the 1e-9 absorbs float error)."""
        return selection_size(self.keep_ratio, n_tokens)


def selection_size(keep_ratio: float, n_tokens: int) -> int:
    """``S = ⌊keep_ratio·N⌋`` clamped to ``[1, N]``; 1228 for 0.3 of 4096 as in the paper."""
    return max(1, min(n_tokens, int(keep_ratio * n_tokens + 1e-9)))


# ---------------------------------------------------------------------------------------------
# Signals


def prediction_tokens(pred: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """A model prediction ``[B, C, H, W]`` as per-token vectors ``[B, grid.n, C·p·q]``.

    ``H, W`` may equal the grid (UNet level 0: one latent pixel per token) or be ``p×q`` times
    it (DiT patches; odd latents are replicate-padded up to whole patches, ``p = ⌈H / h⌉``).
    A video prediction ``[B, C, T, H, W]`` gives ``[B, grid.n, C·pt·p·q]`` on the ``t × h × w``
    grid, frame-major (``pt = ⌈T / t⌉`` latent frames per token). A ``[B, N, C]`` tensor is
    returned unchanged.
    """
    if pred.dim() == 3:
        return pred
    if pred.dim() == 5:
        b, c, tt, hh, ww = pred.shape
        r, p, q = -(-tt // grid.t), -(-hh // grid.h), -(-ww // grid.w)
        if (tt, hh, ww) != (grid.t * r, grid.h * p, grid.w * q):
            pred = F.pad(pred, (0, grid.w * q - ww, 0, grid.h * p - hh, 0, grid.t * r - tt), mode="replicate")
        x = pred.reshape(b, c, grid.t, r, grid.h, p, grid.w, q).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, grid.n, c * r * p * q)
    b, c, hh, ww = pred.shape
    p, q = -(-hh // grid.h), -(-ww // grid.w)
    if (hh, ww) != (grid.h * p, grid.w * q):
        pred = F.pad(pred, (0, grid.w * q - ww, 0, grid.h * p - hh), mode="replicate")
    x = pred.reshape(b, c, grid.h, p, grid.w, q).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, grid.n, c * p * q)


def _driving_row(pred: torch.Tensor, row: int | None) -> torch.Tensor:
    """``[B, N, C]`` (or ``[N, C]``) → ``[N, C]`` fp32 of the row that drives the selection."""
    x = pred.float()
    if x.dim() == 2:
        return x
    if row is None:
        return x.mean(0)
    return x[row]


def noise_relative_magnitude(pred: torch.Tensor, reference: torch.Tensor, row: int | None = 0) -> torch.Tensor:
    """``g = ‖n_t − n_ref‖₂`` per token over channels, ``[N]`` fp32.

    ``pred``/``reference``: ``[B, N, C]`` or ``[N, C]``. ``row``: the batch row that drives the
    selection (official: the conditional row; the caller knows where it is); ``None`` uses the
    mean over rows. A 2-D tensor is taken as that row already.
    """
    return torch.linalg.vector_norm(_driving_row(pred, row) - _driving_row(reference, row), dim=-1)


def cluster_values(delta: torch.Tensor, labels: torch.Tensor, num_clusters: int,
                   adjacency: torch.Tensor | None = None) -> torch.Tensor:
    """Value of every cluster, ``[k]``: L2 norm of the per-channel max of ``Δ`` ``[N, C]``.

    With ``adjacency`` the pooled vectors are first smoothed once over the cluster graph
    (official: at the clustering step only), see :func:`.cluster.smooth_over_clusters`.
    """
    pooled = cluster_max_pool(delta.float(), labels, num_clusters)
    if adjacency is not None:
        pooled = smooth_over_clusters(pooled, adjacency)
    return torch.linalg.vector_norm(pooled, dim=-1)


def rank_clusters(values: torch.Tensor) -> torch.Tensor:
    """Position of every cluster in the ranking (0 = highest value), ``[k]`` long."""
    order = torch.argsort(values, descending=True, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position


def _by_change(g: torch.Tensor) -> torch.Tensor:
    """Token order by ``g`` descending, ties by index."""
    return torch.argsort(g, descending=True, stable=True)


def _by_staleness(freq: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Token order by ``f`` ascending (stalest first), ties by ``g`` descending, then index."""
    by_g = _by_change(g)
    return by_g[torch.argsort(freq[by_g], stable=True)]


def _positions(order: torch.Tensor) -> torch.Tensor:
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos


def _smallest(key: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the ``count`` smallest (unique) keys."""
    return torch.sort(torch.topk(key, count, largest=False, sorted=False).indices).values


# ---------------------------------------------------------------------------------------------
# Selections


def first_selection(g: torch.Tensor, labels: torch.Tensor, cluster_position: torch.Tensor,
                    n_select: int) -> torch.Tensor:
    """The first selection (clustering step), sorted ``[S]`` long.

    Walk the clusters from the highest-ranked down and take from each its
    ``min(⌊S/10⌋, |cluster|)`` tokens with the largest ``g`` until ``S`` are taken (the last
    cluster is cut to its best tokens). If the clusters run out first (fewer than ~10
    clusters), the rest are the largest-``g`` tokens not yet taken.

    ``g``: ``[N]`` noise relative magnitude; ``labels``: ``[N]`` cluster of each token;
    ``cluster_position``: ``[k]`` rank of each cluster (:func:`rank_clusters`).
    """
    n = g.numel()
    k = cluster_position.numel()
    quota = max(1, n_select // FIRST_QUOTA_DIV)
    by_g = _by_change(g)
    in_cluster = rank_within_groups(by_g, labels, k)
    # Unique sort key: cluster rank, then rank inside the cluster; the overflow goes last.
    key = cluster_position[labels] * n + in_cluster
    key = torch.where(in_cluster < quota, key, k * n + _positions(by_g))
    return _smallest(key, n_select)


def later_selection(g: torch.Tensor, freq: torch.Tensor, labels: torch.Tensor,
                    cluster_position: torch.Tensor, n_select: int,
                    cluster_share: float = 0.25) -> torch.Tensor:
    """A selection with distributional balance (every step after the first), sorted ``[S]``.

    *Cluster part*, ``⌊cluster_share·S⌋`` tokens: walk the clusters by rank; cluster at rank
    ``r`` has quota ``q = min(q₀·m_r, |cluster|)`` with ``q₀ = ⌊⌊S/5⌋·0.25⌋`` and
    ``m = 3, 2, 1, 1, …``; it gives its ``q`` largest-``g`` tokens, then the ``⌊q/2⌋`` stalest of
    its remaining tokens; stop when the budget is full (the last cluster is cut).
    *Staleness part*: the rest of ``S`` are the stalest tokens (lowest ``f``) not already taken.
    The result has exactly ``S`` unique tokens; that is the official "75 % stalest, union,
    pad with the next stalest" in one step (the union of the cluster part and the
    ``S − |cluster part|`` stalest others).

    Decisions where the official code was ambiguous or varied between its two versions: the
    stale extra of a cluster is drawn from tokens not already in its ``g`` part (so it adds
    ``⌊q/2⌋`` distinct tokens), and every cluster gets it, the top one included (compile
    version). ``freq``: ``[N]`` decayed selection frequency.
    """
    n = g.numel()
    k = cluster_position.numel()
    budget = int(cluster_share * n_select + 1e-9)
    big = (k + 1) * n
    if budget > 0:
        base_quota = max(1, int((n_select // LATER_QUOTA_DIV) * LATER_QUOTA_FRACTION))
        mult = torch.ones(k, dtype=torch.long, device=g.device)
        for r, m in enumerate(TOP_CLUSTER_MULTIPLIERS[:k]):
            mult[r] = m
        sizes = group_counts(labels, k)
        quota = torch.minimum(base_quota * mult[cluster_position], sizes)[labels]  # per token
        by_g = _by_change(g)
        rank_g = rank_within_groups(by_g, labels, k)
        in_g_part = rank_g < quota
        # Stale extra: rank by staleness among the cluster's tokens outside its g part.
        by_stale = _by_staleness(freq, g)
        rank_s = rank_within_groups(by_stale, labels * 2 + in_g_part.long(), 2 * k)
        in_s_part = ~in_g_part & (rank_s < quota // 2)
        inside = torch.where(in_g_part, rank_g, quota + rank_s)
        key = torch.where(in_g_part | in_s_part, cluster_position[labels] * n + inside, big)
        taken = torch.topk(key, budget, largest=False, sorted=False).indices
        cluster_part = torch.zeros(n, dtype=torch.bool, device=g.device)
        cluster_part[taken] = key[taken] < big  # the budget may exceed what the clusters offer
    else:
        cluster_part = torch.zeros(n, dtype=torch.bool, device=g.device)
    stale_rank = _positions(_by_staleness(freq, g))
    return _smallest(torch.where(cluster_part, -1, stale_rank), n_select)


def update_staleness(freq: torch.Tensor, selection: torch.Tensor, decay: float) -> torch.Tensor:
    """``f ← decay·f + 1[token in selection]`` (out of place), ``[N]`` fp32."""
    hit = torch.zeros_like(freq).index_fill_(0, selection, 1.0)
    return freq * decay + hit


def carry_selection(selection: torch.Tensor, grid: TokenGrid, n_keep: int,
                    freq: torch.Tensor | None = None) -> tuple[TokenGrid, torch.Tensor]:
    """Carry a selection one UNet level down (2×2 → 1, ceil for odd sizes, as the UNet's
    stride-2 convolutions do) keeping ``n_keep`` tokens there.

    A coarse token's *coverage* is the share of the fine tokens under it that are selected.
    The ``n_keep`` coarse tokens of highest coverage are kept; ties go to the stalest (lowest
    ``freq``, the same decayed selection frequency as on the fine grid) and then to the lower
    index. Keeping the keep ratio at every level is what makes the coarse levels cheaper at
    all: "any covered token selected" keeps about 3/4 of a 32×32 level and nearly all of a
    16×16 one for a 30 % selection of the 64×64 grid.

    Returns the coarse grid and the kept coarse tokens as sorted flat indices.
    """
    coarse = grid.halved()
    mask = torch.zeros(grid.n, device=selection.device).index_fill_(0, selection, 1.0).reshape(grid.h, grid.w)
    pad = (0, 2 * coarse.w - grid.w, 0, 2 * coarse.h - grid.h)
    chosen = F.pad(mask, pad).reshape(coarse.h, 2, coarse.w, 2).sum(dim=(1, 3))
    under = F.pad(torch.ones_like(mask), pad).reshape(coarse.h, 2, coarse.w, 2).sum(dim=(1, 3))
    coverage = (chosen / under).flatten()
    n_keep = max(0, min(int(n_keep), coarse.n))
    order = torch.arange(coarse.n, device=selection.device)
    if freq is not None:  # stable sorts, least significant key first: index, then staleness, then coverage
        order = order[torch.sort(freq[order], stable=True).indices]
    order = order[torch.sort(coverage[order], descending=True, stable=True).indices]
    return coarse, torch.sort(order[:n_keep]).values


# ---------------------------------------------------------------------------------------------
# Per-run state


class CATState:
    """Per-run CAT tensors: reference prediction, clusters, staleness and the current selection.

    One instance lives for one sampling run and one token grid (S is fixed by it). Typical use::

        state = CATState(grid, CATConfig())
        state.set_reference(pred_step6, row=cond_row)
        idx = state.first_selection(pred_step7, row=cond_row)   # used by step 8
        idx = state.next_selection(pred_step8, row=cond_row)    # used by step 9, …

    ``pred``: ``[B, N, C]`` per-token prediction (see :func:`prediction_tokens`) or ``[N, C]``.
    """

    def __init__(self, grid: TokenGrid, config: CATConfig | None = None):
        self.grid = grid
        self.config = config or CATConfig()
        problem = self.config.problem()
        if problem:
            raise ValueError(problem)
        self.n_select = self.config.selection_size(grid.n)
        self.num_clusters = max(1, min(self.config.num_clusters, grid.n))
        self.reference: torch.Tensor | None = None  # [N, C] fp32 (driving row)
        self.labels: torch.Tensor | None = None  # [N] long
        self.adjacency: torch.Tensor | None = None  # [k, k] bool
        self.freq: torch.Tensor | None = None  # [N] fp32 staleness frequency
        self.selection: torch.Tensor | None = None  # [S] long, sorted: the tokens the next step recomputes
        self.steps_selected = 0
        self.level_freq: dict[int, torch.Tensor] = {}  # coarser level (1 = one halving) -> its staleness

    @property
    def clustered(self) -> bool:
        return self.labels is not None

    def _check(self, pred: torch.Tensor) -> None:
        n = pred.shape[-2]
        if n != self.grid.n:
            dims = "x".join(str(d) for d in self.grid.dims)
            raise ValueError(f"CAT state made for a {dims} grid ({self.grid.n} tokens), got {n} tokens")

    def set_reference(self, pred: torch.Tensor, row: int | None = 0) -> None:
        """Store the reference prediction ``n_ref`` (official: step 6); g measures drift from it."""
        self._check(pred)
        self.reference = _driving_row(pred, row).clone()

    def first_selection(self, pred: torch.Tensor, row: int | None = 0) -> torch.Tensor:
        """Cluster (once per run), rank the smoothed clusters and make the first selection."""
        self._check(pred)
        if self.reference is None:
            raise RuntimeError("CAT: set_reference() must run before first_selection()")
        x = _driving_row(pred, row)
        generator = torch.Generator(device="cpu").manual_seed(int(self.config.seed))
        self.labels = spatial_clusters(x, self.grid, self.num_clusters, generator=generator,
                                       iters=self.config.kmeans_iters, feature_weight=self.config.feature_weight)
        self.adjacency = cluster_adjacency(self.labels, self.grid, self.num_clusters)
        delta = x - self.reference
        g = torch.linalg.vector_norm(delta, dim=-1)
        position = rank_clusters(cluster_values(delta, self.labels, self.num_clusters, self.adjacency))
        self.selection = first_selection(g, self.labels, position, self.n_select)
        self.freq = update_staleness(torch.zeros_like(g), self.selection, self.config.staleness_decay)
        self.steps_selected = 1
        return self.selection

    def next_selection(self, pred: torch.Tensor, row: int | None = 0) -> torch.Tensor:
        """Make the selection for the next step from this step's prediction.

        ``freq`` already counts every selection published so far (the one the current step
        used included), which is the official order of updates. Before any clustering this
        is :meth:`first_selection`.
        """
        if not self.clustered:
            return self.first_selection(pred, row)
        self._check(pred)
        delta = _driving_row(pred, row) - self.reference
        g = torch.linalg.vector_norm(delta, dim=-1)
        position = rank_clusters(cluster_values(delta, self.labels, self.num_clusters))
        self.selection = later_selection(g, self.freq, self.labels, position, self.n_select,
                                         self.config.cluster_share)
        self.freq = update_staleness(self.freq, self.selection, self.config.staleness_decay)
        self.steps_selected += 1
        return self.selection

    def coarser_selections(self, halvings: int) -> list[tuple[TokenGrid, torch.Tensor]]:
        """The current selection carried to ``halvings`` coarser UNet levels, one level from the
        next (:func:`carry_selection`), with the same keep ratio at each and a staleness per level.
        Call once per selection: it updates the per-level staleness."""
        if self.selection is None:
            raise RuntimeError("CAT: no selection to carry yet")
        out, selection, grid = [], self.selection, self.grid
        for level in range(1, halvings + 1):
            n_coarse = grid.halved().n
            freq = self.level_freq.get(level)
            if freq is None:
                freq = torch.zeros(n_coarse, device=selection.device)
            grid, selection = carry_selection(selection, grid, self.config.selection_size(n_coarse), freq)
            self.level_freq[level] = update_staleness(freq, selection, self.config.staleness_decay)
            out.append((grid, selection))
        return out


# ---------------------------------------------------------------------------------------------
# Helpers for pruned steps


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The selected tokens of every row: ``[B, N, ...]`` → ``[B, S, ...]`` (tokens on dim 1, as
    in ``[B, N, C]`` activations and ``[B, N, heads, dim]`` values)."""
    return x.index_select(1, idx)


def merge_tokens(fresh_selected: torch.Tensor, cached_full: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Full ``[B, N, ...]`` from the cache with the selected tokens (dim 1) replaced by fresh values.

    ``fresh_selected``: ``[B, S, ...]`` values computed this step for tokens ``idx`` ``[S]``;
    ``cached_full``: ``[B, N, ...]`` last values of every token. Out of place (the cache is not
    modified); the result has the cache's dtype.
    """
    return cached_full.index_copy(1, idx, fresh_selected.to(cached_full.dtype))


def token_mask(selection: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[N]`` bool: True at the selected tokens."""
    return torch.zeros(n_tokens, dtype=torch.bool, device=selection.device).index_fill_(0, selection, True)


def latent_mask(selection: torch.Tensor, grid: TokenGrid, h: int, w: int) -> torch.Tensor:
    """``[1, 1, h, w]`` bool: the latent positions covered by selected tokens of ``grid`` (a
    token covers a ``ceil(h / grid.h) x ceil(w / grid.w)`` patch; the last ones are cropped)."""
    m = token_mask(selection, grid.n).reshape(1, 1, grid.h, grid.w)
    p, q = -(-h // grid.h), -(-w // grid.w)
    m = m.repeat_interleave(p, dim=2).repeat_interleave(q, dim=3)
    return m[:, :, :h, :w]


def video_latent_mask(selection: torch.Tensor, grid: TokenGrid, t: int, h: int, w: int) -> torch.Tensor:
    """``[1, 1, t, h, w]`` bool: the video latent positions covered by selected tokens of the
    ``grid.t × grid.h × grid.w`` grid (each token covers ``⌈t/grid.t⌉ × ⌈h/grid.h⌉ × ⌈w/grid.w⌉``
    latent positions; the last ones are cropped)."""
    m = token_mask(selection, grid.n).reshape(1, 1, grid.t, grid.h, grid.w)
    r, p, q = -(-t // grid.t), -(-h // grid.h), -(-w // grid.w)
    m = m.repeat_interleave(r, dim=2).repeat_interleave(p, dim=3).repeat_interleave(q, dim=4)
    return m[:, :, :t, :h, :w]


def merge_prediction(new: torch.Tensor, previous: torch.Tensor, selection: torch.Tensor,
                     grid: TokenGrid) -> torch.Tensor:
    """Noise-space reuse on a latent-shaped prediction ``[B, C, H, W]`` (or ``[B, C, T, H, W]``
    on a video grid): the new prediction where a selected token of ``grid`` lies, the previous
    step's elsewhere."""
    if new.dim() == 5:
        mask = video_latent_mask(selection, grid, *new.shape[-3:])
    else:
        mask = latent_mask(selection, grid, new.shape[-2], new.shape[-1])
    return torch.where(mask, new, previous)
