"""SiTo — similarity-based token pruning (Zhang et al., AAAI 2025), as pure functions.

Per block call and per batch row (docs/algorithms.md §2.2):
1. score_i = β·SimScore_i + α·ε_i, SimScore_i = Σ_j cos(x_i, x_j), ε ~ N(0, 1);
2. base tokens = the per-window argmax of the score;
3. pruned tokens = the K = ⌊r·N⌋ non-base tokens most similar to their nearest base token;
4. the layer runs on the kept tokens only; pruned tokens receive their nearest base token's
   output (see :func:`selection.plan_by_similarity_to_base` for why base-only recovery).

``recovery`` chooses the stand-in of step 4: ``"base"`` (the paper), ``"kept"`` (the official
code: the most similar kept token, base or not), or ``"merge"``: base stand-ins, and each
base token enters the layer as the mean of itself and the tokens it stands in for (ToMe's
averaging on SiTo's selection; :class:`recovery.PrunePlan`). Copying a neighbour's output
costs a pruned token the whole distance between the two; the mean splits that distance
between the members of the group, which is why ToMe is the more faithful of the two at equal
ratio. The selection and the speed are SiTo's.

By default step 3 compares each token with the base tokens of the surrounding 3×3 windows
only (``search="local"``, :func:`selection.plan_by_local_similarity`); ``"global"`` compares
with all base tokens as the official code does, at the price of an N×(N/4) similarity.

Deviations from the official code, on purpose: fp32 scores; ``(h, w)`` grids of any shape;
SimScore in O(N·C) instead of an N×N matrix; noise from a seeded generator instead of the
global RNG, the same for the cond and uncond rows of a sample (``chunks``); the ratio is
validated instead of crashing past 1 − 1/(sx·sy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import TokenGrid
from .recovery import PrunePlan
from .selection import (chunk_draw, normalized, plan_by_local_similarity, plan_by_similarity_to_base, pruned_count,
                        select_base_tokens, similarity_score, stand_ins_from_kept, validate_prune_ratio)

SEARCHES = ("local", "global")
RECOVERIES = ("base", "kept", "merge")


@dataclass(frozen=True)
class SiToConfig:
    prune_ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    noise_alpha: float = 0.1
    sim_beta: float = 1.0
    search: str = "local"  # where pruned tokens look for their most similar base token
    recovery: str = "base"  # stand-in of a pruned token: its most similar base token, or kept token; or merge

    def problem(self) -> str | None:
        """A user-facing reason this configuration cannot run, or None."""
        return recovery_problem(self.search, self.recovery) or validate_prune_ratio(self.prune_ratio, self.sx, self.sy)


def recovery_problem(search: str, recovery: str) -> str | None:
    if search not in SEARCHES:
        return f"similarity search {search!r} must be one of {', '.join(SEARCHES)}"
    if recovery not in RECOVERIES:
        return f"recovery {recovery!r} must be one of {', '.join(RECOVERIES)}"
    return None


def sito_plan(x: torch.Tensor, grid: TokenGrid, cfg: SiToConfig,
              generator: torch.Generator | None = None, chunks: int = 1) -> PrunePlan | None:
    """Plan the pruning of ``x`` ``[B, N, C]`` (N = grid.n); None when nothing would be pruned.
    The noise is the same in each of the batch's ``chunks`` (CFG halves, :func:`selection.chunk_draw`)."""
    n_base = grid.window_count(cfg.sy, cfg.sx)
    k = pruned_count(cfg.prune_ratio, grid.n, n_base)
    if n_base == 0 or k == 0:
        return None
    xn = normalized(x)
    if cfg.sim_beta:
        score = similarity_score(xn)
        if cfg.sim_beta != 1.0:
            score = score * cfg.sim_beta
    else:  # sim_beta 0: base tokens by the noise alone (random per window, as ToMe's), no SimScore
        score = torch.zeros(xn.shape[:2], dtype=torch.float32, device=xn.device)
    if cfg.noise_alpha:
        score = score + cfg.noise_alpha * chunk_draw(torch.randn, score.shape[0], score.shape[1], generator,
                                                     score.device, chunks)
    base = select_base_tokens(score, grid, cfg.sy, cfg.sx)
    return recovery_plan(xn, base, grid, cfg.sy, cfg.sx, k, cfg.search, cfg.recovery)


def recovery_plan(xn, base, grid: TokenGrid, sy: int, sx: int, k: int, search: str, recovery: str) -> PrunePlan:
    """The plan for chosen base tokens (SiTo's and DaTo's shared second half): the ``k`` pruned
    tokens most similar to a base token, and whose output each copies (``recovery``)."""
    plan = plan_for_base(xn, base, grid, sy, sx, k, search)
    if recovery == "kept":
        plan = stand_ins_from_kept(xn, plan, grid, sy, sx, search)
    plan.merge = recovery == "merge"
    return plan


def plan_for_base(xn, base, grid: TokenGrid, sy: int, sx: int, k: int, search: str) -> PrunePlan:
    """Pruned tokens and stand-ins for given base tokens: all M base tokens ("global", as the
    official code) or those of the 3×3 surrounding windows ("local", O(N) — the default)."""
    if search == "global":
        return plan_by_similarity_to_base(xn, base, k)
    return plan_by_local_similarity(xn, base, grid, sy, sx, k)
