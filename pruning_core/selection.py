"""Token scoring and selection shared by SiTo and DaTo.

Vocabulary (SiTo, §2.2 of docs/algorithms.md):
- *base tokens*: one per ``sy × sx`` window of the grid, the window's highest-scoring token.
  They are never pruned and are the anchors pruned tokens are compared with.
- *pruned tokens*: the ``K`` non-base tokens most similar (cosine) to their nearest base
  token. They skip the layer and receive a stand-in's output.
- *kept tokens*: everything else; base tokens are kept.

All scores are fp32 whatever the model dtype (the official code summed 4096 cosines in fp16,
where the spacing above 1024 is ≥ 1 and its noise term vanished).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .geometry import TokenGrid, window_base_offsets, window_member_offsets
from .recovery import PrunePlan, plan_from_order


def max_prune_ratio(sx: int, sy: int) -> float:
    """Largest ratio that leaves room for one base token per window: ``1 − 1/(sx·sy)``."""
    return 1.0 - 1.0 / (sx * sy)


def validate_prune_ratio(ratio: float, sx: int, sy: int) -> str | None:
    """Return a user-facing reason why ``ratio`` cannot be used, or None if it is fine."""
    if sx < 1 or sy < 1:
        return f"window sx={sx}, sy={sy}: both sides must be at least 1"
    if sx * sy < 2 and ratio > 0:
        return f"window sx={sx}, sy={sy} holds a single token, so every token would be a base token and none can be pruned; use a window of at least 2 tokens"
    if not 0.0 <= ratio <= 1.0:
        return f"prune_ratio {ratio} must be between 0 and 1"
    cap = max_prune_ratio(sx, sy)
    if ratio > cap + 1e-9:
        return (f"prune_ratio {ratio:g} is too large for {sx}x{sy} windows: one token per window is a base "
                f"token and is never pruned, so at most 1 - 1/{sx * sy} = {cap:g} of the tokens can be pruned "
                f"(use a larger window or a smaller ratio)")
    return None


def pruned_count(ratio: float, n_tokens: int, n_base: int) -> int:
    """``K = ⌊r·N⌋``, never more than the non-base tokens (odd grids have fewer windows)."""
    # + 1e-6: 0.29·100 is 28.999… in floating point, and ⌊0.29·100⌋ is 29
    return max(0, min(int(ratio * n_tokens + 1e-6), n_tokens - n_base))


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def similarity_score(xn: torch.Tensor) -> torch.Tensor:
    """SiTo's SimScore, ``Σ_j cos(x_i, x_j)``, for unit rows ``xn`` ``[B, N, C]`` → ``[B, N]``.

    The sum over ``j`` commutes with the dot product: ``x̂_i · Σ_j x̂_j``. Linear in N — the
    official code built the N×N matrix, as expensive as the attention it meant to shrink.
    """
    return torch.bmm(xn, xn.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1)


def select_base_tokens(score: torch.Tensor, grid: TokenGrid, sy: int, sx: int) -> torch.Tensor:
    """Per window, the flat index of the highest-scoring token: ``[B, N]`` → ``[B, M]``."""
    b = score.shape[0]
    wy, wx = grid.windows(sy, sx)
    s = score.reshape(b, grid.h, grid.w)[:, : wy * sy, : wx * sx]
    s = s.reshape(b, wy, sy, wx, sx).permute(0, 1, 3, 2, 4).reshape(b, wy * wx, sy * sx)
    local = s.argmax(dim=-1)  # [B, M] member index inside the window
    return _member_tokens(local, grid, sy, sx)


def chunk_draw(draw, batch: int, size: int, generator: torch.Generator | None, device, chunks: int = 1,
               **kwargs) -> torch.Tensor:
    """``[batch, size]`` random numbers (``draw``: torch.rand, torch.randn or torch.randint with
    ``high=``) for a batch laid out as ``chunks`` equal chunks, the way ComfyUI stacks the cond and
    uncond halves of a CFG batch: the rows of one chunk are drawn and repeated for every chunk, so
    that sample i is pruned alike in the cond and the uncond pass. Pruned differently, the two
    passes' errors do not cancel in ``uncond + cfg·(cond − uncond)`` but are scaled by the CFG
    scale (on the reference model: random pruning at r = 0.5, 0.39 error per row, 0.24 shared;
    docs/benchmarks.md). ``chunks`` that do not divide the batch count as 1."""
    if chunks < 1 or batch % chunks:
        chunks = 1
    gen_device = generator.device if generator is not None else device
    rows = draw(size=(batch // chunks, size), generator=generator, device=gen_device, **kwargs).to(device)
    return rows if chunks == 1 else rows.repeat(chunks, 1)


def random_base_tokens(batch: int, grid: TokenGrid, sy: int, sx: int, generator: torch.Generator | None,
                       device, chunks: int = 1) -> torch.Tensor:
    """One uniformly random base token per window (ToMe-style anchors), ``[B, M]``, the same in
    every one of the batch's ``chunks`` (:func:`chunk_draw`)."""
    m = grid.window_count(sy, sx)
    local = chunk_draw(torch.randint, batch, m, generator, device, chunks, low=0, high=sy * sx)
    return _member_tokens(local, grid, sy, sx)


# Index tables that depend on the grid only are built once per (grid, window, device) and cached:
# a sampling run calls the planners with the same few grids in every block, and on a GPU each
# table would otherwise cost a handful of kernel launches per block call.

@lru_cache(maxsize=64)
def _window_members(grid: TokenGrid, sy: int, sx: int, device: torch.device) -> torch.Tensor:
    """``[M, P]``: flat token ids of every whole window's members, windows and members row-major."""
    return window_base_offsets(grid, sy, sx, device)[:, None] + window_member_offsets(grid, sy, sx, device)[None, :]


@lru_cache(maxsize=64)
def _home_windows(grid: TokenGrid, sy: int, sx: int, device: torch.device) -> torch.Tensor:
    """``[N]``: the window of every token; tokens of leftover border rows/columns belong to the nearest one."""
    wy, wx = grid.windows(sy, sx)
    rows = (torch.arange(grid.h, device=device) // sy).clamp(max=wy - 1)
    cols = (torch.arange(grid.w, device=device) // sx).clamp(max=wx - 1)
    return (rows[:, None] * wx + cols[None, :]).reshape(-1)


def _member_tokens(local: torch.Tensor, grid: TokenGrid, sy: int, sx: int) -> torch.Tensor:
    """``[B, M]`` member index inside each window → flat token ids (one gather from the cached table)."""
    members = _window_members(grid, sy, sx, local.device)
    return members.unsqueeze(0).expand(local.shape[0], -1, -1).gather(2, local.unsqueeze(-1)).squeeze(-1)


def plan_by_similarity_to_base(xn: torch.Tensor, base: torch.Tensor, n_pruned: int) -> PrunePlan:
    """Prune the ``n_pruned`` non-base tokens closest (cosine) to their nearest base token.

    Needs only the N×M similarity to base tokens (M ≈ N/4). The same matrix gives each
    pruned token its stand-in: the most similar base token. That is the paper's recovery
    ("copy from the most similar base token"); the released code searched all kept tokens,
    which costs another K×(N−K) similarity for a stand-in that is almost always a base
    token anyway at 2×2 windows. See docs/algorithms.md §2.2.
    """
    b, n, _ = xn.shape
    base_xn = xn.gather(1, base.unsqueeze(-1).expand(-1, -1, xn.shape[-1]))
    sim = torch.bmm(xn, base_xn.transpose(1, 2))  # [B, N, M]
    best, nearest = sim.max(dim=-1)
    best.scatter_(1, base, float("-inf"))  # base tokens are never pruned
    order = best.argsort(dim=1, descending=True)
    plan = plan_from_order(order, n_pruned, base.gather(1, nearest))
    plan.base = base
    return plan


def plan_random(batch: int, grid: TokenGrid, n_pruned: int, sy: int, sx: int,
                generator: torch.Generator | None, device, chunks: int = 1) -> PrunePlan:
    """Random pruning with no scoring at all: the cost-free baseline ("ceiling") of benchmarks.

    One random base token per window, ``n_pruned`` random non-base tokens pruned, each
    recovered from the base token of its own window (border tokens from the nearest window);
    the same draws in each of the batch's ``chunks`` (:func:`chunk_draw`).
    """
    base = random_base_tokens(batch, grid, sy, sx, generator, device, chunks)
    n = grid.n
    if base.shape[1] == 0:  # grid smaller than one window: no base token can stand in, prune nothing
        everything = torch.arange(n, device=device).expand(batch, -1)
        plan = plan_from_order(everything, 0, everything)
        plan.base = base
        return plan
    n_pruned = min(n_pruned, n - base.shape[1])  # base tokens are never pruned
    noise = chunk_draw(torch.rand, batch, n, generator, device, chunks)
    noise.scatter_(1, base, float("-inf"))
    order = noise.argsort(dim=1, descending=True)
    window_of = _home_windows(grid, sy, sx, torch.device(device))
    stand_in = base.gather(1, window_of.expand(batch, -1))
    plan = plan_from_order(order, n_pruned, stand_in)
    plan.base = base
    return plan


@dataclass(frozen=True)
class LocalLayout:
    """Index tables of :func:`plan_by_local_similarity` for one grid (cached by :func:`_local_layout`)."""

    members: torch.Tensor  # [M, P] flat token ids of each whole window's members
    neighbours: torch.Tensor  # [M, K] flat window ids of each window's K = (2r+1)² neighbourhood
    valid: torch.Tensor  # [M, K] False where a neighbour lies outside the grid (a clamped duplicate)
    invalid: torch.Tensor  # [M, 1, K] ~valid, shaped for masking a [B, M, P, K] similarity
    border: torch.Tensor  # [E] tokens of the leftover border rows/columns, increasing
    border_home: torch.Tensor  # [E] the window each belongs to (the nearest one)
    border_neighbours: torch.Tensor  # [E, K] neighbours[border_home]
    border_invalid: torch.Tensor  # [1, E, K] ~valid[border_home]


@lru_cache(maxsize=64)
def _local_layout(grid: TokenGrid, sy: int, sx: int, radius: int, device: torch.device) -> LocalLayout:
    """Index tables for :func:`plan_by_local_similarity` (depend on the grid only, so cached):
    flat token ids of each whole window's members, the flat window ids of each window's
    ``K = (2r+1)²`` neighbourhood (``valid`` False outside the grid), and the tokens of the
    leftover border rows/columns with the window they belong to (the nearest one).
    """
    wy, wx = grid.windows(sy, sx)
    members = _window_members(grid, sy, sx, device)
    span = torch.arange(-radius, radius + 1, device=device)
    ny = torch.arange(wy, device=device)[:, None, None, None] + span[None, None, :, None]
    nx = torch.arange(wx, device=device)[None, :, None, None] + span[None, None, None, :]
    ny, nx = torch.broadcast_tensors(ny, nx)
    valid = ((ny >= 0) & (ny < wy) & (nx >= 0) & (nx < wx)).reshape(wy * wx, -1)
    neighbours = (ny.clamp(0, wy - 1) * wx + nx.clamp(0, wx - 1)).reshape(wy * wx, -1)
    rows = torch.arange(grid.h, device=device)
    cols = torch.arange(grid.w, device=device)
    outside = ((rows[:, None] >= wy * sy) | (cols[None, :] >= wx * sx)).reshape(-1)
    # the border tokens in increasing order, as nonzero() gives them, but with a count known from
    # the grid: nonzero's data-dependent size would make a GPU wait for the host
    border = outside.to(torch.uint8).argsort(descending=True, stable=True)[: grid.n - wy * sy * wx * sx]
    border_home = _home_windows(grid, sy, sx, device)[border]
    return LocalLayout(members, neighbours, valid, (~valid)[:, None, :], border, border_home,
                       neighbours[border_home], (~valid)[border_home][None])


def plan_by_local_similarity(xn: torch.Tensor, base: torch.Tensor, grid: TokenGrid, sy: int, sx: int,
                             n_pruned: int, radius: int = 1) -> PrunePlan:
    """:func:`plan_by_similarity_to_base` restricted to the base tokens of nearby windows.

    Each token is compared with the base tokens of its own window and the ``(2r+1)² − 1``
    windows around it (9 at ``radius=1``) instead of all ``M ≈ N/4`` of them: ``O(N·9·C)``
    instead of ``O(N·M·C)``. At 4096 tokens the global N×M similarity costs as much as the
    ``Q·Kᵀ`` product of the pruned attention it feeds, which would eat most of the speedup on
    a CPU. A token's most similar base token is almost always a neighbour (the official code's
    stand-ins are dominated by the 2×2 window mates), which the benchmark's fidelity column
    checks against the global search.
    """
    b, n, c = xn.shape
    layout = _local_layout(grid, sy, sx, radius, xn.device)
    members, neighbours, border = layout.members, layout.neighbours, layout.border
    m, p = members.shape
    base_xn = xn.gather(1, base.unsqueeze(-1).expand(-1, -1, c))  # [B, M, C], window order
    # index_select, not advanced indexing: several times faster on CPU for these gathers
    cand = base_xn.index_select(1, neighbours.reshape(-1)).reshape(b, m, -1, c)  # [B, M, K, C]
    tokens = xn.index_select(1, members.reshape(-1)).reshape(b, m, p, c)  # [B, M, P, C]
    sim = torch.matmul(tokens, cand.transpose(-1, -2))  # [B, M, P, K]
    best_w, arg_w = sim.masked_fill_(layout.invalid, float("-inf")).max(dim=-1)  # [B, M, P]
    near_w = neighbours.unsqueeze(0).expand(b, -1, -1).gather(2, arg_w)  # [B, M, P] window ids
    best = torch.empty(b, n, dtype=sim.dtype, device=xn.device)
    nearest_window = torch.empty(b, n, dtype=torch.long, device=xn.device)
    flat = members.reshape(-1)
    best.index_copy_(1, flat, best_w.reshape(b, -1))
    nearest_window.index_copy_(1, flat, near_w.reshape(b, -1))
    if border.numel():
        nb = layout.border_neighbours  # [E, K]
        cand_e = base_xn.index_select(1, nb.reshape(-1)).reshape(b, border.numel(), -1, c)
        sim_e = (xn.index_select(1, border).unsqueeze(2) * cand_e).sum(-1)
        best_e, arg_e = sim_e.masked_fill_(layout.border_invalid, float("-inf")).max(dim=-1)
        best.index_copy_(1, border, best_e)
        nearest_window.index_copy_(1, border, nb.unsqueeze(0).expand(b, -1, -1).gather(2, arg_e.unsqueeze(-1))
                                   .squeeze(-1))
    best.scatter_(1, base, float("-inf"))  # base tokens are never pruned
    order = best.argsort(dim=1, descending=True)
    plan = plan_from_order(order, n_pruned, base.gather(1, nearest_window))
    plan.base = base
    return plan


@lru_cache(maxsize=64)
def _kept_candidate_layout(grid: TokenGrid, sy: int, sx: int, radius: int, device: torch.device):
    """Index tables for the local search of :func:`stand_ins_from_kept` (grid only, so cached).

    Returns ``(members [M, P], candidates [M, K·P], inside [M, K·P])``: each window's
    members, the tokens of its ``K = (2r+1)²`` neighbour windows, and whether that neighbour
    window lies inside the grid (outside ones are clamped duplicates and must not count).
    """
    layout = _local_layout(grid, sy, sx, radius, device)
    members, neighbours, valid = layout.members, layout.neighbours, layout.valid
    m, p = members.shape
    candidates = members[neighbours].reshape(m, -1)
    inside = valid[:, :, None].expand(-1, -1, p).reshape(m, -1)
    return members, candidates, inside


def stand_ins_from_kept(xn: torch.Tensor, plan: PrunePlan, grid: TokenGrid, sy: int, sx: int,
                        search: str = "local", radius: int = 1) -> PrunePlan:
    """Re-point every pruned token of ``plan`` at its most similar *kept* token (base or not).

    The official code's recovery: a pruned token copies the output of the kept token it is
    most similar to, not necessarily a base token. ``search="global"`` compares each pruned
    token with all ``N − K`` kept tokens (a K×(N−K) similarity); ``"local"`` with the kept
    members of the surrounding ``(2r+1)²`` windows only (O(N·C·(2r+1)²·sy·sx)). The pruned set
    does not change; border tokens outside whole windows keep their stand-in under "local".
    """
    b, n, c = xn.shape
    pruned = plan.pruned_mask()  # [B, N]
    position = torch.full((b, n), -1, dtype=torch.long, device=xn.device)
    position.scatter_(1, plan.kept, torch.arange(plan.n_kept, device=xn.device).expand(b, -1))
    source = plan.source.clone()
    if search == "global":
        k = plan.n_pruned
        pruned_ids = pruned.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]  # [B, K]
        q = xn.gather(1, pruned_ids.unsqueeze(-1).expand(-1, -1, c))
        sim = torch.bmm(q, plan.prune(xn).transpose(1, 2))  # [B, K, N-K]
        source.scatter_(1, pruned_ids, sim.argmax(dim=-1))
    else:
        members, cand_ids, inside = _kept_candidate_layout(grid, sy, sx, radius, xn.device)
        m, p = members.shape
        cand_ok = inside[None] & ~pruned[:, cand_ids]  # [B, M, K·P] kept tokens of the neighbour windows
        tokens = xn.index_select(1, members.reshape(-1)).reshape(b, m, p, c)
        cand = xn.index_select(1, cand_ids.reshape(-1)).reshape(b, m, -1, c)
        sim = torch.matmul(tokens, cand.transpose(-1, -2))  # [B, M, P, K·P]
        best = torch.where(cand_ok[:, :, None, :], sim, float("-inf")).argmax(dim=-1)  # [B, M, P]
        token = cand_ids[torch.arange(m, device=xn.device)[None, :, None], best].reshape(b, -1)
        flat = members.reshape(-1).expand(b, -1)
        new = position.gather(1, token)  # the own window's base is always a kept candidate
        source.scatter_(1, flat, torch.where(pruned.gather(1, flat), new, source.gather(1, flat)))
    out = PrunePlan(kept=plan.kept, source=source, n_tokens=plan.n_tokens)
    out.base = plan.base
    return out
