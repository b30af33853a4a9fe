"""The GPU side of the benchmarks, on a machine without a GPU: bench.py's device options map to
ComfyUI's own, the GPU check refuses cleanly without a GPU, its bootstrap takes from the carry
folder only what this python lacks, and its CPU dry run samples every variant through the same
code path (scripts/gpu_check.py; docs/gpu.md)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
CHECK = ROOT / "scripts" / "gpu_check.py"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def device():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return _load("bench_device", ROOT / "benchmarks" / "device.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check", CHECK)


def test_device_options_map_to_comfyui_options(device):
    def args(**kw):
        return argparse.Namespace(**({"device": "cpu", "dtype": "fp32", "attention": "default"} | kw))

    assert device.comfy_args(args()) is None  # the CPU benchmark as it always ran
    assert device.comfy_args(args(device="cuda", dtype="fp16", attention="sdpa")) == [
        "--use-pytorch-cross-attention", "--fp16-unet"]
    assert device.comfy_args(args(device="cuda")) == ["--fp32-unet"]  # ComfyUI's own attention choice
    assert device.comfy_args(args(attention="sub-quadratic")) == ["--cpu", "--use-quad-cross-attention"]
    assert device.comfy_args(args(attention="split", dtype="bf16")) == ["--cpu", "--use-split-cross-attention",
                                                                         "--bf16-unet"]
    # every option named is one ComfyUI's own parser knows
    import comfy.cli_args
    for attention in device.ATTENTION_OPTIONS:
        for dtype in device.DTYPE_CHOICES:
            for dev in device.DEVICES:
                options = device.comfy_args(args(device=dev, dtype=dtype, attention=attention)) or []
                parsed = comfy.cli_args.parser.parse_args(options)
                assert parsed.cpu == (dev == "cpu" and bool(options))


@no_gpu
def test_bench_refuses_cuda_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--tiny", "--size", "64", "--steps", "1",
                           "--variants", "unpatched", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA GPU is visible" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r.json").exists()


@no_gpu
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                                     "PYTHON": sys.executable})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stderr
    assert "no CUDA GPU" in (tmp_path / "gpu_check.log").read_text()
    assert not (tmp_path / "gpu_check.json").exists()  # nothing measured, nothing written


def _wheel(path: Path, module: str, body: str = "VALUE = 42\n") -> Path:
    whl = path / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{module}/__init__.py", body)
        z.writestr(f"{module}-1.0.dist-info/top_level.txt", module + "\n")
    return whl


def test_bootstrap_takes_only_what_this_python_lacks(gpu_check, tmp_path):
    wheels = tmp_path / "carry" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "tpc_carried_probe")
    _wheel(wheels, "json", "raise RuntimeError('the carried copy must not shadow an installed package')\n")
    saved = list(sys.path)
    try:
        report = gpu_check.bootstrap(tmp_path / "carry")
        assert report["from_carry"] == ["tpc_carried_probe-1.0-py3-none-any.whl"]
        assert report["already_installed"] == ["json-1.0-py3-none-any.whl"]
        assert sys.path[-1] == report["site"]  # appended: the machine's own packages come first
        import tpc_carried_probe
        assert tpc_carried_probe.VALUE == 42
        assert not (Path(report["site"]) / "json").exists()
    finally:
        sys.path[:] = saved
        sys.modules.pop("tpc_carried_probe", None)


def test_av_stand_in_imports_and_refuses_use(gpu_check, tmp_path):
    gpu_check.AVStub.write(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import av\n"
            "from av.container import InputContainer\nfrom av.subtitles.stream import SubtitleStream\n"
            "try:\n    av.open('x.mp4')\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "refused: PyAV is not installed here" in proc.stdout


def test_gpu_check_cpu_dry_run(tmp_path):
    """The dry run of one tiny model with two variants: the same bench.py path (ComfyUI's options
    parsed by pack.bootstrap, SDPA on the CPU) end to end; outputs in the out folder."""
    proc = subprocess.run([sys.executable, str(CHECK), "--cpu-dry-run", "--only", "sd15_tiny",
                           "--variants", "unpatched,sito@0.5", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    entry = result["models"]["sd15_tiny"]
    assert entry["status"] == "ok"
    config = entry["report"]["config"]
    assert (config["device"], config["dtype"], config["attention"]) == ("cpu", "fp32", "attention_pytorch")
    rows = {r["variant"]: r for r in entry["report"]["results"]}
    assert list(rows) == ["unpatched", "sito@0.5"]
    assert rows["sito@0.5"]["flops_per_model_call"] < rows["unpatched"]["flops_per_model_call"]
    assert "| sito@0.5 |" in (tmp_path / "gpu_check.md").read_text()
