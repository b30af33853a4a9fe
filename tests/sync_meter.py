"""Host synchronisations of a sampling run, counted on the CPU and attributed to where they happen.

On a CUDA device the host waits for the GPU whenever Python needs a tensor's *value* (``.item()``,
``bool(t)``, ``if t > 0:``, ``int(t)``, indexing with a 0-d tensor), whenever an output's *shape*
depends on values (``nonzero``, boolean-mask indexing, ``bincount``, ``unique``,
``masked_select``, ``repeat_interleave`` with tensor repeats) and whenever a tensor is copied to
the host (``.cpu()``, ``.tolist()``, ``.numpy()``, ``.to("cpu")``). On the CPU none of these
stall anything, which is why they are easy to add without noticing. ``SyncMeter`` records them
during a run on the CPU:

* a ``TorchDispatchMode`` sees every aten op, also the ones torch calls from C++ on the
  caller's behalf (``Tensor.__getitem__`` with a 0-d index reads it with ``_local_scalar_dense``;
  ``x[mask]`` is ``aten.index`` with a bool index, which runs ``nonzero`` inside);
* a ``TorchFunctionMode`` sees the host copies, which are no-ops on a CPU tensor and never reach
  the dispatcher: ``.cpu()``, ``.tolist()``, ``.numpy()`` and ``.to(...)`` naming the CPU by
  string. A ``.to(other.device)`` looks the same on the CPU whether it will be a copy on a GPU or
  not, so it is not counted: a host-to-device copy of a tensor the code made on the CPU is the
  one kind of sync this meter cannot see.

Each sync is attributed from the Python stack at the moment it happens:

* ``step``: the sampler step it belongs to (the sampler's callback fires after each step; the
  syncs before the first callback are step 0, those after the last one are ``steps`` = the end
  of the run);
* ``in_block``: True when one of the block-level patch functions of the sampled model is on the
  stack (attention patches, object patches, DiT block replacements: what ``block_functions``
  reads from the ModelPatcher); False for the per-step wrappers and everything else;
* ``owner``: the file that asked for it: the innermost frame outside torch and the standard
  library ("pack" for this repository's nodes/ and pruning_core/, "comfy" for ComfyUI, "test"
  for the tests' own code, "other").
"""
from __future__ import annotations

import inspect
import os
import sys
import sysconfig
import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_PACK_DIRS = tuple(str(ROOT / d) + os.sep for d in ("nodes", "pruning_core"))
_TESTS_DIR = str(ROOT / "tests") + os.sep
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_STDLIB_DIRS = tuple({str(Path(sysconfig.get_paths()[k]).resolve()) + os.sep for k in ("stdlib", "platstdlib")})
_THIS_FILE = str(Path(__file__).resolve())

# aten ops that read a value back to the host or whose output shape depends on values
_VALUE_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}
_SHAPE_OPS = {"nonzero", "bincount", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
              "masked_select", "argwhere", "histc"}
# function-level host copies (invisible to the dispatcher on a CPU tensor)
_COPY_METHODS = {"cpu", "tolist", "numpy"}


@dataclass(frozen=True)
class Sync:
    kind: str  # the op, e.g. "_local_scalar_dense", "nonzero", "index(bool)", "cpu", "to(cpu)"
    step: int
    in_block: bool
    owner: str  # "pack" | "comfy" | "test" | "other"
    where: str  # "file:line function" of the innermost frame outside torch / stdlib

    def __str__(self) -> str:
        scope = "block" if self.in_block else "outside blocks"
        return f"step {self.step}: {self.kind} ({self.owner}, {scope}) at {self.where}"


@lru_cache(maxsize=1)
def _comfy_dir() -> str:
    import comfy.model_management  # the ComfyUI tree that is imported (``comfy`` has no __init__ file)
    return str(Path(comfy.model_management.__file__).resolve().parents[1]) + os.sep


@lru_cache(maxsize=None)
def _real_file(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except OSError:
        return filename


def _owner(path: str) -> str:
    if path.startswith(_PACK_DIRS):
        return "pack"
    if path.startswith(_comfy_dir()):
        return "comfy"
    if path.startswith(_TESTS_DIR):
        return "test"
    return "other"


def block_functions(patcher) -> set:
    """Code objects of the block-level patch functions installed on ``patcher``: attention patches
    (``transformer_options["patches"]``), replace patches (``patches_replace``: DiT blocks,
    attention replacements) and object patches (function-valued ones)."""
    to = patcher.model_options.get("transformer_options", {})
    fns = []
    for patches in (to.get("patches") or {}).values():
        fns.extend(patches)
    for table in (to.get("patches_replace") or {}).values():
        fns.extend(table.values())
    fns.extend(fn for fn in patcher.object_patches.values() if callable(fn) and not isinstance(fn, torch.nn.Module))
    codes = set()
    for fn in fns:
        fn = inspect.unwrap(fn)
        fn = getattr(fn, "_torchdynamo_orig_callable", fn)
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.add(code)
    return codes


class _Dispatch(TorchDispatchMode):
    def __init__(self, meter: "SyncMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        kind = None
        if name in _VALUE_OPS or name in _SHAPE_OPS:
            kind = name
        elif name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor) \
                and kwargs.get("output_size") is None and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
            kind = "repeat_interleave(tensor repeats)"
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                kind = f"{name}(bool mask)"
        if kind is not None:
            self.meter.record(kind)
        return func(*args, **kwargs)


def _names_cpu(value) -> bool:
    if isinstance(value, str):
        return value.split(":")[0] == "cpu"
    return False


class _Function(TorchFunctionMode):
    def __init__(self, meter: "SyncMeter"):
        super().__init__()
        self.meter = meter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _COPY_METHODS and args and isinstance(args[0], torch.Tensor) and \
                getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase.", "_TensorBase.")):
            self.meter.record(name)
        elif name == "to" and args and isinstance(args[0], torch.Tensor):
            if any(_names_cpu(a) for a in args[1:]) or _names_cpu(kwargs.get("device")):
                self.meter.record("to(cpu)")
        return func(*args, **kwargs)


class SyncMeter:
    """Records the host syncs of what runs inside ``with meter:`` (this thread only).

    ``meter.callback`` is a sampler callback that advances the step; ``meter.blocks`` the code
    objects of the block-level patch functions (:func:`block_functions`).
    """

    def __init__(self, blocks: set | None = None):
        self.blocks = blocks or set()
        self.syncs: list[Sync] = []
        self.step = 0
        self._thread = None
        self._modes = None

    def callback(self, step, *rest):
        self.step = int(step) + 1

    def record(self, kind: str) -> None:
        if threading.get_ident() != self._thread:
            return
        frame = sys._getframe(2)
        in_block, owner, where = False, None, "?"
        while frame is not None:
            code = frame.f_code
            if code in self.blocks:
                in_block = True
            if owner is None:
                path = _real_file(code.co_filename)
                if not (path.startswith(_TORCH_DIR) or path.startswith(_STDLIB_DIRS) or path == _THIS_FILE
                        or path.startswith("<")):
                    owner = _owner(path)
                    rel = os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path
                    where = f"{rel}:{frame.f_lineno} {code.co_name}"
            frame = frame.f_back
        self.syncs.append(Sync(kind, self.step, in_block, owner or "other", where))

    def __enter__(self):
        self._thread = threading.get_ident()
        self._modes = (_Dispatch(self), _Function(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._thread = None
        return False

    # ------------------------------------------------------------------ views
    def of(self, owner: str | None = None, in_block: bool | None = None, steps=None) -> list[Sync]:
        return [s for s in self.syncs if (owner is None or s.owner == owner)
                and (in_block is None or s.in_block == in_block) and (steps is None or s.step in steps)]

    def per_step(self, owner: str | None = None, in_block: bool | None = None) -> Counter:
        return Counter(s.step for s in self.of(owner, in_block))
