"""CAT Pruning inside DiT blocks (SD3 MMDiT joint blocks, Flux double and single blocks).

Through ``dit`` block-replace patches: on a pruned step the block runs on the text tokens and
the selected image tokens (and their RoPE rows on Flux); unselected image tokens get their
input plus the block's cached residual update from the last step that computed them. A full
step runs the block whole and caches its update.
"""
from __future__ import annotations

import torch

from ...pruning_core import cat as cat_core
from .cat_step import call_of
from .model_info import diffusion_model
from .patching import register


def install_cat_dit(model, uid: str, family: str) -> None:
    dm = diffusion_model(model)
    if family == "mmdit":
        blocks = [("double_block", i) for i in range(len(dm.joint_blocks))]
    else:
        blocks = ([("double_block", i) for i in range(len(dm.double_blocks))]
                  + [("single_block", i) for i in range(len(dm.single_blocks))])
    for kind, i in blocks:
        register(model, "dit", cat_dit_block(uid, (kind, i)), kind, i)


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
