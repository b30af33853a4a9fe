"""The benchmark's report: the JSON (``build_report``), its markdown table and the console lines.

``build_report`` turns the measured ``Result`` of every variant into a row (speedup, FLOPs-ideal
speedup and how it was obtained, peak memory, relative error of the final latent) and adds
what was measured how: configuration, model, code version, the unpatched drift and how much
other load there was. ``markdown`` renders the table; ``write`` writes the JSON and the .md
beside it; ``console_lines`` are the one-line-per-variant summary bench.py prints otherwise.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path

import device
from measure import Measured, PeakRSS, rel_error
from models import comfyui_version
from pack import ROOT
from variants import SHALLOW_COST, cat_probe_steps

log = logging.getLogger("bench")


def _ideal_basis(r) -> str | None:
    """How a row's FLOPs-ideal speedup was obtained (the caching variants' differ from the per-call ratio)."""
    if r.flops is not None:
        return "FLOPs of one CFG model call: unpatched / variant"
    if r.method == "cat" and r.pruned_flops is not None:
        o = r.options
        return (f"{o['full_steps']} full + {o['pruned_steps']} pruned model calls, the pruned call's FLOPs counted "
                f"on a {cat_probe_steps()}-step warmup-0 probe")
    if r.method in ("dato", "deepcache") and r.ideal is not None:
        return (f"DaTo schedule: steps / (full + {SHALLOW_COST:g} x shallow), reused steps free "
                f"(pruning not included)")
    if r.method in ("easycache", "lazycache") and r.ideal is not None:
        return "steps / computed steps (a reused step runs no model call)"
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


def git_state() -> dict:
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
    """The README-ready table of a report, with the lines that say what was measured how."""
    c, m, d = report["config"], report["model"], report["unpatched_drift"]
    tiny = "TINY " if m["family"].endswith("-tiny") else ""
    if m["source"] != "random":
        model = f"checkpoint `{Path(m['path']).name}` ({m['family']})"
    elif m.get("description"):
        model = m["description"]
    elif m.get("arch") == "mmdit":
        shape = ("the real SD3-medium block shape" if not tiny
                 else f"hidden {m['hidden_size']} instead of SD3 medium's 1536")
        model = (f"{tiny}SD3-medium-shaped MMDiT (ComfyUI `model_base.SD3`): {m['joint_blocks']} of SD3 medium's "
                 f"{m['real_joint_blocks']} joint blocks at {shape} (hidden {m['hidden_size']} = {m['heads']} heads × "
                 f"{m['head_dim']}, patch {m['patch_size']}, {m['latent_channels']} latent channels, text context "
                 f"{m['context'][0]}×{m['context'][1]}, pooled {m['pooled']}), "
                 f"{m['unet_parameters'] / 1e6:.0f} M parameters, random seeded weights")
    else:
        arch = "SDXL-architecture (base)" if m["family"].startswith("SDXL") else "SD1.5-architecture"
        model = f"{tiny}{arch} UNet, {m['unet_parameters'] / 1e6:.0f} M parameters, random seeded weights"
    tokens = (f" = {m['image_tokens']} image + {m['text_tokens']} text tokens" if m.get("image_tokens") else "")
    rerun_skipped = report["unpatched_drift"].get("rerun_skipped", False)
    gpu = c.get("device") == "cuda"
    if gpu:
        where = (f"torch {c['torch']} on {c['gpu']} (CUDA {c['cuda']}), ComfyUI attention `{c['attention']}`, "
                 f"timed with CUDA events, fastest of {c['repeats']} run(s) after {c.get('warmup', 0)} warm-up run(s).")
        header = ("| variant | s / image | speedup | FLOPs-ideal speedup | peak GPU mem (MiB) | peak GPU mem Δ (MiB) "
                  "| rel. error vs unpatched |")
        rule = "|---|---:|---:|---:|---:|---:|---:|"
    else:
        where = (f"torch {c['torch']} on {c['threads']} CPU threads, ComfyUI attention `{c['attention']}`, fastest of "
                 f"{c['repeats']} run(s).")
        header = "| variant | s / image | speedup | FLOPs-ideal speedup | peak RAM Δ (MiB) | rel. error vs unpatched |"
        rule = "|---|---:|---:|---:|---:|---:|"
    *frames, lat_h, lat_w = c["latent"][2:]
    latent = f"{lat_w}×{lat_h}" + (f" × {frames[0]} latent frames ({c['frames']} video frames)" if frames else "")
    lines = [
        f"{model}, {m['dtype'].replace('torch.', '')}; {c['width']}×{c['height']} "
        f"(latent {latent}{tokens}), {c['sampler']}/{c['scheduler']}, {c['steps']} steps, "
        f"CFG {c['cfg']:g}, seed {c['seed']}; {where}",
        "",
        header,
        rule,
    ]
    for r in report["results"] + ([] if rerun_skipped else [report["unpatched_rerun"]]):
        err = "0 (reference)" if r is report["results"][0] else f"{100 * r['rel_error']:.2f} %"
        memory = (f"{_fmt(r.get('peak_gpu_mib'), '.0f')} | {_fmt(r.get('peak_gpu_delta_mib'), '.0f')}" if gpu
                  else f"{r['peak_rss_delta_mib']:.0f}")
        lines.append(f"| {r['variant']} | {r['seconds_per_image']:.2f} | {r['speedup']:.2f}× | "
                     f"{_fmt(r['flops_ideal_speedup'], '.2f')}{'×' if r['flops_ideal_speedup'] else ''} | "
                     f"{memory} | {err} |")
    drift_text = ("no re-run (--skip-rerun)" if rerun_skipped else
                  f"{d['first_seconds']:.2f} s first, {d['rerun_seconds']:.2f} s re-run at the end: "
                  f"drift {d['drift_percent']:+.1f} %")
    cache_notes = []
    for r in report["results"]:
        basis = r.get("flops_ideal_basis")
        if basis and not basis.startswith("FLOPs of one CFG model call") and r["flops_ideal_speedup"]:
            cache_notes.append(f"{r['variant']}: {basis}")
    against = c.get("paired_against")
    speedup_text = (f"Speedup = median over {c['repeats']} rounds of unpatched / variant, each variant timed right "
                    f"next to its own unpatched run (--paired; order alternating per round; the s / image column is "
                    f"the fastest run; unpatched {drift_text}). " if c.get("paired") and not against else
                    f"Speedup = fastest unpatched run / variant (unpatched {drift_text}). ")
    lines += [
        "",
        speedup_text +
        "FLOPs-ideal = FlopCounterMode FLOPs of one CFG model call, unpatched / variant "
        "(matmuls, convs, attention; not element-wise work, sorts or gathers)"
        + (f"; for the caching rows the FLOPs of the whole run: {'; '.join(cache_notes)}" if cache_notes else "")
        + ". "
        + ("Peak GPU mem = torch.cuda.max_memory_allocated during the timed run (weights included), Δ = that "
           "minus what was allocated before it. " if gpu else
           "Peak RAM Δ = peak resident set during the timed run minus RSS before it "
           f"({c['peak_memory_method']}). ")
        + "Rel. error = ‖x − x_ref‖ / ‖x_ref‖ of the final latent.",
    ]
    if against:
        lines += ["", f"Paired against `{against}` (--paired-against): each variant timed right next to a run of "
                      f"`{against}`, order alternating per round; ratio = `{against}` / variant time, median of the "
                      f"pairs (> 1: faster than `{against}`).", "",
                  f"| variant | faster than `{against}` (median) | per pair |", "|---|---:|---|"]
        for r in report["results"]:
            if r.get("pair_ratios"):
                lines.append(f"| {r['variant']} | {r['paired_ratio']:.3f}× | "
                             f"{', '.join(f'{x:.3f}' for x in r['pair_ratios'])} |")
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


def result_row(r, ref, ref_seconds: float, steps: int) -> dict:
    """The JSON row of result ``r``; ``ref`` is the unpatched model's result, ``ref_seconds`` its time."""
    row = _row(r, ref, ref_seconds, steps)
    if r.gpu_peaks:  # a CUDA run: seconds are CUDA-event times; memory is the GPU's
        row.update(wall_seconds_all=[round(w, 4) for w in r.wall_all], peak_gpu_mib=max(r.gpu_peaks) / 2**20,
                   peak_gpu_delta_mib=max(r.gpu_deltas) / 2**20)
    return row


def _row(r, ref, ref_seconds: float, steps: int) -> dict:
    import torch
    return {
        "variant": r.spec, "method": r.method, "ratio": r.ratio, "options": r.options,
        "seconds_per_image": r.seconds, "seconds_all": r.seconds_all,
        "cpu_wait_seconds_all": [round(w, 2) for w in r.cpu_wait_all], "loadavg_all": r.loadavg_all,
        "seconds_per_step": r.seconds / steps,
        "speedup": statistics.median(r.pair_speedups) if r.pair_speedups else ref_seconds / r.seconds,
        "pair_speedups": [round(x, 4) for x in r.pair_speedups],
        "pair_ratios": [round(x, 4) for x in r.pair_ratios],
        "paired_ratio": statistics.median(r.pair_ratios) if r.pair_ratios else None,
        "flops_per_model_call": r.flops,
        "flops_per_pruned_call": r.pruned_flops,
        "flops_ideal_speedup": (ref.flops / r.flops) if (r.flops and ref.flops) else r.ideal,
        "flops_ideal_basis": _ideal_basis(r),
        "peak_rss_delta_mib": r.peak_rss_delta_mib,
        "rel_error": rel_error(r.latent, ref.latent),
        "finite": bool(torch.isfinite(r.latent).all()),
        "unet_calls": r.unet_calls, "unet_batch": r.unet_batch,
        "pack_summary": r.pack_summary,
    }


def build_report(args, measured: Measured) -> dict:
    """The JSON of a benchmark run of ``args`` (bench.parse_args): what measure.run_benchmark measured."""
    import torch
    import comfy.ldm.modules.attention as attn

    bed, results, drift = measured.bed, measured.results, measured.drift
    ref = results[0]
    ref_seconds = min(ref.seconds, drift.seconds)
    rows = [result_row(r, ref, ref_seconds, args.steps) for r in results]
    drift_row = result_row(drift, ref, ref_seconds, args.steps)
    for r in rows[1:]:
        if r["flops_per_model_call"] is not None and r["flops_per_model_call"] == ref.flops:
            log.warning("%s: counted FLOPs equal the unpatched model's - is the patch active?", r["variant"])

    return {
        "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "config": {
            "width": args.width, "height": args.height, "latent": list(bed.latent.shape),
            "frames": getattr(args, "frames", 1), "steps": args.steps,
            "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg, "seed": args.seed,
            "repeats": args.repeats, "paired": bool(args.paired),
            "paired_against": getattr(args, "paired_against", None), "threads": torch.get_num_threads(),
            "attention": getattr(attn.optimized_attention, "__name__", str(attn.optimized_attention)),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "speedup_reference": ("median of the speedups of adjacent unpatched/variant pairs (--paired)"
                                  if args.paired and not getattr(args, "paired_against", None)
                                  else "fastest of the first and the final unpatched run"),
            "peak_memory_method": PeakRSS.method,
            "family": bed.info["arch"], "comfyui": comfyui_version(),
            "warmup": getattr(args, "warmup", 0) or 0, **device.describe(args),
        },
        "model": bed.info,
        "code": git_state(),
        "unpatched_drift": {
            "first_seconds": ref.seconds, "rerun_seconds": drift.seconds,
            "drift_percent": 100.0 * (drift.seconds - ref.seconds) / ref.seconds,
            "rerun_rel_error": drift_row["rel_error"], "rerun_skipped": bool(args.skip_rerun),
        },
        "contention": contention(results + [drift]),
        "results": rows,
        "unpatched_rerun": drift_row,
        "total_seconds": round(time.perf_counter() - measured.t0, 1),
    }


def write(report: dict, out: Path) -> str:
    """The JSON to ``out`` and the markdown table beside it (``.md``); returns the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = markdown(report)
    out.with_suffix(".md").write_text(md + "\n")
    return md


def console_lines(report: dict) -> list[str]:
    """One line per variant (and the unpatched re-run): time, speedups, memory, error."""
    return [f"{r['variant']:<20} {r['seconds_per_image']:8.2f} s  {r['speedup']:5.2f}x  "
            f"flops-ideal {_fmt(r['flops_ideal_speedup'], '5.2f')}x  "
            + (f"GPU mem {r['peak_gpu_mib']:.0f} MiB (+{r['peak_gpu_delta_mib']:.0f})" if "peak_gpu_mib" in r
               else f"mem +{r['peak_rss_delta_mib']:.0f} MiB")
            + f"  err {100 * r['rel_error']:.2f} %"
            for r in report["results"] + [report["unpatched_rerun"]]]
