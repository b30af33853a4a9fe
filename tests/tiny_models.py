"""Tiny, real ComfyUI diffusion models with seeded random weights, for fast CPU tests.

No trained weights can be downloaded on the machines this pack is developed on, so the
tests build models from ComfyUI's *own* classes (``comfy.supported_models`` configs and
``comfy.model_base`` wrappers) and fill them with deterministic random values.  Every
builder returns a ``comfy.model_patcher.ModelPatcher`` on the CPU, which is exactly what a
ComfyUI node receives as ``MODEL`` - so node code under test sees the real
``apply_model`` path, the real ``transformer_options``/patch machinery and the real
samplers.

Structure is kept real where the pack cares about it (attention at the levels where the
real family has it, real head sizes, real context/pooled widths); only depth (and, for the
DiTs, width) is shrunk. On 2 CPU cores a default ``run_sampler`` call (16x24 latent,
batch 2, 4 euler steps, CFG) takes about a second for the DiTs and several seconds for
the UNets, which keep the real 320-channel first level; tests that need many runs should
pass a smaller ``latent_hw`` (8x8 works for every family).

Requires ComfyUI to be importable with ``--cpu`` already applied (tests/conftest.py does
this before any test module imports this file).
"""

from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models

# The seeded initialisation is shared with scripts/make_checkpoint.py (the checkpoint files
# of the end-to-end tests are initialised the same way); the reasoning for the scales is
# documented there. scripts/ is put on sys.path by tests/conftest.py.
from make_checkpoint import UNET_COMMON, seeded_fill_

__all__ = [
    "LATENT_CHANNELS",
    "KINDS",
    "tiny_sd15",
    "tiny_sd2v",
    "tiny_sdxl",
    "tiny_sd3",
    "tiny_flux",
    "build",
    "make_conds",
    "run_sampler",
    "seeded_fill_",
]

# Latent channels per family: SD1.x/2.x/XL use the 4-channel VAE, SD3 and Flux the 16-channel one.
LATENT_CHANNELS = {"sd15": 4, "sd2v": 4, "sdxl": 4, "sd3": 16, "flux": 16}
KINDS = tuple(LATENT_CHANNELS)

# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------
_CPU = torch.device("cpu")


def _wrap(model: comfy.model_base.BaseModel, seed: int) -> comfy.model_patcher.ModelPatcher:
    # Only the diffusion model is randomised: model_sampling holds the (meaningful) sigma
    # schedule buffers, which must keep the values ComfyUI computed.
    seeded_fill_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=_CPU, offload_device=_CPU)


def _config(cls, unet_config: dict, dtype: torch.dtype):
    mc = cls(unet_config)
    # manual_cast None: weights are created directly in `dtype`, as ComfyUI does when the
    # device supports that dtype.
    mc.set_inference_dtype(dtype, None)
    return mc


def _unet_config(**kw) -> dict:
    # Keys as comfy.model_detection.detect_unet_config produces them for a checkpoint (the
    # same base the checkpoint generator writes), so these tiny models go through exactly the
    # constructor path of real ones.
    return {**UNET_COMMON, "adm_in_channels": None, **kw}


def tiny_sd15(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SD1.5 family (eps, context 768, 8 heads, conv proj_in), two levels, attention at both.

    Like real SD1.5, the highest-resolution level (320 channels) has self-attention - the
    blocks token pruning targets."""
    cfg = _unet_config(
        model_channels=320,
        channel_mult=[1, 2],
        num_res_blocks=[1, 1],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        use_linear_in_transformer=False,
        context_dim=768,
    )
    mc = _config(comfy.supported_models.SD15, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_sd2v(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SD2.x v-prediction family (context 1024, 64-channel heads, linear proj_in)."""
    cfg = _unet_config(
        model_channels=320,
        channel_mult=[1, 2],
        num_res_blocks=[1, 1],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        use_linear_in_transformer=True,
        context_dim=1024,
    )
    mc = _config(comfy.supported_models.SD20, cfg, dtype)
    # SD20.model_type() guesses v-prediction from trained weight statistics; there are
    # none here, so choose the model type explicitly (what a 768-v checkpoint resolves to).
    model = comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.V_PREDICTION)
    return _wrap(model, seed)


def tiny_sdxl(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SDXL family: context 2048, 2816-wide ADM vector (pooled 1280 + 6 size embeddings).

    As in real SDXL the highest-resolution level has *no* transformer; attention starts
    one level down."""
    cfg = _unet_config(
        model_channels=320,
        channel_mult=[1, 2, 2],
        num_res_blocks=[1, 1, 1],
        transformer_depth=[0, 1, 1],
        transformer_depth_output=[0, 0, 1, 1, 1, 1],
        transformer_depth_middle=1,
        use_linear_in_transformer=True,
        context_dim=2048,
        adm_in_channels=2816,
        num_classes="sequential",
    )
    mc = _config(comfy.supported_models.SDXL, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_sd3(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SD3 MMDiT: joint text/image blocks, patch 2, pooled 2048, context 4096 -> hidden.

    MMDiT ties width to ``depth`` (hidden = 64 * depth, one 64-wide head per unit of
    depth); depth=4 gives hidden 256 / 4 heads, and ``num_blocks`` keeps only 3 joint
    blocks (the last one context-"pre_only", as in the real model)."""
    cfg = {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": 4,
        "num_blocks": 3,
        "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 256}},
        "num_patches": 32 * 32,
        "pos_embed_max_size": 32,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }
    mc = _config(comfy.supported_models.SD3, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_flux(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Flux (dev-style, guidance embedding): 2 double-stream + 2 single-stream blocks,
    hidden 256 with 4 heads of 64 (RoPE axes 8+28+28), T5 context 4096, pooled 768."""
    cfg = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 768,
        "context_in_dim": 4096,
        "hidden_size": 256,
        "mlp_ratio": 4.0,
        "num_heads": 4,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [8, 28, 28],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": True,
    }
    mc = _config(comfy.supported_models.Flux, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def micro(kind: str = "sd15", dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Micro models for the long compatibility matrices: the tiny SD1.5 / SDXL layouts with 64
    base channels (a few ms per call, so hundreds of sampler runs stay affordable)."""
    if kind == "sd15":
        cfg = _unet_config(model_channels=64, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                           transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                           use_linear_in_transformer=False, context_dim=768)
        mc = _config(comfy.supported_models.SD15, cfg, dtype)
    elif kind == "sdxl":
        cfg = _unet_config(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
                           transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1],
                           transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048,
                           adm_in_channels=2816, num_classes="sequential")
        mc = _config(comfy.supported_models.SDXL, cfg, dtype)
    else:
        raise ValueError(f"no micro model for {kind!r} (sd15, sdxl)")
    return _wrap(mc.get_model({}), seed)


def sample_sigmas(patcher, steps: int, scheduler: str = "normal") -> list[float]:
    """The sigma schedule ComfyUI's sampler will use for ``steps`` steps."""
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps).tolist()


def step_of(sigma: float, sigmas: list[float]) -> int:
    """Index of the step whose sigma a model call ran at (fails if it is not on the schedule)."""
    diffs = [abs(sigma - s) for s in sigmas[:-1]]
    j = min(range(len(diffs)), key=diffs.__getitem__)
    assert diffs[j] <= 1e-5 * max(abs(sigma), 1.0), f"call at sigma {sigma} is not on the schedule {sigmas}"
    return j


_BUILDERS = {"sd15": tiny_sd15, "sd2v": tiny_sd2v, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


def build(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Builder lookup by family name (one of KINDS)."""
    return _BUILDERS[kind](dtype=dtype, seed=seed)


# --------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------
# (context width, default token count, pooled width) per family, as the real text
# encoders produce them: CLIP-L 768; OpenCLIP-H 1024; SDXL CLIP-L+G concatenated 2048
# with G's pooled 1280; SD3 CLIP-L+G padded to T5's 4096, 77 CLIP + 77 T5 tokens, pooled
# L+G 2048; Flux T5-XXL 4096 with CLIP-L pooled 768.
_COND_SPEC = {
    "sd15": (768, 77, None),
    "sd2v": (1024, 77, None),
    "sdxl": (2048, 77, 1280),
    "sd3": (4096, 154, 2048),
    "flux": (4096, 256, 768),
}


def make_conds(kind: str, batch: int = 1, seed: int = 0, tokens: int | None = None):
    """Random (positive, negative) conditioning in ComfyUI's ``[[tensor, {extras}]]`` form.

    Extras are what each ``model_base`` class's ``extra_conds`` reads:
      * SDXL: ``pooled_output`` (B, 1280) is required (``sdxl_pooled`` indexes it); the
        size/crop embeddings default from the latent size (``width``/``height`` are filled
        in by ``comfy.samplers.encode_model_conds``), crop defaults to 0.
      * SD3: ``pooled_output`` (B, 2048) becomes ``y``.
      * Flux: ``pooled_output`` (B, 768) becomes ``y``; ``guidance`` (default 3.5) feeds
        the guidance embedding.
    """
    dim, default_tokens, pooled = _COND_SPEC[kind]
    tokens = default_tokens if tokens is None else tokens
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def one():
        ctx = torch.randn((batch, tokens, dim), generator=gen)
        extras = {}
        if pooled is not None:
            extras["pooled_output"] = torch.randn((batch, pooled), generator=gen)
        if kind == "flux":
            extras["guidance"] = 3.5
        return [[ctx, extras]]

    positive = one()
    negative = one()
    return positive, negative


def _kind_of(patcher) -> str:
    m = patcher.model
    if isinstance(m, comfy.model_base.Flux):
        return "flux"
    if isinstance(m, comfy.model_base.SD3):
        return "sd3"
    if isinstance(m, comfy.model_base.SDXL):
        return "sdxl"
    ctx = m.model_config.unet_config.get("context_dim")
    return "sd2v" if ctx == 1024 else "sd15"


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def run_sampler(
    patcher,
    latent_hw=(16, 24),
    batch: int = 2,
    steps: int = 4,
    cfg: float = 7.5,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    denoise: float = 1.0,
    latent: torch.Tensor | None = None,
    positive=None,
    negative=None,
) -> torch.Tensor:
    """Sample with ComfyUI's real ``comfy.sample.sample`` - the call the KSampler node makes.

    ``latent`` (B, C, H, W) enables img2img with ``denoise`` < 1; by default an empty
    (zero) latent of the family's channel count is used, as EmptyLatentImage does.
    Conditioning defaults to ``make_conds(kind, seed=seed)`` (broadcast over the batch by
    ComfyUI). Returns the final latent (float32, CPU).
    """
    kind = _kind_of(patcher)
    if latent is None:
        h, w = latent_hw
        latent = torch.zeros((batch, LATENT_CHANNELS[kind], h, w), dtype=torch.float32)
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    if positive is None or negative is None:
        pos, neg = make_conds(kind, seed=seed)
        positive = pos if positive is None else positive
        negative = neg if negative is None else negative
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        positive,
        negative,
        latent,
        denoise=denoise,
        disable_pbar=True,
        seed=seed,
    )
    return out.float().cpu()
