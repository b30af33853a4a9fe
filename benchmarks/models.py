"""The benchmarked model and its inputs.

``build_model`` gives a real checkpoint (``load_checkpoint``) or a random-weight model built
with ComfyUI's own classes: the SD1.5 UNet (``build_random_sd15``), the SDXL base UNet
(``build_random_sdxl``), an SD3-medium-shaped MMDiT (``build_random_mmdit``), a Wan-2.1-1.3B- or
Qwen-Image-shaped DiT (``build_random_dit``), in the dtype of ``--dtype``; ``model_family`` says which
kind the pack sees in it.
``make_testbed`` adds what every variant shares, the latent, noise and random text conds
(``make_inputs``) and the sampler settings, as a ``Testbed`` that samples a model.
``diffusion_model_wrappers_run`` probes whether a model's forward runs ComfyUI's
DIFFUSION_MODEL wrappers (which EasyCache needs); ``comfyui_version`` says which ComfyUI it is.

Everything of ComfyUI, torch and the pack is imported inside the functions, after
``pack.bootstrap()``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pack

# The standard SD1.5 UNet (comfy/model_detection.py, ``SD15`` of unet_config_from_diffusers_unet).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# The SDXL base UNet (2.6 B parameters): no attention at the full-resolution level, 2 and 10
# transformer blocks per SpatialTransformer at 1/2 and 1/4, 64-wide heads, linear proj_in, CLIP-L+G
# context 2048, ADM vector 2816 (pooled 1280 + six 256-wide size/crop embeddings).
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# torch dtype of each --dtype choice
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


# SD3 medium as comfy.model_detection.detect_unet_config reads it from the released
# sd3_medium checkpoint: ComfyUI's MMDiT ties the width to ``depth`` (hidden = 64 * depth, one
# 64-wide head per unit), so depth 24 = hidden 1536 / 24 heads; 24 joint blocks (the last one's
# text stream "pre_only"); patch 2 on the 16-channel SD3 latent; CLIP-L+G pooled 2048 into
# y_embedder; CLIP+T5 context of width 4096 into context_embedder; a 192x192-patch pos_embed
# table; no q/k norm and no extra x-block self-attention (those are SD3.5). ``num_blocks`` (the
# number of joint blocks) is set from --dit-depth.
SD3_MEDIUM_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "num_patches": 192 * 192, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
SD3_MEDIUM_BLOCKS = 24
SD3_TEXT_TOKENS = 154  # 77 CLIP-L/G + 77 T5 tokens, as ComfyUI's SD3 text encoder pads them
TINY_MMDIT_WIDTH_UNITS = 4  # --tiny --family mmdit: hidden 256 = 4 heads x 64


# Wan 2.1 text-to-video 1.3B as comfy.model_detection reads it from the released checkpoint: dim
# 1536 = 12 heads x 128, FFN 8960, 256-wide frequency embedding, patch (1, 2, 2) on the 16-channel
# latent of the Wan 2.1 VAE (4x in time, 8x in space), umT5-XXL context 512 x 4096, q/k RMS norms
# and cross-attention norm; 30 blocks. ``num_layers`` is set from --dit-depth.
WAN21_1_3B_CONFIG = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
    "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12,
    "num_layers": 30, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
WAN_TEXT_TOKENS = 512  # ComfyUI's umT5 tokenizer pads Wan prompts to 512 tokens
# Qwen-Image (20 B): 60 dual-stream blocks of width 3072 = 24 heads x 128 (MLP 4x), patch 2 on the
# 16-channel Wan 2.1 VAE latent (64 input channels after packing), Qwen2.5-VL context of width 3584,
# rotary axes 16 + 56 + 56. ``num_layers`` is set from --dit-depth.
QWEN_IMAGE_CONFIG = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56),
}
# Qwen-Image's text encoder keeps a prompt's own tokens (no padding); a prompt of one or two sentences
QWEN_TEXT_TOKENS = 64
# the DiT families of build_random_dit: (supported_models class, config, depth key, real depth)
DIT_FAMILIES = {
    "wan": ("WAN21_T2V", WAN21_1_3B_CONFIG, "num_layers", 30),
    "qwen": ("QwenImage", QWEN_IMAGE_CONFIG, "num_layers", 60),
}


def _fill_random_(module, seed: int) -> None:
    """Seeded, deterministic weights with fan-in scaling so activations stay O(1).

    Matrices/convs ~ N(0, 1/fan_in), norm scales 1 and shifts 0, other vectors (biases) ~ N(0, 0.02^2).
    Every tensor draws from its own generator seeded with (seed, its index), so the result
    does not depend on the order the worker threads run in (two threads halve the ~860 M draws).
    """
    import torch
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for t_name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point():
                jobs.append((len(jobs), is_norm, t_name, t))

    def fill(job):
        i, is_norm, t_name, t = job
        with torch.no_grad():
            if is_norm:
                t.fill_(1.0 if t_name == "weight" else 0.0)
                return
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)
            if t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=gen).mul_(1.0 / math.sqrt(t[0].numel())))
            else:
                t.copy_(torch.randn(t.shape, generator=gen).mul_(0.02))

    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, sorted(jobs, key=lambda j: -j[3].numel())))


def build_random_sd15(seed: int, tiny: bool = False, dtype: str = "fp32"):
    """The real-size SD1.5 UNet from ComfyUI's own classes, seeded random weights (fp32 unless
    ``dtype`` says otherwise: the weights are drawn in fp32 and rounded to it).

    ``tiny``: the same family shrunk for smoke tests (two levels, one res block each; real
    widths, heads and context), about 1/10 of the parameters.
    """
    import comfy.supported_models

    cfg = dict(SD15_UNET_CONFIG)
    if tiny:
        cfg.update(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                   transformer_depth_output=[1, 1, 1, 1])
    return _random_unet(comfy.supported_models.SD15, cfg, seed, "SD15" + ("-tiny" if tiny else ""), dtype)


def build_random_sdxl(seed: int, tiny: bool = False, dtype: str = "fp32"):
    """The SDXL base UNet from ComfyUI's own classes (``comfy.supported_models.SDXL``), seeded random
    weights. ``tiny``: two levels with one transformer block each at 1/2 (the highest-resolution level
    keeps no attention, as in SDXL), for smoke tests."""
    import comfy.supported_models

    cfg = dict(SDXL_UNET_CONFIG)
    if tiny:
        cfg.update(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[0, 1], transformer_depth_middle=1,
                   transformer_depth_output=[0, 0, 1, 1])
    return _random_unet(comfy.supported_models.SDXL, cfg, seed, "SDXL" + ("-tiny" if tiny else ""), dtype)


def _random_unet(config_class, cfg: dict, seed: int, family: str, dtype: str):
    import torch
    import comfy.model_management
    import comfy.model_patcher

    mc = config_class(cfg)
    mc.set_inference_dtype(torch_dtype(dtype), None)
    model = mc.get_model({})
    _fill_random_(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
    info = {"source": "random", "family": family, "seed": seed}
    return patcher, info


def _random_dit(config_class, cfg: dict, seed: int, dtype: str):
    """A ModelPatcher of ``config_class(cfg)``'s model in ``dtype``, weights by ``make_checkpoint.seeded_fill_``."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    from make_checkpoint import seeded_fill_  # scripts/ is on sys.path after bootstrap()

    mc = config_class(cfg)
    mc.set_inference_dtype(torch_dtype(dtype), None)
    model = mc.get_model({})
    seeded_fill_(model.diffusion_model, seed)
    model.eval()
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def build_random_mmdit(seed: int, blocks: int = 2, tiny: bool = False, dtype: str = "fp32"):
    """An SD3-medium-shaped MMDiT from ComfyUI's own classes, fp32, seeded random weights.

    ``comfy.supported_models.SD3`` -> ``comfy.model_base.SD3`` (flow matching, shift 3) ->
    ``OpenAISignatureMMDITWrapper``, as ComfyUI builds it from a real SD3 checkpoint: every joint
    block has the real SD3-medium shape (hidden 1536 = 24 heads x 64, MLP 4x, both streams), the
    patch embedding, pos_embed table, pooled/context embedders and final layer are the real ones;
    only the number of joint blocks is ``blocks`` instead of 24 (the last one text-"pre_only", as in
    the real model). ``tiny``: hidden 256 (4 heads) for smoke tests.

    Weights: ``make_checkpoint.seeded_fill_``, the initialisation of tests/tiny_models.py
    (variance-preserving matrices, extra gain on the q/k rows so attention is peaked, and the
    fixed sin/cos pos_embed table of ComfyUI's own generator).
    """
    import copy

    import comfy.supported_models

    cfg = copy.deepcopy(SD3_MEDIUM_CONFIG)
    if tiny:
        cfg["depth"] = TINY_MMDIT_WIDTH_UNITS
        cfg["context_embedder_config"]["params"]["out_features"] = 64 * TINY_MMDIT_WIDTH_UNITS
    cfg["num_blocks"] = blocks
    patcher = _random_dit(comfy.supported_models.SD3, cfg, seed, dtype)
    dm = patcher.model.diffusion_model
    info = {
        "source": "random", "family": "SD3-MMDiT" + ("-tiny" if tiny else ""), "seed": seed, "arch": "mmdit",
        "shape": "tiny (hidden 256)" if tiny else "SD3 medium per-block shape",
        "joint_blocks": len(dm.joint_blocks), "real_joint_blocks": SD3_MEDIUM_BLOCKS,
        "hidden_size": dm.hidden_size, "heads": dm.num_heads, "head_dim": dm.hidden_size // dm.num_heads,
        "patch_size": cfg["patch_size"], "latent_channels": cfg["in_channels"],
        "context": [SD3_TEXT_TOKENS, cfg["context_embedder_config"]["params"]["in_features"]],
        "pooled": cfg["adm_in_channels"], "pos_embed_max_size": cfg["pos_embed_max_size"],
        "init": "make_checkpoint.seeded_fill_", "patch": [2, 2],
    }
    return patcher, info


def build_random_dit(family: str, seed: int, blocks: int = 1, tiny: bool = False, dtype: str = "fp32"):
    """A Wan-2.1-1.3B-shaped (``family`` "wan") or Qwen-Image-shaped ("qwen") DiT from ComfyUI's own
    classes (``comfy.supported_models.WAN21_T2V`` -> ``model_base.WAN21``, ``QwenImage`` ->
    ``model_base.QwenImage``), seeded random weights: every block has the real shape (width, heads,
    MLP, patching, context width), only the number of blocks is ``blocks``. ``tiny``: 2 heads of 128
    (width 256) for smoke tests. Weights: ``make_checkpoint.seeded_fill_``, as for the MMDiT.
    """
    import copy

    import comfy.supported_models

    class_name, config, depth_key, real_depth = DIT_FAMILIES[family]
    cfg = copy.deepcopy(config)
    cfg[depth_key] = blocks
    if tiny and family == "wan":
        cfg.update(dim=256, ffn_dim=512, num_heads=2)
    elif tiny:
        cfg.update(num_attention_heads=2)
    patcher = _random_dit(getattr(comfy.supported_models, class_name), cfg, seed, dtype)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    tag = "TINY " if tiny else ""
    if family == "wan":
        width, heads, patch = cfg["dim"], cfg["num_heads"], tuple(cfg["patch_size"])
        shape = (f"{tag}Wan-2.1-1.3B-shaped DiT (ComfyUI `model_base.WAN21`): {blocks} of its {real_depth} blocks at "
                 f"width {width} = {heads} heads x {width // heads}, FFN {cfg['ffn_dim']}, patch 1x2x2, "
                 f"{cfg['in_dim']} latent channels, umT5 context {WAN_TEXT_TOKENS}x{cfg['text_dim']}")
        context = [WAN_TEXT_TOKENS, cfg["text_dim"]]
    else:
        heads = cfg["num_attention_heads"]
        width, patch = heads * cfg["attention_head_dim"], (1, cfg["patch_size"], cfg["patch_size"])
        shape = (f"{tag}Qwen-Image-shaped DiT (ComfyUI `model_base.QwenImage`): {blocks} of its {real_depth} "
                 f"dual-stream blocks at width {width} = {heads} heads x {cfg['attention_head_dim']}, MLP 4x, patch 2, "
                 f"16 latent channels, Qwen2.5-VL context {QWEN_TEXT_TOKENS}x{cfg['joint_attention_dim']}")
        context = [QWEN_TEXT_TOKENS, cfg["joint_attention_dim"]]
    info = {
        "source": "random", "family": {"wan": "Wan2.1-1.3B", "qwen": "Qwen-Image"}[family] + ("-tiny" if tiny else ""),
        "seed": seed, "blocks": blocks, "real_blocks": real_depth, "hidden_size": width, "heads": heads,
        "patch": list(patch), "context": context, "init": "make_checkpoint.seeded_fill_",
        "description": f"{shape}, {params / 1e6:.0f} M parameters, random seeded weights",
    }
    return patcher, info


def build_model(args):
    """The benchmarked model: a checkpoint, or the random-weight model of ``--family``."""
    dtype = getattr(args, "dtype", "fp32")
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    if args.family == "mmdit":
        return build_random_mmdit(args.seed, blocks=args.dit_depth, tiny=args.tiny, dtype=dtype)
    if args.family in DIT_FAMILIES:
        return build_random_dit(args.family, args.seed, blocks=args.dit_depth, tiny=args.tiny, dtype=dtype)
    if args.family == "sdxl":
        return build_random_sdxl(args.seed, tiny=args.tiny, dtype=dtype)
    return build_random_sd15(args.seed, tiny=args.tiny, dtype=dtype)


def model_family(patcher) -> str:
    """"unet", "mmdit" or "flux" (the pack's hooks decide, as the nodes do)."""
    if pack.attention_levels(patcher):
        return "unet"
    return pack.dit_family(patcher) or "unknown"


def load_checkpoint(path: str):
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False, output_clipvision=False,
                                                embedding_directory=None)
    patcher = out[0]
    if patcher is None:
        raise SystemExit(f"{path}: no diffusion model found in this checkpoint")
    return patcher, {"source": "checkpoint", "path": str(path),
                     "family": type(patcher.model.model_config).__name__}


def make_inputs(patcher, width: int, height: int, seed: int, frames: int = 1):
    """Latent, noise and random text conds of the right shape for this model (same for every variant).

    Video models (Wan) get ``frames`` video frames, ``(frames - 1) // 4 + 1`` latent frames (the
    Wan 2.1 VAE's 4x temporal compression, as EmptyHunyuanLatentVideo makes them); Qwen-Image one.
    """
    import torch
    import comfy.sample
    import comfy.model_base
    unet_cfg = patcher.model.model_config.unet_config
    ctx_dim = unet_cfg.get("context_dim") or 768
    tokens, pooled = 77, None
    channels = patcher.model.latent_format.latent_channels
    shape = (1, channels, height // 8, width // 8)
    if isinstance(patcher.model, comfy.model_base.SD3):
        # SD3: CLIP-L+G (padded to 4096) and T5 tokens concatenated, 77 + 77; pooled CLIP-L+G 2048 -> y
        ctx_dim = unet_cfg["context_embedder_config"]["params"]["in_features"]
        tokens, pooled = SD3_TEXT_TOKENS, unet_cfg.get("adm_in_channels") or 2048
    elif isinstance(patcher.model, comfy.model_base.WAN21):
        ctx_dim, tokens = unet_cfg["text_dim"], WAN_TEXT_TOKENS
        shape = (1, channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    elif isinstance(patcher.model, comfy.model_base.QwenImage):
        ctx_dim, tokens = unet_cfg["joint_attention_dim"], QWEN_TEXT_TOKENS
        shape = (1, channels, 1, height // 8, width // 8)
    elif unet_cfg.get("adm_in_channels"):  # SDXL-type: pooled text embedding for the ADM vector
        pooled = 1280
    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    if pooled:
        extra = lambda: {"pooled_output": torch.randn(1, pooled, generator=g)}  # noqa: E731
    else:
        extra = lambda: {}  # noqa: E731
    pos = [[torch.randn(1, tokens, ctx_dim, generator=g), extra()]]
    neg = [[torch.randn(1, tokens, ctx_dim, generator=g), extra()]]
    return latent, noise, pos, neg


@dataclass
class Testbed:
    """The model and what every variant's run shares: inputs, sampler settings (``args``) and seed."""

    args: object  # the parsed command line: cfg, sampler, scheduler, seed, steps, ...
    base: object  # the unpatched ModelPatcher
    info: dict  # what the JSON's "model" says of it
    latent: object
    noise: object
    pos: list
    neg: list

    def sample(self, model, steps: int):
        """One run of ComfyUI's real sampler (CFG) on ``model``: its output as the sampler returns it."""
        import comfy.sample
        a = self.args
        return comfy.sample.sample(model, self.noise, steps, a.cfg, a.sampler, a.scheduler, self.pos, self.neg,
                                   self.latent, seed=a.seed, disable_pbar=True)

    def final_latent(self, model, steps: int):
        """``sample``'s output, detached, as a float32 CPU tensor (what the errors compare)."""
        return host_latent(self.sample(model, steps))


def host_latent(latent):
    """A sampled latent, detached, as a float32 CPU tensor."""
    import torch
    return latent.detach().to("cpu", torch.float32)


def make_testbed(args, base, info: dict) -> Testbed:
    """``base`` with the inputs of ``args``' size and seed."""
    latent, noise, pos, neg = make_inputs(base, args.width, args.height, args.seed, getattr(args, "frames", 1))
    return Testbed(args, base, info, latent, noise, pos, neg)


def diffusion_model_wrappers_run(base, pos, neg, like=None) -> bool:
    """Does this model's forward call ComfyUI's DIFFUSION_MODEL wrappers (which EasyCache needs)?

    Not every model class does: in ComfyUI 0.3.75 the UNet, Flux and most video DiTs run them, the
    SD3 MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py) does not - there EasyCache installs
    without error and never skips a step. One model call on an 8x8 latent (one frame where the
    benchmark's latent ``like`` has a frame axis) with a probe wrapper.
    """
    import torch
    import comfy.patcher_extension
    import comfy.sample

    hits = []

    def probe(executor, *args, **kwargs):
        hits.append(1)
        return executor(*args, **kwargs)

    m = base.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench.probe", probe)
    frames = (1,) if like is not None and like.ndim == 5 else ()
    latent = torch.zeros(1, base.model.latent_format.latent_channels, *frames, 8, 8)
    comfy.sample.sample(m, torch.zeros_like(latent), 1, 1.0, "euler", "normal", pos, neg, latent, seed=0,
                        disable_pbar=True)
    return bool(hits)


def comfyui_version() -> str | None:
    """ComfyUI's version string (None where its tree has no comfyui_version.py)."""
    try:
        import comfyui_version as version
        return version.__version__
    except ImportError:
        return None
