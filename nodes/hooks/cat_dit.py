"""CAT Pruning inside DiT blocks (SD3 MMDiT joint blocks, Flux double and single blocks).

Two ways, chosen per block by what the block offers (feature detection):

- **K/V cache (official; SD3 joint blocks).** Object patches on the image stream's
  ``attn.pre_attention``, ``attn.post_attention`` and ``mlp``: on a pruned step the Q/K/V
  projection, the output projection and the feed-forward run on the selected image tokens
  only; the keys and values of the other image tokens come from the block's cache (fresh for
  the selected, the last computed value for the rest), so the selected image tokens and every
  text token attend to all image tokens. Unselected tokens get their cached attention and
  feed-forward outputs, scaled by this step's modulation gates and added to their current
  input: norms, modulation, gates and residual adds run on every token, as in the official code.
  A full step runs everything and fills the caches.
- **Residual update (Flux, and SD3.5's MMDiT-X blocks with a second image self-attention).**
  A ``dit`` block-replace patch runs the block on the text tokens and the selected image
  tokens (and their RoPE rows on Flux); unselected image tokens get their input plus the
  block's cached residual update from the last step that computed them. The attention of a
  pruned block then sees only the selected image keys, and unselected tokens keep an earlier
  step's gates: a deviation from the official code, kept where the block's attention cannot be
  reached without copying its forward (Flux applies RoPE to queries and keys together).
"""
from __future__ import annotations

import threading

import torch

from ...pruning_core import cat as cat_core
from .cat_step import CATCall, call_of
from .model_info import diffusion_model
from .patching import register


def install_cat_dit(model, uid: str, family: str, kv_cache: bool = True) -> None:
    """``kv_cache=False`` uses the residual-update way on every block (for comparisons)."""
    dm = diffusion_model(model)
    if family == "mmdit":
        blocks = []
        for i, joint in enumerate(dm.joint_blocks):
            if kv_cache and _has_kv_cache_points(joint.x_block):
                _install_joint_kv_cache(model, uid, i)
            else:
                blocks.append(("double_block", i))
    else:
        blocks = ([("double_block", i) for i in range(len(dm.double_blocks))]
                  + [("single_block", i) for i in range(len(dm.single_blocks))])
    for kind, i in blocks:
        register(model, "dit", cat_dit_block(uid, (kind, i)), kind, i)


def _has_kv_cache_points(x_block) -> bool:
    """An SD3 image stream whose attention and feed-forward can be reached as sub-modules."""
    attn = getattr(x_block, "attn", None)
    return (not getattr(x_block, "x_block_self_attn", False) and not getattr(x_block, "pre_only", True)
            and hasattr(attn, "pre_attention") and hasattr(attn, "post_attention")
            and isinstance(getattr(x_block, "mlp", None), torch.nn.Module))


class _PendingJoint(threading.local):
    """The selection of the joint block call running on this thread, from ``pre_attention`` to
    ``mlp`` (None: this call runs every token and fills the caches)."""

    call: CATCall | None = None
    selection: torch.Tensor | None = None


def _install_joint_kv_cache(model, uid: str, index: int) -> None:
    path = f"diffusion_model.joint_blocks.{index}.x_block"
    pending = _PendingJoint()
    attn_key, mlp_key = ("dit-attn", index), ("dit-mlp", index)
    pre_original = model.get_model_object(f"{path}.attn.pre_attention")
    post_original = model.get_model_object(f"{path}.attn.post_attention")
    mlp_original = model.get_model_object(f"{path}.mlp.forward")

    def pre_attention(x):
        pending.call = pending.selection = None
        call = call_of(uid)
        if call is None or x.dim() != 3 or x.shape[1] != call.n_tokens:
            return pre_original(x)
        pending.call = call
        cache, mlp_cache, sel = call.block_cache(attn_key), call.block_cache(mlp_key), call.selection
        if not (cache.ready(x, sel, ("to_k", "to_v", "out")) and mlp_cache.ready(x, sel, ("out",))):
            sel = None  # run every token and fill the caches
        pending.selection = sel
        q, k, v = pre_original(x if sel is None else cat_core.gather_tokens(x, sel))
        # keys/values of every image token: fresh for the selected, the cached ones for the rest
        return q, cache.merge("to_k", k, sel, x.shape[1]), cache.merge("to_v", v, sel, x.shape[1])

    def post_attention(attn):
        call, sel = pending.call, pending.selection
        out = post_original(attn)
        return out if call is None else call.block_cache(attn_key).merge("out", out, sel, call.n_tokens)

    def mlp(x):
        call, sel = pending.call, pending.selection
        pending.call = pending.selection = None
        if call is None or x.dim() != 3 or x.shape[1] != call.n_tokens:
            return mlp_original(x)
        out = mlp_original(x if sel is None else cat_core.gather_tokens(x, sel))
        return call.block_cache(mlp_key).merge("out", out, sel, call.n_tokens)

    register(model, "object", pre_attention, f"{path}.attn.pre_attention")
    register(model, "object", post_attention, f"{path}.attn.post_attention")
    register(model, "object", mlp, f"{path}.mlp.forward")


def cat_dit_block(uid: str, block_key):
    def block(args, extra):
        original = extra["original_block"]
        call = call_of(uid)
        if call is None:
            return original(args)
        img = args["img"]
        n_img = call.n_tokens
        offset = img.shape[1] - n_img  # Flux single blocks see cat(txt, img)
        cache, selection = call.block_cache(("dit",) + tuple(block_key)), call.selection
        if offset < 0 or (offset > 0 and "txt" in args) or args.get("attn_mask") is not None:
            return original(args)
        ready = selection is not None and cache.delta is not None and cache.delta.shape == img[:, offset:].shape
        if not ready:
            out = original(args)
            cache.delta = out["img"][:, offset:] - img[:, offset:]
            return out
        index = torch.cat([torch.arange(offset, device=selection.device), selection + offset])
        short = dict(args)
        short["img"] = img.index_select(1, index)
        pe = args.get("pe")
        if isinstance(pe, torch.Tensor):  # Flux RoPE rows, [B, 1, txt + img, ...]: keep text + selected image rows
            text = pe.shape[2] - n_img
            short["pe"] = pe.index_select(2, torch.cat([torch.arange(text, device=pe.device), selection + text]))
        out = original(short)
        new_img = out["img"]
        fresh = new_img[:, offset:]
        cache.delta = cat_core.merge_tokens(fresh - short["img"][:, offset:], cache.delta, selection)
        # unselected tokens: their input plus the block's cached update; selected: the fresh output itself
        image = (img[:, offset:] + cache.delta.to(img.dtype)).index_copy(1, selection, fresh)
        full = image if not offset else torch.cat([new_img[:, :offset], image], dim=1)
        result = dict(out)
        result["img"] = full
        return result
    return block
