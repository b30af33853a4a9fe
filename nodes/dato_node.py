"""DaTo Prune + Cache node (Zhang et al., "Token Pruning for Caching Better: 9× Acceleration on
Stable Diffusion for Free", arXiv 2501.00375): dynamics-aware token pruning combined with
DeepCache-style feature caching, for any sampler."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..pruning_core import schedule as sched
from ..pruning_core.dato import DaToConfig, dato_plan, dynamics_map
from ..pruning_core.geometry import TokenGrid
from . import adapter
from ._schema import build
from .sito_node import CATEGORY, DOWNSAMPLE_CHOICES

log = logging.getLogger("token_pruning_cache")

# Presets are functions of the run's step count and the shallow depth. DaTo's lists were made
# for 50 steps and are resampled by relative position (Schedule.resample): by default each kind
# of step keeps its share of the run, so the preset keeps its speed at any step count; the
# _dense preset keeps every full step of the list instead. DeepCache intervals stay intervals.
PRESETS = {
    "dato_official": lambda n, d: _with_depth(sched.Schedule.dato_search_old(n), d),
    "dato_official_dense": lambda n, d: _with_depth(
        sched.Schedule.dato_search_old().resample(n, keep_refreshes=True), d),
    "dato_aggressive": lambda n, d: _with_depth(sched.Schedule.aggressive(n), d),
    "deepcache_5": lambda n, d: sched.Schedule.deepcache(n, 5, d),
    "deepcache_10": lambda n, d: sched.Schedule.deepcache(n, 10, d),
    "pruning_only": lambda n, d: sched.Schedule.pruning_only(n),
}
DEFAULT_PRESET = "dato_official"
PRESET_HELP = ("dato_official: the schedule of the paper's final runs (5 full / 20 shallow / 25 reused at 50 steps, "
               "~7x), each kind of step keeping its share at other step counts (3 / 8 / 9 at 20 steps); "
               "dato_official_dense: the same list keeping all 5 full steps at any step count (slower below 50 "
               "steps, closer to the unpatched image); dato_aggressive: ours, ~9x at 50 steps; deepcache_5/10: a "
               "full step every 5/10 steps, shallow in between; pruning_only: every step full, token pruning only.")
SYNTAX_HELP = ("Steps separated by spaces: F = full, S2 = shallow with 2 outer block pairs, R = reuse the previous "
               "prediction, S1x3 = three S1 steps. E.g. 'F S1x4 F R S1x3'. Resampled to the step count; step 0 is always full.")


def _with_depth(schedule, depth):
    if depth == 1:
        return schedule
    return sched.Schedule.of(sched.Step.shallow(depth) if s.kind == sched.SHALLOW else s for s in schedule)


def schedule_maker(schedule=DEFAULT_PRESET, custom_schedule=""):
    """``(make, label)``: ``make(n_steps, depth)`` gives the run's schedule (before depth
    clamping); a non-empty ``custom_schedule`` overrides the preset and is resampled."""
    if custom_schedule and custom_schedule.strip():
        custom = sched.Schedule.parse(custom_schedule)
        return (lambda n, d: custom.resample(n)), "custom"
    return PRESETS[schedule], schedule


def dato_problem(prune_ratio, sx=2, sy=2, schedule=DEFAULT_PRESET, custom_schedule="", start_percent=0.0, end_percent=1.0):
    problem = DaToConfig(prune_ratio=prune_ratio, sx=sx, sy=sy).problem()
    if problem:
        return problem
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        return f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1"
    if custom_schedule and custom_schedule.strip():
        try:
            sched.Schedule.parse(custom_schedule)
        except ValueError as e:
            return f"custom_schedule does not parse: {e}"
    elif schedule and schedule not in PRESETS:
        return f"unknown schedule preset {schedule!r}; choose one of {', '.join(PRESETS)}"
    return None


def apply_dato(model, *, prune_ratio=0.4, schedule=DEFAULT_PRESET, custom_schedule="", cache_depth=1,
               max_downsample="auto", dynamics_weight=1.0, noise_alpha=0.1, align_cfg=False, sign_flip=False, sx=2,
               sy=2, start_percent=0.0, end_percent=1.0, seed=0):
    """Return a clone of ``model`` with DaTo installed (the input model is never modified)."""
    problem = dato_problem(prune_ratio, sx, sy, schedule, custom_schedule, start_percent, end_percent)
    if problem:
        raise ValueError(f"DaTo Prune + Cache: {problem}")
    factor, warning = adapter.resolve_max_downsample(model, str(max_downsample))
    if factor is None:
        log.warning("DaTo Prune + Cache: %s; model passed through unchanged.", warning)
        return model
    if warning:
        log.warning("DaTo Prune + Cache: %s", warning)
    depth_cap = adapter.max_cache_depth(model)
    make_schedule, label = schedule_maker(schedule, custom_schedule)
    depth = min(cache_depth, depth_cap)
    probe = make_schedule(50, depth).clamp_depth(depth_cap)
    cfg = DaToConfig(prune_ratio=prune_ratio, sx=sx, sy=sy, dynamics_weight=dynamics_weight,
                     noise_alpha=noise_alpha, align_cfg=align_cfg, sign_flip=sign_flip)
    m = model.clone()
    uid = adapter.new_uid("dato")
    depths = [s.depth for s in probe if s.kind == sched.SHALLOW]
    min_depth = min(depths) if depths else depth_cap + 1

    def on_start(state, guider):
        state.extra["schedule"] = make_schedule(max(state.total_steps, 1), depth).clamp_depth(depth_cap)
        state.extra["dynamics"] = {}

    def step_kind(state):
        s = state.extra["schedule"]
        step = s[min(state.step, len(s) - 1)]
        return {sched.FULL: adapter.FULL, sched.SHALLOW: adapter.SHALLOW, sched.REUSE: adapter.REUSE}[step.kind], step.depth

    def after_call(state, chunk, x, eps):
        if not isinstance(eps, torch.Tensor) or eps.dim() != 4:
            return
        dyn = state.extra.setdefault("dynamics", {})
        prev = dyn.get(chunk)
        entry = {"eps": eps, "map": None, "grid": TokenGrid(eps.shape[-2], eps.shape[-1])}
        if prev is not None and prev["eps"].shape == eps.shape:
            if prev["eps"] is eps:  # a reused step carries no new dynamics: keep the last map
                entry["map"] = prev["map"]
            else:
                entry["map"] = dynamics_map(eps, prev["eps"])
        dyn[chunk] = entry

    def planner(n, grid, state):
        if cfg.prune_ratio <= 0:
            return None
        call = adapter.current_call()
        entry = state.extra.get("dynamics", {}).get(call.chunk) if call.state is state else None
        d_map, d_grid = (entry["map"], entry["grid"]) if entry is not None and entry["map"] is not None else (None, None)
        return dato_plan(n, grid, cfg, d_map, d_grid, state.generator(n.device),
                         call.cond_or_uncond if call.state is state else None)

    def summary(state):
        kinds = list(state.record.step_kinds.values())
        return (f"DaTo: {kinds.count(adapter.FULL)} full / {kinds.count(adapter.SHALLOW)} shallow / "
                f"{kinds.count(adapter.REUSE)} reused of {state.total_steps} steps ({label}), "
                f"r={prune_ratio:g} pruned: {state.summary_levels()}")

    adapter.install_step_cache(m, uid, step_kind, min_depth=max(min_depth, 1), after_call=after_call)
    adapter.install_block_pruning(m, uid, adapter.BlockPruning(self_attn=True, max_downsample=factor), planner)
    adapter.install_run_lifecycle(m, uid, "dato", start_percent, end_percent, seed, summary, on_start=on_start)
    return m


class DaToPruneCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build(
            io.Schema,
            node_id="DaToPruneCache",
            display_name="DaTo Prune + Cache",
            category=CATEGORY,
            description=("DaTo (arXiv 2501.00375): DeepCache-style feature caching (full / shallow / reused steps "
                         "from a schedule) plus token pruning whose anchor tokens are the ones whose prediction changes "
                         "most between steps. Training-free; SD1.x, SD2.x, SDXL UNets; any sampler."),
            inputs=[
                build(io.Model.Input, id="model", tooltip="The diffusion model to accelerate. It is cloned, never modified."),
                build(io.Float.Input, id="prune_ratio", default=0.4, min=0.0, max=0.95, step=0.05,
                      tooltip="Fraction of tokens that skip self-attention in the highest-resolution blocks on computed "
                              "steps. 0 = caching only. At most 1 - 1/(sx*sy) (0.75 with 2x2 windows)."),
                build(io.Combo.Input, id="schedule", options=list(PRESETS), default=DEFAULT_PRESET,
                      tooltip="Which steps are full (whole UNet), shallow (outer blocks only, deep features reused) or "
                              "reused (previous prediction). Presets are resampled to your step count. "
                              + PRESET_HELP),
                build(io.String.Input, id="custom_schedule", default="", multiline=False,
                      tooltip="Optional schedule string; overrides the preset when not empty. " + SYNTAX_HELP),
                build(io.Int.Input, id="cache_depth", default=1, min=1, max=11,
                      tooltip="Outer input/output block pairs that still run on shallow steps of the presets (1 = only "
                              "the outermost pair, fastest). Capped by the model's depth."),
                build(io.Combo.Input, id="max_downsample", options=DOWNSAMPLE_CHOICES, default="auto",
                      tooltip="UNet levels whose self-attention is pruned; auto = highest-resolution level with attention."),
                build(io.Float.Input, id="dynamics_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                      tooltip="gamma: weight of the step-to-step change of the prediction when choosing base tokens."),
                build(io.Float.Input, id="noise_alpha", default=0.1, min=0.0, max=10.0, step=0.01,
                      tooltip="alpha: weight of the Gaussian noise added to the dynamics score."),
                build(io.Boolean.Input, id="align_cfg", default=False,
                      tooltip="Cond and uncond rows of a CFG batch share base tokens (the uncond rows' choice)."),
                build(io.Boolean.Input, id="sign_flip", default=False,
                      tooltip="Official-code behaviour: on half of the block calls the least dynamic token becomes the "
                              "base token. Off = always the most dynamic one, as the paper describes."),
                build(io.Float.Input, id="start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Caching and pruning start at this point of the denoising schedule."),
                build(io.Float.Input, id="end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Caching and pruning stop after this point of the denoising schedule."),
                build(io.Int.Input, id="seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the base-token noise."),
            ],
            outputs=[build(io.Model.Output, tooltip="The model with DaTo pruning and caching applied.")],
        )

    @classmethod
    def validate_inputs(cls, prune_ratio=0.4, schedule=DEFAULT_PRESET, custom_schedule="", start_percent=0.0,
                        end_percent=1.0):
        return dato_problem(prune_ratio, 2, 2, schedule, custom_schedule, start_percent, end_percent) or True

    @classmethod
    def execute(cls, model, prune_ratio=0.4, schedule=DEFAULT_PRESET, custom_schedule="", cache_depth=1,
                max_downsample="auto", dynamics_weight=1.0, noise_alpha=0.1, align_cfg=False, sign_flip=False,
                start_percent=0.0, end_percent=1.0, seed=0) -> io.NodeOutput:
        return io.NodeOutput(apply_dato(model, prune_ratio=prune_ratio, schedule=schedule,
                                        custom_schedule=custom_schedule, cache_depth=cache_depth,
                                        max_downsample=max_downsample, dynamics_weight=dynamics_weight,
                                        noise_alpha=noise_alpha, align_cfg=align_cfg, sign_flip=sign_flip,
                                        start_percent=start_percent, end_percent=end_percent, seed=seed))
