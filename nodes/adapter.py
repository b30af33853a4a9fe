"""The one module that touches ComfyUI internals.

Everything here goes through ComfyUI's public patch API — ``ModelPatcher.clone()``,
attention patch pairs (``attn1_patch``/``attn1_output_patch`` …), keyed wrappers from
``comfy.patcher_extension``, object patches and attachments. We never copy the UNet's
``_forward`` and never take the single-slot ``model_function_wrapper``, so other packs'
patches, ControlNet residuals and LoRA keep working around ours.

Lifecycle (the EasyCache pattern, see docs in README "How it hooks in"):
- the node stores only *configuration* (frozen dataclasses captured by closures), so it
  does not matter whether ``clone()`` deep-copies ``model_options`` (ComfyUI 0.3.x) or
  shares them (0.38.x);
- an OUTER_SAMPLE wrapper creates a fresh :class:`RunState` for each sampling run, puts it in
  this run's ``transformer_options[RUN_KEY][uid]`` and drops it afterwards — a hires pass, a
  second queue or an interrupted run never sees a previous run's tensors;
- the sampler's per-step callback counts finished steps (so Heun-type samplers, which call
  the model twice per step, stay aligned to steps), and a CALC_COND_BATCH wrapper decides once
  per step whether the patch is inside ``start_percent``/``end_percent`` (one host sync per
  step, none per block call).

Imports of ``comfy`` happen inside functions: importing the pack must stay cheap and must
never break ComfyUI start-up.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..pruning_core.geometry import TokenGrid, downsample_factor, grid_from_shapes
from ..pruning_core.recovery import PrunePlan

log = logging.getLogger("token_pruning_cache")

RUN_KEY = "token_pruning_cache"  # transformer_options key holding {uid: RunState} during a run
ATTACHMENT_KEY = "token_pruning_cache"  # ModelPatcher attachment: list of (uid, method) on this model
WRAPPER_PREFIX = "token_pruning_cache"
DISPLAY_NAMES = {"sito": "SiTo Token Pruning", "dato": "DaTo Prune + Cache", "cat": "CAT Pruning"}
# Why a block call was left unpruned when another patch shortens the token sequence: one ahead of
# ours in the attn1 patch list, or one after ours (its output patch runs before our recovery).
CHANGED_BEFORE = "another patch had already changed their token sequence (put this node first in the chain)"
PATCH_AFTER = ("another pack's self-attention patch (e.g. ToMe, HyperTile) comes after this node; "
               "apply this node after it in the graph")

# Decisions recorded during the most recent runs, for the preview node. Bounded, and holds
# only small CPU tensors; it is never read by sampling itself.
_RECORDS: "OrderedDict[str, RunRecord]" = OrderedDict()
_RECORDS_MAX = 16


def _eager(fn):
    """Keep one of our patch functions out of ``torch.compile`` graphs (TorchCompileModel).

    Our input patches hand their plan to the output partner through thread-local objects.
    Dynamo does not replay such writes inside a compiled region, so the partner would read a
    stale plan. Running the patch functions eagerly (a graph break around each) keeps them
    right, and the model's own layers still compile. Feature-detected: torch without
    ``torch.compiler.disable`` cannot compile ComfyUI models anyway.
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return fn if disable is None else disable(fn)


_ATTENTION_SLOTS = {
    "attn1": "set_model_attn1_patch", "attn1_output": "set_model_attn1_output_patch",
    "attn2": "set_model_attn2_patch", "attn2_output": "set_model_attn2_output_patch",
}


def _register(model, slot: str, fn, *where):
    """Hand one of our functions to ComfyUI; every registration of this adapter goes through
    here so that none of them misses :func:`_eager`.

    ``slot``: an attention slot (``attn1``, ``attn1_output``, ``attn2``, ``attn2_output``),
    ``"object"`` (``where`` = the attribute path of an object patch) or ``"dit"`` (``where`` =
    block kind and index of a DiT block-replace patch). Returns the registered function.
    """
    fn = _eager(fn)
    if slot == "object":
        model.add_object_patch(where[0], fn)
    elif slot == "dit":
        model.set_model_patch_replace(fn, "dit", *where)
    else:
        getattr(model, _ATTENTION_SLOTS[slot])(fn)
    return fn


# --------------------------------------------------------------------------------------
# Per-run state
# --------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """What a run decided, kept at the highest-resolution level for the preview node."""

    method: str
    total_steps: int
    token_maps: dict = field(default_factory=dict)  # step -> (h, w, uint8 map) 0 kept 1 base 2 pruned / 0 recomputed 2 cached
    step_kinds: dict = field(default_factory=dict)  # step -> "full" | "shallow" | "reuse" | "pruned"
    max_maps: int = 64

    def add_map(self, step: int, grid: TokenGrid, codes: torch.Tensor) -> None:
        if step in self.token_maps or len(self.token_maps) >= self.max_maps:
            return
        self.token_maps[step] = (grid.h, grid.w, codes.detach().to("cpu", torch.uint8).reshape(grid.h, grid.w))


class RunState:
    """Everything that lives for exactly one sampling run of one patch."""

    def __init__(self, uid: str, method: str, sample_sigmas: list[float], start_sigma: float, end_sigma: float,
                 seed: int):
        self.uid = uid
        self.method = method
        self.sample_sigmas = sample_sigmas
        self.total_steps = max(len(sample_sigmas) - 1, 0)
        self.start_sigma = start_sigma
        self.end_sigma = end_sigma
        self.seed = seed
        self.step = 0  # index of the sampler step the next model call belongs to
        self.callbacks_seen = 0
        self.sigma: float | None = None
        self.active = True
        self.active_steps: set[int] = set()
        self.level_stats: dict[tuple[int, int], list[int]] = {}  # (h, w) -> [calls, pruned, tokens]
        self.record = RunRecord(method=method, total_steps=self.total_steps)
        self.extra: dict = {}  # method-specific per-run state (caches, dynamics maps, ...)
        self.skipped: dict[str, int] = {}  # reason -> block calls left alone (one warning per run)
        self.pruning_off = False  # token pruning disabled for this run (incompatible patch order)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._lock = threading.Lock()

    def generator(self, device: torch.device) -> torch.Generator:
        """A seeded generator per device; re-created for every run, so runs are reproducible."""
        g = self._generators.get(device)
        if g is None:
            with self._lock:
                g = self._generators.get(device)
                if g is None:
                    g = torch.Generator(device=device)
                    g.manual_seed(self.seed)
                    self._generators[device] = g
        return g

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def begin_step_call(self, sigma: float) -> None:
        self.sigma = sigma
        self.active = self.end_sigma <= sigma <= self.start_sigma

    def step_finished(self, i: int) -> None:
        self.callbacks_seen += 1
        self.step = i + 1

    def count(self, grid: TokenGrid, pruned: int) -> None:
        s = self.level_stats.setdefault((grid.h, grid.w), [0, 0, 0])
        s[0] += 1
        s[1] += pruned
        s[2] += grid.n
        self.active_steps.add(self.step)

    def summary_levels(self, unit: str = "block calls") -> str:
        if not self.level_stats:
            return "no tokens pruned"
        parts = []
        for (h, w), (calls, pruned, tokens) in sorted(self.level_stats.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            parts.append(f"{h}x{w}: {pruned // max(calls, 1)}/{tokens // max(calls, 1)} tokens pruned in {calls} {unit}")
        return "; ".join(parts)


def run_state(transformer_options: dict, uid: str) -> RunState | None:
    runs = transformer_options.get(RUN_KEY)
    if runs is None:
        return None
    return runs.get(uid)


def last_records(model) -> list[tuple[str, RunRecord]]:
    """The records of the last run of every patch of ours on ``model`` (newest last)."""
    out = []
    for uid, method in (model.get_attachment(ATTACHMENT_KEY) or []):
        rec = _RECORDS.get(uid)
        if rec is not None:
            out.append((method, rec))
    return out


def _store_record(uid: str, record: RunRecord) -> None:
    _RECORDS[uid] = record
    _RECORDS.move_to_end(uid)
    while len(_RECORDS) > _RECORDS_MAX:
        _RECORDS.popitem(last=False)


# --------------------------------------------------------------------------------------
# Model inspection (feature detection, never version parsing)
# --------------------------------------------------------------------------------------

def diffusion_model(model):
    return model.get_model_object("diffusion_model")


def attention_levels(model) -> list[int]:
    """Downsample factors of the UNet levels that hold transformer blocks (SD1.5: 1,2,4; SDXL: 2,4).

    Empty when the model is not a UNet with ``input_blocks`` (a DiT, or something unknown).
    """
    dm = diffusion_model(model)
    blocks = getattr(dm, "input_blocks", None)
    if blocks is None:
        return []
    levels, factor = set(), 1
    for block in blocks:
        for layer in block:
            name = type(layer).__name__
            if "SpatialTransformer" in name or "SpatialVideoTransformer" in name:
                levels.add(factor)
            if name == "Downsample":
                factor *= 2
    return sorted(levels)


def transformer_block_paths(model, max_downsample: int | None = None) -> list[str]:
    """Dotted paths (under ``diffusion_model``) of UNet BasicTransformerBlocks at eligible levels."""
    dm = diffusion_model(model)
    paths: list[str] = []

    def visit(prefix: str, module, factor: int) -> None:
        if max_downsample is not None and factor > max_downsample:
            return
        for name, sub in module.named_modules():
            if type(sub).__name__ == "BasicTransformerBlock":
                paths.append(f"{prefix}.{name}" if name else prefix)

    factor = 1
    for i, block in enumerate(getattr(dm, "input_blocks", [])):
        visit(f"input_blocks.{i}", block, factor)
        if any(type(layer).__name__ == "Downsample" for layer in block):
            factor *= 2
    if getattr(dm, "middle_block", None) is not None:
        visit("middle_block", dm.middle_block, factor)
    for i, block in enumerate(getattr(dm, "output_blocks", [])):
        visit(f"output_blocks.{i}", block, factor)
        if any(type(layer).__name__ == "Upsample" for layer in block):
            factor //= 2
    return paths


def model_class_name(model) -> str:
    try:
        return type(diffusion_model(model)).__name__
    except Exception:  # noqa: BLE001 - only used for messages
        return type(getattr(model, "model", model)).__name__


# --------------------------------------------------------------------------------------
# Run lifecycle: OUTER_SAMPLE + CALC_COND_BATCH wrappers
# --------------------------------------------------------------------------------------

def _wrappers():
    import comfy.patcher_extension as pe
    return pe.WrappersMP


def _sigma_of(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])  # one host sync per sampler step
    return float(timestep)


def install_run_lifecycle(model, uid: str, method: str, start_percent: float, end_percent: float, seed: int,
                          summary: Callable[[RunState], str], on_start: Callable[[RunState, object], None] | None = None,
                          on_end: Callable[[RunState], None] | None = None) -> None:
    """Give the patch ``uid`` a fresh :class:`RunState` for every sampling run of ``model``."""
    import comfy.model_patcher

    W = _wrappers()

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        sampling = guider.model_patcher.get_model_object("model_sampling")
        state = RunState(uid, method, [float(s) for s in sigmas.reshape(-1).cpu()],
                         start_sigma=float(sampling.percent_to_sigma(start_percent)),
                         end_sigma=float(sampling.percent_to_sigma(end_percent)), seed=seed)
        to = guider.model_options.setdefault("transformer_options", {})
        # Another pack's attn1 patch pair registered after ours would see our shortened
        # sequence and its output patch would run before our recovery: prune nothing then.
        attn1 = (to.get("patches") or {}).get("attn1_patch", [])
        mine = [i for i, p in enumerate(attn1) if getattr(p, "token_pruning_uid", None) == uid]
        foreign_after = bool(mine) and any(getattr(p, "token_pruning_uid", None) is None for p in attn1[mine[0] + 1:])
        runs = dict(to.get(RUN_KEY, {}))
        runs[uid] = state
        to[RUN_KEY] = runs
        if foreign_after:
            state.pruning_off = True
            state.skip(PATCH_AFTER)
        if on_start is not None:
            on_start(state, guider)

        user_callback = args[5] if len(args) > 5 else kwargs.get("callback")

        def step_callback(i, *rest):
            state.step_finished(int(i))
            if user_callback is not None:
                return user_callback(i, *rest)

        if len(args) > 5:
            args = args[:5] + (step_callback,) + args[6:]
        else:
            kwargs["callback"] = step_callback
        finished = False
        try:
            out = executor(*args, **kwargs)
            finished = True
            return out
        finally:
            guider.model_options = original_options
            if on_end is not None:
                on_end(state)
            _store_record(uid, state.record)
            if finished:
                log.info(summary(state))
                if state.skipped:
                    log.warning("%s: %s", DISPLAY_NAMES.get(method, method),
                                "; ".join(f"{n} calls left unpruned because {why}" for why, n in state.skipped.items()))
            state.extra.clear()

    def calc_cond_batch(executor, *args, **kwargs):
        model_options = args[4] if len(args) > 4 else kwargs["model_options"]
        timestep = args[3] if len(args) > 3 else kwargs["timestep"]
        state = run_state(model_options.get("transformer_options", {}), uid)
        if state is not None:
            state.begin_step_call(_sigma_of(timestep))
        return executor(*args, **kwargs)

    key = f"{WRAPPER_PREFIX}.{uid}"
    model.add_wrapper_with_key(W.OUTER_SAMPLE, key, outer_sample)
    model.add_wrapper_with_key(W.CALC_COND_BATCH, key, calc_cond_batch)
    attached = list(model.get_attachment(ATTACHMENT_KEY) or [])
    model.set_attachments(ATTACHMENT_KEY, attached + [(uid, method)])


def new_uid(method: str) -> str:
    return f"{method}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------
# Token pruning inside UNet transformer blocks: attention patch pairs + FF object patches
# --------------------------------------------------------------------------------------

Planner = Callable[[torch.Tensor, TokenGrid, RunState], "PrunePlan | None"]


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
    kv: torch.Tensor | None = None  # CAT: the K/V input our attn1 patch handed to this block's self-attention


def _grid_of_call(n_tokens: int, extra: dict) -> TokenGrid | None:
    """The token grid of a block call, or None when its token count fits no grid of the latent:
    a patch ahead of ours (ToMe, HyperTile, another pruning node) already changed the sequence."""
    try:
        return grid_from_shapes(n_tokens, extra.get("activations_shape"), extra.get("original_shape"))
    except ValueError:
        return None


def install_block_pruning(model, uid: str, how: BlockPruning, planner: Planner, record_kind: str = "sito") -> None:
    """Register the attention patch pairs (and FF object patches) that prune tokens of ``uid``.

    ``planner(n, grid, state)`` sees ``norm1(x)`` of an eligible block and returns a plan or
    None. The residual stream is never shortened: every patch that shortens a sequence has a
    partner that restores it before ComfyUI adds the residual.
    """
    plans = _BlockPlans()

    def attn1_in(n, context, value, extra):
        plans.block = plans.attn1 = plans.attn2 = None
        state = run_state(extra, uid)
        if state is None or not state.active or state.pruning_off:
            return n, context, value
        grid = _grid_of_call(n.shape[1], extra)
        if grid is None:
            state.skip(CHANGED_BEFORE)
            return n, context, value
        if downsample_factor(grid, extra.get("original_shape") or [grid.h, grid.w]) > how.max_downsample:
            return n, context, value
        plan = planner(n, grid, state)
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
    _register(model, "attn1", attn1_in).token_pruning_uid = uid
    _register(model, "attn1_output", attn1_out)

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

        _register(model, "attn2", attn2_in)
        _register(model, "attn2_output", attn2_out)

    if how.mlp:
        # The feed-forward has no patch slot; wrap each eligible block's ``ff.forward``.
        for path in transformer_block_paths(model, how.max_downsample):
            name = f"diffusion_model.{path}.ff.forward"
            original = model.get_model_object(name)
            _register(model, "object", _pruned_ff(original, plans), name)


def _pruned_ff(original, plans: _BlockPlans):
    def forward(x):
        plan = plans.block
        if plan is None or x.dim() != 3 or x.shape[1] != plan.n_tokens or x.shape[0] != plan.kept.shape[0]:
            return original(x)
        return plan.recover(original(plan.prune(x)))
    return forward


def plan_codes(plan: PrunePlan) -> torch.Tensor:
    """Row 0 of a plan as a token map: 0 kept, 1 base, 2 pruned."""
    codes = torch.zeros(plan.n_tokens, dtype=torch.uint8, device=plan.kept.device)
    codes[plan.pruned_mask()[0]] = 2
    if plan.base is not None:
        codes[plan.base[0]] = 1
    return codes


# --------------------------------------------------------------------------------------
# Validation helpers shared by nodes
# --------------------------------------------------------------------------------------

def resolve_max_downsample(model, choice: str) -> tuple[int | None, str | None]:
    """Map the ``max_downsample`` combo to a factor; (None, warning) when the model has no UNet attention."""
    levels = attention_levels(model)
    if not levels:
        return None, (f"{model_class_name(model)} has no UNet transformer blocks (input_blocks with "
                      f"SpatialTransformer); supported are SD1.x, SD2.x and SDXL UNets")
    if choice == "auto":
        return levels[0], None
    factor = int(choice)
    if factor < levels[0]:
        return factor, (f"max_downsample={factor} selects no attention level of {model_class_name(model)}: its "
                        f"highest-resolution attention is at downsample {levels[0]} (use 'auto')")
    return factor, None


# --------------------------------------------------------------------------------------
# Feature caching across steps (DeepCache-style shallow steps, whole-step reuse)
# --------------------------------------------------------------------------------------
#
# The native UNet ``_forward`` keeps running on every step. We object-patch the ``forward``
# of every layer inside the deep input/middle/output blocks (an instance attribute, so
# weight keys — and LoRA — are untouched). On a shallow step of depth d, a layer of a block
# whose depth rank is >= d does no work: inner layers pass their input through and the
# block's last layer returns the block output cached on the last full step. ComfyUI's own
# skip concatenations, ControlNet ``apply_control`` and other packs' block patches still run
# around them. A reuse step is answered by a DIFFUSION_MODEL wrapper with the chunk's
# previous prediction, without entering the UNet.

FULL, SHALLOW, REUSE = "full", "shallow", "reuse"


class _CallContext(threading.local):
    """The model call being executed on this thread (set by the DIFFUSION_MODEL wrapper)."""

    state: RunState | None = None
    chunk: tuple | None = None
    cond_or_uncond: list | None = None
    kind: str = FULL
    depth: int = 0
    store: bool = False
    blocks: dict | None = None  # block key -> cached output (read on shallow steps, filled on full steps)


_CALL = _CallContext()


def current_call() -> _CallContext:
    return _CALL


def unet_block_ranks(model) -> list[tuple[str, int, list[str]]]:
    """(block key, depth rank, layer paths) for every UNet block a shallow step may skip.

    Input block i has rank i, output block j has rank L−1−j, the middle block ranks deepest.
    A shallow step of depth d runs blocks of rank < d and reuses the others.
    """
    dm = diffusion_model(model)
    ins, outs = list(getattr(dm, "input_blocks", [])), list(getattr(dm, "output_blocks", []))
    blocks = []
    for i, block in enumerate(ins):
        blocks.append((f"input_blocks.{i}", i, [f"input_blocks.{i}.{k}" for k in range(len(block))]))
    mid = getattr(dm, "middle_block", None)
    if mid is not None:
        blocks.append(("middle_block", 1 << 16, [f"middle_block.{k}" for k in range(len(mid))]))
    for j, block in enumerate(outs):
        blocks.append((f"output_blocks.{j}", len(outs) - 1 - j, [f"output_blocks.{j}.{k}" for k in range(len(block))]))
    return blocks


def max_cache_depth(model) -> int:
    dm = diffusion_model(model)
    return max(len(getattr(dm, "input_blocks", [])) - 1, 0)


def _chunk_key(transformer_options: dict) -> tuple:
    uuids = transformer_options.get("uuids")
    if uuids:
        return tuple(str(u) for u in uuids)
    return tuple(transformer_options.get("cond_or_uncond") or ())


def _transformer_options(args, kwargs) -> dict:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict):
            return a
    return {}


def _first_tensor(x):
    # newer ComfyUI may pass a list of tensors (audio+video models); we only cache plain tensors
    return x if isinstance(x, torch.Tensor) else None


def install_step_cache(model, uid: str, step_kind: Callable[[RunState], tuple[str, int]], min_depth: int,
                       after_call: Callable[[RunState, tuple, torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Skip work on shallow/reuse steps of patch ``uid``.

    ``step_kind(state)`` says what the current step is: (FULL, 0), (SHALLOW, d) or (REUSE, 0).
    ``min_depth`` is the smallest shallow depth the run can use: only blocks of rank >= it are
    patched and cached. ``after_call(state, chunk, x, eps)`` sees every evaluated prediction.
    """
    W = _wrappers()

    def diffusion_wrapper(executor, *args, **kwargs):
        to = _transformer_options(args, kwargs)
        state = run_state(to, uid)
        x = _first_tensor(args[0] if args else kwargs.get("x"))
        if state is None or x is None:
            return executor(*args, **kwargs)
        chunk = _chunk_key(to)
        caches = state.extra.setdefault("step_cache", {})
        entry = caches.get(chunk)
        kind, depth = step_kind(state) if state.active else (FULL, 0)
        fits = entry is not None and entry["shape"] == tuple(x.shape) and entry["dtype"] == x.dtype
        if kind == REUSE and fits and entry.get("eps") is not None:
            state.record.step_kinds.setdefault(state.step, REUSE)
            return entry["eps"]
        if kind != FULL and not (fits and entry.get("blocks")):
            kind, depth = FULL, 0  # nothing cached for this chunk/shape yet: compute it
        if kind == REUSE:
            kind, depth = SHALLOW, max(min_depth, 1)
        state.record.step_kinds.setdefault(state.step, kind)
        blocks = entry["blocks"] if (kind == SHALLOW) else {}
        prev = (_CALL.state, _CALL.chunk, _CALL.cond_or_uncond, _CALL.kind, _CALL.depth, _CALL.store)
        _CALL.state, _CALL.chunk, _CALL.cond_or_uncond = state, chunk, to.get("cond_or_uncond")
        _CALL.kind, _CALL.depth, _CALL.store = kind, depth, kind == FULL
        _CALL.blocks = blocks
        try:
            eps = executor(*args, **kwargs)
        finally:
            stored = _CALL.blocks
            _CALL.state, _CALL.chunk, _CALL.cond_or_uncond, _CALL.kind, _CALL.depth, _CALL.store = prev
            _CALL.blocks = {}
        new_entry = {"shape": tuple(x.shape), "dtype": x.dtype, "eps": eps,
                     "blocks": stored if kind == FULL else (entry["blocks"] if entry else {})}
        caches[chunk] = new_entry
        if after_call is not None:
            after_call(state, chunk, x, eps)
        return eps

    model.add_wrapper_with_key(W.DIFFUSION_MODEL, f"{WRAPPER_PREFIX}.{uid}", diffusion_wrapper)

    for block_key, rank, layers in unet_block_ranks(model):
        if rank < min_depth:
            continue
        for k, path in enumerate(layers):
            name = f"diffusion_model.{path}.forward"
            original = model.get_model_object(name)
            _register(model, "object", _cached_layer(original, uid, block_key, rank, k == len(layers) - 1), name)


def _cached_layer(original, uid: str, block_key: str, rank: int, is_last: bool):
    def forward(*args, **kwargs):
        c = _CALL
        if c.state is None or c.state.uid != uid or c.kind == FULL or rank < c.depth:
            out = original(*args, **kwargs)
            if is_last and c.store and c.state is not None and c.state.uid == uid:
                c.blocks[block_key] = out.clone()  # ComfyUI adds ControlNet residuals to it in place
            return out
        if is_last:
            return c.blocks[block_key].clone()
        return args[0] if args else next(iter(kwargs.values()))
    return forward


# --------------------------------------------------------------------------------------
# CAT Pruning: one token selection per step, recomputed tokens vs cached ones
# --------------------------------------------------------------------------------------
#
# An APPLY_MODEL wrapper (the one hook every model family fires, in every ComfyUI version;
# SD3 has no DIFFUSION_MODEL wrapper in 0.3.x) publishes the step's selection to the blocks,
# replaces the prediction of unselected tokens with the previous step's (noise-space reuse,
# done on the denoised estimate that APPLY_MODEL returns), and makes the next selection from
# the cond rows. Inside the model:
# - UNet transformer blocks of the highest-resolution attention level: attention and FF run
#   on the selected tokens only; self-attention keys/values are the fresh selected tokens
#   merged into the block's cached ``norm1`` input (the official K/V cache, kept before the
#   projection), and unselected tokens get their cached attention / FF outputs;
# - DiT blocks (SD3 MMDiT joint blocks, Flux double and single blocks), through ``dit``
#   block-replace patches: the block runs on the selected image tokens (and their RoPE rows
#   on Flux); unselected tokens get the block's cached residual update.

CAT_FULL, CAT_REFERENCE, CAT_CLUSTER, CAT_PRUNED = "full", "reference", "cluster", "pruned"


def cat_role(step: int, warmup_steps: int) -> str:
    """Role of a step: ``warmup_steps`` full steps, the reference step, the clustering step, then pruned."""
    if step < warmup_steps:
        return CAT_FULL
    if step == warmup_steps:
        return CAT_REFERENCE
    if step == warmup_steps + 1:
        return CAT_CLUSTER
    return CAT_PRUNED


class _CatCall(threading.local):
    uid: str | None = None
    state: RunState | None = None
    chunk: tuple | None = None
    selection: torch.Tensor | None = None  # [S] sorted token indices, None on full steps
    n_tokens: int = 0  # tokens of the selection's grid (image tokens on DiTs)
    levels: dict | None = None  # UNet: tokens of each coarser eligible level -> the selection carried to it
    keep_attn2: bool = False  # an attn2 replace patch (IPAdapter style) expects every query


_CAT = _CatCall()


def _cond_rows(batch: int, cond_or_uncond) -> list[int]:
    """Rows of a model call that belong to cond chunks (all rows when unknown)."""
    if not cond_or_uncond:
        return list(range(batch))
    per = batch // len(cond_or_uncond)
    rows = [i * per + r for i, c in enumerate(cond_or_uncond) if c == 0 for r in range(per)]
    return rows


def _token_grid_of_latent(h: int, w: int, factor: int) -> TokenGrid:
    grid = TokenGrid(h, w)
    for _ in range(max(factor.bit_length() - 1, 0)):
        grid = grid.halved()
    return grid


def _coarser_sizes(grid: TokenGrid, halvings: int) -> list[int]:
    """Token counts of the next ``halvings`` coarser UNet levels; a count identifies the level
    of a block call."""
    sizes = []
    for _ in range(halvings):
        grid = grid.halved()
        sizes.append(grid.n)
    return sizes


def _cat_level(n_tokens: int) -> tuple[bool, torch.Tensor | None]:
    """(eligible, selection) for a token sequence of this call: the selection's own grid, or a
    coarser UNet level it was carried to; (False, None) for anything else."""
    if n_tokens == _CAT.n_tokens:
        return True, _CAT.selection
    if _CAT.levels and n_tokens in _CAT.levels:
        return True, _CAT.levels[n_tokens]
    return False, None


def install_cat(model, uid: str, policy_factory: Callable[[TokenGrid], object], warmup_steps: int,
                family: str, factor: int = 1, max_downsample: int | None = None) -> None:
    """Install CAT for ``uid``. ``family`` is "unet", "mmdit" or "flux"; ``factor`` the UNet level
    the selection is made on (its highest-resolution attention level); ``max_downsample`` the
    coarsest UNet level pruned with it (default: that level only).

    ``policy_factory(grid)`` returns a fresh per-run selection policy (``pruning_core.cat.CATState``).
    """
    from ..pruning_core import cat as cat_core
    from ..pruning_core.cat import prediction_tokens

    W = _wrappers()
    token_factor = factor if family == "unet" else 2  # DiTs here patchify 2x2
    max_downsample = max(max_downsample or factor, factor) if family == "unet" else factor
    halvings = max_downsample.bit_length() - factor.bit_length()

    def apply_model_wrapper(executor, *args, **kwargs):
        to = _transformer_options(args, kwargs)
        state = run_state(to, uid)
        x = _first_tensor(args[0] if args else kwargs.get("x"))
        if state is None or x is None or x.dim() != 4:
            return executor(*args, **kwargs)
        # one policy per token grid: area/regional conds run on crops of the latent
        grid = _token_grid_of_latent(x.shape[-2], x.shape[-1], token_factor)
        cat = state.extra.setdefault("cat", {}).setdefault(grid, {"selections": {}, "levels": {}, "previous": {}})
        if "policy" not in cat:
            cat["policy"] = policy_factory(grid)
        policy = cat["policy"]
        chunk = _chunk_key(to)
        role = cat_role(state.step, warmup_steps)
        selection = cat["selections"].get(state.step) if (role == CAT_PRUNED and state.active) else None
        # coarser levels: the selection carried down (None on full steps: run whole, fill the caches)
        levels = {n: None for n in _coarser_sizes(grid, halvings)}
        if selection is not None:
            levels.update(cat["levels"].get(state.step, {}))
        state.record.step_kinds.setdefault(state.step, "pruned" if selection is not None else "full")
        if selection is not None and state.step not in state.record.token_maps:
            codes = torch.full((grid.n,), 2, dtype=torch.uint8, device=selection.device)
            codes[selection] = 0
            state.record.add_map(state.step, grid, codes)
        keep_attn2 = bool((to.get("patches_replace") or {}).get("attn2"))
        if keep_attn2 and selection is not None:
            state.skip("an attn2 replace patch (IPAdapter style) is present, so cross-attention ran on all tokens")
        previous = (_CAT.uid, _CAT.state, _CAT.chunk, _CAT.selection, _CAT.n_tokens, _CAT.keep_attn2, _CAT.levels)
        _CAT.uid, _CAT.state, _CAT.chunk, _CAT.selection, _CAT.n_tokens = uid, state, chunk, selection, grid.n
        _CAT.keep_attn2 = keep_attn2
        _CAT.levels = levels
        try:
            out = executor(*args, **kwargs)
        finally:
            (_CAT.uid, _CAT.state, _CAT.chunk, _CAT.selection, _CAT.n_tokens, _CAT.keep_attn2,
             _CAT.levels) = previous
        prev_out = cat["previous"].get(chunk)
        if selection is not None and prev_out is not None and prev_out.shape == out.shape:
            out = cat_core.merge_prediction(out, prev_out, selection, grid)
            state.count(grid, grid.n - selection.numel())
        cat["previous"][chunk] = out
        # The cond rows drive the selection (official). A grid that never saw a cond row (an area
        # crop only the uncond covers) uses its uncond rows instead.
        rows = _cond_rows(out.shape[0], to.get("cond_or_uncond"))
        if rows:
            cat["has_cond"] = True
        elif not cat.get("has_cond"):
            rows = list(range(out.shape[0]))
        if role != CAT_FULL and rows:
            with state._lock:  # cond batches may run in threads (multi-GPU): one selection per step
                if state.step + 1 not in cat["selections"] and (role != CAT_REFERENCE or policy.reference is None):
                    pred = prediction_tokens(out[rows], grid)
                    if role == CAT_REFERENCE:
                        policy.set_reference(pred, row=None)
                    elif policy.reference is not None:
                        cat["selections"][state.step + 1] = (
                            policy.first_selection(pred, row=None) if role == CAT_CLUSTER
                            else policy.next_selection(pred, row=None))
                        if halvings > 0:
                            cat["levels"][state.step + 1] = {
                                g.n: sel for g, sel in policy.coarser_selections(halvings)}
        return out

    model.add_wrapper_with_key(W.APPLY_MODEL, f"{WRAPPER_PREFIX}.{uid}", apply_model_wrapper)
    if family == "unet":
        _install_cat_unet(model, uid, max_downsample)
    else:
        _install_cat_dit(model, uid, family)


def _cat_cache(key) -> dict | None:
    """This call's cache dict for ``key`` (per cond/uncond chunk)."""
    if _CAT.state is None:
        return None
    caches = _CAT.state.extra.setdefault("cat_cache", {})
    return caches.setdefault((_CAT.chunk, key), {})


def _merge_or_store(cache: dict, slot: str, out: torch.Tensor, selection, n_tokens: int) -> torch.Tensor:
    """Full step: remember ``out``. Pruned step: put ``out`` (selected rows) into the cached full tensor."""
    if selection is None or out.shape[1] == n_tokens:
        cache[slot] = out
        return out
    full = cache[slot].index_copy(1, selection, out.to(cache[slot].dtype))
    cache[slot] = full
    return full


def _cat_ready(cache: dict, n: torch.Tensor, selection, slots: tuple[str, ...]) -> bool:
    """A pruned step can run: there is a selection and the last full step left every slot's tensor."""
    if selection is None or cache is None or n.dim() != 3:
        return False
    return all(s in cache and cache[s].shape[0] == n.shape[0] and cache[s].shape[1] == n.shape[1] for s in slots)


def _install_cat_unet(model, uid: str, max_downsample: int) -> None:
    pending = _BlockPlans()  # reuse the per-thread slots: attn1 = the selection for this block call

    def key(extra, name):
        return (name, tuple(extra.get("block") or ()), extra.get("block_index", 0))

    def attn1_in(n, context, value, extra):
        pending.attn1 = pending.kv = None
        eligible, selection = _cat_level(n.shape[1]) if _CAT.uid == uid else (False, None)
        if not eligible:
            if _CAT.uid == uid and n.dim() == 3 and _grid_of_call(n.shape[1], extra) is None:
                _CAT.state.skip(CHANGED_BEFORE)
            return n, context, value
        cache = _cat_cache(key(extra, "attn1"))
        pending.attn1 = (cache, selection if _cat_ready(cache, n, selection, ("kv", "out")) else None, n.shape[1])
        sel = pending.attn1[1]
        if sel is None:
            if context is n:
                cache["kv"] = pending.kv = n  # full step: the K/V projections fill their caches
            return n, context, value
        q = n.index_select(1, sel)
        if context is not n:  # someone else changed K/V: leave them alone, prune the queries only
            return q, context, value
        kv = cache["kv"].index_copy(1, sel, q.to(cache["kv"].dtype))
        cache["kv"] = pending.kv = kv
        return q, kv, kv

    def finish(name, n):
        """Output patch: merge this block call's pending slot (set by the input patch) into its cache."""
        slot = getattr(pending, name)
        setattr(pending, name, None)
        if slot is None:
            return n
        cache, sel, n_tokens = slot
        if n.shape[1] != (n_tokens if sel is None else sel.numel()):
            # a patch after ours shortened the sequence and its output patch has not restored it
            _CAT.state.skip(PATCH_AFTER)
            return n
        return _merge_or_store(cache, "out", n, sel, n_tokens)

    def attn1_out(n, extra):
        pending.kv = None
        return finish("attn1", n)

    def attn2_in(n, context, value, extra):
        pending.attn2 = None
        eligible, selection = _cat_level(n.shape[1]) if _CAT.uid == uid else (False, None)
        if not eligible or _CAT.keep_attn2:
            return n, context, value
        cache = _cat_cache(key(extra, "attn2"))
        sel = selection if _cat_ready(cache, n, selection, ("out",)) else None
        pending.attn2 = (cache, sel, n.shape[1])
        return (n if sel is None else n.index_select(1, sel)), context, value

    def attn2_out(n, extra):
        return finish("attn2", n)

    for slot, fn in (("attn1", attn1_in), ("attn1_output", attn1_out), ("attn2", attn2_in), ("attn2_output", attn2_out)):
        _register(model, slot, fn)
    for path in transformer_block_paths(model, max_downsample):
        name = f"diffusion_model.{path}.ff.forward"
        _register(model, "object", _cat_ff(model.get_model_object(name), uid, path), name)
        for proj in ("to_k", "to_v"):
            name = f"diffusion_model.{path}.attn1.{proj}.forward"
            _register(model, "object", _cat_kv_projection(model.get_model_object(name), pending, proj), name)


def _cat_kv_projection(original, pending: _BlockPlans, proj: str):
    """Self-attention ``to_k``/``to_v`` of an eligible block: on a pruned step only the selected
    tokens are projected and the others' keys/values come from the block's cache (the issue's
    per-block K/V cache); a full step projects every token and fills the cache. Anything but
    the exact K/V tensor our input patch handed over (another pack changed it) runs as usual.
    The block's cache and selection are those its attn1 input patch left in ``pending.attn1``."""
    def forward(x):
        if pending.kv is not x:  # set together with pending.attn1 by the attn1 input patch
            return original(x)
        cache, selection, _ = pending.attn1
        sel = selection if _cat_ready(cache, x, selection, (proj,)) else None
        return _merge_or_store(cache, proj, original(x if sel is None else x.index_select(1, sel)), sel, x.shape[1])
    return forward


def _cat_ff(original, uid: str, path: str):
    def forward(x):
        if _CAT.uid != uid or x.dim() != 3:
            return original(x)
        eligible, selection = _cat_level(x.shape[1])
        if not eligible:
            return original(x)
        cache = _cat_cache(("ff", path))
        sel = selection if _cat_ready(cache, x, selection, ("out",)) else None
        out = original(x if sel is None else x.index_select(1, sel))
        return _merge_or_store(cache, "out", out, sel, x.shape[1])
    return forward


def dit_family(model) -> str | None:
    dm = diffusion_model(model)
    if hasattr(dm, "joint_blocks"):
        return "mmdit"
    if hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"):
        return "flux"
    return None


def _install_cat_dit(model, uid: str, family: str) -> None:
    dm = diffusion_model(model)
    if family == "mmdit":
        blocks = [("double_block", i) for i in range(len(dm.joint_blocks))]
    else:
        blocks = ([("double_block", i) for i in range(len(dm.double_blocks))]
                  + [("single_block", i) for i in range(len(dm.single_blocks))])
    for kind, i in blocks:
        _register(model, "dit", _cat_dit_block(uid, (kind, i)), kind, i)


def _cat_dit_block(uid: str, block_key):
    def block(args, extra):
        original = extra["original_block"]
        if _CAT.uid != uid or _CAT.state is None:
            return original(args)
        img = args["img"]
        n_img = _CAT.n_tokens
        offset = img.shape[1] - n_img  # Flux single blocks see cat(txt, img)
        cache, selection = _cat_cache(("dit",) + tuple(block_key)), _CAT.selection
        if offset < 0 or (offset > 0 and "txt" in args) or args.get("attn_mask") is not None:
            return original(args)
        ready = selection is not None and "delta" in cache and cache["delta"].shape == img[:, offset:].shape
        if not ready:
            out = original(args)
            cache["delta"] = out["img"][:, offset:] - img[:, offset:]
            return out
        index = torch.cat([torch.arange(offset, device=selection.device), selection + offset])
        short = dict(args)
        short["img"] = img.index_select(1, index)
        pe = args.get("pe")
        if isinstance(pe, torch.Tensor):  # Flux RoPE rows, [B, 1, txt + img, ...]: keep text + selected image rows
            text = pe.shape[2] - n_img
            short["pe"] = pe.index_select(2, torch.cat([torch.arange(text, device=pe.device), selection + text]))
        out = original(short)
        new_img = out["img"]
        fresh = new_img[:, offset:]
        cache["delta"] = cache["delta"].index_copy(1, selection, (fresh - short["img"][:, offset:]).to(cache["delta"].dtype))
        # unselected tokens: their input plus the block's cached update; selected: the fresh output itself
        image = (img[:, offset:] + cache["delta"].to(img.dtype)).index_copy(1, selection, fresh)
        full = image if not offset else torch.cat([new_img[:, :offset], image], dim=1)
        result = dict(out)
        result["img"] = full
        return result
    return block
