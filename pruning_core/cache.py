"""A per-run feature cache: tensors keyed by (chunk key, slot name).

- *chunk key*: identifies which rows a model call computes — the tuple of the cond/uncond
  uuids ComfyUI passes in ``transformer_options["uuids"]`` (see :func:`chunk_key`). A CFG
  run may evaluate cond and uncond together or in separate calls; each combination gets
  its own entries, so one never reads the other's features.
- *slot*: what was stored, e.g. ``"deep:output_blocks.1"`` or ``"eps"``.

Reads state what they expect (shape, dtype, device); a stored tensor that does not match
is answered with ``None`` — "not cached, compute it" — never with a wrong tensor (batch
size, resolution or dtype can change between calls of one run, e.g. a final smaller batch).

Tensors are stored by reference, not copied: callers must not modify them in place.
One instance lives for one sampling run; ``clear()`` (or a new instance) starts over.
"""
from __future__ import annotations

from typing import Hashable, Iterable

import torch


def chunk_key(uuids: Iterable | None) -> tuple:
    """The cache key of a model call from its ``uuids`` (any iterable; None → empty tuple)."""
    return tuple(str(u) for u in uuids) if uuids is not None else ()


def _same_device(a: torch.device, b: torch.device | str) -> bool:
    b = torch.device(b)
    # "cuda" (no index) matches any cuda device; otherwise the index must match
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class FeatureCache:
    """``{(chunk, slot): tensor}`` with checked reads."""

    def __init__(self):
        self._store: dict[tuple[Hashable, str], torch.Tensor] = {}

    def put(self, chunk: Hashable, slot: str, value: torch.Tensor) -> None:
        self._store[(chunk, slot)] = value

    def get(self, chunk: Hashable, slot: str, *, shape=None, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> torch.Tensor | None:
        """The stored tensor, or None if absent or if it differs from any given expectation."""
        value = self._store.get((chunk, slot))
        if value is None:
            return None
        if shape is not None and tuple(value.shape) != tuple(shape):
            return None
        if dtype is not None and value.dtype != dtype:
            return None
        if device is not None and not _same_device(value.device, device):
            return None
        return value

    def get_like(self, chunk: Hashable, slot: str, like: torch.Tensor) -> torch.Tensor | None:
        """:meth:`get` expecting the shape, dtype and device of ``like``."""
        return self.get(chunk, slot, shape=like.shape, dtype=like.dtype, device=like.device)

    def drop(self, chunk: Hashable, slot: str | None = None) -> None:
        """Forget one slot of a chunk, or the whole chunk when ``slot`` is None."""
        if slot is not None:
            self._store.pop((chunk, slot), None)
        else:
            for key in [k for k in self._store if k[0] == chunk]:
                del self._store[key]

    def clear(self) -> None:
        self._store.clear()

    def __contains__(self, key: tuple[Hashable, str]) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def nbytes(self) -> int:
        """Memory held, for logs (tensors shared between slots are counted once per slot)."""
        return sum(v.numel() * v.element_size() for v in self._store.values())
