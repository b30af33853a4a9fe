"""DaTo's step cache: which steps run the whole UNet, which only its outer blocks, which reuse
the previous prediction, and what DaTo keeps from step to step (:class:`DaToRun`).

The native UNet ``_forward`` keeps running on every step. We object-patch the ``forward`` of
every layer inside the deep input/middle/output blocks (an instance attribute, so weight keys,
and LoRA, are untouched). On a shallow step of depth d, a layer of a block whose depth rank is
>= d does no work: inner layers pass their input through and the block's last layer returns the
block output cached on the last full step. ComfyUI's own skip concatenations, ControlNet
``apply_control`` and other packs' block patches still run around them. A reuse step is
answered by a DIFFUSION_MODEL wrapper with the chunk's previous prediction, without entering
the UNet.

Where a step's kind is decided: the run's schedule (:attr:`DaToRun.schedule`, a preset or the
user's string resampled to the run's step count and clamped to the model's depth, built by the
node) says what the step should be; :func:`step_to_run` says what it can be (outside
start/end, or with nothing cached for this chunk yet, it is full); each cached layer then
compares its block's rank with the step's depth (:func:`_cached_layer`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...pruning_core import schedule as sched
from ...pruning_core.dato import dynamics_map
from ...pruning_core.geometry import TokenGrid
from ...pruning_core.schedule import Schedule, Step
from .calls import CallSlot, chunk_key, latent_of, transformer_options_of
from .model_info import unet_block_ranks
from .patching import add_wrapper, register, wrapper_kinds
from .run import RunState, run_state


@dataclass
class StepEntry:
    """The last computed model call of one chunk."""

    shape: tuple
    dtype: torch.dtype
    eps: torch.Tensor  # its prediction (what a reuse step returns)
    blocks: dict[str, torch.Tensor]  # deep block key -> its output on the last full step


@dataclass
class Dynamics:
    """The last prediction of one chunk and how much it moved since the one before (DaTo's D)."""

    eps: torch.Tensor
    grid: TokenGrid  # the prediction's own grid (the latent's)
    map: torch.Tensor | None = None  # [B, N] mean |eps_t - eps_{t-1}| per latent position


@dataclass
class DaToRun:
    """Everything DaTo keeps for one sampling run."""

    schedule: Schedule
    steps: dict[tuple, StepEntry] = field(default_factory=dict)  # chunk -> last computed call
    dynamics: dict[tuple, Dynamics] = field(default_factory=dict)  # chunk -> prediction dynamics
    uncond_chunk: tuple | None = None  # the chunk of the last uncond-only call (cond and uncond run apart)


@dataclass
class ModelCall:
    """The UNet call being executed: what the cached layers and the token planner read."""

    state: RunState
    chunk: tuple
    cond_or_uncond: list | None
    step: Step  # what this call runs: full, shallow at a depth
    blocks: dict[str, torch.Tensor]  # read on shallow steps, filled on full steps

    @property
    def stores(self) -> bool:
        return self.step.kind == sched.FULL


CALL: CallSlot[ModelCall] = CallSlot()


def step_to_run(state: RunState, entry: StepEntry | None, x: torch.Tensor, min_depth: int) -> Step:
    """What this call of the run can run: the schedule's step, unless the patch is inactive
    (full), or nothing fits in the cache yet (full: compute and fill it). A reuse step is
    answered from the cache by the caller; it falls back to the shallowest cached depth when only
    block outputs fit."""
    if not state.active:
        return Step.full()
    schedule = state.data.schedule
    step = schedule[min(state.step, len(schedule) - 1)]
    fits = entry is not None and entry.shape == tuple(x.shape) and entry.dtype == x.dtype
    if step.kind == sched.REUSE and fits and entry.eps is not None:
        return step
    if step.kind != sched.FULL and not (fits and entry.blocks):
        return Step.full()
    if step.kind == sched.REUSE:
        return Step.shallow(max(min_depth, 1))
    return step


def record_dynamics(run: DaToRun, chunk: tuple, eps) -> None:
    """Keep the chunk's new prediction and its change since the previous one."""
    if not isinstance(eps, torch.Tensor) or eps.dim() != 4:
        return
    prev = run.dynamics.get(chunk)
    entry = Dynamics(eps=eps, grid=TokenGrid(eps.shape[-2], eps.shape[-1]))
    if prev is not None and prev.eps.shape == eps.shape:
        # a reused step carries no new dynamics: keep the last map
        entry.map = prev.map if prev.eps is eps else dynamics_map(eps, prev.eps)
    run.dynamics[chunk] = entry


def current_dynamics(state: RunState, align: bool = False) -> tuple[torch.Tensor | None, TokenGrid | None, list | None]:
    """(dynamics map, its grid, cond_or_uncond) of the call being executed, for the token planner;
    Nones outside a call of this run or before a chunk has two predictions.

    ``align`` (DaTo's ``align_cfg``) when ComfyUI runs cond and uncond as separate calls: a cond
    call gets the uncond chunk's map, so that (with the planner's per-step draws, the same in
    both calls) the two passes choose the same base tokens, as ``align_rows`` makes them do
    within one call."""
    call = CALL.current
    if call is None or call.state is not state:
        return None, None, None
    run = state.data
    entry = run.dynamics.get(call.chunk)
    if align and call.cond_or_uncond == [0] and run.uncond_chunk is not None:
        other = run.dynamics.get(run.uncond_chunk)
        if other is not None and other.map is not None and entry is not None and entry.eps.shape == other.eps.shape:
            entry = other
    if entry is None or entry.map is None:
        return None, None, call.cond_or_uncond
    return entry.map, entry.grid, call.cond_or_uncond


def install_step_cache(model, uid: str, min_depth: int) -> None:
    """Run the steps of patch ``uid`` as its run's schedule says (``state.data``: a :class:`DaToRun`).

    ``min_depth`` is the smallest shallow depth the run can use: only blocks of rank >= it are
    patched and cached.
    """
    W = wrapper_kinds()

    def diffusion_wrapper(executor, *args, **kwargs):
        to = transformer_options_of(args, kwargs)
        state = run_state(to, uid)
        x = latent_of(args, kwargs)
        if state is None or x is None:
            return executor(*args, **kwargs)
        run: DaToRun = state.data
        chunk = chunk_key(to)
        if to.get("cond_or_uncond") == [1]:
            run.uncond_chunk = chunk
        entry = run.steps.get(chunk)
        step = step_to_run(state, entry, x, min_depth)
        state.record.step_kinds.setdefault(state.step, step.kind)
        if step.kind == sched.REUSE:
            return entry.eps
        call = ModelCall(state, chunk, to.get("cond_or_uncond"), step,
                         blocks=entry.blocks if step.kind == sched.SHALLOW else {})
        with CALL.entered(call):
            eps = executor(*args, **kwargs)
        run.steps[chunk] = StepEntry(tuple(x.shape), x.dtype, eps,
                                     call.blocks if call.stores else (entry.blocks if entry else {}))
        record_dynamics(run, chunk, eps)
        return eps

    add_wrapper(model, W.DIFFUSION_MODEL, uid, diffusion_wrapper)

    for block_key, rank, layers in unet_block_ranks(model):
        if rank < min_depth:
            continue
        for k, path in enumerate(layers):
            name = f"diffusion_model.{path}.forward"
            original = model.get_model_object(name)
            register(model, "object", _cached_layer(original, uid, block_key, rank, k == len(layers) - 1), name)


def _cached_layer(original, uid: str, block_key: str, rank: int, is_last: bool):
    """A layer of a deep block: computes on full steps (the block's last layer stores the block
    output), and on shallow steps of depth <= its rank passes through / returns the stored output."""
    def forward(*args, **kwargs):
        c = CALL.current
        mine = c is not None and c.state.uid == uid
        if not mine or c.step.kind == sched.FULL or rank < c.step.depth:
            out = original(*args, **kwargs)
            if is_last and mine and c.stores:
                c.blocks[block_key] = out.clone()  # ComfyUI adds ControlNet residuals to it in place
            return out
        if is_last:
            return c.blocks[block_key].clone()
        return args[0] if args else next(iter(kwargs.values()))
    return forward
