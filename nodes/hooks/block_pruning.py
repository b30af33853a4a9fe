"""Token pruning inside UNet transformer blocks (SiTo, DaTo): attention patch pairs + FF object patches.

The attn1 input patch sees ``norm1(x)`` of every transformer block, asks the method's planner
for a :class:`PrunePlan` on eligible levels, and shortens the self-attention (and, when asked,
cross-attention and feed-forward) to the kept tokens. Every patch that shortens a sequence has
a partner that restores it (``PrunePlan.recover``) before ComfyUI adds the residual, so the
residual stream is never shortened and ComfyUI's own block code runs unchanged.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from ...pruning_core.geometry import TokenGrid, downsample_factor, grid_from_shapes
from ...pruning_core.recovery import PrunePlan
from .model_info import transformer_block_paths
from .patching import register
from .run import CHANGED_BEFORE, RunState, run_state


@dataclass(frozen=True)
class BlockCall:
    """What a planner may draw from in one block call, so that the cond and uncond passes of a
    sample are pruned alike (``pruning_core.selection.chunk_draw`` says why it matters):

    - ``generator`` is seeded from (run seed, step, block), so that the cond and the uncond
      call of a step draw the same numbers when ComfyUI runs them apart; it is made on first
      use, so a planner that draws nothing (DaTo at ratio 0, SiTo without noise) costs nothing;
    - ``chunks`` is the number of cond/uncond chunks stacked in this call's batch, whose rows
      the planner draws once and repeats when ComfyUI runs them together.
    """

    state: RunState
    device: torch.device
    chunks: int
    block: tuple  # ComfyUI's ("input" | "middle" | "output", index, transformer index)

    @cached_property
    def generator(self) -> torch.Generator:
        return self.state.keyed_generator(self.device, self.block)


Planner = Callable[[torch.Tensor, TokenGrid, RunState, BlockCall], "PrunePlan | None"]


def block_call(state: RunState, n: torch.Tensor, extra: dict) -> BlockCall:
    block = tuple(extra.get("block") or ()) + (extra.get("block_index", 0),)
    chunks = len(extra.get("cond_or_uncond") or ()) or 1
    return BlockCall(state, n.device, chunks if n.shape[0] % chunks == 0 else 1, block)


@dataclass(frozen=True)
class BlockPruning:
    """Which sub-layers of an eligible transformer block run on the kept tokens only."""

    self_attn: bool = True
    cross_attn: bool = False
    mlp: bool = False
    prune_kv: bool = True  # self-attention keys/values shortened too (SiTo); False = queries only (ToMe-like)
    max_downsample: int = 1  # eligible levels: downsample factor <= this


class _BlockPlans(threading.local):
    """Plans of the block being executed, per thread (multi-GPU runs cond batches in threads)."""

    block: PrunePlan | None = None
    attn1: PrunePlan | None = None
    attn2: PrunePlan | None = None


def grid_of_call(n_tokens: int, extra: dict) -> TokenGrid | None:
    """The token grid of a block call, or None when its token count fits no grid of the latent:
    a patch ahead of ours (ToMe, HyperTile, another pruning node) already changed the sequence."""
    try:
        return grid_from_shapes(n_tokens, extra.get("activations_shape"), extra.get("original_shape"))
    except ValueError:
        return None


def install_block_pruning(model, uid: str, how: BlockPruning, planner: Planner) -> None:
    """Register the attention patch pairs (and FF object patches) that prune tokens of ``uid``.

    ``planner(n, grid, state, call)`` sees ``norm1(x)`` of an eligible block and returns a plan
    or None; it draws its random numbers from ``call`` (:class:`BlockCall`). The residual stream
    is never shortened: every patch that shortens a sequence has a partner that restores it
    before ComfyUI adds the residual.
    """
    plans = _BlockPlans()

    def attn1_in(n, context, value, extra):
        plans.block = plans.attn1 = plans.attn2 = None
        state = run_state(extra, uid)
        if state is None or not state.active or state.pruning_off:
            return n, context, value
        grid = grid_of_call(n.shape[1], extra)
        if grid is None:
            state.skip(CHANGED_BEFORE)
            return n, context, value
        if downsample_factor(grid, extra.get("original_shape") or [grid.h, grid.w]) > how.max_downsample:
            return n, context, value
        plan = planner(n, grid, state, block_call(state, n, extra))
        if plan is None:
            return n, context, value
        plans.block = plan
        state.count(grid, plan.n_pruned)
        if state.step not in state.record.token_maps:
            state.record.add_map(state.step, grid, plan_codes(plan))
        if not how.self_attn:
            return n, context, value
        plans.attn1 = plan
        short = plan.prune(n)
        if how.prune_kv and context is n:
            # keys and values are the same tokens as the queries (self-attention)
            return short, short, (short if value is n else value)
        return short, context, value

    def attn1_out(n, extra):
        plan, plans.attn1 = plans.attn1, None
        if plan is None or n.shape[1] != plan.n_kept or n.shape[0] != plan.kept.shape[0]:
            return n
        return plan.recover(n)

    # tagged so that a later node of ours can tell whose input patch comes first
    register(model, "attn1", attn1_in).token_pruning_uid = uid
    register(model, "attn1_output", attn1_out)

    if how.cross_attn:
        def attn2_in(n, context, value, extra):
            plan = plans.block
            if plan is None or n.shape[1] != plan.n_tokens or n.shape[0] != plan.kept.shape[0]:
                return n, context, value
            plans.attn2 = plan
            return plan.prune(n), context, value  # queries only: keys/values are the text

        def attn2_out(n, extra):
            plan, plans.attn2 = plans.attn2, None
            if plan is None or n.shape[1] != plan.n_kept:
                return n
            return plan.recover(n)

        register(model, "attn2", attn2_in)
        register(model, "attn2_output", attn2_out)

    if how.mlp:
        # The feed-forward has no patch slot; wrap each eligible block's ``ff.forward``.
        for path in transformer_block_paths(model, how.max_downsample):
            name = f"diffusion_model.{path}.ff.forward"
            original = model.get_model_object(name)
            register(model, "object", _pruned_ff(original, plans), name)


def _pruned_ff(original, plans: _BlockPlans):
    def forward(x):
        plan = plans.block
        if plan is None or x.dim() != 3 or x.shape[1] != plan.n_tokens or x.shape[0] != plan.kept.shape[0]:
            return original(x)
        return plan.recover(original(plan.prune(x)))
    return forward


def plan_codes(plan: PrunePlan) -> torch.Tensor:
    """Row 0 of a plan as a token map: 0 kept, 1 base, 2 pruned."""
    codes = plan.pruned_mask()[0].to(torch.uint8) * 2  # arithmetic, not a boolean-mask write (a host sync)
    if plan.base is not None:
        codes.index_fill_(0, plan.base[0], 1)
    return codes
