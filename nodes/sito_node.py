"""SiTo Token Pruning node (Zhang et al., "Training-Free and Hardware-Friendly Acceleration
for Diffusion Models via Similarity-based Token Pruning", AAAI 2025)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..pruning_core import sito
from ..pruning_core.sito import SiToConfig
from . import adapter
from ._schema import build

log = logging.getLogger("token_pruning_cache")

CATEGORY = "model_patches/token_pruning"
DOWNSAMPLE_CHOICES = ["auto", "1", "2", "4", "8"]


def sito_problem(prune_ratio: float, sx: int, sy: int, start_percent: float = 0.0, end_percent: float = 1.0,
                 similarity_search: str = "local", recovery: str = "base") -> str | None:
    problem = SiToConfig(prune_ratio=prune_ratio, sx=sx, sy=sy, search=similarity_search, recovery=recovery).problem()
    if problem is None and not 0.0 <= start_percent <= end_percent <= 1.0:
        problem = f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1"
    return problem


def apply_sito(model, *, prune_ratio=0.5, max_downsample="auto", prune_self_attn=True, prune_cross_attn=False,
               prune_mlp=False, prune_kv=True, sx=2, sy=2, noise_alpha=0.1, sim_beta=1.0, start_percent=0.0,
               end_percent=1.0, seed=0, similarity_search="local", recovery="base"):
    """Return a clone of ``model`` with SiTo installed (the input model is never modified)."""
    problem = sito_problem(prune_ratio, sx, sy, start_percent, end_percent, similarity_search, recovery)
    if problem:
        raise ValueError(f"SiTo Token Pruning: {problem}")
    factor, warning = adapter.resolve_max_downsample(model, str(max_downsample))
    if factor is None:
        log.warning("SiTo Token Pruning: %s; model passed through unchanged.", warning)
        return model
    if warning:
        log.warning("SiTo Token Pruning: %s", warning)
    m = model.clone()
    if prune_ratio <= 0 or not (prune_self_attn or prune_cross_attn or prune_mlp):
        return m
    cfg = SiToConfig(prune_ratio=prune_ratio, sx=sx, sy=sy, noise_alpha=noise_alpha, sim_beta=sim_beta,
                     search=similarity_search, recovery=recovery)
    uid = adapter.new_uid("sito")
    layers = "+".join(n for n, on in (("attn1" + ("" if prune_kv else "(q only)"), prune_self_attn),
                                      ("attn2", prune_cross_attn), ("mlp", prune_mlp)) if on)

    def planner(n, grid, state):
        return sito.sito_plan(n, grid, cfg, state.generator(n.device) if cfg.noise_alpha else None)

    def summary(state):
        return (f"SiTo: r={prune_ratio:g} on {layers}, levels up to 1/{factor}: {state.summary_levels()}; "
                f"active in {len(state.active_steps)}/{state.total_steps} steps")

    adapter.install_block_pruning(m, uid, adapter.BlockPruning(self_attn=prune_self_attn, cross_attn=prune_cross_attn,
                                                               mlp=prune_mlp, prune_kv=prune_kv, max_downsample=factor),
                                  planner)
    adapter.install_run_lifecycle(m, uid, "sito", start_percent, end_percent, seed, summary)
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
            inputs=[
                build(io.Model.Input, id="model", tooltip="The diffusion model to accelerate. It is cloned, never modified."),
                build(io.Float.Input, id="prune_ratio", default=0.5, min=0.0, max=0.95, step=0.05,
                      tooltip="Fraction of tokens that skip the pruned layers. 0 = off (bit-identical output). At most "
                              "1 - 1/(sx*sy): 0.75 with 2x2 windows. 0.5 is a good start; 0.7 is faster, softer."),
                build(io.Combo.Input, id="max_downsample", options=DOWNSAMPLE_CHOICES, default="auto",
                      tooltip="Which UNet levels are pruned. auto = the highest-resolution level that has attention "
                              "(64x64 tokens at 512 px on SD1.5, at 1024 px on SDXL). 2, 4 or 8 also prunes the coarser levels "
                              "(8 includes the SD1.5 middle block)."),
                build(io.Boolean.Input, id="prune_self_attn", default=True,
                      tooltip="Run self-attention on the kept tokens only (the main speedup)."),
                build(io.Boolean.Input, id="prune_cross_attn", default=False,
                      tooltip="Also run cross-attention (text) on the kept tokens only. Small gain; not recommended by the paper."),
                build(io.Boolean.Input, id="prune_mlp", default=False,
                      tooltip="Also run the feed-forward on the kept tokens only. Strongly discouraged by the paper (quality drop)."),
                build(io.Boolean.Input, id="prune_kv", default=True,
                      tooltip="On: pruned tokens leave the queries, keys and values (SiTo). Off: only the queries are "
                              "pruned and every token stays a key/value (like ComfyUI's ToMe) - slower, more faithful."),
                build(io.Int.Input, id="sx", default=2, min=1, max=8,
                      tooltip="Window width in tokens; each window keeps one base token."),
                build(io.Int.Input, id="sy", default=2, min=1, max=8,
                      tooltip="Window height in tokens; each window keeps one base token."),
                build(io.Float.Input, id="noise_alpha", default=0.1, min=0.0, max=10.0, step=0.01,
                      tooltip="Weight of the Gaussian noise added to the similarity score when choosing base tokens (tie-breaker)."),
                build(io.Float.Input, id="sim_beta", default=1.0, min=0.0, max=10.0, step=0.05,
                      tooltip="Weight of the similarity score (sum of cosine similarities) when choosing base tokens."),
                build(io.Combo.Input, id="similarity_search", options=["local", "global"], default="local",
                      tooltip="Where a token looks for its most similar base token. local = the 3x3 surrounding "
                              "windows (fast); global = every base token, as the official code (costs an N x N/4 "
                              "similarity per block, as much as the attention it saves)."),
                build(io.Float.Input, id="start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Start pruning at this point of the denoising schedule (0 = first step)."),
                build(io.Float.Input, id="end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Stop pruning after this point of the denoising schedule (1 = last step)."),
                build(io.Int.Input, id="seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                      tooltip="Seed of the base-token noise; same seed, same image."),
                build(io.Combo.Input, id="recovery", options=["base", "kept", "merge"], default="base",
                      tooltip="Whose attention output a pruned token copies. base = its most similar base token "
                              "(the paper's figure); kept = its most similar kept token, base or not (the official "
                              "code; one more small similarity per block, searched as similarity_search says); "
                              "merge = base, and each base token is computed as the mean of itself and the tokens "
                              "that copy it (ToMe's averaging: more faithful at the same speed)."),
            ],
            outputs=[build(io.Model.Output, tooltip="The model with SiTo token pruning applied.")],
        )

    @classmethod
    def validate_inputs(cls, prune_ratio=0.5, sx=2, sy=2, start_percent=0.0, end_percent=1.0):
        return sito_problem(prune_ratio, sx, sy, start_percent, end_percent) or True

    @classmethod
    def execute(cls, model, prune_ratio=0.5, max_downsample="auto", prune_self_attn=True, prune_cross_attn=False,
                prune_mlp=False, prune_kv=True, sx=2, sy=2, noise_alpha=0.1, sim_beta=1.0, start_percent=0.0,
                end_percent=1.0, seed=0, similarity_search="local", recovery="base") -> io.NodeOutput:
        return io.NodeOutput(apply_sito(model, prune_ratio=prune_ratio, max_downsample=max_downsample,
                                        prune_self_attn=prune_self_attn, prune_cross_attn=prune_cross_attn,
                                        prune_mlp=prune_mlp, prune_kv=prune_kv, sx=sx, sy=sy, noise_alpha=noise_alpha,
                                        sim_beta=sim_beta, start_percent=start_percent, end_percent=end_percent,
                                        seed=seed, similarity_search=similarity_search, recovery=recovery))
