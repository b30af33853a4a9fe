"""CAT Pruning node (Cheng et al., "CAT Pruning: Cluster-Aware Token Pruning for Text-to-Image
Diffusion Models", arXiv 2502.00433): per step, only a cluster- and staleness-balanced subset
of tokens is recomputed; the rest reuse cached features and the previous prediction."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..pruning_core.cat import CATConfig, CATState
from . import hooks
from ._schema import build
from .params import CATEGORY, DOWNSAMPLE_CHOICES, Param, Params, percent_problem, window_and_seed

log = logging.getLogger("token_pruning_cache")


PARAMS = Params(
    Param("keep_ratio", "float", 0.3, "Fraction of tokens recomputed on each pruned step (0.3 = 70% pruned, as in "
          "the paper). 1.0 recomputes everything (output identical to the unpatched model).", 0.05, 1.0, 0.05),
    Param("warmup_steps", "int", 6, "Full steps before the reference step; then one clustering step, then pruned "
          "steps (official: 6, i.e. pruning starts at step 8).", 0, 1000),
    Param("num_clusters", "int", 20, "Spatial k-means clusters used to spread the recomputed tokens over the "
          "image.", 1, 256),
    Param("cluster_share", "float", 0.25, "Share of the recomputed tokens chosen from the most-changed clusters; the "
          "rest are the least recently recomputed tokens.", 0.0, 1.0, 0.05),
    Param("staleness_decay", "float", 0.5, "Per-step decay of each token's selection frequency (staleness memory).",
          0.0, 0.99, 0.05),
    *window_and_seed("Pruned steps only happen after this point of the denoising schedule.",
                     "Pruned steps stop after this point of the denoising schedule.",
                     "Seed of the k-means clustering."),
    Param("max_downsample", "combo", "8", "UNets: which levels recompute only the selected tokens. 8 (default) = "
          "every level with attention, middle block included; auto = only the highest-resolution one (the "
          "selection's own grid); a coarser level recomputes the same share of its tokens, those covering the most "
          "selected ones. Conv blocks always run in full. Ignored on DiTs (SD3, Flux, video models).",
          options=tuple(DOWNSAMPLE_CHOICES)),
    # The pack's earlier shortcuts, kept to measure against the official behaviour (docs/algorithms.md §4.6)
    Param("dit_kv_cache", "boolean", True, "SD3: attention of pruned blocks sees every image token's keys/values "
          "(fresh for the selected, cached for the rest); False runs the block on the selected tokens and reuses "
          "the others' residual update.", widget=False),
    Param("signal_before_merge", "boolean", True, "The next selection is made from the raw prediction; False: "
          "from the prediction after unselected tokens were given their previous value.", widget=False),
    Param("prediction_space", "combo", "noise", "Where the selection signal is measured and unselected tokens "
          "keep their previous value: the model's own noise/velocity output (default, as the official code; more "
          "faithful on the reference model, docs/benchmarks.md) or the denoised estimate (the pack's earlier choice).",
          options=hooks.CAT_PREDICTION_SPACES, widget=False),
)


def _config(o: dict) -> CATConfig:
    return CATConfig(keep_ratio=o["keep_ratio"], num_clusters=o["num_clusters"], cluster_share=o["cluster_share"],
                     staleness_decay=o["staleness_decay"], seed=o["seed"])


def cat_problem(o: dict) -> str | None:
    """What is wrong with a full set of options (``PARAMS.resolve``), or None."""
    problem = _config(o).problem()
    if problem:
        return problem
    if o["warmup_steps"] < 0:
        return f"warmup_steps {o['warmup_steps']} must be >= 0"
    if o["prediction_space"] not in hooks.CAT_PREDICTION_SPACES:
        return f"prediction_space {o['prediction_space']!r} must be one of {', '.join(hooks.CAT_PREDICTION_SPACES)}"
    return percent_problem(o["start_percent"], o["end_percent"])


def apply_cat(model, **options):
    """Return a clone of ``model`` with CAT Pruning installed (the input model is never modified);
    options not given take their defaults from :data:`PARAMS`."""
    o = PARAMS.resolve(options)
    problem = cat_problem(o)
    if problem:
        raise ValueError(f"CAT Pruning: {problem}")
    levels = hooks.attention_levels(model)
    family = "unet" if levels else hooks.dit_family(model)
    if family is None:
        log.warning("CAT Pruning: %s is not a supported model (UNet with SpatialTransformer levels, SD3 MMDiT, "
                    "Flux, Chroma, Qwen-Image, Wan 2.x, HunyuanVideo or LTX-Video); model passed through unchanged.",
                    hooks.model_class_name(model))
        return model
    coarsest = None
    if family == "unet":
        coarsest, warning = hooks.resolve_max_downsample(model, str(o["max_downsample"]))
        if warning:
            log.warning("CAT Pruning: %s", warning)
    cfg = _config(o)
    m = model.clone()
    uid = hooks.new_uid("cat")

    def summary(state):
        kinds = list(state.record.step_kinds.values())
        pruned = kinds.count("pruned")
        return (f"CAT: {pruned} pruned / {len(kinds) - pruned} full of {state.total_steps} steps on {family}, "
                f"{o['keep_ratio']:.0%} of tokens recomputed per pruned step: {state.summary_levels('model calls')}")

    hooks.install_cat(m, uid, lambda grid: CATState(grid, cfg), o["warmup_steps"], family,
                      factor=levels[0] if levels else 1, max_downsample=coarsest, dit_kv_cache=o["dit_kv_cache"],
                      signal_before_merge=o["signal_before_merge"], prediction_space=o["prediction_space"])
    hooks.install_run_lifecycle(m, uid, "cat", o["start_percent"], o["end_percent"], o["seed"], summary,
                                new_data=lambda state: hooks.CATRun())
    return m


class CATPruneCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build(
            io.Schema,
            node_id="CATPruneCache",
            display_name="CAT Pruning (cluster-aware cache)",
            category=CATEGORY,
            description=("CAT Pruning (arXiv 2502.00433): after a few full warm-up steps, each step recomputes only "
                         "the tokens whose prediction drifted most (ranked by spatial cluster) plus the stalest ones; "
                         "all other tokens reuse cached attention keys/values and attention/feed-forward outputs, and their "
                         "previous prediction; UNet conv blocks always run in full. "
                         "SD1.x/SD2.x/SDXL UNets, SD3, Flux, Chroma, Qwen-Image, and the video models Wan 2.x, "
                         "HunyuanVideo and LTX-Video (frames x height x width tokens)."),
            inputs=[build(io.Model.Input, id="model", tooltip="The diffusion model to accelerate. It is cloned, never modified.")]
            + PARAMS.schema_inputs(),
            outputs=[build(io.Model.Output, tooltip="The model with CAT Pruning applied.")],
        )

    @classmethod
    def validate_inputs(cls, keep_ratio=None, warmup_steps=None, num_clusters=None, cluster_share=None,
                        staleness_decay=None, start_percent=None, end_percent=None):
        # Only the inputs named here are handed over (ComfyUI still range-checks the others).
        o = PARAMS.resolve(dict(keep_ratio=keep_ratio, warmup_steps=warmup_steps, num_clusters=num_clusters,
                                cluster_share=cluster_share, staleness_decay=staleness_decay,
                                start_percent=start_percent, end_percent=end_percent), skip_none=True)
        return cat_problem(o) or True

    @classmethod
    def execute(cls, model, **options) -> io.NodeOutput:
        return io.NodeOutput(apply_cat(model, **options))
