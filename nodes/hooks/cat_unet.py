"""CAT Pruning inside UNet transformer blocks (SD1.x, SD2.x, SDXL).

On a pruned step, the blocks of the eligible levels run attention and feed-forward on the
selected tokens only (a coarser level on the selection carried to it); unselected tokens get
their cached attention / feed-forward outputs. Self-attention keys and values are the official
K/V cache: the fresh selected tokens merged into the block's cached ``norm1`` input, and only
the selected tokens are projected (``to_k``/``to_v`` object patches merge them into the cached
projections). A full step runs every token and fills the caches. Conv blocks always run whole.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ...pruning_core import cat as cat_core
from .block_pruning import grid_of_call
from .cat_step import BlockCache, call_of
from .model_info import transformer_block_paths
from .patching import register
from .run import CHANGED_BEFORE, PATCH_AFTER


@dataclass(frozen=True)
class Pending:
    """What an input patch left for its output partner in the same block call."""

    cache: BlockCache
    selection: torch.Tensor | None  # None: this call runs whole (and fills the cache)
    n_tokens: int


class _PendingBlock(threading.local):
    """The block call being executed on this thread."""

    attn1: Pending | None = None
    attn2: Pending | None = None
    kv: torch.Tensor | None = None  # the exact K/V input our attn1 patch handed to self-attention


def install_cat_unet(model, uid: str, max_downsample: int) -> None:
    pending = _PendingBlock()

    def key(extra, name):
        return (name, tuple(extra.get("block") or ()), extra.get("block_index", 0))

    def attn1_in(n, context, value, extra):
        pending.attn1 = pending.kv = None
        call = call_of(uid)
        eligible, selection = call.level(n.shape[1]) if call is not None else (False, None)
        if not eligible:
            if call is not None and n.dim() == 3 and grid_of_call(n.shape[1], extra) is None:
                call.state.skip(CHANGED_BEFORE)
            return n, context, value
        cache = call.block_cache(key(extra, "attn1"))
        sel = selection if cache.ready(n, selection, ("kv", "out")) else None
        pending.attn1 = Pending(cache, sel, n.shape[1])
        if sel is None:
            if context is n:
                cache.kv = pending.kv = n  # full step: the K/V projections fill their caches
            return n, context, value
        q = cat_core.gather_tokens(n, sel)
        if context is not n:  # someone else changed K/V: leave them alone, prune the queries only
            return q, context, value
        kv = cat_core.merge_tokens(q, cache.kv, sel)
        cache.kv = pending.kv = kv
        return q, kv, kv

    def finish(slot: Pending | None, n):
        """Output patch: merge this block call's pending slot (set by the input patch) into its cache."""
        if slot is None:
            return n
        if n.shape[1] != (slot.n_tokens if slot.selection is None else slot.selection.numel()):
            # a patch after ours shortened the sequence and its output patch has not restored it
            call_of(uid).state.skip(PATCH_AFTER)
            return n
        return slot.cache.merge("out", n, slot.selection, slot.n_tokens)

    def attn1_out(n, extra):
        slot, pending.attn1, pending.kv = pending.attn1, None, None
        return finish(slot, n)

    def attn2_in(n, context, value, extra):
        pending.attn2 = None
        call = call_of(uid)
        eligible, selection = call.level(n.shape[1]) if call is not None else (False, None)
        if not eligible or call.keep_attn2:
            return n, context, value
        cache = call.block_cache(key(extra, "attn2"))
        sel = selection if cache.ready(n, selection, ("out",)) else None
        pending.attn2 = Pending(cache, sel, n.shape[1])
        return (n if sel is None else cat_core.gather_tokens(n, sel)), context, value

    def attn2_out(n, extra):
        slot, pending.attn2 = pending.attn2, None
        return finish(slot, n)

    for slot, fn in (("attn1", attn1_in), ("attn1_output", attn1_out), ("attn2", attn2_in), ("attn2_output", attn2_out)):
        register(model, slot, fn)
    for path in transformer_block_paths(model, max_downsample):
        name = f"diffusion_model.{path}.ff.forward"
        register(model, "object", _cat_ff(model.get_model_object(name), uid, path), name)
        for proj in ("to_k", "to_v"):
            name = f"diffusion_model.{path}.attn1.{proj}.forward"
            register(model, "object", _cat_kv_projection(model.get_model_object(name), pending, proj), name)


def _cat_kv_projection(original, pending: _PendingBlock, proj: str):
    """Self-attention ``to_k``/``to_v`` of an eligible block: on a pruned step only the selected
    tokens are projected and the others' keys/values come from the block's cache; a full step
    projects every token and fills the cache. Anything but the exact K/V tensor our input patch
    handed over (another pack changed it) runs as usual. The block's cache and selection are
    those its attn1 input patch left in ``pending.attn1``."""
    def forward(x):
        if pending.kv is not x:  # set together with pending.attn1 by the attn1 input patch
            return original(x)
        return pending.attn1.cache.recompute(proj, original, x, pending.attn1.selection)
    return forward


def _cat_ff(original, uid: str, path: str):
    def forward(x):
        call = call_of(uid)
        if call is None or x.dim() != 3:
            return original(x)
        eligible, selection = call.level(x.shape[1])
        if not eligible:
            return original(x)
        return call.block_cache(("ff", path)).recompute("out", original, x, selection)
    return forward
