#!/usr/bin/env python
"""Schedule search for the DaTo node: the best caching + pruning schedule for a model, a sampler,
a step count and a speed budget, by multi-objective evolution (NSGA-II, ``pymoo``).

A candidate is what a user can type into the DaTo node: one step kind per step (``F`` full,
``S<d>`` shallow with the outer ``d`` block pairs, ``R`` reuse the previous prediction; step 0
is always ``F``) as its ``custom_schedule`` string, plus one ``prune_ratio``. Two objectives,
both minimised:

  error  fidelity: the mean latent relative error of the candidate's samples against the
         unpatched samples of the same labels and seeds (the calibration set), sampled through
         ComfyUI's real sampler (``benchmarks/quality.py``'s sampling and metrics)
  cost   the schedule's ideal cost, relative to the unpatched run: the sum over its steps of
         what each kind of step costs at that prune ratio; its inverse is the ideal speedup.
         By default the step costs are FLOPs measured on the searched model (torch's
         FlopCounterMode over one-sample runs of ``F`` and ``F S<d>``; a reuse step costs
         nothing). With ``--step-costs FILE`` they are the clock times that
         ``benchmarks/step_costs.py`` measured on the model users run (the SD1.5-size UNet):
         on the 32x32 reference model pruning hardly changes a step's FLOPs, on the 64x64
         level of SD1.5 it makes a full step far cheaper, and a search priced by the small
         model's FLOPs undervalues pruning. Errors do not depend on the cost model, so one
         run's evaluations serve a search under another cost model (``--resume``).

The unpatched samples are cached (keyed by the weights' hash and the setting), every
evaluation is written to ``--out``/evaluations.json as it is made, and ``--resume`` starts from
them (their best points seed the first population), so a run cut short loses nothing. The run
is bounded by ``--generations`` and ``--budget-minutes``; each generation prints one line.

Output (``--out``): ``front-<steps>-<sampler>[-clock].{json,md}`` (``-clock`` with ``--step-costs``), the Pareto front as a table with each
point's ``custom_schedule`` string, its error on the calibration set and on a **held-out** set
(other seeds; error, PSNR, SSIM, FID-analogue, judge accuracy), its FLOPs-ideal speedup and its
measured time on the reference model; and ``front-<steps>-<sampler>.png``, every evaluated
candidate and the front, with the node's presets marked.

    nice .venv/bin/python benchmarks/schedule_search.py --steps 20 --sampler euler --budget-minutes 30
    nice .venv/bin/python benchmarks/schedule_search.py --steps 20 --sampler euler --resume --budget-minutes 30
    nice .venv/bin/python benchmarks/schedule_search.py --steps 20 --sampler euler --budget-minutes 30 \
        --step-costs benchmarks/results/sd15-step-costs.json      # priced by the SD1.5-size clock
    nice .venv/bin/python benchmarks/schedule_search.py --tiny     # smoke test: 3 steps, 1 generation

The reference model (models/reference/, SD1.5 family) is the default model; ``--ref-dir``
points at another directory of the same layout (config.json, unet.safetensors, classifier).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import pack  # noqa: E402  (bootstrap, the pack's internals)
import quality  # noqa: E402  (the reference model, sampling through ComfyUI, metrics)

#: Prune ratios a candidate can take (DaTo's ``prune_ratio``; 0 = caching only).
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
#: The DaTo presets drawn on the plot and put into the first population.
PRESETS = ("dato_official", "dato_official_dense", "dato_aggressive", "deepcache_5", "deepcache_10")
HOLDOUT_NOISE_BASE = 50_000  # held-out samples use other noise seeds than the calibration set


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=1, help="calibration seeds per label (9 labels: 1 seed = 9 samples)")
    ap.add_argument("--holdout-seeds", type=int, default=2, help="held-out seeds per label for the final front")
    ap.add_argument("--max-depth", type=int, default=3, help="deepest shallow step searched (S1..S<d>)")
    ap.add_argument("--pop", type=int, default=16, help="population size")
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="stop starting generations after this")
    ap.add_argument("--resume", action="store_true", help="start from --out/evaluations.json")
    ap.add_argument("--ref-dir", type=Path, default=quality.REF_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "schedule_search")
    ap.add_argument("--comfyui", default=str(ROOT / ".comfyui"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--attention", choices=("pytorch", "comfy-default"), default="pytorch")
    ap.add_argument("--seed", type=int, default=0, help="seed of the search and of the pack's generators")
    ap.add_argument("--no-timing", action="store_true", help="skip the front's timing on the reference model")
    ap.add_argument("--presets", default=",".join(PRESETS), help="the node's presets to seed and compare with")
    ap.add_argument("--step-costs", type=Path, default=None,
                    help="price schedules with these measured step costs (benchmarks/step_costs.py's JSON) instead "
                         "of the reference model's FLOPs")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 3 steps, population 4, 1 generation")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.pop, args.generations, args.holdout_seeds, args.max_depth = 3, 4, 1, 1, 2
        args.presets = "dato_official"
    args.presets = [p for p in args.presets.split(",") if p.strip()]
    if args.steps < 2:
        ap.error("--steps must be at least 2 (step 0 is always full)")
    return args


# ---------------------------------------------------------------------------------------------
# Genome <-> schedule


def kind_letters(max_depth: int) -> list[str]:
    """Gene value -> step: 0 = R, 1..d = S1..Sd, d+1 = F (more computing = higher)."""
    return ["R"] + [f"S{d}" for d in range(1, max_depth + 1)] + ["F"]


def genome_schedule(x, steps: int, max_depth: int) -> tuple[str, float]:
    """(custom_schedule text, prune ratio) of a genome ``[kind_0 … kind_{T-1}, ratio index]``."""
    letters = kind_letters(max_depth)
    kinds = ["F"] + [letters[int(round(v))] for v in x[1:steps]]
    return str(pack.Schedule.parse(" ".join(kinds))), RATIOS[int(round(x[steps]))]


def schedule_genome(text: str, ratio: float, steps: int, max_depth: int) -> list[int]:
    """The genome of a schedule text resampled to ``steps`` (depths clamped to ``max_depth``)."""
    sched = pack.Schedule.parse(text).resample(steps).clamp_depth(max_depth)
    letters = kind_letters(max_depth)
    return [letters.index(str(s)) for s in sched] + [RATIOS.index(min(RATIOS, key=lambda r: abs(r - ratio)))]


# ---------------------------------------------------------------------------------------------
# Costs and evaluation


def step_costs(ref, args, max_depth: int) -> dict:
    """FLOPs of one step of each kind at each prune ratio, relative to an unpatched step:
    ``{ratio: {"F": c, "S1": c, …, "R": 0}}``, from one-sample runs of ``F`` and ``F S<d>``."""
    from torch.utils.flop_counter import FlopCounterMode

    labels, noise = ref.batch(1)

    def flops(model, steps):
        with FlopCounterMode(display=False) as fc:
            quality.sample(model, ref, labels[:1], noise[:1], args, steps=steps)
        return float(fc.get_total_flops())

    base = flops(ref.patcher, 1)
    costs = {}
    for r in RATIOS:
        full = flops(pack.apply_dato(ref.patcher, prune_ratio=r, custom_schedule="F", seed=args.seed), 1)
        row = {"F": full / base, "R": 0.0}
        for d in range(1, max_depth + 1):
            two = flops(pack.apply_dato(ref.patcher, prune_ratio=r, custom_schedule=f"F S{d}", seed=args.seed), 2)
            row[f"S{d}"] = (two - full) / base
        costs[r] = row
    return costs


def load_step_costs(path: Path, max_depth: int) -> dict:
    """``benchmarks/step_costs.py``'s measured costs as ``{ratio: {"F": c, "S1": c, …, "R": c}}``;
    refuses a file that lacks one of the searched ratios or step kinds."""
    measured = {float(r): row for r, row in json.loads(Path(path).read_text())["costs"].items()}
    kinds = ["F", "R"] + [f"S{d}" for d in range(1, max_depth + 1)]
    for r in RATIOS:
        missing = [k for k in kinds if k not in measured.get(r, {})]
        if missing:
            raise SystemExit(f"--step-costs {path}: no cost for {', '.join(missing)} at prune ratio {r:g} "
                             f"(the search needs ratios {', '.join(f'{x:g}' for x in RATIOS)}, S1..S{max_depth})")
    return {r: {k: measured[r][k] for k in kinds} for r in RATIOS}


def schedule_cost(text: str, ratio: float, costs: dict) -> float:
    """Ideal cost of a whole run relative to the unpatched run (1 / FLOPs-ideal speedup)."""
    sched = pack.Schedule.parse(text)
    return sum(costs[ratio][str(s)] for s in sched) / len(sched)


class Evaluations:
    """Every candidate evaluated so far, ``key -> record``, kept in a JSON file as it grows."""

    def __init__(self, path: Path, setting: dict, resume: bool):
        self.path, self.setting = path, setting
        self.records: dict[str, dict] = {}
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("setting") != setting:
                raise SystemExit(f"--resume: {path} was made for {saved.get('setting')}, not {setting}")
            self.records = {r["key"]: r for r in saved["evaluations"]}

    @staticmethod
    def key(text: str, ratio: float) -> str:
        return f"{ratio:g}|{text}"

    def save(self) -> None:
        self.path.write_text(json.dumps({"setting": self.setting, "evaluations": list(self.records.values())},
                                        indent=1) + "\n")


def make_problem(evaluate, steps: int, max_depth: int):
    import numpy as np
    from pymoo.core.problem import Problem

    class ScheduleProblem(Problem):
        def __init__(self):
            xu = np.array([max_depth + 1] * steps + [len(RATIOS) - 1])
            super().__init__(n_var=steps + 1, n_obj=2, xl=np.zeros(steps + 1), xu=xu, vtype=int)

        def _evaluate(self, X, out, *a, **kw):
            out["F"] = np.array([evaluate(x) for x in X])

    return ScheduleProblem()


def make_repair():
    import numpy as np
    from pymoo.core.repair import Repair

    class FirstStepFull(Repair):
        """Integer genes, and step 0 full (a shallow or reuse step needs a cache to read)."""

        def _do(self, problem, X, **kwargs):
            X = np.clip(np.round(X), problem.xl, problem.xu).astype(int)
            X[:, 0] = problem.xu[0]
            return X

    return FirstStepFull()


def pareto(records: list[dict]) -> list[dict]:
    """The non-dominated records (error and cost both lower is better), by cost."""
    import numpy as np
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if not records:
        return []
    F = np.array([[r["error"], r["cost"]] for r in records])
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((records[i] for i in front), key=lambda r: r["cost"])


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict:
    quality.bootstrap(args)
    import os

    import numpy as np
    import torch
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair

    torch.set_num_threads(max(1, args.threads or len(os.sched_getaffinity(0))))
    import logging
    logging.getLogger(pack.PACK_ALIAS).setLevel(logging.WARNING)

    ref = quality.Reference(args.ref_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    max_depth = min(args.max_depth, pack.max_cache_depth(ref.patcher))
    steps = args.steps
    setting = {"weights": ref.weights, "steps": steps, "sampler": args.sampler, "scheduler": args.scheduler,
               "cfg": args.cfg, "seeds": args.seeds, "max_depth": max_depth, "ratios": list(RATIOS)}
    tag = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    labels, noise = ref.batch(args.seeds)

    cache = args.out / f"unpatched-{tag}.pt"
    if cache.is_file():
        ref_out = torch.load(cache)
    else:
        ref_out = quality.sample(ref.patcher, ref, labels, noise, args)
        torch.save(ref_out, cache)
    costs_path = args.out / f"step-costs-{tag}.json"
    cost_model = f"clock: {args.step_costs.name}" if args.step_costs else "FLOPs on the searched model"
    if args.step_costs:
        costs = load_step_costs(args.step_costs, max_depth)
    elif costs_path.is_file():
        costs = {float(r): row for r, row in json.loads(costs_path.read_text()).items()}
    else:
        costs = step_costs(ref, args, max_depth)
        costs_path.write_text(json.dumps({str(r): row for r, row in costs.items()}, indent=1) + "\n")
    print(f"[search] step costs ({cost_model}, share of an unpatched step): "
          + "; ".join(f"r={r:g}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()) for r, row in costs.items()),
          flush=True)

    evals = Evaluations(args.out / f"evaluations-{steps}-{args.sampler}.json", setting, args.resume)
    for rec in evals.records.values():  # earlier runs may have priced them with another cost model
        rec["cost"] = schedule_cost(rec["schedule"], rec["prune_ratio"], costs)
    if evals.records:
        evals.save()

    def evaluate_schedule(text: str, ratio: float) -> dict:
        key = Evaluations.key(text, ratio)
        rec = evals.records.get(key)
        if rec is None:
            model = pack.apply_dato(ref.patcher, prune_ratio=ratio, custom_schedule=text, seed=args.seed)
            out = quality.sample(model, ref, labels, noise, args)
            rec = {"key": key, "schedule": text, "prune_ratio": ratio,
                   "error": float(quality.rel_errors(out, ref_out).mean()),
                   "cost": schedule_cost(text, ratio, costs)}
            evals.records[key] = rec
            evals.save()
        return rec

    def evaluate(x) -> list[float]:
        rec = evaluate_schedule(*genome_schedule(x, steps, max_depth))
        return [rec["error"], rec["cost"]]

    # The unpatched schedule (the front's anchor: error 0 at 1x), the node's presets (at prune 0
    # and 0.4), the best of earlier evaluations, then random genomes.
    make = pack.schedule_maker
    seeds_x = [schedule_genome("F", 0.0, steps, max_depth)]
    for name in args.presets:
        text = str(make(name, "")[0](steps, 1))
        for r in (0.0, 0.4):
            seeds_x.append(schedule_genome(text, r, steps, max_depth))
    seeds_x += [schedule_genome(r["schedule"], r["prune_ratio"], steps, max_depth)
                for r in pareto(list(evals.records.values()))]
    problem = make_problem(evaluate, steps, max_depth)
    rng = np.random.default_rng(args.seed)
    random_x = rng.integers(0, problem.xu + 1, size=(max(0, args.pop - len(seeds_x)), problem.n_var))
    X0 = np.array(seeds_x[:args.pop] + random_x.tolist())
    X0[:, 0] = max_depth + 1
    algorithm = NSGA2(pop_size=args.pop, sampling=X0, repair=make_repair(),
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=1.0, eta=20, vtype=float, repair=RoundingRepair()),
                      eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", args.generations), seed=args.seed, verbose=False)
    t0 = time.perf_counter()
    gen = 0
    while algorithm.has_next():
        if gen and (time.perf_counter() - t0) / 60 > args.budget_minutes:
            print(f"[search] budget of {args.budget_minutes:g} min spent after {gen} generations", flush=True)
            break
        algorithm.next()
        gen += 1
        front = pareto(list(evals.records.values()))
        print(f"[search] generation {gen}/{args.generations}: {len(evals.records)} evaluated, front of "
              f"{len(front)} (ideal speedup {1 / front[-1]['cost']:.2f}x .. {1 / front[0]['cost']:.2f}x), "
              f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)

    front = pareto(list(evals.records.values()))
    presets = []
    for name in args.presets:
        text = str(make(name, "")[0](steps, 1).clamp_depth(max_depth))
        for r in (0.0, 0.4):
            presets.append({"preset": name, **evaluate_schedule(text, r)})
    report = final_report(args, ref, front, presets, setting, costs, cost_model, evals)
    write_outputs(report, args, list(evals.records.values()))
    return report


def final_report(args, ref, front: list[dict], presets: list[dict], setting: dict, costs: dict, cost_model: str,
                 evals) -> dict:
    """Held-out quality and measured time on the reference model of every front point and preset."""
    import torch

    h_labels, h_noise = ref.batch(args.holdout_seeds, noise_base=HOLDOUT_NOISE_BASE)
    t = time.perf_counter()
    h_ref = quality.sample(ref.patcher, ref, h_labels, h_noise, args)
    unpatched_s = time.perf_counter() - t
    rows = []
    for rec in front + presets:
        model = pack.apply_dato(ref.patcher, prune_ratio=rec["prune_ratio"], custom_schedule=rec["schedule"],
                                seed=args.seed)
        t = time.perf_counter()
        out = quality.sample(model, ref, h_labels, h_noise, args)
        seconds = time.perf_counter() - t
        m = quality.metrics(out, h_ref, h_labels, ref)
        rows.append({**{k: rec[k] for k in ("schedule", "prune_ratio", "error", "cost")},
                     "preset": rec.get("preset"), "ideal_speedup": 1 / rec["cost"],
                     "holdout": m, "ref_time_speedup": None if args.no_timing else unpatched_s / seconds})
    with torch.no_grad():
        unpatched_m = quality.metrics(h_ref, h_ref, h_labels, ref)
    return {"setting": setting, "holdout_samples": len(h_labels), "calibration_samples": ref.num_labels * args.seeds,
            "evaluated": len(evals.records), "cost_model": cost_model, "step_costs": {str(r): row for r, row in costs.items()},
            "unpatched_holdout": unpatched_m, "front": [r for r in rows if r["preset"] is None],
            "presets": [r for r in rows if r["preset"] is not None],
            "command": "benchmarks/schedule_search.py " + " ".join(sys.argv[1:])}


def markdown(report: dict) -> str:
    s = report["setting"]
    lines = [f"Schedule search: {s['steps']} steps {s['sampler']}, CFG {s['cfg']:g}, reference model "
             f"{s['weights']}; {report['evaluated']} schedules evaluated on {report['calibration_samples']} "
             f"calibration samples, front and presets re-measured on {report['holdout_samples']} held-out samples "
             f"(other seeds). Unpatched held-out FID-analogue {report['unpatched_holdout']['fid']:.2f}, accuracy "
             f"{report['unpatched_holdout']['accuracy']:.3f}.", "",
             f"Ideal speedup = 1 / the schedule's cost under the cost model ({report['cost_model']}).", "",
             "| custom_schedule | prune_ratio | ideal speedup | error (calibration) | error (held-out) | PSNR | SSIM "
             "| FID-analogue | accuracy | time vs unpatched (ref. model) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(r, name):
        h = r["holdout"]
        t = "–" if r["ref_time_speedup"] is None else f"{r['ref_time_speedup']:.2f}×"
        return (f"| {name} | {r['prune_ratio']:g} | {r['ideal_speedup']:.2f}× | {r['error']:.4f} | {h['rel_error']:.4f} "
                f"| {h['psnr']:.2f} | {h['ssim']:.3f} | {h['fid']:.2f} | {h['accuracy']:.3f} | {t} |")

    lines += [row(r, f"`{r['schedule']}`") for r in report["front"]]
    lines += ["", "The node's presets on the same samples:", "", lines[4], lines[5]]
    lines += [row(r, f"{r['preset']} (`{r['schedule']}`)") for r in report["presets"]]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, args, records: list[dict]) -> None:
    stem = args.out / f"front-{args.steps}-{args.sampler}{'-clock' if args.step_costs else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, records, stem.with_suffix(".png"))
    print(markdown(report))


def plot(report: dict, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    ax.scatter([1 / r["cost"] for r in records], [r["error"] for r in records], s=8, color="0.7",
               label="evaluated (calibration set)")
    f = report["front"]
    ax.plot([r["ideal_speedup"] for r in f], [r["error"] for r in f], "o-", color="tab:blue", label="front (calibration)")
    ax.plot([r["ideal_speedup"] for r in f], [r["holdout"]["rel_error"] for r in f], "s--", color="tab:green",
            label="front (held-out)")
    for r in report["presets"]:
        ax.plot([r["ideal_speedup"]], [r["error"]], "x", color="tab:red")
        ax.annotate(f"{r['preset']}@{r['prune_ratio']:g}", (r["ideal_speedup"], r["error"]), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"ideal speedup ({report['cost_model']})")
    ax.set_ylabel("relative error vs unpatched sample (lower is better)")
    s = report["setting"]
    ax.set_title(f"DaTo schedule search: {s['steps']} steps {s['sampler']}, CFG {s['cfg']:g} (x: the node's presets)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
