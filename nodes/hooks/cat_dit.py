"""CAT Pruning inside DiT blocks (SD3 MMDiT joint blocks; Flux, Chroma and HunyuanVideo double
and single blocks). Wan, Qwen-Image and LTX-Video: :mod:`.cat_dit_kv`.

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
- **Residual update (Flux, Chroma, HunyuanVideo, and SD3.5's MMDiT-X blocks with a second
  image self-attention).** A ``dit`` block-replace patch runs the block on the text tokens and
  the selected image tokens (and their RoPE rows, attention-mask columns and, on HunyuanVideo's
  image-to-video, per-range modulation bounds); unselected image tokens get their input plus the
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
    """``kv_cache=False`` uses the residual-update way on every block (for comparisons).
    ``family``: "mmdit", or "flux" / "chroma" / "hunyuan_video" (double + single blocks; on
    HunyuanVideo the image stream comes first in the joint sequence)."""
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
        register(model, "dit", cat_dit_block(uid, (kind, i), image_first=family == "hunyuan_video"), kind, i)


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


UNPLACED = ("a block saw more image tokens than the latent has (reference latents, e.g. Flux Kontext or "
            "HunyuanVideo's ref_latent): those steps ran in full")


def _remap_modulation_dims(dims, index: torch.Tensor):
    """Token ranges ``(start, end, vec)`` of HunyuanVideo's per-range modulation, moved to the
    positions the kept rows ``index`` (sorted) have in the shortened sequence."""
    if not dims:
        return dims
    bounds = torch.tensor([b for s, e, _ in dims for b in (s, e) if b is not None], device=index.device)
    where = iter(torch.searchsorted(index, bounds).tolist())
    return [(next(where), None if e is None else next(where), v) for s, e, v in dims]


def _short_mask(mask, index: torch.Tensor, length: int):
    """The attention mask of the shortened joint sequence (``index``: its rows of the
    ``length``-token sequence), or None when the mask does not key on that sequence."""
    if mask.shape[-1] != length:
        return None
    mask = mask.index_select(mask.dim() - 1, index)
    if mask.dim() >= 2 and mask.shape[-2] == length:
        mask = mask.index_select(mask.dim() - 2, index)
    elif mask.dim() >= 2 and mask.shape[-2] != 1:
        return None
    return mask


def cat_dit_block(uid: str, block_key, image_first: bool = False):
    """The residual-update ``dit`` replace patch of one double or single block.

    Where the image tokens sit: double blocks get them alone in ``img``; single blocks get the
    joint sequence, text first on Flux/Chroma and image first on HunyuanVideo (``image_first``),
    and the rotary table ``pe`` covers the joint sequence in the same order. The blocks update
    their input in place (``img +=``), so the update is measured against a copy of the input.
    """
    def block(args, extra):
        original = extra["original_block"]
        call = call_of(uid)
        if call is None:
            return original(args)
        img = args["img"]
        n_img, length = call.n_tokens, img.shape[1]
        double = "txt" in args
        if call.unplaced or length < n_img or (double and length != n_img):
            if call.selection is not None and (call.unplaced or length > n_img):
                call.cannot_place(UNPLACED)
            return original(args)
        mask_key = "attention_mask" if "attention_mask" in args else "attn_mask"
        mask = args.get(mask_key)
        if mask is not None and not image_first:  # Flux/Chroma: a masked block runs whole (as before)
            return original(args)
        start = 0 if image_first else length - n_img  # the image rows of ``img``
        cache, selection = call.block_cache(("dit",) + tuple(block_key)), call.selection
        ready = selection is not None and cache.delta is not None and cache.delta.shape == img[:, start:start + n_img].shape
        pe = args.get("pe")
        pe_len = pe.shape[2] if isinstance(pe, torch.Tensor) else None
        if ready:
            dev = selection.device
            rows = selection + start
            index = (torch.cat([rows, torch.arange(start + n_img, length, device=dev)]) if image_first
                     else torch.cat([torch.arange(start, device=dev), rows]))
            pe_start = 0 if image_first else (pe_len - n_img if pe_len is not None else 0)
            joint = None
            if pe_len is not None:
                joint = (torch.cat([selection, torch.arange(n_img, pe_len, device=dev)]) if image_first
                         else torch.cat([torch.arange(pe_start, device=dev), selection + pe_start]))
            if mask is not None:
                mask = _short_mask(mask, joint, pe_len) if joint is not None else None
                if mask is None:
                    ready = False
        if not ready:
            before = img[:, start:start + n_img].clone()
            out = original(args)
            cache.delta = out["img"][:, start:start + n_img] - before
            return out
        short = dict(args)
        short["img"] = img.index_select(1, index)
        before = short["img"][:, start:start + selection.numel()].clone()  # the block adds to it in place
        if joint is not None:  # RoPE rows: text + selected image rows
            short["pe"] = pe.index_select(2, joint)
        if mask is not None:
            short[mask_key] = mask
        for key in ("modulation_dims_img", "modulation_dims"):
            if args.get(key):  # the same ranges in every block of the call: remapped once (a host sync)
                memo = (key, tuple(args[key]), length)
                if memo not in call.memo:
                    call.memo[memo] = _remap_modulation_dims(args[key], selection if double else index)
                short[key] = call.memo[memo]
        out = original(short)
        new_img = out["img"]
        s = selection.numel()
        fresh = new_img[:, start:start + s]
        cache.delta = cat_core.merge_tokens(fresh - before, cache.delta, selection)
        # unselected tokens: their input plus the block's cached update; selected: the fresh output itself
        image = (img[:, start:start + n_img] + cache.delta.to(img.dtype)).index_copy(1, selection, fresh)
        if image_first:
            full = image if length == n_img else torch.cat([image, new_img[:, s:]], dim=1)
        else:
            full = image if not start else torch.cat([new_img[:, :start], image], dim=1)
        result = dict(out)
        result["img"] = full
        return result
    return block
