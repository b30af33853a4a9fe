"""Measurement: the meters, and the benchmark run that reads them.

Meters: ``PeakRSS`` (peak resident memory of a block; on CUDA also ``device.PeakCUDA``, the peak
GPU memory), ``cpu_wait_seconds`` (the contention gauge), ``UNetCalls`` (diffusion-model forwards and batch sizes), ``PackLog`` (the pack's
per-run summary line), ``CoreCacheLog`` (ComfyUI's EasyCache / LazyCache skip counts),
``count_flops`` (FlopCounterMode over a sampler run) and ``rel_error``.

The run (``run_benchmark``): ``prepare_testbed`` builds the model and its inputs and refuses
what cannot run on it; ``prepare`` patches each variant and counts its FLOPs (``cat_ideal`` for
CAT's mix of full and pruned steps), which doubles as the warm-up (``--warmup`` adds whole untimed
runs of every variant: the default on CUDA, whose kernels and allocator warm up per shape);
``time_rounds`` times every variant ``--repeats`` times (``timed_run``: one sampler run under all
meters; on CUDA timed with CUDA events between ``torch.cuda.synchronize()`` calls), in rounds or in
``--paired`` pairs; ``drift_check`` re-runs the unpatched model. It returns the ``Measured``
run, which report.build_report turns into the JSON.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import device
import pack
from models import (Testbed, build_model, comfyui_version, diffusion_model_wrappers_run, host_latent, make_testbed,
                    model_family)
from variants import (CACHE_METHODS, Variant, cat_full_steps, cat_probe, cat_probe_steps, family_problem, options,
                      parse_variants, patch, schedule_ideal)

log = logging.getLogger("bench")


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
    pruned_flops: float | None = None  # cat: FLOPs of one pruned CFG model call (warmup-0 probe)
    latent: object = None  # torch.Tensor, not serialised
    pair_speedups: list = field(default_factory=list)  # --paired: unpatched / variant of adjacent runs
    pair_ratios: list = field(default_factory=list)  # --paired-against B: B / variant of adjacent runs
    wall_all: list = field(default_factory=list)  # CUDA: host wall time of each timed run (seconds_all: CUDA events)
    gpu_peaks: list = field(default_factory=list)  # CUDA: peak allocated bytes of each timed run
    gpu_deltas: list = field(default_factory=list)  # CUDA: ... minus what was allocated before it


@contextmanager
def pack_log_capture(verbose: bool):
    """The pack's log lines into a ``PackLog`` for the duration (not to the console unless ``verbose``)."""
    pack_log = PackLog()
    pl = logging.getLogger(pack.PACK_ALIAS)
    pl.setLevel(logging.INFO)
    pl.addHandler(pack_log)
    if not verbose:
        pl.propagate = False
    try:
        yield pack_log
    finally:
        pl.removeHandler(pack_log)
        pl.propagate = True


@dataclass
class Meters:
    """What every timed run is measured with besides the clock."""

    calls: UNetCalls
    pack_log: PackLog


def prepare_testbed(args, variants: list[Variant]) -> Testbed:
    """The model and its inputs; refuses variants that cannot run on it (SystemExit, before any timing)."""
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

    bed = make_testbed(args, base, model_info)
    if family != "unet":
        patch = model_info.get("patch", [2, 2])  # tokens per latent axis: ceil(size / patch)
        model_info["image_tokens"] = math.prod(-(-n // p) for n, p in zip(bed.latent.shape[2:], patch))
        model_info["latent"] = list(bed.latent.shape)
        model_info["text_tokens"] = int(bed.pos[0][0].shape[1])
    if any(v.method == "easycache" for v in variants) and not diffusion_model_wrappers_run(base, bed.pos, bed.neg,
                                                                                         bed.latent):
        raise SystemExit(
            f"easycache: ComfyUI's EasyCache works through the DIFFUSION_MODEL wrapper, which this model's "
            f"forward ({type(dm).__name__}, ComfyUI {comfyui_version()}) never calls: it would skip "
            f"no step and its row would repeat the unpatched one. Use lazycache@T instead (ComfyUI's LazyCache: "
            f"the same reuse rule at the PREDICT_NOISE level, which every model runs).")
    return bed


def count_flops(bed: Testbed, model, steps: int) -> float:
    """FlopCounterMode's total over a ``steps``-step sampler run of ``model`` (its patches live)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        bed.sample(model, steps)
    return float(fc.get_total_flops())


def cat_ideal(bed: Testbed, v: Variant, res: Result, ref_flops: float) -> None:
    """CAT's FLOPs-ideal speedup over the whole run: its full steps cost an unpatched model call, its
    pruned ones what a pruned call costs, counted on a warm-up-0 probe (reference, clustering, one pruned)."""
    probe_steps = cat_probe_steps()
    total = count_flops(bed, cat_probe(bed.base, v, bed.args.seed), probe_steps)
    pruned = max(total - cat_full_steps(probe_steps, 0) * ref_flops, 1.0)
    steps = bed.args.steps
    full_steps = cat_full_steps(steps, v.warmup)
    res.ideal = steps * ref_flops / (full_steps * ref_flops + (steps - full_steps) * pruned)
    res.pruned_flops = pruned
    res.options.update(full_steps=full_steps, pruned_steps=steps - full_steps)
    log.info("%-18s flops of one pruned model call: %.1f G (unpatched %.1f G)", res.spec, pruned / 1e9,
             ref_flops / 1e9)


def prepare(bed: Testbed, v: Variant, ref_flops: float | None) -> tuple[object, Result]:
    """Variant ``v`` applied to the model, and its ``Result`` with the FLOPs counted (unless --no-flops).

    Per-call variants: one CFG model call (steps=1 -> one euler step) through the real sampler.
    Caching variants: the ideal speedup of their schedule, or for CAT ``cat_ideal`` (needs the
    unpatched model's ``ref_flops``); EasyCache / LazyCache get theirs from the timed run.
    """
    model = patch(bed.base, v, bed.args.seed)
    res = Result(v.spec, v.method, v.ratio, options(v))
    if v.method in CACHE_METHODS:
        res.ideal = schedule_ideal(v, bed.args.steps)
        if v.method == "cat" and not bed.args.no_flops and ref_flops is not None:
            cat_ideal(bed, v, res, ref_flops)
        return model, res
    if not bed.args.no_flops:
        res.flops = count_flops(bed, model, 1)
        log.info("%-18s flops of one model call: %.1f G", v.spec, res.flops / 1e9)
    return model, res


def timed_run(bed: Testbed, meters: Meters, model, res: Result) -> None:
    """One timed sampler run of ``model`` under every meter, appended to ``res``."""
    meters.pack_log.lines.clear()
    meters.calls.reset()
    wait0, load0 = cpu_wait_seconds(), os.getloadavg()[0]
    if device.is_cuda(bed.args):
        with CoreCacheLog(bed.args.verbose) as core_log, PeakRSS() as mem, device.PeakCUDA() as gpu:
            with device.CudaTimer() as timer:
                raw = bed.sample(model, bed.args.steps)
            out, dt = host_latent(raw), timer.seconds
        del raw
        res.wall_all.append(timer.wall)
        res.gpu_peaks.append(gpu.peak)
        res.gpu_deltas.append(gpu.delta)
    else:
        with CoreCacheLog(bed.args.verbose) as core_log, PeakRSS() as mem:
            t = time.perf_counter()
            out = bed.final_latent(model, bed.args.steps)
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
    res.unet_calls, res.unet_batch = meters.calls.calls, sorted(meters.calls.batches)
    res.pack_summary = meters.pack_log.lines[-1] if meters.pack_log.lines else core_log.line
    log.info("%-18s %7.2f s/image  (waited %.1f s for a CPU, load %.1f)", res.spec, dt, wait, res.loadavg_all[-1])


def time_rounds(bed: Testbed, meters: Meters, prepared: list[tuple[object, Result]]) -> None:
    """The timed runs, in rounds -- every variant once per round -- so that a burst of load from
    elsewhere on the machine hits one run of several variants rather than all runs of one.

    --paired: each variant next to its own run of the pair's base, ABBA across rounds, so both
    halves of a pair see the machine at the same speed. The base is the unpatched model (the
    pair's speedup goes to ``pair_speedups``) or, with --paired-against, that variant (the pair's
    ratio goes to ``pair_ratios``; the unpatched model then runs once, in the first round).
    """
    against = getattr(bed.args, "paired_against", None)
    base = next((p for p in prepared if p[1].spec == against), prepared[0])
    for round_ in range(bed.args.repeats):
        if not bed.args.paired:
            for model, res in prepared:
                timed_run(bed, meters, model, res)
            continue
        if base is not prepared[0] and round_ == 0:
            timed_run(bed, meters, *prepared[0])
        for model, res in prepared[1:]:
            if res is base[1]:
                continue
            order = [base, (model, res)]
            for m, r in (order if round_ % 2 == 0 else order[::-1]):
                timed_run(bed, meters, m, r)
            pairs = res.pair_speedups if base is prepared[0] else res.pair_ratios
            pairs.append(base[1].seconds_all[-1] / res.seconds_all[-1])
        if len(prepared) == 1:
            timed_run(bed, meters, *base)


def warm_up(bed: Testbed, prepared: list[tuple[object, Result]], runs: int) -> None:
    """``runs`` whole untimed sampler runs of every variant (``--warmup``), so that the timed runs
    find the kernels chosen, the caches' shapes allocated and the weights where they run."""
    for _ in range(runs):
        for model, res in prepared:
            t = time.perf_counter()
            bed.sample(model, bed.args.steps)
            log.info("%-18s warm-up run %.2f s", res.spec, time.perf_counter() - t)


def drift_check(bed: Testbed, meters: Meters, unpatched: tuple[object, Result]) -> Result:
    """The unpatched model once more at the end (unless --skip-rerun): how far the machine drifted."""
    model, first = unpatched
    drift = Result("unpatched (re-run)", "unpatched", 0.0, {}, flops=first.flops)
    if bed.args.skip_rerun:
        drift.seconds, drift.latent, drift.seconds_all = first.seconds, first.latent, []
    else:
        timed_run(bed, meters, model, drift)
    return drift


def rel_error(latent, x_ref) -> float:
    """||latent - x_ref|| / ||x_ref|| (NaN for a zero reference)."""
    ref_norm = float(x_ref.norm())
    return float((latent - x_ref).norm()) / ref_norm if ref_norm > 0 else math.nan


@dataclass
class Measured:
    """A benchmark run's measurements: the testbed, every variant's ``Result`` (unpatched first), the
    final unpatched re-run, and when it began (time.perf_counter)."""

    bed: Testbed
    results: list[Result]
    drift: Result
    t0: float


def run_benchmark(args) -> Measured:
    """Every variant of ``args`` (bench.parse_args) measured on one model: FLOPs, timed runs, drift check."""
    pack.bootstrap(args.comfyui, device.comfy_args(args))
    import torch

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads))

    with pack_log_capture(args.verbose) as pack_log:
        variants = parse_variants(args.variants, args.dato_schedule)
        t0 = time.perf_counter()
        bed = prepare_testbed(args, variants)
        meters = Meters(UNetCalls(bed.base.model.diffusion_model), pack_log)
        # FLOPs pass of every variant first (it doubles as the warm-up), then the timed runs.
        if args.no_flops:  # warm-up (model load, first allocations) so the first timed run is fair
            bed.sample(bed.base, 1)
        prepared, ref_flops = [], None
        for v in variants:
            model, res = prepare(bed, v, ref_flops)
            if v.method == "unpatched" and res.flops is not None:
                ref_flops = res.flops
            prepared.append((model, res))
        warm_up(bed, prepared, getattr(args, "warmup", 0) or 0)
        time_rounds(bed, meters, prepared)
        drift = drift_check(bed, meters, prepared[0])
        results = [res for _, res in prepared]
        del prepared, model
        meters.calls.remove()
    return Measured(bed, results, drift, t0)
