#!/usr/bin/env python3
"""The prepared GPU check: every method of the pack and ComfyUI's own against the unpatched model,
on one CUDA GPU, in one process, in a few minutes.

What it measures (``benchmarks/bench.py --device cuda --dtype fp16 --attention sdpa``, random seeded
weights, 20 euler steps, CFG 7.5, the fastest of 3 timed runs after one warm-up run of each variant):

    SD1.5-architecture UNet at 512x512 px, the SDXL base UNet at 1024x1024 px, SD1.5 at 1024x1024 px
    variants  unpatched, ComfyUI's ToMe (tome@0.5), SiTo (sito@0.5), random pruning (random@0.5, the
              free-selection baseline of SiTo), DaTo (dato-official@0.4), DeepCache (deepcache-5@0),
              ComfyUI's EasyCache (easycache@0.2), CAT (cat@0.3)

and writes, under ``--out``: ``gpu_check.md`` (one table per model and size), ``gpu_check.json`` (the
full benchmark report of each, plus the GPU, the timings of the check and what was carried) and the
log ``gpu_check.log``. Results are written after each model, so a
check cut short keeps what it finished; ``--budget-s`` (default 420) skips a model that would not
finish in time, from what the models before it took.

The machine it is meant for has a bare ``python3`` with torch (CUDA), torchvision, transformers,
safetensors, einops, numpy, scipy, Pillow and torchmetrics, and no way to install anything. What
ComfyUI needs beyond that comes in ``.gpu_carry/`` (``make gpu-carry``): the ComfyUI tree and the
wheels of torchsde, trampoline and psutil. ``bootstrap`` unpacks only the wheels whose modules the
machine lacks into a temporary folder appended to ``sys.path``; PyAV, which ComfyUI's API module
imports at start-up but no sampler touches, is replaced by a stub that raises on use when it is
not installed.

Without a CUDA GPU it stops before any work with exit status 3 and says so. ``--cpu-dry-run``
instead runs the same bootstrap and the same code path on the CPU, on the tiny SD1.5 and SDXL
models at 64 px and 2 steps: a check that imports and sampling work with a bare python before
device time is spent (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = "unpatched,tome@0.5,sito@0.5,random@0.5,dato-official@0.4,deepcache-5@0,easycache@0.2,cat@0.3"
GPU_RUN = ["--device", "cuda", "--dtype", "fp16", "--attention", "sdpa", "--steps", "20", "--repeats", "3",
           "--warmup", "1"]
# (name, title, bench arguments, cost relative to the first model: used to skip what cannot finish)
MODELS = [
    ("sd15_512", "SD1.5-architecture UNet, 512x512 px", ["--family", "sd15", "--size", "512"], 1.0),
    ("sdxl_1024", "SDXL base UNet, 1024x1024 px", ["--family", "sdxl", "--size", "1024"], 5.0),
    ("sd15_1024", "SD1.5-architecture UNet, 1024x1024 px", ["--family", "sd15", "--size", "1024"], 6.0),
]
DRY_RUN = ["--device", "cpu", "--attention", "sdpa", "--tiny", "--size", "64", "--steps", "2", "--repeats", "1"]
NO_GPU = 3


class AVStub:
    """Source of the stand-in for PyAV (package ``av``)."""

    INIT = ('"""Stand-in for PyAV, written by scripts/gpu_check.py: ComfyUI\'s API module imports av at start-up;\n'
            'the GPU check never reads or writes video. Any use raises."""\n\n\n'
            'class _Missing:\n'
            '    def __init__(self, *args, **kwargs):\n'
            '        raise RuntimeError("PyAV is not installed here (gpu_check stand-in)")\n\n\n'
            'def open(*args, **kwargs):  # noqa: A001 - the name PyAV uses\n'
            '    raise RuntimeError("PyAV is not installed here (gpu_check stand-in)")\n\n\n'
            'def __getattr__(name):\n'
            '    return _Missing\n')
    SUBMODULES = {"av/container/__init__.py": "from av import _Missing as InputContainer, _Missing as OutputContainer\n",
                  "av/subtitles/__init__.py": "",
                  "av/subtitles/stream.py": "from av import _Missing as SubtitleStream\n"}

    @classmethod
    def write(cls, site: Path) -> None:
        (site / "av").mkdir(parents=True, exist_ok=True)
        (site / "av" / "__init__.py").write_text(cls.INIT)
        for rel, text in cls.SUBMODULES.items():
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(text)


def _wheel_modules(whl: zipfile.ZipFile) -> list[str]:
    """Top-level import names of a wheel (top_level.txt, else its top folders / modules)."""
    names = whl.namelist()
    top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top:
        return [line.strip() for line in whl.read(top[0]).decode().splitlines() if line.strip()]
    out = set()
    for n in names:
        first = n.split("/")[0]
        if first.endswith((".dist-info", ".data")):
            continue
        out.add(first[:-3] if first.endswith(".py") else first)
    return sorted(out)


def bootstrap(carry: Path) -> dict:
    """Make ComfyUI's requirements importable from the carry folder where the machine lacks them."""
    site = Path(tempfile.mkdtemp(prefix="tpc-gpu-site-"))
    report = {"carry": str(carry), "site": str(site), "from_carry": [], "already_installed": [], "stubbed": []}
    for path in sorted((carry / "wheels").glob("*.whl")):
        with zipfile.ZipFile(path) as whl:
            modules = _wheel_modules(whl)
            if all(importlib.util.find_spec(m) is not None for m in modules):
                report["already_installed"].append(path.name)
                continue
            whl.extractall(site)
            report["from_carry"].append(path.name)
    if importlib.util.find_spec("av") is None:
        AVStub.write(site)
        report["stubbed"].append("av")
    sys.path.append(str(site))
    importlib.invalidate_caches()
    return report


def gpu_problem() -> str | None:
    import torch
    if torch.cuda.is_available():
        return None
    return (f"no CUDA GPU: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no device "
            f"(torch.cuda.is_available() is False). This check measures a GPU; run it where one is, or use "
            f"--cpu-dry-run to test the bootstrap on the CPU.")


def free_models() -> None:
    """Drop the last model from ComfyUI's loaded-model list and the CUDA cache before the next one."""
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [f"# GPU check: {result.get('gpu') or 'no GPU (CPU dry run)'}", "",
             f"{result['what']}. torch {result.get('torch')}, CUDA {result.get('cuda')}, ComfyUI "
             f"{result.get('comfyui')}, Python {result['python']}; {result['elapsed_s']:.0f} s in all "
             f"(model builds included). Command: `{result['command']}`.", ""]
    for name, title, _, _ in MODELS if not result["dry_run"] else DRY_MODELS:
        entry = result["models"].get(name)
        lines.append(f"## {title}")
        lines.append("")
        if entry is None:
            lines.append("not reached")
        elif "markdown" in entry:
            lines.append(entry["markdown"])
        else:
            lines.append(f"**{entry.get('status')}**: {entry.get('reason') or entry.get('error')}")
        lines.append("")
    (out / "gpu_check.md").write_text("\n".join(lines))


DRY_MODELS = [
    ("sd15_tiny", "tiny SD1.5 family, 64x64 px, CPU dry run", ["--family", "sd15"], 1.0),
    ("sdxl_tiny", "tiny SDXL family, 64x64 px, CPU dry run", ["--family", "sdxl"], 1.0),
]


class Tee:
    """A stream that writes to the console and to the check's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench_out" / "gpu_check"),
                   help="output folder (default $OUT, else bench_out/gpu_check)")
    p.add_argument("--carry", default=str(ROOT / ".gpu_carry"), help="the carry folder (make gpu-carry)")
    p.add_argument("--comfyui", default=None, help="ComfyUI tree (default: the carry folder's, else .comfyui)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip a model that would end past this many seconds from the start (default 420)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: the same bootstrap and code path on the CPU, tiny models, 64 px, 2 steps")
    p.add_argument("--only", default=None, help="comma-separated model names to run (default: all)")
    p.add_argument("--variants", default=VARIANTS, help=f"bench.py variants (default {VARIANTS})")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_check.log", "w")
    sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)

    problem = None if args.cpu_dry_run else gpu_problem()
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return NO_GPU
    carry = Path(args.carry)
    # without a carry folder this python's own packages must hold ComfyUI's requirements (a dev machine)
    carried = bootstrap(carry) if (carry / "wheels").is_dir() else {"carry": None}
    comfy_dir = Path(args.comfyui) if args.comfyui else (carry / "comfyui" if (carry / "comfyui").is_dir()
                                                         else ROOT / ".comfyui")
    if not (comfy_dir / "comfy").is_dir():
        print(f"gpu_check: no ComfyUI tree at {comfy_dir}: run `make gpu-carry` (or `make setup`) where a package "
              f"registry is reachable, and carry .gpu_carry/ along", file=sys.stderr)
        return 2
    print(f"gpu_check: ComfyUI from {comfy_dir}; carried wheels {carried.get('from_carry')}, installed here "
          f"{carried.get('already_installed')}, stubbed {carried.get('stubbed')}", flush=True)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench  # noqa: E402 - benchmarks/bench.py, after the bootstrap

    models = DRY_MODELS if args.cpu_dry_run else MODELS
    if args.only:
        wanted = set(args.only.split(","))
        models = [m for m in models if m[0] in wanted]
    common = DRY_RUN if args.cpu_dry_run else GPU_RUN
    result = {"what": ("CPU dry run of the GPU check (bootstrap and code path only; the numbers mean nothing)"
                       if args.cpu_dry_run else
                       "Random seeded weights, fp16, ComfyUI attention SDPA (--use-pytorch-cross-attention), 20 "
                       "euler steps, CFG 7.5, one warm-up run per variant, fastest of 3 timed runs"),
              "dry_run": args.cpu_dry_run, "command": "python3 scripts/gpu_check.py " + " ".join(argv or sys.argv[1:]),
              "python": platform.python_version(), "variants": args.variants, "bench_args": common, "carried": carried,
              "models": {}, "elapsed_s": 0.0}
    import torch
    result["torch"], result["cuda"] = torch.__version__, torch.version.cuda
    if not args.cpu_dry_run:
        result["gpu"] = torch.cuda.get_device_name(0)
    failures, first_cost = 0, None
    with tempfile.TemporaryDirectory(prefix="tpc-gpu-check-") as scratch:
        for name, title, model_args, cost in models:
            elapsed = time.perf_counter() - t0
            estimate = None if first_cost is None else first_cost * cost
            if estimate is not None and elapsed + estimate > args.budget_s:
                reason = (f"skipped: {elapsed:.0f} s spent, about {estimate:.0f} s more needed (from the first "
                          f"model's {first_cost:.0f} s x {cost:g}), over the {args.budget_s:.0f} s budget")
                print(f"gpu_check: {name} {reason}", flush=True)
                result["models"][name] = {"status": "skipped", "reason": reason}
                continue
            bench_argv = common + model_args + ["--variants", args.variants, "--comfyui", str(comfy_dir),
                                                "--out", str(Path(scratch) / f"{name}.json")]
            print(f"gpu_check: {name}: bench.py {' '.join(bench_argv)}", flush=True)
            t = time.perf_counter()
            try:
                report = bench.main(bench_argv)
                md = Path(scratch, f"{name}.md").read_text()
                result["models"][name] = {"status": "ok", "title": title, "seconds": round(time.perf_counter() - t, 1),
                                          "markdown": md.strip(), "report": report}
                result["comfyui"] = report["config"].get("comfyui")
            except (Exception, SystemExit) as e:  # noqa: BLE001 - one model failing must not lose the others
                failures += 1
                result["models"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc()[-4000:]}
                print(f"gpu_check: {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            if first_cost is None:
                first_cost = time.perf_counter() - t
            try:
                free_models()
            except Exception:  # noqa: BLE001
                pass
            result["elapsed_s"] = time.perf_counter() - t0
            write_outputs(out, result)
    result["elapsed_s"] = time.perf_counter() - t0
    write_outputs(out, result)
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} "
          f"({result['elapsed_s']:.0f} s, {failures} failed)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
