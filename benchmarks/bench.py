#!/usr/bin/env python
"""Speed / fidelity benchmark of the pack's token pruning against ComfyUI's own ToMe.

Everything runs in ONE process on ONE model with the same seed, noise and conditioning:

1. an SD1.5-architecture UNet at full size (860 M parameters), built with ComfyUI's own
   classes (``comfy.supported_models.SD15`` with the standard SD1.5 unet config, fp32) and
   filled with seeded random weights -- or, with ``--family mmdit``, an SD3-medium-shaped
   MMDiT (``comfy.supported_models.SD3`` / ``comfy.model_base.SD3``: the real per-block shape,
   hidden 1536 = 24 heads x 64, patch 2, 16 latent channels, 154 x 4096 text context, pooled
   2048, but only ``--dit-depth`` joint blocks instead of 24) -- or, with ``--family wan``, a
   Wan-2.1-1.3B-shaped video DiT (``comfy.supported_models.WAN21_T2V``: width 1536 = 12 heads x
   128, FFN 8960, patch 1x2x2, umT5 context 512 x 4096; ``--frames`` video frames) or, with
   ``--family qwen``, a Qwen-Image-shaped DiT (width 3072 = 24 heads x 128, patch 2, Qwen2.5-VL
   context width 3584), each with ``--dit-depth`` of its blocks -- or a real checkpoint given
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

Device (``--device``, ``--dtype``, ``--attention``; see device.py): the CPU in fp32 with ComfyUI's
own attention choice by default, exactly the runs above; ``--device cuda`` runs the same variants
on the GPU with ComfyUI's options for the chosen attention kernel and dtype (``--attention sdpa``
= ``--use-pytorch-cross-attention``, ``sub-quadratic`` = ``--use-quad-cross-attention``, ``split``
= ``--use-split-cross-attention``, ...), ``--warmup`` untimed runs of every variant first (default
1 on CUDA), each timed image between ``torch.cuda.synchronize()`` calls and timed with CUDA
events, and the peak GPU memory from ``torch.cuda.max_memory_allocated``. ``--family sdxl`` is the
SDXL base UNet (2.6 B parameters) with random weights.

Variants are ``method[-modifier...][@ratio]``:
  unpatched                      the model as loaded
  tome@R                         ComfyUI core ``TomePatchModel`` (comfy_extras/nodes_tomesd.py)
  sito@R                         this pack's SiTo node (``apply_sito``), defaults
  random@R                       random pruning through this pack's block-pruning hooks: random base
                                 token per 2x2 window, R*N random other tokens pruned, no
                                 scoring at all (the cost-free ceiling of attn1 pruning)
  modifiers (sito, random):      qonly  keys/values stay full (prune_kv=False, like ToMe)
                                 ds2 / ds4  also prune the 1/2 (and 1/4) resolution levels
                                 xattn  also prune cross-attention queries;  mlp  also the FF
  dato[-official|-official-dense|-aggressive]@R, deepcache[-5|-10]@R   this pack's DaTo node (UNet only)
  dato-searched-20-balanced@R    DaTo with a preset of the schedule search (searched_20_balanced; any
                                 searched_<steps>_<name> preset of the node)
  dato-custom@R                  DaTo with the schedule given by --dato-schedule (the node's
                                 custom_schedule syntax, resampled to --steps like the node does)
  cat@R                          this pack's CAT node (keep_ratio R; UNet and DiT)
  easycache@T, lazycache@T       ComfyUI core's EasyCache / LazyCache nodes (reuse_threshold T)
On the DiTs (mmdit, wan, qwen) only unpatched, cat, lazycache and easycache apply (SiTo, DaTo/DeepCache, ToMe and
random pruning patch the UNet's SpatialTransformer blocks); anything else is refused up front.
See benchmarks/README.md for usage.

Layout: this file is the command line (``parse_args``, ``main``); the work is in its sibling
modules -- pack.py (the bootstrap, and the one place the pack's internals are named), device.py
(device, dtype and attention options, CUDA timing and memory),
variants.py (variant syntax and patching), models.py (the model and its inputs), measure.py
(meters and the benchmark run), profiling.py (``--profile``) and report.py (JSON, markdown).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling modules, also when imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import device  # noqa: E402
import report  # noqa: E402
from measure import run_benchmark  # noqa: E402
from pack import ROOT  # noqa: E402
from profiling import run_profile  # noqa: E402
from variants import family_problem, parse_variant  # noqa: E402

DEFAULT_VARIANTS = ("unpatched,tome@0.5,tome@0.7,random@0.5,random@0.7,sito@0.3,sito@0.5,sito@0.7,"
                    "sito-qonly@0.5,sito-ds2@0.5")
DEFAULT_DIT_VARIANTS = "unpatched,cat@0.3,lazycache@0.2"
DIT_FAMILIES = ("mmdit", "wan", "qwen")  # --family choices that are DiTs (CAT and the core caches only)

log = logging.getLogger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a real SD1.x/SD2.x/SDXL checkpoint (.safetensors/.ckpt); default: a random-weight SD1.5 UNet")
    p.add_argument("--family", choices=("sd15", "sdxl") + DIT_FAMILIES, default="sd15",
                   help="random-weight model: sd15 = the SD1.5 UNet (default); sdxl = the SDXL base UNet; mmdit = an "
                        "SD3-medium-shaped MMDiT; wan = a Wan-2.1-1.3B-shaped video DiT; qwen = a Qwen-Image-shaped "
                        "DiT (the DiTs: real block width, --dit-depth blocks)")
    p.add_argument("--device", choices=device.DEVICES, default="cpu",
                   help="where the model runs (default cpu); cuda: the current CUDA GPU, CUDA-event timing, peak GPU "
                        "memory")
    p.add_argument("--dtype", choices=device.DTYPE_CHOICES, default="fp32",
                   help="dtype of the random-weight model and ComfyUI's --fp16-unet/--bf16-unet/--fp32-unet (default "
                        "fp32)")
    p.add_argument("--attention", choices=tuple(device.ATTENTION_OPTIONS), default="default",
                   help="ComfyUI's attention kernel: sdpa (--use-pytorch-cross-attention), sub-quadratic "
                        "(--use-quad-cross-attention), split (--use-split-cross-attention), flash, sage; default: "
                        "ComfyUI's own choice (SDPA on NVIDIA GPUs, sub-quadratic on the CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed whole runs of every variant before the timed ones (default 1 on cuda, 0 on cpu, "
                        "where the FLOPs pass is the warm-up)")
    p.add_argument("--dit-depth", type=int, default=2,
                   help="--family mmdit / wan / qwen: number of blocks (SD3 medium has 24, Wan 1.3B 30, Qwen-Image "
                        "60; default 2)")
    p.add_argument("--frames", type=int, default=9,
                   help="--family wan: video frames, 4k+1 (the latent has (frames-1)/4+1 frames; default 9)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test model: SD1.5 family shrunk to two levels / one res block; the DiTs at width 256 "
                        "(not for reported numbers)")
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
                   help=f"comma-separated list (default: {DEFAULT_VARIANTS}; on a DiT family: "
                        f"{DEFAULT_DIT_VARIANTS})")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant, fastest kept (default 1)")
    p.add_argument("--paired", action="store_true",
                   help="time every variant right next to an unpatched run (order alternating per round) and "
                        "report the median of the per-pair speedups: for machines whose speed drifts within minutes")
    p.add_argument("--paired-against", metavar="VARIANT", default=None,
                   help="with --paired: pair every other variant with VARIANT (one of --variants) instead of the "
                        "unpatched model, which then runs once; the report gives each variant's median speedup "
                        "over VARIANT, e.g. a schedule against dato-official@0.4 without an unpatched run per pair")
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
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0 (got {args.warmup})")
    if args.variants is None:
        args.variants = DEFAULT_DIT_VARIANTS if args.family in DIT_FAMILIES else DEFAULT_VARIANTS
    if args.dit_depth < 1:
        p.error(f"--dit-depth must be >= 1 (got {args.dit_depth})")
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error(f"--frames must be 4k+1 (1, 5, 9, 13, ...; got {args.frames}): the video VAE makes one latent frame of "
                f"the first and one of every 4 after it")
    if args.checkpoint and args.family != "sd15":
        p.error("--family chooses the random-weight model; with --checkpoint the checkpoint decides the family")
    try:
        variants = [parse_variant(s, args.dato_schedule) for s in args.variants.split(",") if s.strip()]
        if args.profile:
            variants.append(parse_variant(args.profile, args.dato_schedule))
    except ValueError as e:
        p.error(str(e))
    if args.paired_against is not None:
        specs = [v.spec for v in variants]
        if not args.paired:
            p.error("--paired-against needs --paired")
        if args.paired_against not in specs or args.paired_against == "unpatched":
            p.error(f"--paired-against {args.paired_against!r} must be one of the patched --variants "
                    f"({', '.join(specs[specs[0] == 'unpatched':])})")
        if len(set(specs) - {"unpatched", args.paired_against}) < 1:
            p.error("--paired-against needs at least one other patched variant to pair with it")
    if args.family in DIT_FAMILIES:
        problem = family_problem(variants, args.family)
        if problem:
            p.error(problem)
    return args


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
    problem = device.device_problem(args.device)
    if problem:
        raise SystemExit(f"bench.py: {problem}")
    if args.profile:
        prof = run_profile(args)
        out = Path(args.out).with_name(f"profile_{args.profile.replace('@', '_')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(prof, indent=2))
        log.info("wrote %s", out)
        return prof
    result = report.build_report(args, run_benchmark(args))
    out = Path(args.out)
    md = report.write(result, out)
    if args.markdown:
        print(md)
    else:
        print("\n".join(report.console_lines(result)))
    log.info("wrote %s and %s (%.0f s total)", out, out.with_suffix(".md"), result["total_seconds"])
    return result


if __name__ == "__main__":
    main()
