"""The run lifecycle: one :class:`RunState` per sampling run of each patch.

- A node stores only *configuration* (frozen dataclasses captured by closures), so it does not
  matter whether ``clone()`` deep-copies ``model_options`` (ComfyUI 0.3.x) or shares them
  (0.38.x).
- An OUTER_SAMPLE wrapper creates a fresh :class:`RunState` for each sampling run, puts it in
  this run's ``transformer_options[RUN_KEY][uid]`` and drops it afterwards: a hires pass, a
  second queue or an interrupted run never sees a previous run's tensors.
- The sampler's per-step callback counts finished steps, not model calls. Heun-type samplers
  call the model twice per step and ComfyUI's callback fires between the two calls, so the
  second call of step i (at sigma i+1) belongs to step i+1. And a CALC_COND_BATCH wrapper decides once per
  step whether the patch is inside ``start_percent``/``end_percent`` (one host sync per step,
  none per block call).
- What a run decided (token maps, step kinds) is kept in a small bounded store of
  :class:`RunRecord` for the preview node; sampling never reads it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import torch

from ...pruning_core.geometry import TokenGrid
from .patching import add_wrapper, attach, attached, wrapper_kinds

log = logging.getLogger("token_pruning_cache")

RUN_KEY = "token_pruning_cache"  # transformer_options key holding {uid: RunState} during a run
DISPLAY_NAMES = {"sito": "SiTo Token Pruning", "dato": "DaTo Prune + Cache", "cat": "CAT Pruning"}
# Why a block call was left unpruned when another patch shortens the token sequence: one ahead of
# ours in the attn1 patch list, or one after ours (its output patch runs before our recovery).
CHANGED_BEFORE = "another patch had already changed their token sequence (put this node first in the chain)"
PATCH_AFTER = ("another pack's self-attention patch (e.g. ToMe, HyperTile) comes after this node; "
               "apply this node after it in the graph")

D = TypeVar("D")

_RECORDS: "OrderedDict[str, RunRecord]" = OrderedDict()
_RECORDS_MAX = 16


def new_uid(method: str) -> str:
    return f"{method}-{uuid.uuid4().hex[:8]}"


@dataclass
class RunRecord:
    """What a run decided, kept at the highest-resolution level for the preview node."""

    method: str
    total_steps: int
    token_maps: dict = field(default_factory=dict)  # step -> (h, w, uint8 map) 0 kept 1 base 2 pruned / 0 recomputed 2 cached
    step_kinds: dict = field(default_factory=dict)  # step -> "full" | "shallow" | "reuse" | "pruned"
    max_maps: int = 64

    def add_map(self, step: int, grid: TokenGrid, codes: torch.Tensor) -> None:
        """A video grid's frames are stacked top to bottom (``t·h × w``)."""
        if step in self.token_maps or len(self.token_maps) >= self.max_maps:
            return
        h = grid.t * grid.h
        self.token_maps[step] = (h, grid.w, codes.detach().to(torch.uint8).reshape(h, grid.w))

    def to_host(self) -> None:
        """Move the maps to the CPU, one copy per map size, when the run ends (``add_map`` keeps
        them on the model's device: a copy to the host there would make the GPU wait, once per
        step, inside a transformer block)."""
        by_size: dict[tuple, list[int]] = {}
        for step, (h, w, codes) in self.token_maps.items():
            if codes.device.type != "cpu":
                by_size.setdefault((h, w, codes.device), []).append(step)
        for (h, w, _), steps in by_size.items():
            host = torch.stack([self.token_maps[s][2] for s in steps]).cpu()
            for s, codes in zip(steps, host):
                self.token_maps[s] = (h, w, codes)


class RunState(Generic[D]):
    """Everything that lives for exactly one sampling run of one patch.

    The bookkeeping every method shares is here; what one method keeps (caches, selections,
    dynamics) is its own typed object in :attr:`data`, made by the node's ``new_data`` at the
    start of the run and dropped at its end.
    """

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
        self.level_stats: dict[tuple[int, ...], list[int]] = {}  # (h, w) or (t, h, w) -> [calls, pruned, tokens]
        self.record = RunRecord(method=method, total_steps=self.total_steps)
        self.data: D | None = None  # the method's own per-run state
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

    def keyed_generator(self, device: torch.device, key: tuple) -> torch.Generator:
        """A generator seeded from (run seed, current step, ``key``): every call with the same
        key in the same step draws the same numbers, whatever ran before it (the cond and uncond
        calls of a step, when ComfyUI runs them apart). CPU-side seeding: no device sync."""
        digest = hashlib.blake2b(repr((self.seed, self.step, key)).encode(), digest_size=8).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest, "little") >> 1)
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
        s = self.level_stats.setdefault(grid.dims, [0, 0, 0])
        s[0] += 1
        s[1] += pruned
        s[2] += grid.n
        self.active_steps.add(self.step)

    def summary_levels(self, unit: str = "block calls") -> str:
        if not self.level_stats:
            return "no tokens pruned"
        parts = []
        for dims, (calls, pruned, tokens) in sorted(self.level_stats.items(), key=lambda kv: -math.prod(kv[0])):
            name = "x".join(str(d) for d in dims)
            parts.append(f"{name}: {pruned // max(calls, 1)}/{tokens // max(calls, 1)} tokens pruned in {calls} {unit}")
        return "; ".join(parts)


def run_state(transformer_options: dict, uid: str) -> RunState | None:
    runs = transformer_options.get(RUN_KEY)
    if runs is None:
        return None
    return runs.get(uid)


def last_records(model) -> list[tuple[str, RunRecord]]:
    """The records of the last run of every patch of ours on ``model`` (newest last)."""
    out = []
    for uid, method in attached(model):
        rec = _RECORDS.get(uid)
        if rec is not None:
            out.append((method, rec))
    return out


def _store_record(uid: str, record: RunRecord) -> None:
    record.to_host()
    _RECORDS[uid] = record
    _RECORDS.move_to_end(uid)
    while len(_RECORDS) > _RECORDS_MAX:
        _RECORDS.popitem(last=False)


def _sigma_of(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])  # one host sync per sampler step
    return float(timestep)


def install_run_lifecycle(model, uid: str, method: str, start_percent: float, end_percent: float, seed: int,
                          summary: Callable[[RunState], str], new_data: Callable[[RunState], object] | None = None) -> None:
    """Give the patch ``uid`` a fresh :class:`RunState` for every sampling run of ``model``;
    ``new_data(state)`` makes the method's own per-run state (``state.data``)."""
    import comfy.model_patcher

    W = wrapper_kinds()

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        original_options = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        sampling = guider.model_patcher.get_model_object("model_sampling")
        state = RunState(uid, method, sigmas.reshape(-1).tolist(),  # one copy to the host per run
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
        if new_data is not None:
            state.data = new_data(state)

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
            _store_record(uid, state.record)
            if finished:
                log.info(summary(state))
                if state.skipped:
                    log.warning("%s: %s", DISPLAY_NAMES.get(method, method),
                                "; ".join(f"{n} calls left unpruned because {why}" for why, n in state.skipped.items()))
            state.data = None  # the run's tensors go with it

    def calc_cond_batch(executor, *args, **kwargs):
        model_options = args[4] if len(args) > 4 else kwargs["model_options"]
        timestep = args[3] if len(args) > 3 else kwargs["timestep"]
        state = run_state(model_options.get("transformer_options", {}), uid)
        if state is not None:
            state.begin_step_call(_sigma_of(timestep))
        return executor(*args, **kwargs)

    add_wrapper(model, W.OUTER_SAMPLE, uid, outer_sample)
    add_wrapper(model, W.CALC_COND_BATCH, uid, calc_cond_batch)
    attach(model, uid, method)


def new_uid(method: str) -> str:
    return f"{method}-{uuid.uuid4().hex[:8]}"
