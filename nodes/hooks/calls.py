"""What a hook can learn about the model call it runs in, and how a wrapper tells the hooks
deeper in the model about it.

ComfyUI calls the model once per batch of conds ("chunk"): cond and uncond together or apart,
area conds on crops. A *chunk key* names the rows of one call, so a cache never hands one
chunk's tensors to another. A wrapper that knows something about the call (the step's CAT
selection, DaTo's shallow depth) publishes it in a :class:`CallSlot` for the duration of the
call; patches inside the model read ``slot.current``.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Generic, Iterator, TypeVar

import torch

T = TypeVar("T")


class CallSlot(threading.local, Generic[T]):
    """The call this thread is executing (multi-GPU runs cond batches in threads).

    ``with slot.entered(call): ...`` publishes ``call`` and restores what was there before,
    also when the model raises; nested calls (a model inside a model) stack.
    """

    def __init__(self):
        self.current: T | None = None

    @contextmanager
    def entered(self, call: T) -> Iterator[T]:
        previous, self.current = self.current, call
        try:
            yield call
        finally:
            self.current = previous


def chunk_key(transformer_options: dict) -> tuple:
    """The rows of this model call: the cond uuids, else the cond/uncond flags."""
    uuids = transformer_options.get("uuids")
    if uuids:
        return tuple(str(u) for u in uuids)
    return tuple(transformer_options.get("cond_or_uncond") or ())


def cond_rows(batch: int, cond_or_uncond) -> list[int]:
    """Rows of a model call that belong to cond chunks (all rows when unknown)."""
    if not cond_or_uncond:
        return list(range(batch))
    per = batch // len(cond_or_uncond)
    return [i * per + r for i, c in enumerate(cond_or_uncond) if c == 0 for r in range(per)]


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]`` along the batch: the tensor itself or a slice when the rows are one run
    (a CFG batch's cond half), so that no index list is copied to the device (a host sync on a GPU)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x if len(rows) == x.shape[0] else x[rows[0]:rows[0] + len(rows)]
    return x[rows]


def transformer_options_of(args, kwargs) -> dict:
    """``transformer_options`` of a wrapped model call (keyword, else the last dict argument)."""
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict):
            return a
    return {}


def latent_of(args, kwargs) -> torch.Tensor | None:
    """The latent of a wrapped model call; None when it is not a plain tensor (newer ComfyUI may
    pass a list of tensors for audio+video models, which we do not cache)."""
    x = args[0] if args else kwargs.get("x")
    return x if isinstance(x, torch.Tensor) else None
