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
    "tiny_chroma",
    "tiny_qwen_image",
    "tiny_wan21",
    "tiny_wan21_i2v",
    "tiny_wan22_ti2v",
    "tiny_hunyuan_video",
    "tiny_ltxv",
    "VIDEO_KINDS",
    "build",
    "make_conds",
    "run_sampler",
    "seeded_fill_",
]

# Latent channels per family: SD1.x/2.x/XL use the 4-channel VAE, SD3 and Flux the 16-channel one;
# Chroma the Flux VAE; Qwen-Image, Wan 2.1 and HunyuanVideo 16-channel video VAEs, Wan 2.2 (TI2V 5B)
# its 48-channel VAE, LTX-Video a 128-channel one.
LATENT_CHANNELS = {"sd15": 4, "sd2v": 4, "sdxl": 4, "sd3": 16, "flux": 16,
                   "chroma": 16, "qwen_image": 16, "wan21": 16, "wan21_i2v": 16, "wan22_ti2v": 48,
                   "hunyuan_video": 16, "ltxv": 128}
KINDS = ("sd15", "sd2v", "sdxl", "sd3", "flux")  # the image families of the original matrices
DIT_KINDS = ("chroma", "qwen_image", "wan21", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "ltxv")
# latents with a frame axis ([B, C, T, H, W]); Qwen-Image's are one frame
VIDEO_KINDS = ("qwen_image", "wan21", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "ltxv")

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


# --------------------------------------------------------------------------------------
# The DiTs users run in 2026 (CAT on frames x height x width grids). Real head sizes, rotary
# axes, patching, context widths and block structure; two blocks (and a reduced width) each.
# --------------------------------------------------------------------------------------

def tiny_chroma(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Chroma: Flux's double/single blocks without their own modulation (the distilled-guidance
    approximator produces every block's modulation), T5 context 4096, no pooled vector."""
    cfg = {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
        "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
        "axes_dim": [8, 28, 28], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "in_dim": 64, "out_dim": 256, "hidden_dim": 256, "n_layers": 2,
    }
    mc = _config(comfy.supported_models.Chroma, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_qwen_image(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Qwen-Image: dual-stream blocks (joint attention over text + image, separate MLPs),
    128-wide heads with rotary axes 16+56+56, Qwen2.5-VL context 3584, one-frame 16-channel latents."""
    cfg = {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 3584,
        "axes_dims_rope": (16, 56, 56),
    }
    mc = _config(comfy.supported_models.QwenImage, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def _wan_config(**kw) -> dict:
    # Real Wan: 128-wide heads (model_detection: num_heads = dim // 128), patch (1, 2, 2), umT5 4096
    # context, 256-wide frequency embedding; the 1.3B/14B/5B models differ in width, depth, latent
    # channels and (14B I2V) the image cross-attention.
    return {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
            "dim": 256, "ffn_dim": 512, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 2,
            "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, **kw}


def tiny_wan21(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Wan 2.1 text-to-video (the 1.3B/14B T2V layout): self-attention with 3-D RoPE, text
    cross-attention, FFN, per-block modulation; 16-channel latents."""
    mc = _config(comfy.supported_models.WAN21_T2V, _wan_config(), dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_wan21_i2v(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Wan 2.1 image-to-video (the 14B I2V layout, also Wan 2.2 A14B I2V): 36 input channels (noise
    + 4 mask + 16 start-image latent channels), CLIP-vision tokens (257 x 1280) in the cross-attention."""
    mc = _config(comfy.supported_models.WAN21_I2V, _wan_config(model_type="i2v", in_dim=36), dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_wan22_ti2v(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Wan 2.2 TI2V (the 5B layout): 48-channel latents of the 16x VAE; image-to-video puts the
    start image in the first latent frame with a denoise mask of 0 there (per-frame timesteps)."""
    mc = _config(comfy.supported_models.WAN22_T2V, _wan_config(in_dim=48, out_dim=48), dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_hunyuan_video(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """HunyuanVideo: Flux-style double/single blocks with the image stream first in the joint
    sequence, 128-wide heads with rotary axes 16+56+56, patch (1, 2, 2), LLaMA context 4096 with
    its attention mask, CLIP-L pooled 768, guidance embedding."""
    cfg = {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
        "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2],
        "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
        "use_cond_type_embedding": False, "vision_in_dim": None,
    }
    mc = _config(comfy.supported_models.HunyuanVideo, cfg, dtype)
    return _wrap(mc.get_model({}), seed)


def tiny_ltxv(dtype: torch.dtype = torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """LTX-Video: 128-channel latents patchified 1x1x1 (one token per latent voxel), blocks with
    RoPE self-attention, T5 cross-attention and a GEGLU feed-forward, per-token timesteps."""
    cfg = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 256, "attention_head_dim": 64,
           "num_attention_heads": 4, "caption_channels": 4096, "num_layers": 2}
    mc = _config(comfy.supported_models.LTXV, cfg, dtype)
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


_BUILDERS = {"sd15": tiny_sd15, "sd2v": tiny_sd2v, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux,
             "chroma": tiny_chroma, "qwen_image": tiny_qwen_image, "wan21": tiny_wan21, "wan21_i2v": tiny_wan21_i2v,
             "wan22_ti2v": tiny_wan22_ti2v, "hunyuan_video": tiny_hunyuan_video, "ltxv": tiny_ltxv}


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
    # the 2026 DiTs (fewer text tokens than the real encoders pad to, to keep the tests fast)
    "chroma": (4096, 32, None),  # T5-XXL
    "qwen_image": (3584, 32, None),  # Qwen2.5-VL 7B
    "wan21": (4096, 32, None),  # umT5-XXL
    "wan21_i2v": (4096, 32, None),
    "wan22_ti2v": (4096, 32, None),
    "hunyuan_video": (4096, 32, 768),  # LLaMA-3 8B hidden states + CLIP-L pooled
    "ltxv": (4096, 32, None),  # T5-XXL
}


class _ClipVisionOutput:
    """What CLIPVisionEncode hands Wan I2V: the penultimate hidden states, 257 tokens x 1280."""

    def __init__(self, hidden):
        self.penultimate_hidden_states = hidden


def make_conds(kind: str, batch: int = 1, seed: int = 0, tokens: int | None = None, text_mask: bool = False):
    """Random (positive, negative) conditioning in ComfyUI's ``[[tensor, {extras}]]`` form.

    Extras are what each ``model_base`` class's ``extra_conds`` reads:
      * SDXL: ``pooled_output`` (B, 1280) is required (``sdxl_pooled`` indexes it); the
        size/crop embeddings default from the latent size (``width``/``height`` are filled
        in by ``comfy.samplers.encode_model_conds``), crop defaults to 0.
      * SD3: ``pooled_output`` (B, 2048) becomes ``y``.
      * Flux: ``pooled_output`` (B, 768) becomes ``y``; ``guidance`` (default 3.5) feeds
        the guidance embedding.
      * LTX-Video: the T5 padding ``attention_mask``; HunyuanVideo: the LLaMA one with
        ``text_mask`` (its encoder drops an all-ones mask, and ComfyUI's HunyuanVideo
        accepts a mask on one-row calls only, i.e. cfg 1).
      * Wan 2.1 I2V: ``clip_vision_output`` (257 CLIP-vision tokens of 1280).
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
        if kind == "chroma":  # its T5-only encoder gives no pooled vector (Flux's encode_adm reads the key)
            extras["pooled_output"] = None
        if kind == "ltxv" or (kind == "hunyuan_video" and text_mask):  # padding mask (last quarter padded)
            mask = torch.ones((batch, tokens), dtype=torch.long)
            mask[:, tokens - tokens // 4:] = 0
            extras["attention_mask"] = mask
        if kind == "wan21_i2v":
            extras["clip_vision_output"] = _ClipVisionOutput(torch.randn((batch, 257, 1280), generator=gen))
        return [[ctx, extras]]

    positive = one()
    negative = one()
    return positive, negative


def _kind_of(patcher) -> str:
    m = patcher.model
    if isinstance(m, comfy.model_base.Chroma):
        return "chroma"
    if isinstance(m, comfy.model_base.QwenImage):
        return "qwen_image"
    if isinstance(m, comfy.model_base.WAN22):
        return "wan22_ti2v"
    if isinstance(m, comfy.model_base.WAN21):
        return "wan21_i2v" if m.image_to_video else "wan21"
    if isinstance(m, comfy.model_base.HunyuanVideo):
        return "hunyuan_video"
    if isinstance(m, comfy.model_base.LTXV):
        return "ltxv"
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
def _image_to_video(kind: str, latent: torch.Tensor, positive, negative, seed: int):
    """What the family's image-to-video node does to the latent and the conds (start image = a
    random latent frame): Wan 2.1 I2V (WanImageToVideo) concatenates the start image and a mask
    (0 on the first frame) to the input channels; Wan 2.2 TI2V (Wan22ImageToVideoLatent),
    LTX-Video (LTXVImgToVideo) and HunyuanVideo's "v2 (replace)" (HunyuanImageToVideo) put it in
    the first latent frame with a noise mask of 0 there (HunyuanVideo also sets guiding_frame_index).
    Returns (latent, positive, negative, noise_mask)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 99)
    b, c, t, h, w = latent.shape
    image = torch.randn((1, c, 1, h, w), generator=gen)
    extra: dict = {}
    noise_mask = None
    if kind == "wan21_i2v":
        concat = torch.zeros((1, 16, t, h, w))
        concat[:, :, :1] = image[:, :16]
        mask = torch.ones((1, 1, t, h, w))
        mask[:, :, :1] = 0.0
        extra = {"concat_latent_image": concat, "concat_mask": mask}
    elif kind in ("wan22_ti2v", "ltxv", "hunyuan_video"):
        latent = latent.clone()
        latent[:, :, :1] = image
        noise_mask = torch.ones((b, 1, t, h, w) if kind != "ltxv" else (b, 1, t, 1, 1))
        noise_mask[:, :, :1] = 0.0
        if kind == "hunyuan_video":
            extra = {"guiding_frame_index": 0}
    else:
        raise ValueError(f"{kind} has no image-to-video mode here")

    def add(conds):
        return [[c, {**d, **extra}] for c, d in conds]
    return latent, add(positive), add(negative), noise_mask


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
    frames: int | None = None,
    i2v: bool = False,
    noise_mask: torch.Tensor | None = None,
    callback=None,
) -> torch.Tensor:
    """Sample with ComfyUI's real ``comfy.sample.sample`` - the call the KSampler node makes.

    ``latent`` (B, C, H, W) enables img2img with ``denoise`` < 1; by default an empty
    (zero) latent of the family's channel count is used, as EmptyLatentImage does.
    Video families (``VIDEO_KINDS`` but Qwen-Image) get a ``(B, C, frames, H, W)`` latent
    (``frames`` latent frames, default 3), as EmptyHunyuanLatentVideo / EmptyLTXVLatentVideo do;
    ``i2v`` turns it into the family's image-to-video setup (:func:`_image_to_video`).
    Conditioning defaults to ``make_conds(kind, seed=seed)`` (broadcast over the batch by
    ComfyUI). Returns the final latent (float32, CPU).
    """
    kind = _kind_of(patcher)
    if latent is None:
        h, w = latent_hw
        if kind in VIDEO_KINDS and kind != "qwen_image":
            latent = torch.zeros((batch, LATENT_CHANNELS[kind], frames or 3, h, w), dtype=torch.float32)
        else:
            latent = torch.zeros((batch, LATENT_CHANNELS[kind], h, w), dtype=torch.float32)
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    if positive is None or negative is None:
        pos, neg = make_conds(kind, seed=seed)
        positive = pos if positive is None else positive
        negative = neg if negative is None else negative
    if i2v:
        latent, positive, negative, noise_mask = _image_to_video(kind, latent, positive, negative, seed)
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
        noise_mask=noise_mask,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )
    return out.float().cpu()
