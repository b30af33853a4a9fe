#!/usr/bin/env python
"""Quality benchmark on the pack's trained reference model (models/reference/).

Does "for free" hold on a model that has learned something? Every variant samples the same
labels x seeds through ComfyUI's real sampler (``comfy.sample.sample``, CFG against the
"no label" context), and is compared with the unpatched model:

  fidelity     to the unpatched sample of the same seed: latent relative error
               (||x - x_ref|| / ||x_ref||, per sample, then the mean), PSNR and SSIM of the
               RGB pictures (torchmetrics)
  distribution FID-analogue: torchmetrics' FrechetInceptionDistance with the judge's 64
               penultimate features as the extractor, samples against the shipped
               reference set of real emoji (models/reference/fid_reference.npz);
               accuracy: the judge's category of each sample equals the label it was asked for
  cost         diffusion-model calls and UNet ResBlock calls per sample run, and the FLOPs-ideal speedup on the
               reference model (torch's FlopCounterMode over a whole one-sample run);
               seconds of this run on the reference model (this CPU, whole batch); and the
               paired SD1.5-size speedup of the same setting from benchmarks/sd15_speed.json
               where one was measured (the README's bench.py runs)

Variants use bench.py's syntax (``bench.py --help``), plus ``cat-wN@R`` (CAT with
``warmup_steps`` N). The unpatched samples of a (steps, sampler, cfg, samples) setting are
cached under ``--out``/cache, keyed by the weights' hash.

    nice .venv/bin/python benchmarks/quality.py --steps 20 --sampler euler --variants unpatched,sito@0.5,tome@0.5
    nice .venv/bin/python benchmarks/quality.py --preset full      # the README table (about an hour)

Writes ``--out``/quality-<steps>-<sampler>.json and .md, a Pareto plot (PNG) and an image grid
(PNG, same seeds, one row per variant). ``--tiny`` runs 9 samples at 3 steps (smoke test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import pack  # noqa: E402  (bootstrap, the pack's internals)
import variants as bench_variants  # noqa: E402  (bench.py's variant syntax and patching)
from measure import UNetCalls  # noqa: E402

REF_DIR = ROOT / "models" / "reference"

# The README's quality table: every family the issue lists, at 20 steps.
PRESETS = {
    "full": ("unpatched,"
             "tome@0.3,tome@0.5,tome@0.7,random@0.3,random@0.5,random@0.7,"
             "sito@0.3,sito@0.5,sito@0.7,sito-merge@0.3,sito-merge@0.5,sito-merge@0.7,"
             "sito-kept@0.3,sito-kept@0.5,sito-kept@0.7,sito-qonly@0.5,"
             "dato-official@0.4,dato-official@0,dato-official-dense@0.4,dato-aggressive@0.4,"
             "deepcache-5@0,deepcache-5@0.4,deepcache-10@0,"
             "easycache@0.05,easycache@0.2,easycache@0.5,easycache@1.0,"
             "cat-w4@0.3,cat-w6@0.3,cat-w8@0.3,cat-w4@0.5,cat-w6@0.5,cat-w8@0.5"),
    # Defaults of each family, for the 50-step and multistep-sampler runs.
    "defaults": ("unpatched,tome@0.5,random@0.5,sito@0.5,sito-merge@0.5,dato-official@0.4,dato-official@0,"
                 "deepcache-5@0,easycache@0.2,cat-w6@0.3,cat-w4@0.3"),
}

# Method families, for the plot's lines.
def family(spec: str) -> str:
    name = spec.split("@")[0]
    if name.startswith("dato") and spec.endswith("@0"):
        return "DaTo schedule, no pruning"
    for prefix, fam in (("sito-merge", "SiTo merge"), ("sito-kept", "SiTo kept"), ("sito-qonly", "SiTo q-only"),
                        ("sito", "SiTo"), ("tome", "ToMe"), ("random", "random"), ("dato", "DaTo"),
                        ("deepcache", "DeepCache (DaTo r=0)"), ("easycache", "EasyCache"), ("cat", "CAT"),
                        ("unpatched", "unpatched")):
        if name.startswith(prefix):
            if prefix == "deepcache" and not spec.endswith("@0"):
                return "DaTo"
            return fam
    return name


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=None, help="comma-separated variants (bench.py syntax)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named variant list")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=8, help="seeds per label (9 labels: 8 seeds = 72 samples)")
    ap.add_argument("--grid-seeds", type=int, default=6, help="samples per row of the image grid")
    ap.add_argument("--ref-dir", type=Path, default=REF_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "quality")
    ap.add_argument("--comfyui", default=str(ROOT / ".comfyui"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 3 steps, 1 seed per label, no FLOPs")
    ap.add_argument("--attention", choices=("pytorch", "comfy-default"), default="pytorch",
                    help="attention kernel when this script starts ComfyUI: PyTorch's SDPA (what the model was "
                         "trained with; faster on this CPU) or ComfyUI's default CPU kernel (sub-quadratic)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pack's own generators")
    ap.add_argument("--pairs", default="", metavar="A:B,...",
                    help="variant pairs compared sample by sample in the table's notes: the mean error "
                         "difference B - A, its 95%% interval and a Wilcoxon signed-rank p-value")
    ap.add_argument("--report-from", type=Path, default=None, metavar="JSON",
                    help="write the table, plot and grid from the rows of an earlier run (e.g. the .partial.json "
                         "of a run cut short); the grid's samples are drawn again, the rows are not re-measured")
    args = ap.parse_args(argv)
    if args.variants is None:
        args.variants = PRESETS[args.preset or "defaults"]
    if args.tiny:
        args.steps, args.seeds, args.no_flops = 3, 1, True
    return args


def _weights_hash(ref_dir: Path) -> str:
    h = hashlib.sha1()
    h.update((ref_dir / "unet.safetensors").read_bytes())
    return h.hexdigest()[:12]


class Reference:
    """The reference model, its judge and the real-image features, loaded once."""

    def __init__(self, ref_dir: Path):
        import numpy as np
        import torch
        import reference_model
        from reference_judge import FeatureNet, Judge

        self.patcher, self.labels, self.config = reference_model.load_reference(ref_dir)
        self.judge = Judge.load(ref_dir / "classifier.safetensors")
        self.features = FeatureNet(self.judge)
        real = np.load(ref_dir / "fid_reference.npz")
        self.real = torch.from_numpy(real["images"]).float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        self.weights = _weights_hash(ref_dir)
        self.num_labels = len(self.config["labels"])

    def batch(self, seeds: int, noise_base: int = 1000):
        """Labels and per-sample noise for labels x seeds (sample i: label i % L, seed i // L,
        noise seed ``noise_base + i``; another base gives a disjoint set, e.g. held-out samples)."""
        import torch

        n = self.num_labels * seeds
        labels = [i % self.num_labels for i in range(n)]
        noise = torch.stack([torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(noise_base + i))
                             for i in range(n)])
        return labels, noise


def sample(patcher, ref: Reference, labels, noise, args, steps=None):
    import torch
    import comfy.sample
    import reference_model

    pos, neg = reference_model.label_conds(ref.labels, ref.config, labels)
    latent = torch.zeros_like(noise)
    with torch.no_grad():
        out = comfy.sample.sample(patcher, noise, steps or args.steps, args.cfg, args.sampler, args.scheduler,
                                  pos, neg, latent, denoise=1.0, disable_pbar=True, seed=args.seed)
    return out.float()


def to_unit_rgb(x):
    return ((x[:, :3].clamp(-1, 1) + 1) / 2).float()


def rel_errors(out, ref_out):
    """Latent relative error of each sample, ``||x - x_ref|| / ||x_ref||``."""
    return (out - ref_out).flatten(1).norm(dim=1) / ref_out.flatten(1).norm(dim=1)


def metrics(out, ref_out, labels, ref: Reference) -> dict:
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = rel_errors(out, ref_out)
    a, b = to_unit_rgb(out), to_unit_rgb(ref_out)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    fid = FrechetInceptionDistance(feature=ref.features, normalize=True)
    fid.update(ref.real, real=True)
    fid.update(out.clamp(-1, 1), real=False)
    with torch.no_grad():
        pred = ref.judge(out).argmax(-1)
    acc = (pred == torch.as_tensor(labels)).float().mean()
    # PSNR is infinite for an identical sample; report the mean over finite ones (and say so).
    finite = psnr[torch.isfinite(psnr)]
    return {"rel_error": float(d.mean()), "rel_error_max": float(d.max()),
            "rel_errors": [round(float(e), 6) for e in d],  # per sample, for paired comparisons
            "psnr": float(finite.mean()) if finite.numel() else math.inf,
            "ssim": float(ssim), "fid": float(fid.compute()), "accuracy": float(acc)}


def flops_of_run(patcher, ref: Reference, args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    labels, noise = ref.batch(1)
    with FlopCounterMode(display=False) as fc:
        sample(patcher, ref, labels[:1], noise[:1], args)
    return float(fc.get_total_flops())


def parse_quality_variant(spec: str):
    """bench.py's variants (CAT's warm-up is its modifier wN: cat-w4@0.3)."""
    return bench_variants.parse_variant(spec)


def patch(base, v, seed: int):
    return bench_variants.patch(base, v, seed)


class BlockCalls:
    """Counts the UNet's ResBlocks that computed (a DeepCache-style shallow step skips the deep ones).

    The hook sits on each ResBlock's first layer (``in_layers[0]``), as tests/work_meter.py
    does: DaTo's shallow steps still enter the deep ResBlocks, whose patched ``forward``
    returns the cache without running their layers. Not the input/middle/output blocks
    either: ComfyUI's UNet runs the layers of each ``TimestepEmbedSequential`` one by one, so
    a hook on the block itself never fires."""

    def __init__(self, dm):
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        self.calls = 0
        self._hooks = [m.in_layers[0].register_forward_pre_hook(self._hook) for m in dm.modules()
                       if isinstance(m, ResBlock)]

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        for h in self._hooks:
            h.remove()


def sd15_speed(spec: str, steps: int) -> tuple[float | None, str | None]:
    table = json.loads((ROOT / "benchmarks" / "sd15_speed.json").read_text())
    for key in (f"{spec}/{steps}", spec):
        if key in table["speedups"]:
            e = table["speedups"][key]
            return e["speedup"], e["source"]
    return None, None


def bootstrap(args) -> None:
    """ComfyUI on the CPU with the chosen attention kernel. If ComfyUI is already imported (in
    pytest, or driven from another script), its kernel stays what it is."""
    if "comfy.model_management" not in sys.modules and args.attention == "pytorch":
        sys.path.insert(0, str(Path(args.comfyui).resolve()))
        import comfy.options

        saved = sys.argv
        sys.argv = [saved[0], "--cpu", "--use-pytorch-cross-attention"]
        comfy.options.enable_args_parsing(True)
        try:
            import comfy.cli_args  # noqa: F401
        finally:
            sys.argv = saved
            comfy.options.enable_args_parsing(False)
        import comfy.model_management  # noqa: F401
    pack.bootstrap(args.comfyui)


def report_from(args: argparse.Namespace) -> dict:
    """Table, plot and grid from recorded rows; only the grid's few samples are sampled again."""
    bootstrap(args)
    rows = json.loads(args.report_from.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    ref = Reference(args.ref_dir)
    labels, noise = ref.batch(1)
    n = min(args.grid_seeds, len(labels))
    labels, noise = labels[:n], noise[:n]
    outputs = {}
    for r in rows:
        v = parse_quality_variant(r["variant"])
        model = ref.patcher if v.method == "unpatched" else patch(ref.patcher, v, args.seed)
        outputs[v.spec] = sample(model, ref, labels, noise, args)
    unp = next((r for r in rows if r["variant"] == "unpatched"), None)
    if unp and unp["ref_seconds"]:
        for r in rows:
            r["ref_time_speedup"] = unp["ref_seconds"] / r["ref_seconds"] if r["ref_seconds"] else None
    report = {"steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg,
              "samples": ref.num_labels * args.seeds, "labels": ref.config["labels"], "weights": ref.weights,
              "model_training": ref.config.get("training"), "rows": rows, "pairs": args.pairs,
              "command": "benchmarks/quality.py " + " ".join(sys.argv[1:])}
    write_outputs(report, outputs, args)
    return report


def write_outputs(report: dict, outputs: dict, args) -> None:
    stem = args.out / f"quality-{args.steps}-{args.sampler}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    image_grid(outputs, min(args.grid_seeds, next(iter(outputs.values())).shape[0]),
               stem.with_name(stem.name + "-grid.png"))
    pareto_plot(report, stem.with_name(stem.name + "-pareto.png"))
    print(markdown(report))


def run(args: argparse.Namespace) -> dict:
    if args.report_from is not None:
        return report_from(args)
    bootstrap(args)
    import os
    import torch

    torch.set_num_threads(max(1, args.threads or len(os.sched_getaffinity(0))))
    import logging
    logging.getLogger(pack.PACK_ALIAS).setLevel(logging.WARNING)

    ref = Reference(args.ref_dir)
    labels, noise = ref.batch(args.seeds)
    variants = [parse_quality_variant(s) for s in args.variants.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    key = f"{ref.weights}-{args.steps}-{args.sampler}-{args.scheduler}-{args.cfg:g}-{args.seeds}"
    cache = args.out / "cache" / f"unpatched-{key}.pt"
    dm = ref.patcher.model.diffusion_model

    calls, blocks = UNetCalls(dm), BlockCalls(dm)

    def counted(model) -> dict:
        calls.reset()
        blocks.calls = 0
        t = time.perf_counter()
        out = sample(model, ref, labels, noise, args)
        return {"out": out, "seconds": time.perf_counter() - t, "model_calls": calls.calls,
                "block_calls": blocks.calls}

    # The unpatched run of this setting, with its time and counts (seconds are of the run that
    # made the cache: the time column compares runs of one machine state only when the cache
    # was made in the same invocation, which the JSON records).
    if cache.is_file():
        unpatched = torch.load(cache)
        unpatched["cached"] = True
    else:
        unpatched = counted(ref.patcher)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(unpatched, cache)
        unpatched["cached"] = False
    ref_out = unpatched["out"]
    ref_flops = None if args.no_flops else flops_of_run(ref.patcher, ref, args)

    rows, outputs = [], {}
    for v in variants:
        print(f"[quality] {v.spec} ...", flush=True)
        if v.method == "unpatched":
            model, run_ = ref.patcher, unpatched
        else:
            model = patch(ref.patcher, v, args.seed)
            run_ = counted(model)
        out, seconds, n_calls, n_blocks = run_["out"], run_["seconds"], run_["model_calls"], run_["block_calls"]
        m = metrics(out, ref_out, labels, ref)
        flops = None if args.no_flops else flops_of_run(model, ref, args)
        speed, source = sd15_speed(v.spec, args.steps)
        row = {"variant": v.spec, "family": family(v.spec), **m, "model_calls": n_calls, "block_calls": n_blocks,
               "flops_ideal": (ref_flops / flops) if flops else None, "ref_seconds": seconds,
               "sd15_speedup": speed, "sd15_source": source}
        rows.append(row)
        print(f"[quality] {v.spec}: err {m['rel_error']:.4f} psnr {m['psnr']:.2f} ssim {m['ssim']:.3f} "
              f"fid {m['fid']:.2f} acc {m['accuracy']:.3f} calls {n_calls} "
              f"ideal {row['flops_ideal'] or float('nan'):.2f}x {seconds:.1f}s", flush=True)
        outputs[v.spec] = out
        # Written after every variant, so a run cut short keeps what it measured.
        (args.out / f"quality-{args.steps}-{args.sampler}.partial.json").write_text(json.dumps(rows, indent=2) + "\n")
    calls.remove()
    blocks.remove()
    unp = next((r for r in rows if r["variant"] == "unpatched"), None)
    if unp and unp["ref_seconds"]:
        for r in rows:
            r["ref_time_speedup"] = unp["ref_seconds"] / r["ref_seconds"] if r["ref_seconds"] else None
    report = {"steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler, "cfg": args.cfg,
              "samples": len(labels), "labels": ref.config["labels"], "weights": ref.weights,
              "model_training": ref.config.get("training"), "rows": rows,
              "unpatched_time_from_cache": unpatched["cached"], "pairs": args.pairs,
              "command": "benchmarks/quality.py " + " ".join(sys.argv[1:])}
    write_outputs(report, outputs, args)
    return report


def markdown(report: dict) -> str:
    def f(x, spec):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    lines = [f"{report['samples']} samples, {report['steps']} steps, {report['sampler']}, CFG {report['cfg']:g}",
             "",
             "| variant | rel. error | PSNR (dB) | SSIM | FID-analogue | accuracy | model / ResBlock calls | FLOPs-ideal (ref. model) "
             "| time vs unpatched (ref. model) | SD1.5-size paired speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {f(r['rel_error'], '.4f')} | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.3f')} "
                     f"| {f(r['fid'], '.2f')} | {f(r['accuracy'], '.3f')} | {r['model_calls']} / {r['block_calls'] or 'n/c'} "
                     f"| {f(r['flops_ideal'], '.2f')} | {f(r.get('ref_time_speedup'), '.2f')} "
                     f"| {f(r['sd15_speedup'], '.2f')} |")
    by_name = {r["variant"]: r for r in report["rows"]}
    pairs = [p.split(":") for p in report.get("pairs", "").split(",") if p]
    if pairs:
        lines += ["", "| paired: B against A | mean error B − A | 95 % interval | Wilcoxon p |", "|---|---:|---:|---:|"]
    for a, b in pairs:
        if "rel_errors" not in by_name.get(a, {}) or "rel_errors" not in by_name.get(b, {}):
            lines.append(f"| {b} against {a} | – (per-sample errors not recorded) | | |")
            continue
        d = paired_difference(by_name[a]["rel_errors"], by_name[b]["rel_errors"])
        lines.append(f"| {b} against {a} | {d['mean']:+.4f} | {d['low']:+.4f} … {d['high']:+.4f} | {d['p']:.3f} |")
    return "\n".join(lines) + "\n"


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Sample-by-sample comparison of two variants' errors on the same seeds: the mean of
    ``b - a``, its 95 % t-interval, and the two-sided Wilcoxon signed-rank p-value."""
    import numpy as np
    from scipy import stats

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else math.nan
    p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half), "p": p}


def image_grid(outputs: dict, per_row: int, path: Path) -> None:
    """One row per variant (its name on the left), the same seeds in every column."""
    import numpy as np
    from PIL import Image, ImageDraw
    import reference_data

    scale, label_w = 3, 170
    cell = 32 * scale
    names = list(outputs)
    grid = Image.new("RGB", (label_w + per_row * cell, len(names) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        rgb = reference_data.to_rgb_uint8(outputs[name][:per_row])
        for c in range(rgb.shape[0]):
            im = Image.fromarray(np.ascontiguousarray(rgb[c])).resize((cell, cell), Image.NEAREST)
            grid.paste(im, (label_w + c * cell, r * cell))
        draw.text((4, r * cell + cell // 2 - 6), name, fill="black")
    grid.save(path)


def pareto_plot(report: dict, path: Path) -> None:
    """Fidelity against speed, one line per method family. Speed: the SD1.5-size paired
    speedup where measured, else the reference model's FLOPs-ideal speedup (hollow marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, list] = {}
    for r in report["rows"]:
        if r["variant"] == "unpatched":
            continue
        x = r["sd15_speedup"] or r["flops_ideal"]
        if x is None:
            continue
        fams.setdefault(r["family"], []).append((x, r["rel_error"], r["sd15_speedup"] is not None, r["variant"]))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for fam, pts in sorted(fams.items()):
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", alpha=0.6, label=fam)
        for x, y, measured, name in pts:
            ax.plot([x], [y], "o", color=line.get_color(), markerfacecolor=line.get_color() if measured else "none")
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("speedup (filled: paired SD1.5-size run on this CPU; hollow: FLOPs-ideal on the reference model)")
    ax.set_ylabel("relative error vs unpatched sample (lower is better)")
    ax.set_title(f"Reference model, {report['samples']} samples, {report['steps']} steps {report['sampler']}, "
                 f"CFG {report['cfg']:g}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
