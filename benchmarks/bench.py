#!/usr/bin/env python
"""Speed / fidelity benchmark of the pack's token pruning against ComfyUI's own ToMe.

Everything runs in ONE process on ONE model with the same seed, noise and conditioning:

1. an SD1.5-architecture UNet at full size (860 M parameters), built with ComfyUI's own
   classes (``comfy.supported_models.SD15`` with the standard SD1.5 unet config, fp32) and
   filled with seeded random weights -- or, with ``--family mmdit``, an SD3-medium-shaped
   MMDiT (``comfy.supported_models.SD3`` / ``comfy.model_base.SD3``: the real per-block shape,
   hidden 1536 = 24 heads x 64, patch 2, 16 latent channels, 154 x 4096 text context, pooled
   2048, but only ``--dit-depth`` joint blocks instead of 24) -- or a real checkpoint given
   with ``--checkpoint``;
2. every variant is sampled with ComfyUI's real sampler (``comfy.sample.sample``, CFG, so a
   batch-1 latent becomes batch-2 UNet calls), the unpatched model first and once more at the
   end as a drift check;
3. per variant: seconds per image (fastest of ``--repeats``), speedup against the unpatched
   model, peak memory (see below), fidelity (relative error of the final latent against the
   unpatched one) and the FLOPs-ideal speedup (``torch.utils.flop_counter.FlopCounterMode``
   over one CFG model call of that variant, made through the real sampler with steps=1, so
   the patches are live while counting).

Peak memory is the kernel's peak resident set size of this process during the timed run
(``VmHWM`` from /proc/self/status, reset before each run by writing 5 to
/proc/self/clear_refs) minus the resident size just before the run: the extra RAM the run
needed on top of the already-loaded weights, including whatever the allocator kept. Where
clear_refs cannot be written, a background thread samples RSS with psutil every 5 ms
instead (it can miss very short peaks); the JSON says which method was used.

FLOPs are what FlopCounterMode counts: matmuls, convolutions and attention kernels
(including the similarity matmuls that SiTo and ToMe add), not element-wise work, sorts or
gathers. "FLOPs-ideal speedup" = unpatched FLOPs / variant FLOPs, the speedup a device
whose time is proportional to those FLOPs would see.

Variants are ``method[-modifier...][@ratio]``:
  unpatched                      the model as loaded
  tome@R                         ComfyUI core ``TomePatchModel`` (comfy_extras/nodes_tomesd.py)
  sito@R                         this pack's SiTo node (``apply_sito``), defaults
  random@R                       random pruning through this pack's adapter: random base
                                 token per 2x2 window, R*N random other tokens pruned, no
                                 scoring at all (the cost-free ceiling of attn1 pruning)
  modifiers (sito, random):      qonly  keys/values stay full (prune_kv=False, like ToMe)
                                 ds2 / ds4  also prune the 1/2 (and 1/4) resolution levels
                                 xattn  also prune cross-attention queries;  mlp  also the FF
  dato[-official|-official-dense|-aggressive]@R, deepcache[-5|-10]@R   this pack's DaTo node (UNet only)
  dato-custom@R                  DaTo with the schedule given by --dato-schedule (the node's
                                 custom_schedule syntax, resampled to --steps like the node does)
  cat@R                          this pack's CAT node (keep_ratio R; UNet and DiT)
  easycache@T, lazycache@T       ComfyUI core's EasyCache / LazyCache nodes (reuse_threshold T)
On the MMDiT only unpatched, cat, lazycache and easycache apply (SiTo, DaTo/DeepCache, ToMe and
random pruning patch the UNet's SpatialTransformer blocks); anything else is refused up front.
See benchmarks/README.md for usage.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_ALIAS = "token_pruning_cache"

DEFAULT_VARIANTS = ("unpatched,tome@0.5,tome@0.7,random@0.5,random@0.7,sito@0.3,sito@0.5,sito@0.7,"
                    "sito-qonly@0.5,sito-ds2@0.5")
DEFAULT_DIT_VARIANTS = "unpatched,cat@0.3,lazycache@0.2"

# The standard SD1.5 UNet (comfy/model_detection.py, ``SD15`` of unet_config_from_diffusers_unet).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

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

# Which variants can run on which model family. SiTo, DaTo/DeepCache, ToMe and random pruning
# hook the UNet's SpatialTransformer blocks (attn1/attn2/ff patches); an MMDiT never calls them.
UNET_ONLY_METHODS = {
    "tome": "ComfyUI's ToMe node patches the UNet's attn1",
    "sito": "SiTo patches the UNet's SpatialTransformer self-attention",
    "random": "random pruning goes through SiTo's UNet block patches",
    "dato": "DaTo's step cache and pruning patch the UNet's blocks",
    "deepcache": "DeepCache (DaTo node) caches the UNet's skip-connected blocks",
}
DIT_METHODS = ("unpatched", "cat", "lazycache", "easycache")

log = logging.getLogger("bench")


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a real SD1.x/SD2.x/SDXL checkpoint (.safetensors/.ckpt); default: a random-weight SD1.5 UNet")
    p.add_argument("--family", choices=("sd15", "mmdit"), default="sd15",
                   help="random-weight model: sd15 = the SD1.5 UNet (default); mmdit = an SD3-medium-shaped MMDiT "
                        "(real block width, --dit-depth joint blocks)")
    p.add_argument("--dit-depth", type=int, default=2,
                   help="--family mmdit: number of joint blocks (SD3 medium has 24; default 2)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test model: SD1.5 family shrunk to two levels / one res block; with --family mmdit "
                        "hidden 256 (4 heads) instead of 1536 (not for reported numbers)")
    p.add_argument("--steps", type=int, default=2, help="sampler steps per image (default 2)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels; the latent is size/8 (default 512)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (overrides --size)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (overrides --size)")
    p.add_argument("--sampler", default="euler", help="ComfyUI sampler name (default euler)")
    p.add_argument("--scheduler", default="normal", help="ComfyUI scheduler name (default normal)")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (default 7.5; != 1 gives batch-2 UNet calls)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, conds, random weights and pruning (default 0)")
    p.add_argument("--dato-schedule", default=None, metavar="SCHEDULE",
                   help="the schedule of the dato-custom variant, in the node's custom_schedule syntax, "
                        "e.g. \"F S1 R S1x3 R S1 Rx4 S1x2 F Rx3 S1 R\"")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated list (default: {DEFAULT_VARIANTS}; with --family mmdit: "
                        f"{DEFAULT_DIT_VARIANTS})")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant, fastest kept (default 1)")
    p.add_argument("--paired", action="store_true",
                   help="time every variant right next to an unpatched run (order alternating per round) and "
                        "report the median of the per-pair speedups: for machines whose speed drifts within minutes")
    p.add_argument("--skip-rerun", action="store_true",
                    help="skip the final unpatched drift-check run (saves one unpatched run at long step counts)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOPs pass (one extra model call per variant)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores this process may use)")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "results.json"),
                   help="where to write the JSON (a .md with the table is written beside it)")
    p.add_argument("--profile", metavar="VARIANT", default=None,
                   help="instead of the benchmark: torch.profiler over one CFG model call of VARIANT (and of the "
                        "unpatched model), broken down into attention, selection, gather/scatter; e.g. sito@0.5")
    p.add_argument("--markdown", action="store_true", help="print the README-ready markdown table to stdout")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", str(ROOT / ".comfyui")),
                   help="ComfyUI source tree (default .comfyui/ of this repo)")
    p.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's and the pack's log lines")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.width = args.width or args.size
    args.height = args.height or args.size
    for name in ("width", "height"):
        v = getattr(args, name)
        if v < 8 or v % 8:
            p.error(f"--{name} must be a positive multiple of 8 (got {v})")
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    if args.variants is None:
        args.variants = DEFAULT_DIT_VARIANTS if args.family == "mmdit" else DEFAULT_VARIANTS
    if args.dit_depth < 1:
        p.error(f"--dit-depth must be >= 1 (got {args.dit_depth})")
    if args.checkpoint and args.family != "sd15":
        p.error("--family chooses the random-weight model; with --checkpoint the checkpoint decides the family")
    try:
        variants = [parse_variant(s, args.dato_schedule) for s in args.variants.split(",") if s.strip()]
        if args.profile:
            variants.append(parse_variant(args.profile, args.dato_schedule))
    except ValueError as e:
        p.error(str(e))
    if args.family == "mmdit":
        problem = family_problem(variants, "mmdit")
        if problem:
            p.error(problem)
    return args


def family_problem(variants, family: str) -> str | None:
    """Why some of ``variants`` cannot run on a model of ``family`` ("unet", "mmdit", "flux"), or None."""
    if family == "unet":
        return None
    bad = [v for v in variants if v.method not in DIT_METHODS]
    if not bad:
        return None
    why = "; ".join(f"{v.spec}: {UNET_ONLY_METHODS.get(v.method, 'not a DiT method')}" for v in bad)
    return (f"UNet-only variant(s) asked for on the {family} (a DiT): {why}. On a DiT the benchmark runs "
            f"unpatched, cat@R (CAT Pruning), lazycache@T and easycache@T (ComfyUI core caches).")


@dataclass
class Variant:
    spec: str
    method: str  # unpatched | tome | sito | random
    ratio: float = 0.0
    qonly: bool = False
    max_downsample: str = "auto"
    xattn: bool = False
    mlp: bool = False
    search: str | None = None  # SiTo similarity_search ("local" | "global"); None = the node's default
    recovery: str | None = None  # SiTo recovery ("base" | "kept" | "merge"); None = the node's default
    preset: str | None = None  # DaTo schedule preset (dato / deepcache variants); "custom" = schedule
    schedule: str | None = None  # dato-custom: the custom_schedule text (--dato-schedule)


# Caching variants (issues 3 and 4): method -> how the ratio is read
CACHE_METHODS = {
    "dato": "prune_ratio of DaToPruneCache; modifier = schedule preset (official, official-dense, aggressive) or custom",
    "deepcache": "prune_ratio (0 = caching only); modifier = interval (5, 10): DaToPruneCache deepcache_N",
    "cat": "keep_ratio of CATPruneCache (warmup 6); modifier ds1/ds2/ds4/ds8 = max_downsample (default 8: all levels)",
    "easycache": "reuse_threshold of ComfyUI's EasyCache node",
    "lazycache": "reuse_threshold of ComfyUI's LazyCache node (PREDICT_NOISE level: works on every model)",
}


def parse_variant(spec: str, dato_schedule: str | None = None) -> Variant:
    """``dato_schedule``: the schedule text of a ``dato-custom`` variant (``--dato-schedule``)."""
    spec = spec.strip()
    name, _, ratio = spec.partition("@")
    method, *mods = name.split("-")
    if method == "unpatched":
        if ratio or mods:
            raise ValueError(f"variant {spec!r}: unpatched takes no ratio or modifiers")
        return Variant(spec, method)
    if method in CACHE_METHODS:
        if not ratio:
            raise ValueError(f"variant {spec!r}: needs a ratio ({CACHE_METHODS[method]})")
        v = Variant(spec, method, ratio=float(ratio))
        if method == "dato":
            if mods == ["custom"]:
                if not (dato_schedule or "").strip():
                    raise ValueError(f"variant {spec!r} needs --dato-schedule")
                v.preset, v.schedule = "custom", dato_schedule
            else:
                v.preset = "dato_" + ("_".join(mods) if mods else "official")
        elif method == "deepcache":
            v.preset = "deepcache_" + (mods[0] if mods else "5")
        elif method == "cat":
            if mods and (len(mods) != 1 or mods[0] not in ("ds1", "ds2", "ds4", "ds8")):
                raise ValueError(f"variant {spec!r}: cat takes one modifier, ds1/ds2/ds4/ds8")
            v.max_downsample = mods[0][2:] if mods else "8"  # the node's default: every attention level
        return v
    if method not in ("tome", "sito", "random"):
        raise ValueError(f"variant {spec!r}: unknown method {method!r} (unpatched, tome, sito, random, "
                         f"{', '.join(CACHE_METHODS)})")
    if not ratio:
        raise ValueError(f"variant {spec!r}: needs a ratio, e.g. {method}@0.5")
    v = Variant(spec, method, ratio=float(ratio))
    for mod in mods:
        if method == "tome":
            raise ValueError(f"variant {spec!r}: ComfyUI's ToMe node has no modifiers")
        if mod == "qonly":
            v.qonly = True
        elif mod in ("ds1", "ds2", "ds4"):
            v.max_downsample = mod[2:]
        elif mod == "xattn":
            v.xattn = True
        elif mod == "mlp":
            v.mlp = True
        elif mod in ("local", "global") and method == "sito":
            v.search = mod
        elif mod in ("base", "kept", "merge") and method == "sito":
            v.recovery = mod
        else:
            raise ValueError(f"variant {spec!r}: unknown modifier {mod!r} (qonly, ds1, ds2, ds4, xattn, mlp; "
                             f"sito also local, global, base, kept, merge)")
    return v


# --------------------------------------------------------------------------------------
# Import ComfyUI (on the CPU) and this pack
# --------------------------------------------------------------------------------------

def bootstrap(comfy_dir: str) -> None:
    """Put ComfyUI on sys.path in --cpu mode and import this pack as ``token_pruning_cache``.

    Idempotent, so the script can also be driven in-process (e.g. from pytest, whose
    conftest has already done the same).
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_checkpoint import ensure_comfy_importable  # the one --cpu bootstrap of the repo
    ensure_comfy_importable(Path(comfy_dir).resolve())
    import comfy.cli_args
    import comfy.model_management as mm
    if not comfy.cli_args.args.cpu or mm.cpu_state != mm.CPUState.CPU:
        raise SystemExit("comfy.model_management was imported without --cpu before bench.bootstrap()")
    if PACK_ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_ALIAS, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_ALIAS] = module
        spec.loader.exec_module(module)
    # Import everything the variants use now, so the whole run measures one version of the code.
    importlib.import_module(PACK_ALIAS + ".nodes.sito_node")
    importlib.import_module(PACK_ALIAS + ".nodes.adapter")
    importlib.import_module(PACK_ALIAS + ".pruning_core.selection")
    importlib.import_module("comfy_extras.nodes_tomesd")


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

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


def build_random_sd15(seed: int, tiny: bool = False):
    """The real-size SD1.5 UNet from ComfyUI's own classes, fp32, seeded random weights.

    ``tiny``: the same family shrunk for smoke tests (two levels, one res block each; real
    widths, heads and context), about 1/10 of the parameters.
    """
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(SD15_UNET_CONFIG)
    if tiny:
        cfg.update(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                   transformer_depth_output=[1, 1, 1, 1])
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    _fill_random_(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
    info = {"source": "random", "family": "SD15" + ("-tiny" if tiny else ""), "seed": seed}
    return patcher, info


def build_random_mmdit(seed: int, blocks: int = 2, tiny: bool = False):
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

    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from make_checkpoint import seeded_fill_  # scripts/ is on sys.path after bootstrap()

    cfg = copy.deepcopy(SD3_MEDIUM_CONFIG)
    if tiny:
        cfg["depth"] = TINY_MMDIT_WIDTH_UNITS
        cfg["context_embedder_config"]["params"]["out_features"] = 64 * TINY_MMDIT_WIDTH_UNITS
    cfg["num_blocks"] = blocks
    mc = comfy.supported_models.SD3(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    seeded_fill_(model.diffusion_model, seed)
    model.eval()
    dev = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
    dm = model.diffusion_model
    info = {
        "source": "random", "family": "SD3-MMDiT" + ("-tiny" if tiny else ""), "seed": seed, "arch": "mmdit",
        "shape": "tiny (hidden 256)" if tiny else "SD3 medium per-block shape",
        "joint_blocks": len(dm.joint_blocks), "real_joint_blocks": SD3_MEDIUM_BLOCKS,
        "hidden_size": dm.hidden_size, "heads": dm.num_heads, "head_dim": dm.hidden_size // dm.num_heads,
        "patch_size": cfg["patch_size"], "latent_channels": cfg["in_channels"],
        "context": [SD3_TEXT_TOKENS, cfg["context_embedder_config"]["params"]["in_features"]],
        "pooled": cfg["adm_in_channels"], "pos_embed_max_size": cfg["pos_embed_max_size"],
        "init": "make_checkpoint.seeded_fill_",
    }
    return patcher, info


def build_model(args):
    """The benchmarked model: a checkpoint, or the random-weight model of ``--family``."""
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    if args.family == "mmdit":
        return build_random_mmdit(args.seed, blocks=args.dit_depth, tiny=args.tiny)
    return build_random_sd15(args.seed, tiny=args.tiny)


def model_family(patcher) -> str:
    """"unet", "mmdit" or "flux" (the pack's adapter decides, as the nodes do)."""
    from token_pruning_cache.nodes import adapter
    if adapter.attention_levels(patcher):
        return "unet"
    return adapter.dit_family(patcher) or "unknown"


def load_checkpoint(path: str):
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False, output_clipvision=False,
                                                embedding_directory=None)
    patcher = out[0]
    if patcher is None:
        raise SystemExit(f"{path}: no diffusion model found in this checkpoint")
    return patcher, {"source": "checkpoint", "path": str(path),
                     "family": type(patcher.model.model_config).__name__}


def make_inputs(patcher, width: int, height: int, seed: int):
    """Latent, noise and random text conds of the right shape for this model (same for every variant)."""
    import torch
    import comfy.sample
    import comfy.model_base
    unet_cfg = patcher.model.model_config.unet_config
    ctx_dim = unet_cfg.get("context_dim") or 768
    tokens, pooled = 77, None
    if isinstance(patcher.model, comfy.model_base.SD3):
        # SD3: CLIP-L+G (padded to 4096) and T5 tokens concatenated, 77 + 77; pooled CLIP-L+G 2048 -> y
        ctx_dim = unet_cfg["context_embedder_config"]["params"]["in_features"]
        tokens, pooled = SD3_TEXT_TOKENS, unet_cfg.get("adm_in_channels") or 2048
    elif unet_cfg.get("adm_in_channels"):  # SDXL-type: pooled text embedding for the ADM vector
        pooled = 1280
    channels = patcher.model.latent_format.latent_channels
    latent = torch.zeros(1, channels, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    if pooled:
        extra = lambda: {"pooled_output": torch.randn(1, pooled, generator=g)}  # noqa: E731
    else:
        extra = lambda: {}  # noqa: E731
    pos = [[torch.randn(1, tokens, ctx_dim, generator=g), extra()]]
    neg = [[torch.randn(1, tokens, ctx_dim, generator=g), extra()]]
    return latent, noise, pos, neg


# --------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------

def apply_random(model, ratio: float, max_downsample: str, qonly: bool, xattn: bool, mlp: bool, seed: int,
                 sx: int = 2, sy: int = 2):
    """Random pruning, installed exactly like ``apply_sito`` but with ``plan_random`` as planner."""
    from token_pruning_cache.nodes import adapter
    from token_pruning_cache.pruning_core.selection import plan_random, pruned_count, validate_prune_ratio

    problem = validate_prune_ratio(ratio, sx, sy)
    if problem:
        raise ValueError(f"random pruning: {problem}")
    factor, warning = adapter.resolve_max_downsample(model, str(max_downsample))
    if factor is None:
        raise ValueError(f"random pruning: {warning}")
    m = model.clone()
    uid = adapter.new_uid("random")

    def planner(n, grid, state):
        k = pruned_count(ratio, grid.n, grid.window_count(sy, sx))
        if k == 0 or grid.window_count(sy, sx) == 0:
            return None
        return plan_random(n.shape[0], grid, k, sy, sx, state.generator(n.device), n.device)

    def summary(state):
        return (f"random: r={ratio:g}, levels up to 1/{factor}: {state.summary_levels()}; "
                f"active in {len(state.active_steps)}/{state.total_steps} steps")

    adapter.install_block_pruning(m, uid, adapter.BlockPruning(self_attn=True, cross_attn=xattn, mlp=mlp,
                                                               prune_kv=not qonly, max_downsample=factor),
                                  planner, record_kind="random")
    adapter.install_run_lifecycle(m, uid, "random", 0.0, 1.0, seed, summary)
    return m


def patch(base, v: Variant, seed: int):
    if v.method == "unpatched":
        return base
    if v.method == "tome":
        from comfy_extras.nodes_tomesd import TomePatchModel
        return TomePatchModel.execute(base, v.ratio).result[0]
    if v.method == "sito":
        from token_pruning_cache.nodes.sito_node import apply_sito
        extra = {"similarity_search": v.search} if v.search else {}
        if v.recovery:
            extra["recovery"] = v.recovery
        return apply_sito(base, prune_ratio=v.ratio, max_downsample=v.max_downsample, prune_self_attn=True,
                          prune_cross_attn=v.xattn, prune_mlp=v.mlp, prune_kv=not v.qonly, seed=seed, **extra)
    if v.method == "random":
        return apply_random(base, v.ratio, v.max_downsample, v.qonly, v.xattn, v.mlp, seed)
    if v.method in ("dato", "deepcache"):
        from token_pruning_cache.nodes.dato_node import apply_dato
        if v.preset == "custom":
            return apply_dato(base, prune_ratio=v.ratio, custom_schedule=v.schedule, seed=seed)
        return apply_dato(base, prune_ratio=v.ratio, schedule=v.preset, seed=seed)
    if v.method == "cat":
        from token_pruning_cache.nodes.cat_node import apply_cat
        return apply_cat(base, keep_ratio=v.ratio, max_downsample=v.max_downsample, seed=seed)
    if v.method == "easycache":
        from comfy_extras.nodes_easycache import EasyCacheNode
        return EasyCacheNode.execute(base, reuse_threshold=v.ratio, start_percent=0.15, end_percent=0.95,
                                     verbose=False).result[0]
    if v.method == "lazycache":
        from comfy_extras.nodes_easycache import LazyCacheNode
        return LazyCacheNode.execute(base, reuse_threshold=v.ratio, start_percent=0.15, end_percent=0.95,
                                     verbose=False).result[0]
    raise ValueError(v.method)


def diffusion_model_wrappers_run(base, pos, neg) -> bool:
    """Does this model's forward call ComfyUI's DIFFUSION_MODEL wrappers (which EasyCache needs)?

    Not every model class does: in ComfyUI 0.3.75 the UNet, Flux and most video DiTs run them, the
    SD3 MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py) does not - there EasyCache installs
    without error and never skips a step. One model call on an 8x8 latent with a probe wrapper.
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
    latent = torch.zeros(1, base.model.latent_format.latent_channels, 8, 8)
    comfy.sample.sample(m, torch.zeros_like(latent), 1, 1.0, "euler", "normal", pos, neg, latent, seed=0,
                        disable_pbar=True)
    return bool(hits)


class CoreCacheLog(logging.Handler):
    """Reads the "EasyCache - skipped N/M steps" line ComfyUI's EasyCache / LazyCache log at the end
    of a run (root logger, INFO), without letting other INFO lines through to the console."""

    PATTERN = re.compile(r"\b(EasyCache|LazyCache) - skipped (\d+)/(\d+) steps")

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO)
        self.verbose = verbose
        self.line, self.skipped, self.total = None, None, None

    def emit(self, record):
        msg = record.getMessage()
        m = self.PATTERN.search(msg)
        if m:
            self.line, self.skipped, self.total = msg, int(m.group(2)), int(m.group(3))

    def __enter__(self):
        root = logging.getLogger()
        self._level = root.level
        threshold = root.getEffectiveLevel()
        self._gate = lambda record: self.verbose or record.levelno >= threshold
        self._gated = list(root.handlers)
        for h in self._gated:
            h.addFilter(self._gate)
        root.addHandler(self)
        root.setLevel(min(threshold, logging.INFO))
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)
        for h in self._gated:
            h.removeFilter(self._gate)
        return False


def schedule_ideal(v: Variant, steps: int, shallow_cost: float = 0.13) -> float | None:
    """Ideal speedup of a DaTo/DeepCache schedule: T / (full + shallow_cost·shallow), reuse free."""
    if v.method not in ("dato", "deepcache"):
        return None
    from token_pruning_cache.nodes.dato_node import schedule_maker
    make, _ = schedule_maker(v.preset, v.schedule or "")
    return make(steps, 1).ideal_speedup(shallow_cost=shallow_cost)


# --------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of this process during a block, minus the RSS at its start (bytes)."""

    method: str | None = None

    def __init__(self):
        if PeakRSS.method is None:
            PeakRSS.method = "VmHWM" if self._reset_hwm() and _status_kib("VmHWM") is not None else "psutil-5ms"
        self.delta = None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def __enter__(self):
        gc.collect()
        if self.method == "VmHWM":
            self._reset_hwm()
            self.start = _status_kib("VmRSS") * 1024
        else:
            import psutil
            self._proc = psutil.Process()
            self.start = self._proc.memory_info().rss
            self._peak = self.start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.delta = max(0, peak - self.start)
        return False


def cpu_wait_seconds() -> float:
    """Total time this process's threads spent runnable but waiting for a CPU (schedstat run_delay).

    Grows only when something else competes for the cores: the benchmark's contention gauge.
    """
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        return math.nan
    return total / 1e9


class UNetCalls:
    """Counts diffusion-model forwards and their batch sizes (to show CFG really batches to 2)."""

    def __init__(self, dm):
        self.calls, self.batches = 0, set()
        self._h = dm.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0] if args else None
        self.calls += 1
        if x is not None and hasattr(x, "shape"):
            self.batches.add(int(x.shape[0]))

    def reset(self):
        self.calls, self.batches = 0, set()

    def remove(self):
        self._h.remove()


class PackLog(logging.Handler):
    """Keeps the pack's per-run summary lines (tokens pruned per level, steps active)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------

@dataclass
class Result:
    spec: str
    method: str
    ratio: float
    options: dict
    seconds_all: list = field(default_factory=list)
    cpu_wait_all: list = field(default_factory=list)  # s this process's threads were runnable but not running
    loadavg_all: list = field(default_factory=list)
    peaks: list = field(default_factory=list)
    seconds: float = math.nan
    peak_rss_delta_mib: float = math.nan
    flops: float | None = None
    unet_calls: int = 0
    unet_batch: list = field(default_factory=list)
    pack_summary: str | None = None
    ideal: float | None = None  # ideal speedup of a caching variant (schedule or FLOPs model)
    pruned_flops: float | None = None  # cat: FLOPs of one pruned CFG model call (3-step probe)
    latent: object = None  # torch.Tensor, not serialised
    pair_speedups: list = field(default_factory=list)  # --paired: unpatched / variant of adjacent runs


def run_benchmark(args: argparse.Namespace) -> dict:
    bootstrap(args.comfyui)
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import comfy.sample
    import comfy.model_management

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads))

    pack_log = PackLog()
    pl = logging.getLogger(PACK_ALIAS)
    pl.setLevel(logging.INFO)
    pl.addHandler(pack_log)
    if not args.verbose:
        pl.propagate = False

    variants = [parse_variant(s, args.dato_schedule) for s in args.variants.split(",") if s.strip()]
    if not variants or variants[0].method != "unpatched":
        variants = [parse_variant("unpatched")] + [v for v in variants if v.method != "unpatched"]
    else:
        variants = [variants[0]] + [v for v in variants[1:] if v.method != "unpatched"]

    t0 = time.perf_counter()
    base, model_info = build_model(args)
    dm = base.model.diffusion_model
    family = model_family(base)
    model_info["arch"] = family
    model_info["unet_parameters"] = sum(p.numel() for p in dm.parameters())  # the diffusion model's
    model_info["dtype"] = str(next(dm.parameters()).dtype)
    model_info["build_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("model ready (%s %s, %.0f M parameters) in %.1f s", model_info["source"], model_info["family"],
             model_info["unet_parameters"] / 1e6, model_info["build_seconds"])
    problem = family_problem(variants, family)
    if problem:
        raise SystemExit(problem)

    latent, noise, pos, neg = make_inputs(base, args.width, args.height, args.seed)
    if family != "unet":
        model_info["image_tokens"] = ((latent.shape[2] + 1) // 2) * ((latent.shape[3] + 1) // 2)  # patch 2
        model_info["text_tokens"] = int(pos[0][0].shape[1])
    if any(v.method == "easycache" for v in variants) and not diffusion_model_wrappers_run(base, pos, neg):
        raise SystemExit(
            f"easycache: ComfyUI's EasyCache works through the DIFFUSION_MODEL wrapper, which this model's "
            f"forward ({type(dm).__name__}, ComfyUI {_comfyui_version()}) never calls: it would skip "
            f"no step and its row would repeat the unpatched one. Use lazycache@T instead (ComfyUI's LazyCache: "
            f"the same reuse rule at the PREDICT_NOISE level, which every model runs).")
    calls = UNetCalls(dm)

    def sample(model, steps):
        out = comfy.sample.sample(model, noise, steps, args.cfg, args.sampler, args.scheduler, pos, neg, latent,
                                  seed=args.seed, disable_pbar=True)
        return out.detach().to("cpu", torch.float32)

    def prepare(v: Variant, label: str) -> tuple[object, Result]:
        model = patch(base, v, args.seed)
        opts = {}
        if v.method in ("sito", "random"):
            opts = {"prune_kv": not v.qonly, "max_downsample": v.max_downsample, "cross_attn": v.xattn, "mlp": v.mlp}
            if v.search:
                opts["similarity_search"] = v.search
            if v.recovery:
                opts["recovery"] = v.recovery
        res = Result(label, v.method, v.ratio, opts)
        if v.method in CACHE_METHODS:
            res.options = ({"preset": v.preset} if v.preset else {}) | ({"schedule": v.schedule} if v.schedule else {})
            res.ideal = schedule_ideal(v, args.steps)
            if v.method == "cat" and not args.no_flops and ref_flops:
                from token_pruning_cache.nodes.cat_node import apply_cat
                probe = apply_cat(base, keep_ratio=v.ratio, max_downsample=v.max_downsample, warmup_steps=0,
                                  seed=args.seed)
                with FlopCounterMode(display=False) as fc:  # reference, clustering, one pruned step
                    sample(probe, 3)
                pruned = max(float(fc.get_total_flops()) - 2 * ref_flops[0], 1.0)
                full_steps = min(args.steps, 8)
                res.ideal = args.steps * ref_flops[0] / (full_steps * ref_flops[0] + (args.steps - full_steps) * pruned)
                res.pruned_flops = pruned
                res.options.update(full_steps=full_steps, pruned_steps=args.steps - full_steps)
                log.info("%-18s flops of one pruned model call: %.1f G (unpatched %.1f G)", label, pruned / 1e9,
                         ref_flops[0] / 1e9)
            return model, res
        if not args.no_flops:
            # One CFG model call (steps=1 -> one euler step) through the real sampler, patches live.
            with FlopCounterMode(display=False) as fc:
                sample(model, 1)
            res.flops = float(fc.get_total_flops())
            log.info("%-18s flops of one model call: %.1f G", label, res.flops / 1e9)
            if v.method == "unpatched":
                ref_flops.append(res.flops)
        return model, res

    ref_flops: list[float] = []

    def timed(model, res: Result) -> None:
        pack_log.lines.clear()
        calls.reset()
        wait0, load0 = cpu_wait_seconds(), os.getloadavg()[0]
        with CoreCacheLog(args.verbose) as core_log, PeakRSS() as mem:
            t = time.perf_counter()
            out = sample(model, args.steps)
            dt = time.perf_counter() - t
        wait = cpu_wait_seconds() - wait0
        if core_log.line is not None and res.method in ("easycache", "lazycache"):
            # A reused step runs no model call; every other step is a full one: steps / computed steps.
            computed = core_log.total - core_log.skipped
            res.ideal = core_log.total / computed if computed > 0 else math.inf
            res.options.update(skipped_steps=core_log.skipped, of_steps=core_log.total)
        res.seconds_all.append(dt)
        res.cpu_wait_all.append(wait)
        res.loadavg_all.append(round(max(load0, os.getloadavg()[0]), 2))
        res.peaks.append(mem.delta)
        if res.latent is None:
            res.latent = out
        res.seconds = min(res.seconds_all)
        res.peak_rss_delta_mib = max(res.peaks) / 2**20
        res.unet_calls, res.unet_batch = calls.calls, sorted(calls.batches)
        res.pack_summary = pack_log.lines[-1] if pack_log.lines else core_log.line
        log.info("%-18s %7.2f s/image  (waited %.1f s for a CPU, load %.1f)", res.spec, dt, wait, res.loadavg_all[-1])

    # FLOPs pass of every variant first (it doubles as the warm-up), then the timed runs in
    # rounds -- every variant once per round -- so a burst of load from elsewhere on the
    # machine hits one run of several variants rather than all runs of one.
    if args.no_flops:  # warm-up (model load, first allocations) so the first timed run is fair
        sample(base, 1)
    prepared = [prepare(v, v.spec) for v in variants]
    results: list[Result] = [res for _, res in prepared]
    for round_ in range(args.repeats):
        if not args.paired:
            for model, res in prepared:
                timed(model, res)
            continue
        # --paired: each variant next to its own unpatched run, ABBA across rounds, so both
        # halves of a pair see the machine at the same speed
        base_model, base_res = prepared[0]
        for model, res in prepared[1:]:
            order = [(base_model, base_res), (model, res)]
            for m, r in (order if round_ % 2 == 0 else order[::-1]):
                timed(m, r)
            res.pair_speedups.append(base_res.seconds_all[-1] / res.seconds_all[-1])
        if len(prepared) == 1:
            timed(base_model, base_res)
    drift = Result("unpatched (re-run)", "unpatched", 0.0, {}, flops=results[0].flops)
    if args.skip_rerun:
        drift.seconds, drift.latent, drift.seconds_all = results[0].seconds, results[0].latent, []
    else:
        timed(prepared[0][0], drift)
    del prepared
    calls.remove()
    pl.removeHandler(pack_log)
    pl.propagate = True

    ref = results[0]
    ref_seconds = min(ref.seconds, drift.seconds)
    x_ref = ref.latent
    ref_norm = float(x_ref.norm())

    def row(r: Result) -> dict:
        rel = float((r.latent - x_ref).norm()) / ref_norm if ref_norm > 0 else math.nan
        return {
            "variant": r.spec, "method": r.method, "ratio": r.ratio, "options": r.options,
            "seconds_per_image": r.seconds, "seconds_all": r.seconds_all,
            "cpu_wait_seconds_all": [round(w, 2) for w in r.cpu_wait_all], "loadavg_all": r.loadavg_all,
            "seconds_per_step": r.seconds / args.steps,
            "speedup": statistics.median(r.pair_speedups) if r.pair_speedups else ref_seconds / r.seconds,
            "pair_speedups": [round(x, 4) for x in r.pair_speedups],
            "flops_per_model_call": r.flops,
            "flops_per_pruned_call": r.pruned_flops,
            "flops_ideal_speedup": (ref.flops / r.flops) if (r.flops and ref.flops) else r.ideal,
            "flops_ideal_basis": _ideal_basis(r),
            "peak_rss_delta_mib": r.peak_rss_delta_mib,
            "rel_error": rel,
            "finite": bool(torch.isfinite(r.latent).all()),
            "unet_calls": r.unet_calls, "unet_batch": r.unet_batch,
            "pack_summary": r.pack_summary,
        }

    rows = [row(r) for r in results]
    drift_row = row(drift)
    for r in rows[1:]:
        if r["flops_per_model_call"] is not None and r["flops_per_model_call"] == ref.flops:
            log.warning("%s: counted FLOPs equal the unpatched model's - is the patch active?", r["variant"])

    import comfy.ldm.modules.attention as attn
    report = {
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "config": {
            "width": args.width, "height": args.height, "latent": list(latent.shape), "steps": args.steps,
            "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg, "seed": args.seed,
            "repeats": args.repeats, "paired": bool(args.paired), "threads": torch.get_num_threads(),
            "attention": getattr(attn.optimized_attention, "__name__", str(attn.optimized_attention)),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "speedup_reference": ("median of the speedups of adjacent unpatched/variant pairs (--paired)"
                                  if args.paired else "fastest of the first and the final unpatched run"),
            "peak_memory_method": PeakRSS.method,
            "family": family, "comfyui": _comfyui_version(),
        },
        "model": model_info,
        "code": _git_state(),
        "unpatched_drift": {
            "first_seconds": ref.seconds, "rerun_seconds": drift.seconds,
            "drift_percent": 100.0 * (drift.seconds - ref.seconds) / ref.seconds,
            "rerun_rel_error": drift_row["rel_error"], "rerun_skipped": bool(args.skip_rerun),
        },
        "contention": contention(results + [drift]),
        "results": rows,
        "unpatched_rerun": drift_row,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    return report


# --------------------------------------------------------------------------------------
# Profiling (--profile): where one model call's time goes, selection overhead included
# --------------------------------------------------------------------------------------

class _Labels:
    """Temporarily labels regions for torch.profiler without touching the pack's files.

    Module hooks label every transformer block and its attn1/attn2/ff by token-grid level;
    the planners (SiTo's ``sito_plan``, ToMe's matching), ``PrunePlan.prune``/``recover`` and
    ToMe's merge/unmerge are wrapped in place for the duration of the profile. On an MMDiT:
    every joint block, the image ("img") and text ("txt") streams' qkv / proj / mlp / adaLN
    linears, the joint attention kernel (``mmdit.optimized_attention``), and CAT's selection
    (``CATState``) and final latent merge.
    """

    def __init__(self, dm):
        self.dm, self.handles, self.undo, self.open = dm, [], [], {}

    @staticmethod
    def wrap(fn, label):
        import torch

        def wrapped(*a, **k):
            with torch.profiler.record_function(label):
                return fn(*a, **k)
        wrapped.__wrapped__ = fn
        return wrapped

    def patch_attr(self, obj, name, label):
        orig = getattr(obj, name)
        setattr(obj, name, self.wrap(orig, label))
        self.undo.append((obj, name, orig))

    def hook(self, module, label_fn, arg: int = 0):
        import torch

        def pre(mod, args, kwargs):
            x = args[arg] if len(args) > arg else kwargs.get("x")
            rf = torch.profiler.record_function(label_fn(x))
            rf.__enter__()
            self.open.setdefault(id(mod), []).append(rf)

        def post(mod, args, kwargs, out):
            self.open[id(mod)].pop().__exit__(None, None, None)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def __enter__(self):
        import comfy_extras.nodes_tomesd as tome
        from token_pruning_cache.pruning_core import recovery
        from token_pruning_cache.pruning_core import sito as sito_core

        def level(x):
            return f"{x.shape[1]} tokens" if x is not None and x.dim() == 3 else "?"

        for name, mod in self.dm.named_modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                self.hook(mod, lambda x: f"block [{level(x)}]")
                self.hook(mod.attn1, lambda x: f"attn1 module [{level(x)}]")
                self.hook(mod.attn2, lambda x: f"attn2 module [{level(x)}]")
                self.hook(mod.ff, lambda x: f"ff module [{level(x)}]")
            elif type(mod).__name__ == "JointBlock":  # MMDiT: called as block(context, x, c=...)
                self.hook(mod, lambda x: f"joint block [{level(x)} img]", arg=1)
                for stream, sub in (("img", mod.x_block), ("txt", mod.context_block)):
                    for part in ("attn.qkv", "attn.proj", "mlp", "adaLN_modulation"):
                        try:  # the last block's text stream is "pre_only": no proj, no mlp
                            m = sub.get_submodule(part)
                        except AttributeError:
                            continue
                        self.hook(m, lambda x, s=stream, q=part: f"{s} {q} [{level(x)}]")
        if any(type(m).__name__ == "JointBlock" for m in self.dm.modules()):
            import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
            from token_pruning_cache.pruning_core import cat as cat_core
            orig_attn = mmdit.optimized_attention

            def joint_attention(q, k, v, *a, **kw):
                import torch
                with torch.profiler.record_function(f"attention core [{q.shape[1]} q x {k.shape[1]} kv]"):
                    return orig_attn(q, k, v, *a, **kw)
            mmdit.optimized_attention = joint_attention
            self.undo.append((mmdit, "optimized_attention", orig_attn))
            for name in ("set_reference", "first_selection", "next_selection"):
                self.patch_attr(cat_core.CATState, name, f"select: CAT {name}")
            self.patch_attr(cat_core, "merge_prediction", "gather: CAT merge_prediction")
        self.patch_attr(sito_core, "sito_plan", "select: sito_plan")
        self.patch_attr(recovery.PrunePlan, "prune", "gather: PrunePlan.prune")
        self.patch_attr(recovery.PrunePlan, "recover", "gather: PrunePlan.recover")
        orig_get = tome.get_functions

        def get_functions(x, ratio, original_shape):
            with __import__("torch").profiler.record_function("select: tome matching"):
                m, u = orig_get(x, ratio, original_shape)
            return self.wrap(m, "gather: tome merge"), self.wrap(u, "gather: tome unmerge")
        tome.get_functions = get_functions
        self.undo.append((tome, "get_functions", orig_get))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for obj, name, orig in reversed(self.undo):
            setattr(obj, name, orig)
        return False


def run_profile(args: argparse.Namespace) -> dict:
    bootstrap(args.comfyui)
    import torch
    import comfy.sample

    torch.set_num_threads(max(1, args.threads or len(os.sched_getaffinity(0))))
    logging.getLogger(PACK_ALIAS).setLevel(logging.WARNING)
    base, _ = build_model(args)
    problem = family_problem([parse_variant(args.profile, args.dato_schedule)], model_family(base))
    if problem:
        raise SystemExit(problem)
    latent, noise, pos, neg = make_inputs(base, args.width, args.height, args.seed)
    bm = base.model

    def sample(model, steps):
        return comfy.sample.sample(model, noise, steps, args.cfg, args.sampler, args.scheduler, pos, neg, latent,
                                   seed=args.seed, disable_pbar=True)

    out = {}
    specs = ["unpatched"] + ([args.profile] if args.profile != "unpatched" else [])
    for spec in specs:
        v = parse_variant(spec, args.dato_schedule)
        if v.method == "cat":
            # CAT's full steps cost what unpatched ones do; profile its first pruned step instead:
            # warmup 0 -> step 1 reference, step 2 clustering, step 3 pruned.
            from token_pruning_cache.nodes.cat_node import apply_cat
            extra = {} if v.max_downsample == "auto" else {"max_downsample": v.max_downsample}
            model = apply_cat(base, keep_ratio=v.ratio, warmup_steps=0, seed=args.seed, **extra)
            steps, what = 3, "its first pruned step (step 3 of a warmup-0 run)"
            dit = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
            for key, fn in list(dit.items()):  # the clone's own dict: label the block replacement as a whole
                dit[key] = _Labels.wrap(fn, "dit block replace (CAT: joint block + gather/scatter)")
        else:
            model, steps, what = patch(base, v, args.seed), 1, "one step"
        sample(model, steps)  # warm-up
        # Profile exactly the model call(s) of the last step (apply_model with every wrapper, so CAT's
        # selection and latent merge are in; CFG normally batches cond and uncond into one call).
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        sigmas, timing = [], {"wall": 0.0, "calls": 0, "batch": []}
        orig = bm.apply_model

        def apply_model(*a, **k):
            t = a[1] if len(a) > 1 else k.get("t")
            key = round(float(t.flatten()[0]), 6)
            if key not in sigmas:
                sigmas.append(key)
            if len(sigmas) != steps:
                return orig(*a, **k)
            if timing["calls"] == 0:
                timing["wait0"] = cpu_wait_seconds()
                prof.start()
            with torch.profiler.record_function("model call (1 CFG step)"):
                t0 = time.perf_counter()
                result = orig(*a, **k)
                timing["wall"] += time.perf_counter() - t0
            timing["calls"] += 1
            timing["batch"].append(int(a[0].shape[0]))
            return result

        bm.apply_model = apply_model
        try:
            with _Labels(bm.diffusion_model):
                sample(model, steps)
        finally:
            del bm.apply_model
            if timing["calls"]:
                prof.stop()
        wall, wait = timing["wall"], cpu_wait_seconds() - timing.get("wait0", cpu_wait_seconds())
        ev = prof.key_averages()
        labels = {e.key: (e.cpu_time_total / 1e3, e.count) for e in ev
                  if e.key.startswith(("block", "attn1", "attn2", "ff ", "select:", "gather:", "model call",
                                       "joint block", "img ", "txt ", "attention core", "dit block"))}
        ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in ev if e.key.startswith("aten::")),
                     key=lambda r: -r[1])[:15]
        out[spec] = {"profiled": what, "model_calls": timing["calls"], "batch": timing["batch"],
                     "wall_seconds": wall, "cpu_wait_seconds": wait, "regions_ms": labels, "top_ops_self_ms": ops}
        print(f"\n== {spec}: {what}, {timing['calls']} CFG model call(s) of batch {timing['batch']}, "
              f"{wall:.2f} s wall (threads waited {wait:.1f} s for a CPU) ==")
        total = labels.get("model call (1 CFG step)", (wall * 1e3, 1))[0]
        for key in sorted(labels, key=lambda k: (not k.startswith("model"), -labels[k][0])):
            ms, n = labels[key]
            print(f"  {key:52s} {ms:10.1f} ms  {100 * ms / total:5.1f} %  ({n} calls)")
        print("  top aten ops by self time:")
        for key, ms, n in ops:
            print(f"    {key:50s} {ms:10.1f} ms  {100 * ms / total:5.1f} %  ({n} calls)")
        del model
    return out


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

def _ideal_basis(r) -> str | None:
    """How a row's FLOPs-ideal speedup was obtained (the caching variants' differ from the per-call ratio)."""
    if r.flops is not None:
        return "FLOPs of one CFG model call: unpatched / variant"
    if r.method == "cat" and r.pruned_flops is not None:
        o = r.options
        return (f"{o['full_steps']} full + {o['pruned_steps']} pruned model calls, the pruned call's FLOPs counted "
                f"on a 3-step warmup-0 probe")
    if r.method in ("dato", "deepcache") and r.ideal is not None:
        return "DaTo schedule: steps / (full + 0.13 x shallow), reused steps free (pruning not included)"
    if r.method in ("easycache", "lazycache") and r.ideal is not None:
        return "steps / computed steps (a reused step runs no model call)"
    return None


def _comfyui_version() -> str | None:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return None


def contention(results) -> dict:
    """How much other load disturbed the kept (fastest) timed runs: CPU wait / wall time."""
    worst, worst_variant = 0.0, None
    for r in results:
        if not r.seconds_all:
            continue
        i = r.seconds_all.index(r.seconds)
        frac = r.cpu_wait_all[i] / r.seconds if r.seconds > 0 else 0.0
        if math.isfinite(frac) and frac >= worst:
            worst, worst_variant = frac, r.spec
    return {"max_cpu_wait_fraction": worst, "variant": worst_variant,
            "disturbed": worst > 0.05,
            "note": "threads of this process runnable but not running (schedstat run_delay) / wall time, "
                    "over the kept runs; above 5 % other processes competed for the cores"}


def _git_state() -> dict:
    """Commit of the pack and whether its working tree differs from it (the code measured)."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "nodes", "pruning_core",
                                      "__init__.py").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "modified": dirty}


def _fmt(x, spec: str, none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def markdown(report: dict) -> str:
    c, m, d = report["config"], report["model"], report["unpatched_drift"]
    tiny = "TINY " if m["family"].endswith("-tiny") else ""
    if m["source"] != "random":
        model = f"checkpoint `{Path(m['path']).name}` ({m['family']})"
    elif m.get("arch") == "mmdit":
        shape = ("the real SD3-medium block shape" if not tiny
                 else f"hidden {m['hidden_size']} instead of SD3 medium's 1536")
        model = (f"{tiny}SD3-medium-shaped MMDiT (ComfyUI `model_base.SD3`): {m['joint_blocks']} of SD3 medium's "
                 f"{m['real_joint_blocks']} joint blocks at {shape} (hidden {m['hidden_size']} = {m['heads']} heads × "
                 f"{m['head_dim']}, patch {m['patch_size']}, {m['latent_channels']} latent channels, text context "
                 f"{m['context'][0]}×{m['context'][1]}, pooled {m['pooled']}), "
                 f"{m['unet_parameters'] / 1e6:.0f} M parameters, random seeded weights")
    else:
        model = f"{tiny}SD1.5-architecture UNet, {m['unet_parameters'] / 1e6:.0f} M parameters, random seeded weights"
    tokens = (f" = {m['image_tokens']} image + {m['text_tokens']} text tokens" if m.get("image_tokens") else "")
    rerun_skipped = report["unpatched_drift"].get("rerun_skipped", False)
    lines = [
        f"{model}, {m['dtype'].replace('torch.', '')}; {c['width']}×{c['height']} "
        f"(latent {c['latent'][3]}×{c['latent'][2]}{tokens}), {c['sampler']}/{c['scheduler']}, {c['steps']} steps, "
        f"CFG {c['cfg']:g}, seed {c['seed']}; torch {c['torch']} on {c['threads']} CPU threads, "
        f"ComfyUI attention `{c['attention']}`, fastest of {c['repeats']} run(s).",
        "",
        "| variant | s / image | speedup | FLOPs-ideal speedup | peak RAM Δ (MiB) | rel. error vs unpatched |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"] + ([] if rerun_skipped else [report["unpatched_rerun"]]):
        err = "0 (reference)" if r is report["results"][0] else f"{100 * r['rel_error']:.2f} %"
        lines.append(f"| {r['variant']} | {r['seconds_per_image']:.2f} | {r['speedup']:.2f}× | "
                     f"{_fmt(r['flops_ideal_speedup'], '.2f')}{'×' if r['flops_ideal_speedup'] else ''} | "
                     f"{r['peak_rss_delta_mib']:.0f} | {err} |")
    drift_text = ("no re-run (--skip-rerun)" if rerun_skipped else
                  f"{d['first_seconds']:.2f} s first, {d['rerun_seconds']:.2f} s re-run at the end: "
                  f"drift {d['drift_percent']:+.1f} %")
    cache_notes = []
    for r in report["results"]:
        basis = r.get("flops_ideal_basis")
        if basis and not basis.startswith("FLOPs of one CFG model call") and r["flops_ideal_speedup"]:
            cache_notes.append(f"{r['variant']}: {basis}")
    speedup_text = (f"Speedup = median over {c['repeats']} rounds of unpatched / variant, each variant timed right "
                    f"next to its own unpatched run (--paired; order alternating per round; the s / image column is "
                    f"the fastest run; unpatched {drift_text}). " if c.get("paired") else
                    f"Speedup = fastest unpatched run / variant (unpatched {drift_text}). ")
    lines += [
        "",
        speedup_text +
        "FLOPs-ideal = FlopCounterMode FLOPs of one CFG model call, unpatched / variant "
        "(matmuls, convs, attention; not element-wise work, sorts or gathers)"
        + (f"; for the caching rows the FLOPs of the whole run: {'; '.join(cache_notes)}" if cache_notes else "")
        + ". "
        "Peak RAM Δ = peak resident set during the timed run minus RSS before it "
        f"({c['peak_memory_method']}). Rel. error = ‖x − x_ref‖ / ‖x_ref‖ of the final latent.",
    ]
    k = report.get("contention") or {}
    if k.get("variant"):
        lines += ["", f"Other load on the machine: the kept runs' threads waited for a CPU at most "
                      f"{100 * k['max_cpu_wait_fraction']:.1f} % of their wall time ({k['variant']})"
                      + (" — **timings disturbed, re-run on an idle machine**." if k["disturbed"] else ".")]
    if report.get("command"):
        code = report.get("code") or {}
        at = f" at commit {code['commit']}" if code.get("commit") else ""
        if code.get("modified"):
            at += " (with uncommitted changes)"
        lines += ["", f"Command{at}: `{report['command']}`"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[bench %(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    if args.profile:
        prof = run_profile(args)
        out = Path(args.out).with_name(f"profile_{args.profile.replace('@', '_')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(prof, indent=2))
        log.info("wrote %s", out)
        return prof
    report = run_benchmark(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = markdown(report)
    out.with_suffix(".md").write_text(md + "\n")
    if args.markdown:
        print(md)
    else:
        for r in report["results"] + [report["unpatched_rerun"]]:
            print(f"{r['variant']:<20} {r['seconds_per_image']:8.2f} s  {r['speedup']:5.2f}x  "
                  f"flops-ideal {_fmt(r['flops_ideal_speedup'], '5.2f')}x  "
                  f"mem +{r['peak_rss_delta_mib']:.0f} MiB  err {100 * r['rel_error']:.2f} %")
    log.info("wrote %s and %s (%.0f s total)", out, out.with_suffix(".md"), report["total_seconds"])
    return report


if __name__ == "__main__":
    main()
