"""DaTo — dynamics-aware token pruning (Zhang et al., arXiv 2501.00375), as pure functions.

DaTo keeps SiTo's machinery (pruned tokens = non-base tokens most similar to their nearest
base token, recovered from it) and changes only how *base tokens* are chosen: the token of
each window whose prediction changed most between the two previous model evaluations,
score = γ·D + α·ε with D = mean over channels of |ε_t − ε_{t−1}| (docs/algorithms.md §3.3).
Feature caching (DeepCache-style shallow and reuse steps) is the schedule's job
(``schedule.py``) and ``nodes/hooks/dato_cache.py``'s; nothing here knows about it.

Deviations from the official code, on purpose:
- D comes from *this run's* two previous evaluations of the same cond/uncond chunk (the
  official global leaked the previous image's map into the next image's first step);
- the random sign flip of γ (official: with probability 0.5 per block call the *least*
  dynamic token becomes base) is off by default — the paper describes base tokens as the
  high-dynamics ones — and available as ``sign_flip=True`` for the official behaviour;
- scores are fp32 and grids are any ``h × w``; D is resized to each level's grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import TokenGrid, resize_token_map
from .recovery import PrunePlan
from .selection import (chunk_draw, normalized, pruned_count, random_base_tokens, select_base_tokens,
                        validate_prune_ratio)
from .sito import recovery_plan, recovery_problem


@dataclass(frozen=True)
class DaToConfig:
    prune_ratio: float = 0.4
    sx: int = 2
    sy: int = 2
    dynamics_weight: float = 1.0  # γ
    noise_alpha: float = 0.1  # α
    align_cfg: bool = False  # cond rows use the uncond rows' base tokens
    sign_flip: bool = False  # official random sign of γ per block call
    search: str = "local"  # base-token neighbourhood searched for stand-ins (see sito.plan_for_base)
    recovery: str = "base"  # whose output a pruned token copies (see sito.recovery_plan; official: "kept")

    def problem(self) -> str | None:
        return recovery_problem(self.search, self.recovery) or validate_prune_ratio(self.prune_ratio, self.sx, self.sy)


def dynamics_map(eps: torch.Tensor, prev_eps: torch.Tensor) -> torch.Tensor:
    """``D = mean_c |ε_t − ε_{t−1}|`` per latent position and row: ``[B, C, H, W]`` → ``[B, H·W]`` (fp32)."""
    d = (eps.float() - prev_eps.float()).abs().mean(dim=1)
    return d.reshape(d.shape[0], -1)


def align_rows(base: torch.Tensor, cond_or_uncond: list[int] | None) -> torch.Tensor:
    """Give the cond rows of a CFG batch the base tokens of the matching uncond rows.

    Rows are laid out chunk after chunk as ComfyUI batches them (``cond_or_uncond`` has one
    entry per chunk, 0 = cond, 1 = uncond). Only a call that holds one cond and one uncond
    chunk of equal size can be aligned; anything else is returned unchanged.
    """
    if not cond_or_uncond or sorted(cond_or_uncond) != [0, 1] or base.shape[0] % 2:
        return base
    half = base.shape[0] // 2
    c, u = (0, half) if cond_or_uncond[0] == 0 else (half, 0)
    out = base.clone()
    out[c:c + half] = base[u:u + half]
    return out


def dato_plan(x: torch.Tensor, grid: TokenGrid, cfg: DaToConfig, dynamics: torch.Tensor | None,
              dynamics_grid: TokenGrid | None, generator: torch.Generator | None,
              cond_or_uncond: list[int] | None = None) -> PrunePlan | None:
    """Plan the pruning of ``x`` ``[B, N, C]``. ``dynamics`` is ``[B, dynamics_grid.n]`` or None (no signal yet)."""
    n_base = grid.window_count(cfg.sy, cfg.sx)
    k = pruned_count(cfg.prune_ratio, grid.n, n_base)
    if n_base == 0 or k == 0:
        return None
    b = x.shape[0]
    gen_device = generator.device if generator is not None else x.device
    chunks = len(cond_or_uncond) if cond_or_uncond else 1  # CFG halves draw the same noise (chunk_draw)
    if dynamics is None or dynamics.shape[0] != b:
        # no usable signal yet (first evaluations of a run): random base per window, as official
        base = random_base_tokens(b, grid, cfg.sy, cfg.sx, generator, x.device, chunks)
    else:
        d = resize_token_map(dynamics.to(x.device), dynamics_grid, grid)
        gamma = cfg.dynamics_weight
        if cfg.sign_flip:  # the coin stays on the device: reading it back would stall a GPU per block call
            flip = torch.rand((), generator=generator, device=gen_device).to(x.device) < 0.5
            score = torch.where(flip, -gamma, gamma) * d
        else:
            score = gamma * d
        if cfg.noise_alpha:
            score = score + cfg.noise_alpha * chunk_draw(torch.randn, b, score.shape[1], generator, x.device, chunks)
        base = select_base_tokens(score, grid, cfg.sy, cfg.sx)
    if cfg.align_cfg:
        base = align_rows(base, cond_or_uncond)
    return recovery_plan(normalized(x), base, grid, cfg.sy, cfg.sx, k, cfg.search, cfg.recovery)
