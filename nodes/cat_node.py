"""CAT Pruning node (Cheng et al., "CAT Pruning: Cluster-Aware Token Pruning for Text-to-Image
Diffusion Models", arXiv 2502.00433): per step, only a cluster- and staleness-balanced subset
of tokens is recomputed; the rest reuse cached features and the previous prediction."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..pruning_core.cat import CATConfig, CATState
from . import adapter
from ._schema import build
from .sito_node import CATEGORY, DOWNSAMPLE_CHOICES

log = logging.getLogger("token_pruning_cache")


def cat_problem(keep_ratio=0.3, warmup_steps=6, num_clusters=20, cluster_share=0.25, staleness_decay=0.5,
                start_percent=0.0, end_percent=1.0):
    problem = CATConfig(keep_ratio=keep_ratio, num_clusters=num_clusters, cluster_share=cluster_share,
                        staleness_decay=staleness_decay).problem()
    if problem:
        return problem
    if warmup_steps < 0:
        return f"warmup_steps {warmup_steps} must be >= 0"
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        return f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1"
    return None


def apply_cat(model, *, keep_ratio=0.3, warmup_steps=6, num_clusters=20, cluster_share=0.25, staleness_decay=0.5,
              start_percent=0.0, end_percent=1.0, seed=0, max_downsample="8"):
    """Return a clone of ``model`` with CAT Pruning installed (the input model is never modified)."""
    problem = cat_problem(keep_ratio, warmup_steps, num_clusters, cluster_share, staleness_decay, start_percent,
                          end_percent)
    if problem:
        raise ValueError(f"CAT Pruning: {problem}")
    levels = adapter.attention_levels(model)
    family = "unet" if levels else adapter.dit_family(model)
    if family is None:
        log.warning("CAT Pruning: %s is not a supported model (UNet with SpatialTransformer levels, SD3 MMDiT or "
                    "Flux); model passed through unchanged.", adapter.model_class_name(model))
        return model
    coarsest = None
    if family == "unet":
        coarsest, warning = adapter.resolve_max_downsample(model, str(max_downsample))
        if warning:
            log.warning("CAT Pruning: %s", warning)
    cfg = CATConfig(keep_ratio=keep_ratio, num_clusters=num_clusters, cluster_share=cluster_share,
                    staleness_decay=staleness_decay, seed=seed)
    m = model.clone()
    uid = adapter.new_uid("cat")

    def summary(state):
        kinds = list(state.record.step_kinds.values())
        pruned = kinds.count("pruned")
        return (f"CAT: {pruned} pruned / {len(kinds) - pruned} full of {state.total_steps} steps on {family}, "
                f"{keep_ratio:.0%} of tokens recomputed per pruned step: {state.summary_levels('model calls')}")

    adapter.install_cat(m, uid, lambda grid: CATState(grid, cfg), warmup_steps, family,
                        factor=levels[0] if levels else 1, max_downsample=coarsest)
    adapter.install_run_lifecycle(m, uid, "cat", start_percent, end_percent, seed, summary)
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
                         "SD1.x/SD2.x/SDXL UNets, SD3 and Flux."),
            inputs=[
                build(io.Model.Input, id="model", tooltip="The diffusion model to accelerate. It is cloned, never modified."),
                build(io.Float.Input, id="keep_ratio", default=0.3, min=0.05, max=1.0, step=0.05,
                      tooltip="Fraction of tokens recomputed on each pruned step (0.3 = 70% pruned, as in the paper). "
                              "1.0 recomputes everything (output identical to the unpatched model)."),
                build(io.Int.Input, id="warmup_steps", default=6, min=0, max=1000,
                      tooltip="Full steps before the reference step; then one clustering step, then pruned steps "
                              "(official: 6, i.e. pruning starts at step 8)."),
                build(io.Int.Input, id="num_clusters", default=20, min=1, max=256,
                      tooltip="Spatial k-means clusters used to spread the recomputed tokens over the image."),
                build(io.Float.Input, id="cluster_share", default=0.25, min=0.0, max=1.0, step=0.05,
                      tooltip="Share of the recomputed tokens chosen from the most-changed clusters; the rest are "
                              "the least recently recomputed tokens."),
                build(io.Float.Input, id="staleness_decay", default=0.5, min=0.0, max=0.99, step=0.05,
                      tooltip="Per-step decay of each token's selection frequency (staleness memory)."),
                build(io.Float.Input, id="start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Pruned steps only happen after this point of the denoising schedule."),
                build(io.Float.Input, id="end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Pruned steps stop after this point of the denoising schedule."),
                build(io.Int.Input, id="seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the k-means clustering."),
                build(io.Combo.Input, id="max_downsample", options=DOWNSAMPLE_CHOICES, default="8",
                      tooltip="UNets: which levels recompute only the selected tokens. 8 (default) = every level with "
                              "attention, middle block included; auto = only the highest-resolution one (the "
                              "selection's own grid); a coarser level recomputes the same share of its tokens, those "
                              "covering the most selected ones. Conv blocks always run in full. Ignored on SD3/Flux."),
            ],
            outputs=[build(io.Model.Output, tooltip="The model with CAT Pruning applied.")],
        )

    @classmethod
    def validate_inputs(cls, keep_ratio=0.3, warmup_steps=6, num_clusters=20, cluster_share=0.25, staleness_decay=0.5,
                        start_percent=0.0, end_percent=1.0):
        return cat_problem(keep_ratio, warmup_steps, num_clusters, cluster_share, staleness_decay, start_percent,
                           end_percent) or True

    @classmethod
    def execute(cls, model, keep_ratio=0.3, warmup_steps=6, num_clusters=20, cluster_share=0.25, staleness_decay=0.5,
                start_percent=0.0, end_percent=1.0, seed=0, max_downsample="8") -> io.NodeOutput:
        return io.NodeOutput(apply_cat(model, keep_ratio=keep_ratio, max_downsample=max_downsample,
                                       warmup_steps=warmup_steps,
                                       num_clusters=num_clusters, cluster_share=cluster_share,
                                       staleness_decay=staleness_decay, start_percent=start_percent,
                                       end_percent=end_percent, seed=seed))
