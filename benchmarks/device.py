"""Where the benchmark runs: device, dtype and attention kernel, and how a GPU run is timed and metered.

``--device cpu`` (the default) with ``--dtype fp32`` and ``--attention default`` is the CPU
benchmark as it always was: ``comfy_args`` returns None and ``pack.bootstrap`` takes its --cpu
path. Anything else is handed to ComfyUI as its own command-line options (``comfy.cli_args``),
so the run uses the kernels and dtypes a user's ComfyUI would pick with the same options:

==================  ===================================  ==============================
``--attention``     ComfyUI option                       kernel (comfy.ldm.modules.attention)
==================  ===================================  ==============================
default             (none: ComfyUI decides)              SDPA on NVIDIA GPUs, sub-quadratic on the CPU
sdpa                ``--use-pytorch-cross-attention``    torch SDPA (flash / memory-efficient)
sub-quadratic       ``--use-quad-cross-attention``       attention_sub_quad
split               ``--use-split-cross-attention``      attention_split
flash               ``--use-flash-attention``            flash_attn package (must be installed)
sage                ``--use-sage-attention``             sageattention package (must be installed)
==================  ===================================  ==============================

``--dtype fp16/bf16/fp32`` adds ``--fp16-unet`` / ``--bf16-unet`` / ``--fp32-unet`` (what a
checkpoint is loaded in) and is the dtype the random-weight models are built in.

On CUDA every timed image is bracketed by ``torch.cuda.synchronize()`` and timed with CUDA
events (``CudaTimer``), and the peak GPU memory of the run is ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` (``PeakCUDA``).
"""
from __future__ import annotations

import time

DEVICES = ("cpu", "cuda")
DTYPE_CHOICES = ("fp32", "fp16", "bf16")
ATTENTION_OPTIONS = {
    "default": None,
    "sdpa": "--use-pytorch-cross-attention",
    "sub-quadratic": "--use-quad-cross-attention",
    "split": "--use-split-cross-attention",
    "flash": "--use-flash-attention",
    "sage": "--use-sage-attention",
}
DTYPE_OPTIONS = {"fp32": "--fp32-unet", "fp16": "--fp16-unet", "bf16": "--bf16-unet"}


def is_default_cpu(args) -> bool:
    """The CPU benchmark as it always ran (no ComfyUI option but --cpu)."""
    return (getattr(args, "device", "cpu") == "cpu" and getattr(args, "dtype", "fp32") == "fp32"
            and getattr(args, "attention", "default") == "default")


def comfy_args(args) -> list[str] | None:
    """ComfyUI's command-line options for this run; None for the default CPU run."""
    if is_default_cpu(args):
        return None
    out = ["--cpu"] if args.device == "cpu" else []
    if ATTENTION_OPTIONS[args.attention]:
        out.append(ATTENTION_OPTIONS[args.attention])
    if args.dtype != "fp32" or args.device != "cpu":
        out.append(DTYPE_OPTIONS[args.dtype])
    return out


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None (asked before ComfyUI is imported)."""
    if device == "cpu":
        return None
    import torch
    if not torch.cuda.is_available():
        return (f"--device {device}: no CUDA GPU is visible to this torch ({torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}); torch.cuda.is_available() is False")
    return None


def is_cuda(args) -> bool:
    return getattr(args, "device", "cpu") == "cuda"


def describe(args) -> dict:
    """What the JSON's config says of the device (GPU name, CUDA and driver-visible memory)."""
    import torch
    out = {"device": getattr(args, "device", "cpu"), "dtype": getattr(args, "dtype", "fp32"),
           "attention_option": getattr(args, "attention", "default")}
    if is_cuda(args):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), timing="CUDA events, torch.cuda.synchronize() around each image",
                   peak_memory_method="torch.cuda.max_memory_allocated (reset before each timed run)")
    return out


class CudaTimer:
    """GPU time of a block: ``torch.cuda.synchronize()``, a CUDA event, the block, a CUDA event,
    ``torch.cuda.synchronize()``. ``seconds``: the events' elapsed time; ``wall``: the host's."""

    def __enter__(self):
        import torch
        torch.cuda.synchronize()
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = time.perf_counter()
        self._start.record()
        return self

    def __exit__(self, *exc):
        import torch
        self._end.record()
        torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._t0
        self.seconds = self._start.elapsed_time(self._end) / 1e3
        return False


class PeakCUDA:
    """Peak GPU memory allocated by torch during a block (``peak``) and above what was allocated
    when it began (``delta``), in bytes."""

    method = "torch.cuda.max_memory_allocated"

    def __enter__(self):
        import torch
        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()
        self.delta = max(0, self.peak - self.start)
        return False
