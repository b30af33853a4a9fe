#!/usr/bin/env python
"""Write a random-weight checkpoint that ComfyUI's CheckpointLoaderSimple accepts.

No trained Stable Diffusion weights can be downloaded on the machines this pack is built
on, yet the end-to-end tests, the demo and the benchmark need a *checkpoint file* so that
they exercise the path real users take (CheckpointLoaderSimple -> model detection ->
MODEL/CLIP/VAE).  This script builds the UNet, the text encoder(s) and the VAE with
ComfyUI's own classes, fills them with seeded random values and lets ComfyUI's own
``state_dict_for_saving`` produce the original (LDM/SGM) key names:

  SD1.5  model.diffusion_model.*, cond_stage_model.transformer.text_model.*, first_stage_model.*
  SDXL   model.diffusion_model.*, conditioner.embedders.0.transformer.* (CLIP-L),
         conditioner.embedders.1.model.* (OpenCLIP-G, open_clip layout), first_stage_model.*

ComfyUI reads the UNet's level/res-block/transformer layout from the state dict, so a
``--reduced`` UNet still loads; what decides the *family* is listed in
``comfy.supported_models`` (SD15: model_channels 320 + context_dim 768 + conv proj_in;
the SDXL family: model_channels 320, context 2048, adm 2816 and an exact per-block
``transformer_depth`` list).  The text encoders and the VAE are always full size: their
architecture is fixed by ComfyUI's config files, not read from the checkpoint.

Usage:
    python scripts/make_checkpoint.py OUT.safetensors [--arch sd15|sdxl] [--reduced] [--seed N]
    python scripts/make_checkpoint.py --comfy-models            # default reduced SD1.5 into .comfyui/models/checkpoints
Importable: ``make_checkpoint(path, arch="sd15", reduced=True, seed=0)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFY_DIR = ROOT / ".comfyui"

# Bumped whenever the generated content changes for the same arguments, so stale files
# written by an older version of this script are regenerated instead of reused.
FORMAT_VERSION = "1"

# UNet layouts, in the form comfy.model_detection.detect_unet_config returns them.
UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "model_channels": 320,
}
UNET_LAYOUTS = {
    # Real SD1.5: 4 levels, 2 res blocks each, attention on the first three levels.
    ("sd15", False): {
        **UNET_COMMON,
        "adm_in_channels": None,
        "context_dim": 768,
        "use_linear_in_transformer": False,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
    },
    # Reduced SD1.5: 2 levels, 1 res block each, attention on both (the 320-channel,
    # highest-resolution level keeps its self-attention, which is what pruning targets).
    ("sd15", True): {
        **UNET_COMMON,
        "adm_in_channels": None,
        "context_dim": 768,
        "use_linear_in_transformer": False,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
    },
    # Real SDXL base.
    ("sdxl", False): {
        **UNET_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "context_dim": 2048,
        "use_linear_in_transformer": True,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 10,
    },
    # Reduced SDXL. ComfyUI matches SDXL-family UNets on the exact per-res-block
    # transformer_depth list, so a shrunk SDXL has to take the shape of one of the known
    # distilled variants; [0,0,1,1,2,2] is Segmind Vega (model_base.SDXL, SDXL CLIP-L+G,
    # SDXL latent format - i.e. the same runtime path as SDXL base). Width is capped at
    # 640 channels to keep it small. No attention at the highest-resolution level, as in SDXL.
    ("sdxl", True): {
        **UNET_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "context_dim": 2048,
        "use_linear_in_transformer": True,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 0, 1, 1, 2, 2],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "transformer_depth_middle": 1,
    },
}

# ComfyUI's default SD VAE ("AutoencoderKL", 8x downscale, 4 latent channels); SDXL's VAE
# has the same architecture.
_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


# --------------------------------------------------------------------------------------
# ComfyUI import (CLI use; under pytest tests/conftest.py has already done this)
# --------------------------------------------------------------------------------------
def ensure_comfy_importable(comfy_dir: Path | str = DEFAULT_COMFY_DIR) -> None:
    """Put ComfyUI on sys.path and make it parse ``--cpu`` before model_management loads.

    comfy.model_management picks its device at import time from comfy.cli_args; without
    --cpu it probes CUDA, which fails on machines without an NVIDIA driver."""
    comfy_dir = Path(comfy_dir)
    if not (comfy_dir / "comfy").is_dir():
        raise SystemExit(f"ComfyUI not found at {comfy_dir}; run `bash scripts/setup_env.sh` (or `make test`).")
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    if "comfy.model_management" in sys.modules:
        return
    import comfy.options

    saved = sys.argv
    sys.argv = [saved[0] if saved else "make_checkpoint", "--cpu"]
    comfy.options.enable_args_parsing(True)
    try:
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved
        comfy.options.enable_args_parsing(False)
    import comfy.model_management  # noqa: F401


# --------------------------------------------------------------------------------------
# Seeded initialisation (shared with tests/tiny_models.py)
# --------------------------------------------------------------------------------------
# ComfyUI creates layers with weight init disabled (torch.empty), so every tensor has to
# be written. A "0.02 * normal" init would make every residual branch negligible - the
# output would be carried by skip connections and attention would barely matter, making
# token-pruning tests vacuous. Instead:
#   * matrices / conv kernels: normal / sqrt(fan_in) (variance preserving, so each
#     residual branch contributes on the order of its input),
#   * norm scales ~ 1 and shifts ~ 0 (plus a little noise),
#   * biases small,
#   * query/key projections get an extra gain so softmax attention is peaked rather than
#     a near-uniform average (which would hide the effect of dropping tokens).
QK_GAIN = 2.0
BIAS_STD = 0.05
NORM_STD = 0.1


def _is_norm(module) -> bool:
    import torch

    # GroupNorm/LayerNorm (ComfyUI's ops subclass torch's) and the various RMSNorm classes.
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(module).__name__


def _qk_rows(name: str, shape) -> slice | None:
    """Rows of a weight matrix that produce attention queries/keys (they get QK_GAIN)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in ("to_q", "to_k", "q_proj", "k_proj") and parts[-1] == "weight":
        return slice(None)  # UNet CrossAttention, CLIP attention
    if name.endswith("qkv.weight"):
        return slice(0, 2 * shape[0] // 3)  # MMDiT / Flux double block: fused [q; k; v]
    if "single_blocks." in name and name.endswith("linear1.weight"):
        return slice(0, 2 * shape[1])  # Flux single block: fused [q; k; v; mlp], q,k first
    return None


def _is_qk_norm(name: str) -> bool:
    # Flux normalises q and k (RMSNorm) before the dot product, so a gain on the projection
    # would be normalised away; it goes into the norm scale instead.
    return name.endswith(("query_norm.scale", "key_norm.scale"))


def seeded_fill_(module, seed: int):
    """Overwrite every floating parameter and buffer of ``module`` deterministically.

    Values are drawn in float32 from one ``torch.Generator`` in ``named_modules`` order and
    then cast, so one seed gives the same model (up to rounding) in every dtype.
    MMDiT's fixed sin/cos ``pos_embed`` table is filled with ComfyUI's own generator for it.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            norm = _is_norm(mod)
            tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            for t_name, t in tensors:
                if t is None or not t.is_floating_point():
                    continue
                full = f"{mod_name}.{t_name}" if mod_name else t_name
                if t_name == "pos_embed" and t.ndim == 3:
                    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

                    side = int(round(math.sqrt(t.shape[1])))
                    val = get_2d_sincos_pos_embed_torch(t.shape[2], side, side).reshape(t.shape)
                elif norm:
                    centre = 1.0 if t_name in ("weight", "scale") else 0.0
                    if _is_qk_norm(full):
                        centre = QK_GAIN
                    val = torch.randn(t.shape, generator=gen) * NORM_STD + centre
                elif t.ndim >= 2:
                    val = torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel())
                    rows = _qk_rows(full, t.shape)
                    if rows is not None:
                        val[rows] *= QK_GAIN
                else:
                    val = torch.randn(t.shape, generator=gen) * BIAS_STD
                t.copy_(val.to(t.dtype))
    return module


# --------------------------------------------------------------------------------------
# Checkpoint construction
# --------------------------------------------------------------------------------------
def build_state_dict(arch: str = "sd15", reduced: bool = True, seed: int = 0, dtype=None) -> dict:
    """Return the checkpoint state dict (original key names), values in ``dtype``
    (default float16, the usual distribution dtype; ComfyUI upcasts on load as needed)."""
    import torch

    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models

    dtype = torch.float16 if dtype is None else dtype
    if (arch, reduced) not in UNET_LAYOUTS:
        raise ValueError(f"unknown arch {arch!r} (choose sd15 or sdxl)")
    unet_config = dict(UNET_LAYOUTS[(arch, reduced)])
    config_cls = comfy.supported_models.SD15 if arch == "sd15" else comfy.supported_models.SDXL
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    # Different sub-seeds per component so changing one part's size never shifts the others.
    seeded_fill_(model.diffusion_model, seed)

    if arch == "sd15":
        clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    else:
        clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
    seeded_fill_(clip, seed + 1)

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(_VAE_DDCONFIG), embed_dim=4)
    seeded_fill_(vae, seed + 2)

    # ComfyUI's own conversion to the original checkpoint layout (the same call
    # comfy.sd.save_checkpoint / the CheckpointSave node makes).
    sd = model.state_dict_for_saving(clip.state_dict(), vae.state_dict(), None)
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        v = v.detach().to("cpu")
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def _params(arch: str, reduced: bool, seed: int, dtype_name: str) -> dict:
    return {
        "generator": "token-pruning-cache/scripts/make_checkpoint.py",
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "reduced": str(bool(reduced)),
        "seed": str(int(seed)),
        "dtype": dtype_name,
    }


def _existing_params(path: Path) -> dict | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable/partial file: regenerate
        return None


def make_checkpoint(path, arch: str = "sd15", reduced: bool = True, seed: int = 0, dtype: str = "fp16",
                    force: bool = False, verbose: bool = False) -> Path:
    """Write the checkpoint to ``path`` unless a file made with the same parameters is
    already there (parameters are stored in the safetensors metadata). Returns the path."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}")
    params = _params(arch, reduced, seed, dtype)
    if path.exists() and not force:
        meta = _existing_params(path)
        if meta is not None and all(meta.get(k) == v for k, v in params.items()):
            if verbose:
                print(f"[make_checkpoint] up to date: {path}")
            return path
    t0 = time.time()
    sd = build_state_dict(arch, reduced, seed, dtypes[dtype])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name and rename, so an interrupted run never leaves a file that
    # a later run (or ComfyUI) would mistake for a complete checkpoint.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata=params)
    os.replace(tmp, path)
    if verbose:
        n = sum(v.numel() for v in sd.values())
        print(f"[make_checkpoint] wrote {path} ({n / 1e6:.0f}M values, {path.stat().st_size / 2**20:.0f} MiB) "
              f"in {time.time() - t0:.1f}s")
    return path


def detect(path) -> str:
    """Name of the ``comfy.supported_models`` class ComfyUI detects for a checkpoint file
    (the same detection CheckpointLoaderSimple runs), or raise if none matches."""
    import comfy.model_detection
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix, metadata=metadata)
    if config is None:
        raise ValueError(f"ComfyUI does not recognise {path} as a checkpoint")
    return type(config).__name__


def default_name(arch: str = "sd15", reduced: bool = True, seed: int = 0) -> str:
    return f"tpc_random_{arch}{'_reduced' if reduced else ''}_s{seed}.safetensors"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", nargs="?", help="output .safetensors path (or use --comfy-models)")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--reduced", action="store_true", help="shrunk UNet (fast tests); text encoders and VAE stay full size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage dtype (default fp16)")
    ap.add_argument("--comfy-models", action="store_true",
                    help="write into <comfy>/models/checkpoints/ under a default name")
    ap.add_argument("--comfy-dir", default=str(DEFAULT_COMFY_DIR))
    ap.add_argument("--force", action="store_true", help="rewrite even if an identical file exists")
    ap.add_argument("--check", action="store_true", help="after writing, run ComfyUI's model detection on the file")
    args = ap.parse_args(argv)

    if args.output is None and not args.comfy_models:
        ap.error("give an output path or --comfy-models")
    ensure_comfy_importable(args.comfy_dir)
    out = Path(args.output) if args.output else (
        Path(args.comfy_dir) / "models" / "checkpoints" / default_name(args.arch, args.reduced, args.seed))
    make_checkpoint(out, args.arch, args.reduced, args.seed, args.dtype, force=args.force, verbose=True)
    if args.check:
        print(json.dumps({"path": str(out), "detected": detect(out)}))
    else:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
