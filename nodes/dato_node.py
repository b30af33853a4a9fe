"""DaTo Prune + Cache node (Zhang et al., "Token Pruning for Caching Better: 9× Acceleration on
Stable Diffusion for Free", arXiv 2501.00375): dynamics-aware token pruning combined with
DeepCache-style feature caching, for any sampler."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..pruning_core import schedule as sched
from ..pruning_core.dato import DaToConfig, dato_plan
from . import hooks
from ._schema import build
from .params import CATEGORY, DOWNSAMPLE_CHOICES, Param, Params, percent_problem, window_and_seed

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
# Found by benchmarks/schedule_search.py on the reference model (NSGA-II). 20 euler
# (benchmarks/results/schedule-search-20-euler.md; held-out error against dato_official's 0.376
# at 4.98x FLOPs-ideal): "balanced" 0.248 at 4.92x (searched at prune_ratio 0), "fast" 0.340 at
# 6.64x (searched at prune_ratio 0.1). 20 dpmpp_2m: "balanced" from the FLOPs-priced search
# (held-out 0.330 at prune_ratio 0 against 0.391), "fast" from the search priced by the
# SD1.5-size clock (schedule-search-20-dpmpp_2m-clock.md: held-out 0.395 at prune_ratio 0.4
# against dato_official's 0.440, 1.08x its paired speed). Their step depths are their own
# (cache_depth does not apply); resampled like the other lists at other step counts.
SEARCHED = {
    "searched_20_balanced": "F Rx3 F Rx2 F Rx2 S1 Rx3 S2 Rx3 S2 S1",
    "searched_20_fast": "F Rx3 S1 Rx2 F Rx2 S1 Rx3 S1 Rx2 S3 Rx2",
    "searched_20_dpmpp_2m_balanced": "F S1 F R S1 Rx2 F Rx2 S1 Rx3 S2 Rx4 S1",
    "searched_20_dpmpp_2m_fast": "F S1 Rx2 S1 Rx2 F Rx2 S1 Rx3 F Rx4 S1",
}
PRESETS.update({name: (lambda n, d, text=text: sched.Schedule.parse(text).resample(n)) for name, text in SEARCHED.items()})
DEFAULT_PRESET = "dato_official"
PRESET_HELP = ("dato_official: the schedule of the paper's final runs (5 full / 20 shallow / 25 reused at 50 steps, "
               "~7x), each kind of step keeping its share at other step counts (3 / 8 / 9 at 20 steps); "
               "dato_official_dense: the same list keeping all 5 full steps at any step count (slower below 50 "
               "steps, closer to the unpatched image); dato_aggressive: ours, ~9x at 50 steps; deepcache_5/10: a "
               "full step every 5/10 steps, shallow in between; pruning_only: every step full, token pruning only; "
               "searched_20_balanced / searched_20_fast: found by the pack's schedule search for 20 euler steps (use "
               "prune_ratio 0 / 0.1): more faithful than dato_official at its speed / faster at better fidelity; "
               "searched_20_dpmpp_2m_balanced / _fast: the same for 20 dpmpp_2m steps (balanced: prune_ratio 0; "
               "fast: prune_ratio 0.4, searched for 512 px SD1.5-size models, where pruning makes a step far cheaper).")
SYNTAX_HELP = ("Steps separated by spaces: F = full, S2 = shallow with 2 outer block pairs, R = reuse the previous "
               "prediction, S1x3 = three S1 steps. E.g. 'F S1x4 F R S1x3'. Resampled to the step count; step 0 is always full.")


PARAMS = Params(
    Param("prune_ratio", "float", 0.4, "Fraction of tokens that skip self-attention in the highest-resolution "
          "blocks on computed steps. 0 = caching only. At most 1 - 1/(sx*sy) (0.75 with 2x2 windows).",
          0.0, 0.95, 0.05),
    Param("schedule", "combo", DEFAULT_PRESET, "Which steps are full (whole UNet), shallow (outer blocks only, deep "
          "features reused) or reused (previous prediction). Presets are resampled to your step count. "
          + PRESET_HELP, options=tuple(PRESETS)),
    Param("custom_schedule", "string", "", "Optional schedule string; overrides the preset when not empty. "
          + SYNTAX_HELP),
    Param("cache_depth", "int", 1, "Outer input/output block pairs that still run on shallow steps of the presets "
          "(1 = only the outermost pair, fastest). Capped by the model's depth.", 1, 11),
    Param("max_downsample", "combo", "auto", "UNet levels whose self-attention is pruned; auto = highest-resolution "
          "level with attention.", options=tuple(DOWNSAMPLE_CHOICES)),
    Param("dynamics_weight", "float", 1.0, "gamma: weight of the step-to-step change of the prediction when "
          "choosing base tokens.", 0.0, 100.0, 0.1),
    Param("noise_alpha", "float", 0.1, "alpha: weight of the Gaussian noise added to the dynamics score.",
          0.0, 10.0, 0.01),
    Param("align_cfg", "boolean", False, "Cond and uncond rows of a CFG batch share base tokens (the uncond rows' "
          "choice), also when ComfyUI runs them as separate calls."),
    Param("sign_flip", "boolean", False, "Official-code behaviour: on half of the block calls the least dynamic "
          "token becomes the base token. Off = always the most dynamic one, as the paper describes."),
    *window_and_seed("Caching and pruning start at this point of the denoising schedule.",
                     "Caching and pruning stop after this point of the denoising schedule.",
                     "Seed of the base-token noise."),
    Param("similarity_search", "combo", "local", "Where a pruned token looks for the token it copies. local = the "
          "3x3 surrounding windows (fast); global = everywhere, as the official code.", options=("local", "global")),
    Param("recovery", "combo", "base", "Whose self-attention output a pruned token copies. base = its most "
          "similar base token (the paper's figure); kept = its most similar kept token (the official code); merge "
          "= base, each base token computed as the mean of itself and its copies (ToMe's averaging).",
          options=("base", "kept", "merge")),
    Param("prune_kv", "boolean", True, "On: pruned tokens leave the queries, keys and values (DaTo, SiTo). Off: "
          "only the queries; every token stays a key and value (ComfyUI's ToMe does this; slower, more faithful)."),
    Param("sx", "int", 2, "Window width in tokens (one base token per window).", 1, 8, widget=False),
    Param("sy", "int", 2, "Window height in tokens (one base token per window).", 1, 8, widget=False),
)


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


def _config(o: dict) -> DaToConfig:
    return DaToConfig(prune_ratio=o["prune_ratio"], sx=o["sx"], sy=o["sy"], dynamics_weight=o["dynamics_weight"],
                      noise_alpha=o["noise_alpha"], align_cfg=o["align_cfg"], sign_flip=o["sign_flip"],
                      search=o["similarity_search"], recovery=o["recovery"])


def dato_problem(o: dict) -> str | None:
    """What is wrong with a full set of options (``PARAMS.resolve``), or None."""
    problem = _config(o).problem() or percent_problem(o["start_percent"], o["end_percent"])
    if problem:
        return problem
    if o["custom_schedule"] and o["custom_schedule"].strip():
        try:
            sched.Schedule.parse(o["custom_schedule"])
        except ValueError as e:
            return f"custom_schedule does not parse: {e}"
    elif o["schedule"] and o["schedule"] not in PRESETS:
        return f"unknown schedule preset {o['schedule']!r}; choose one of {', '.join(PRESETS)}"
    return None


def apply_dato(model, **options):
    """Return a clone of ``model`` with DaTo installed (the input model is never modified);
    options not given take their defaults from :data:`PARAMS`."""
    o = PARAMS.resolve(options)
    problem = dato_problem(o)
    if problem:
        raise ValueError(f"DaTo Prune + Cache: {problem}")
    factor, warning = hooks.resolve_max_downsample(model, str(o["max_downsample"]))
    if factor is None:
        log.warning("DaTo Prune + Cache: %s; model passed through unchanged.", warning)
        return model
    if warning:
        log.warning("DaTo Prune + Cache: %s", warning)
    depth_cap = hooks.max_cache_depth(model)
    make_schedule, label = schedule_maker(o["schedule"], o["custom_schedule"])
    depth = min(o["cache_depth"], depth_cap)
    probe = make_schedule(50, depth).clamp_depth(depth_cap)
    cfg = _config(o)
    m = model.clone()
    uid = hooks.new_uid("dato")
    depths = [s.depth for s in probe if s.kind == sched.SHALLOW]
    min_depth = min(depths) if depths else depth_cap + 1

    def new_run(state):
        return hooks.DaToRun(schedule=make_schedule(max(state.total_steps, 1), depth).clamp_depth(depth_cap))

    def planner(n, grid, state, call):
        if cfg.prune_ratio <= 0:
            return None
        d_map, d_grid, cond_or_uncond = hooks.current_dynamics(state, align=cfg.align_cfg)
        return dato_plan(n, grid, cfg, d_map, d_grid, call.generator, cond_or_uncond)

    def summary(state):
        kinds = list(state.record.step_kinds.values())
        return (f"DaTo: {kinds.count(sched.FULL)} full / {kinds.count(sched.SHALLOW)} shallow / "
                f"{kinds.count(sched.REUSE)} reused of {state.total_steps} steps ({label}), "
                f"r={o['prune_ratio']:g} pruned: {state.summary_levels()}")

    hooks.install_step_cache(m, uid, min_depth=max(min_depth, 1))
    hooks.install_block_pruning(m, uid, hooks.BlockPruning(self_attn=True, prune_kv=o["prune_kv"],
                                                           max_downsample=factor), planner)
    hooks.install_run_lifecycle(m, uid, "dato", o["start_percent"], o["end_percent"], o["seed"], summary,
                                new_data=new_run)
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
            inputs=[build(io.Model.Input, id="model", tooltip="The diffusion model to accelerate. It is cloned, never modified.")]
            + PARAMS.schema_inputs(),
            outputs=[build(io.Model.Output, tooltip="The model with DaTo pruning and caching applied.")],
        )

    @classmethod
    def validate_inputs(cls, prune_ratio=None, schedule=None, custom_schedule=None, start_percent=None,
                        end_percent=None):
        # Only the inputs named here are handed over (ComfyUI still range-checks the others).
        o = PARAMS.resolve(dict(prune_ratio=prune_ratio, schedule=schedule, custom_schedule=custom_schedule,
                                start_percent=start_percent, end_percent=end_percent), skip_none=True)
        return dato_problem(o) or True

    @classmethod
    def execute(cls, model, **options) -> io.NodeOutput:
        return io.NodeOutput(apply_dato(model, **options))
