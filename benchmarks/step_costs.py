#!/usr/bin/env python
"""What each kind of DaTo step costs on a model, measured by the clock: the cost model that
``schedule_search.py --step-costs`` prices schedules with.

A DaTo run is made of full steps (``F``), shallow steps (``S<d>``: the outer ``d`` block pairs,
the rest from the cache) and reused steps (``R``), and what each costs depends on the model and
on the prune ratio: on the 64×64 level of the SD1.5 UNet pruning at 0.4 makes a full step far
cheaper, on the 32×32 reference model it hardly changes the FLOPs. This script times them on the
model users run (the SD1.5-size UNet with random weights by default, or ``--checkpoint``).

For every prune ratio, one round is a pair of runs of ComfyUI's real sampler, next to each other
(order alternating per round): the unpatched model for ``--unpatched-steps`` steps, and DaTo with
the probe schedule ``F Fx<k> S1x<k> … S<d>x<k> Rx<k>``. The sampler's per-step callback stamps
the clock after every step; a step's time is the gap to the previous stamp. Step 0 of each run
is left out (it carries the run's set-up). A kind's cost is the median of its steps' times over
the median unpatched step time of the paired run, and the reported cost is the median over
rounds.

This machine's speed drifts by up to 20 % within minutes (the same unpatched step took 14 s in
one pair and 19 s in the next), so one round per ratio is not enough: run three or more, and
rather fewer ratios with more rounds. ``--fill`` then gives every prune ratio of the schedule
search a cost, interpolated linearly between the measured ones (the JSON lists which ratios
were measured and which were interpolated).

    nice .venv/bin/python benchmarks/step_costs.py --ratios 0,0.5 --rounds 3 --fill \
        --out benchmarks/results/sd15-step-costs.json
    nice .venv/bin/python benchmarks/schedule_search.py --steps 20 --step-costs benchmarks/results/sd15-step-costs.json
    .venv/bin/python benchmarks/step_costs.py --tiny --ratios 0,0.4 --out bench_out/step-costs-tiny.json   # smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pack  # noqa: E402
from pack import ROOT  # noqa: E402
from schedule_search import RATIOS  # noqa: E402  (the prune ratios a searched schedule can take)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a real SD1.x/SD2.x/SDXL checkpoint; default: random SD1.5 UNet")
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15", help="random-weight model (default sd15)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512: a 64x64 latent)")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS), help="prune ratios to measure")
    ap.add_argument("--max-depth", type=int, default=3, help="deepest shallow step measured (S1..S<d>)")
    ap.add_argument("--per-kind", type=int, default=2, help="steps of each kind in the probe schedule")
    ap.add_argument("--unpatched-steps", type=int, default=3, help="steps of the paired unpatched run")
    ap.add_argument("--rounds", type=int, default=1, help="paired rounds per ratio (median kept)")
    ap.add_argument("--fill", action="store_true",
                    help="also give the schedule search's other prune ratios a cost, interpolated linearly")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="smoke test: the shrunk SD1.5 model")
    ap.add_argument("--comfyui", default=str(ROOT / ".comfyui"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "step-costs.json")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--ratios must be comma-separated numbers (got {args.ratios!r})")
    if not args.ratios or any(not 0 <= r < 1 for r in args.ratios):
        ap.error("--ratios must be in [0, 1)")
    if args.per_kind < 1 or args.unpatched_steps < 2 or args.rounds < 1 or args.max_depth < 1:
        ap.error("--per-kind, --rounds, --max-depth must be >= 1 and --unpatched-steps >= 2")
    if args.size < 8 or args.size % 8:
        ap.error(f"--size must be a positive multiple of 8 (got {args.size})")
    # what models.build_model / make_testbed read
    args.width = args.height = args.size
    args.dtype, args.dit_depth, args.frames = "fp32", 1, 1
    return args


def probe_kinds(max_depth: int, per_kind: int) -> list[str]:
    """The probe schedule's steps: step 0 (set-up, not counted), then ``per_kind`` of each kind."""
    kinds = ["F"] + [f"S{d}" for d in range(1, max_depth + 1)] + ["R"]
    return ["F"] + [k for k in kinds for _ in range(per_kind)]


def step_times(bed, model, steps: int) -> list[float]:
    """Seconds of each step of one sampler run (the gap between the sampler's step callbacks)."""
    import comfy.sample
    a = bed.args
    stamps = [time.perf_counter()]
    comfy.sample.sample(model, bed.noise, steps, a.cfg, a.sampler, a.scheduler, bed.pos, bed.neg, bed.latent,
                        seed=a.seed, disable_pbar=True, callback=lambda *_: stamps.append(time.perf_counter()))
    if len(stamps) != steps + 1:
        raise RuntimeError(f"the sampler called back {len(stamps) - 1} times for {steps} steps")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def kind_costs(kinds: list[str], patched: list[float], unpatched: list[float]) -> dict:
    """``{kind: median step time of that kind / median unpatched step time}``, step 0 of both left out."""
    base = statistics.median(unpatched[1:])
    by_kind: dict[str, list[float]] = {}
    for kind, dt in zip(kinds[1:], patched[1:]):
        by_kind.setdefault(kind, []).append(dt)
    return {k: statistics.median(v) / base for k, v in by_kind.items()}


def fill_ratios(costs: dict, ratios=RATIOS) -> dict:
    """``costs`` (``{"<ratio>": {kind: cost}}``) with every ratio of ``ratios`` given a cost,
    interpolated linearly per kind between the nearest measured ratios (held at the ends)."""
    import numpy as np
    measured = sorted((float(r), row) for r, row in costs.items())
    xs = [r for r, _ in measured]
    out = {}
    for r in sorted(set(ratios) | set(xs)):
        out[f"{r:g}"] = {k: round(float(np.interp(r, xs, [row[k] for _, row in measured])), 4)
                         for k in measured[0][1]}
    return out


def measure(args) -> dict:
    import torch
    import models
    if args.threads:
        torch.set_num_threads(args.threads)
    base, info = models.build_model(args)
    bed = models.make_testbed(args, base, info)
    kinds = probe_kinds(args.max_depth, args.per_kind)
    text = " ".join(kinds)
    costs, raw = {}, {}
    for r in args.ratios:
        model = pack.apply_dato(base, prune_ratio=r, custom_schedule=text, seed=args.seed)
        rounds, per_round = [], []
        for i in range(args.rounds):
            order = ("unpatched", "dato") if i % 2 == 0 else ("dato", "unpatched")
            times = {}
            for which in order:
                times[which] = (step_times(bed, base, args.unpatched_steps) if which == "unpatched"
                                else step_times(bed, model, len(kinds)))
            rounds.append(times)
            per_round.append(kind_costs(kinds, times["dato"], times["unpatched"]))
            print(f"[step-costs] r={r:g} round {i + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in per_round[-1].items())
                  + f"  (unpatched step {statistics.median(times['unpatched'][1:]):.2f} s)", flush=True)
        costs[f"{r:g}"] = {k: round(statistics.median(c[k] for c in per_round), 4) for k in per_round[0]}
        raw[f"{r:g}"] = rounds
    measured = list(costs)
    if args.fill:
        costs = fill_ratios(costs)
    return {"costs": costs, "measured_ratios": measured,
            "interpolated_ratios": [r for r in costs if r not in measured],
            "raw_seconds": raw, "probe_schedule": text, "model": info,
            "config": {k: getattr(args, k) for k in ("size", "cfg", "sampler", "scheduler", "seed", "per_kind",
                                                    "unpatched_steps", "rounds", "threads", "tiny")},
            "torch": torch.__version__, "threads_used": torch.get_num_threads(),
            "command": "python benchmarks/step_costs.py " + " ".join(args.argv)}


def markdown(result: dict) -> str:
    kinds = list(next(iter(result["costs"].values())))
    lines = ["| prune ratio | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for r, row in result["costs"].items():
        name = r if r in result["measured_ratios"] else f"{r} (interpolated)"
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in kinds) + " |")
    m = result["model"]
    return (f"Step costs relative to an unpatched step, {m.get('family', '?')} {m.get('source', '')} at "
            f"{result['config']['size']} px, CFG {result['config']['cfg']}, {result['threads_used']} threads, "
            f"median of {result['config']['rounds']} paired round(s) (probe `{result['probe_schedule']}`):\n\n"
            + "\n".join(lines) + f"\n\nCommand: `{result['command']}`\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    pack.bootstrap(args.comfyui)
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
