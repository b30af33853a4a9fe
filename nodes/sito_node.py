"""SiTo Token Pruning node (Zhang et al., "Training-Free and Hardware-Friendly Acceleration
for Diffusion Models via Similarity-based Token Pruning", AAAI 2025)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..pruning_core import sito
from ..pruning_core.sito import SiToConfig
from . import hooks
from ._schema import build
from .params import CATEGORY, DOWNSAMPLE_CHOICES, Param, Params, percent_problem, window_and_seed

log = logging.getLogger("token_pruning_cache")

PARAMS = Params(
    Param("prune_ratio", "float", 0.5, "Fraction of tokens that skip the pruned layers. 0 = off (bit-identical "
          "output). At most 1 - 1/(sx*sy): 0.75 with 2x2 windows. 0.5 is a good start; 0.7 is faster, softer.",
          0.0, 0.95, 0.05),
    Param("max_downsample", "combo", "auto", "Which UNet levels are pruned. auto = the highest-resolution level "
          "that has attention (64x64 tokens at 512 px on SD1.5, at 1024 px on SDXL). 2, 4 or 8 also prunes the "
          "coarser levels (8 includes the SD1.5 middle block).", options=tuple(DOWNSAMPLE_CHOICES)),
    Param("prune_self_attn", "boolean", True, "Run self-attention on the kept tokens only (the main speedup)."),
    Param("prune_cross_attn", "boolean", False, "Also run cross-attention (text) on the kept tokens only. Small "
          "gain; not recommended by the paper."),
    Param("prune_mlp", "boolean", False, "Also run the feed-forward on the kept tokens only. Strongly discouraged "
          "by the paper (quality drop)."),
    Param("prune_kv", "boolean", True, "On: pruned tokens leave the queries, keys and values (SiTo). Off: only the "
          "queries are pruned and every token stays a key/value (like ComfyUI's ToMe) - slower, more faithful."),
    Param("sx", "int", 2, "Window width in tokens; each window keeps one base token.", 1, 8),
    Param("sy", "int", 2, "Window height in tokens; each window keeps one base token.", 1, 8),
    Param("noise_alpha", "float", 0.1, "Weight of the Gaussian noise added to the similarity score when choosing "
          "base tokens (tie-breaker).", 0.0, 10.0, 0.01),
    Param("sim_beta", "float", 1.0, "Weight of the similarity score (sum of cosine similarities) when choosing base "
          "tokens.", 0.0, 10.0, 0.05),
    Param("similarity_search", "combo", "local", "Where a token looks for its most similar base token. local = the "
          "3x3 surrounding windows (fast); global = every base token, as the official code (costs an N x N/4 "
          "similarity per block, as much as the attention it saves).", options=("local", "global")),
    *window_and_seed("Start pruning at this point of the denoising schedule (0 = first step).",
                     "Stop pruning after this point of the denoising schedule (1 = last step).",
                     "Seed of the base-token noise; same seed, same image."),
    Param("recovery", "combo", "base", "Whose attention output a pruned token copies. base = its most similar base "
          "token (the paper's figure); kept = its most similar kept token, base or not (the official code; one "
          "more small similarity per block, searched as similarity_search says); merge = base, and each base token "
          "is computed as the mean of itself and the tokens that copy it (ToMe's averaging: more faithful at the "
          "same speed).", options=("base", "kept", "merge")),
)


def _config(o: dict) -> SiToConfig:
    return SiToConfig(prune_ratio=o["prune_ratio"], sx=o["sx"], sy=o["sy"], noise_alpha=o["noise_alpha"],
                      sim_beta=o["sim_beta"], search=o["similarity_search"], recovery=o["recovery"])


def sito_problem(o: dict) -> str | None:
    """What is wrong with a full set of options (``PARAMS.resolve``), or None."""
    return _config(o).problem() or percent_problem(o["start_percent"], o["end_percent"])


def apply_sito(model, **options):
    """Return a clone of ``model`` with SiTo installed (the input model is never modified);
    options not given take their defaults from :data:`PARAMS`."""
    o = PARAMS.resolve(options)
    problem = sito_problem(o)
    if problem:
        raise ValueError(f"SiTo Token Pruning: {problem}")
    factor, warning = hooks.resolve_max_downsample(model, str(o["max_downsample"]))
    if factor is None:
        log.warning("SiTo Token Pruning: %s; model passed through unchanged.", warning)
        return model
    if warning:
        log.warning("SiTo Token Pruning: %s", warning)
    m = model.clone()
    if o["prune_ratio"] <= 0 or not (o["prune_self_attn"] or o["prune_cross_attn"] or o["prune_mlp"]):
        return m
    cfg = _config(o)
    uid = hooks.new_uid("sito")
    layers = "+".join(n for n, on in (("attn1" + ("" if o["prune_kv"] else "(q only)"), o["prune_self_attn"]),
                                      ("attn2", o["prune_cross_attn"]), ("mlp", o["prune_mlp"])) if on)

    def planner(n, grid, state, call):
        return sito.sito_plan(n, grid, cfg, call.generator if cfg.noise_alpha else None, call.chunks)

    def summary(state):
        return (f"SiTo: r={o['prune_ratio']:g} on {layers}, levels up to 1/{factor}: {state.summary_levels()}; "
                f"active in {len(state.active_steps)}/{state.total_steps} steps")

    hooks.install_block_pruning(m, uid, hooks.BlockPruning(self_attn=o["prune_self_attn"],
                                                           cross_attn=o["prune_cross_attn"], mlp=o["prune_mlp"],
                                                           prune_kv=o["prune_kv"], max_downsample=factor), planner)
    hooks.install_run_lifecycle(m, uid, "sito", o["start_percent"], o["end_percent"], o["seed"], summary)
    return m


class SiToTokenPruning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build(
            io.Schema,
            node_id="SiToTokenPruning",
            display_name="SiTo Token Pruning",
            category=CATEGORY,
            description=("Similarity-based token pruning (SiTo, AAAI 2025): in the highest-resolution transformer "
                         "blocks, tokens that closely resemble a neighbouring 'base' token skip self-attention and "
                         "borrow that token's result. Training-free; works on SD1.x, SD2.x and SDXL UNets."),
            inputs=[build(io.Model.Input, id="model", tooltip="The diffusion model to accelerate. It is cloned, never modified.")]
            + PARAMS.schema_inputs(),
            outputs=[build(io.Model.Output, tooltip="The model with SiTo token pruning applied.")],
        )

    @classmethod
    def validate_inputs(cls, prune_ratio=None, sx=None, sy=None, start_percent=None, end_percent=None):
        # Only the inputs named here are handed over (ComfyUI still range-checks the others).
        o = PARAMS.resolve(dict(prune_ratio=prune_ratio, sx=sx, sy=sy, start_percent=start_percent,
                                end_percent=end_percent), skip_none=True)
        return sito_problem(o) or True

    @classmethod
    def execute(cls, model, **options) -> io.NodeOutput:
        return io.NodeOutput(apply_sito(model, **options))
