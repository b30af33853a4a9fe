"""CAT's official K/V cache inside DiT blocks reached through their sub-modules: Wan 2.x,
Qwen-Image and LTX-Video (docs/dit-families.md).

These blocks call their self-attention, cross-attention and feed-forward as sub-modules and
hand the self-attention its rotary table and ``transformer_options`` as arguments, so the
official design fits without copying a forward:

- the block itself runs on every token: norms, modulation (per-token or per-frame timesteps
  included: Wan 2.2 TI2V, LTX-Video image-to-video), gates and residual adds;
- **self-attention** (object patch on its ``forward``): called with the selected rows of its
  input and of the rotary table. Its own Q/K/V projections, q/k norms and RoPE run on those
  rows; an attention override handed in through a per-call copy of ``transformer_options``
  (chained to any override already there) widens the keys and values to every image token:
  fresh for the selected, from the block's cache for the rest. So the selected queries (and,
  on Qwen-Image, every text query) attend to all image tokens, as officially. Its output
  projection runs on the selected rows and is merged into the block's cache of attention
  outputs: an unselected token gets its cached output, under this step's gate;
- **cross-attention and feed-forward** (object patches): token-wise, so they run on the
  selected rows and are merged into their caches;
- tokens the pruning must never drop are always among the computed rows: the text stream
  (never pruned: it is not the latent), frames the sampler keeps fixed (a denoise mask of 0:
  Wan 2.2 TI2V's start image, LTX-Video's conditioning frames; chosen by the step wrapper) and
  Qwen-Image-Edit's reference-latent tokens (after the latent's tokens in the image stream).

A call with an attention mask on the self-attention, or whose shapes do not match the cache,
runs its sub-module on every token and refills the cache. A full step runs everything and
fills every cache.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .cat_step import CATCall, call_of
from .patching import register


@dataclass(frozen=True)
class KVLayout:
    """Where one family's block keeps its sub-modules and how its self-attention is called."""

    blocks: str  # ModuleList of the diffusion model
    attn: str  # self-attention sub-module
    x_param: str  # its token input
    pe_param: str  # its rotary table
    pe_dim: int  # token dim of the rotary table
    kv_dim: int  # token dim of q/k/v in the attention call
    rowwise: tuple[str, ...]  # token-wise sub-modules: cross-attention, feed-forward
    text_param: str | None = None  # joint attention: the text stream, whose tokens come first
    mask_param: str | None = None  # an attention-mask parameter; a call with a mask runs whole
    pair: bool = False  # the self-attention returns (image, text)
    marker: str = ""  # an attribute of the self-attention that tells this family apart
    extra_after: bool = False  # image-stream tokens beyond the latent's come after them (always computed)


LAYOUTS = {
    # WanSelfAttention.forward(x, freqs, transformer_options); freqs [1, L, 1, d/2, 2, 2];
    # q/k/v [B, L, heads*dim]; WanAttentionBlock: cross_attn(norm3(x), context, ...), ffn(...)
    "wan": KVLayout("blocks", "self_attn", "x", "freqs", 1, 1, ("cross_attn", "ffn")),
    # Attention.forward(hidden_states, encoder_hidden_states, ..., image_rotary_emb, transformer_options);
    # rotary table [B, 1, txt + img, ...]; q/k/v [B, heads, txt + img, dim]; img_mlp(...)
    "qwen_image": KVLayout("transformer_blocks", "attn", "hidden_states", "image_rotary_emb", 2, 2, ("img_mlp",),
                           text_param="encoder_hidden_states", mask_param="attention_mask", pair=True,
                           marker="add_q_proj", extra_after=True),
    # CrossAttention.forward(x, context, mask, pe, transformer_options); pe [B, 1, N, ...];
    # q/k/v [B, N, heads*dim]; BasicTransformerBlock: attn2(x, context, mask), ff(...)
    "ltxv": KVLayout("transformer_blocks", "attn1", "x", "pe", 2, 1, ("attn2", "ff"), mask_param="mask"),
}


def _forward_signature(module) -> inspect.Signature:
    """The signature of the module class's own ``forward`` without ``self`` (an object patch on
    the instance, ours from an earlier run included, may take ``*args, **kwargs``)."""
    sig = inspect.signature(type(module).forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _patchable(block, layout: KVLayout) -> bool:
    attn = getattr(block, layout.attn, None)
    if not isinstance(attn, torch.nn.Module) or (layout.marker and not hasattr(attn, layout.marker)):
        return False
    if not all(isinstance(getattr(block, name, None), torch.nn.Module) for name in layout.rowwise):
        return False
    params = _forward_signature(attn).parameters
    wanted = {layout.x_param, layout.pe_param, "transformer_options"} | ({layout.text_param} - {None})
    return wanted <= set(params)


def kv_layout(dm) -> str | None:
    """The family of ``dm`` whose blocks have the sub-modules of the K/V-cache path, or None."""
    for family, layout in LAYOUTS.items():
        blocks = getattr(dm, layout.blocks, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and all(_patchable(b, layout) for b in blocks):
            if family == "wan" and not hasattr(dm, "patch_embedding"):
                continue
            if family == "ltxv" and not hasattr(dm, "patchifier"):
                continue
            return family
    return None


UNPLACED = ("the blocks saw image tokens the latent does not account for (e.g. Wan's reference_latent or "
            "time_dim_concat, S2V/Animate motion frames): those calls ran in full")


def install_cat_dit_kv(model, uid: str, family: str) -> int:
    """Object-patch every block of ``family``; returns the number of blocks patched."""
    layout = LAYOUTS[family]
    dm = model.get_model_object("diffusion_model")
    blocks = getattr(dm, layout.blocks)
    for i in range(len(blocks)):
        path = f"diffusion_model.{layout.blocks}.{i}"
        _install_attention(model, uid, layout, path, i)
        for name in layout.rowwise:
            _install_rowwise(model, uid, layout, f"{path}.{name}", ("dit-row", i, name))
    return len(blocks)


def _placed(call: CATCall, layout: KVLayout, x) -> bool:
    """Whether this call's selection can be placed on the image stream ``x``: as many tokens as
    the latent, or (Qwen-Image-Edit) extra tokens after them. Otherwise the rest of the call runs
    whole (:meth:`CATCall.cannot_place`)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] < call.n_tokens:
        return False
    if call.unplaced or (x.shape[1] > call.n_tokens and not layout.extra_after):
        if call.selection is not None:
            call.cannot_place(UNPLACED)
        return False
    return True


def _computed(call: CATCall, n_img: int) -> torch.Tensor:
    """Rows of an ``n_img``-token image stream this pruned call computes: the selection (the
    step wrapper already added the frames the sampler keeps fixed) plus every token after the
    latent's (Qwen-Image-Edit's reference latents)."""
    if n_img == call.n_tokens:
        return call.selection
    extra = torch.arange(call.n_tokens, n_img, device=call.selection.device)
    return torch.cat([call.selection, extra])


def _kv_ready(cache, x: torch.Tensor) -> bool:
    return all(t is not None and t.shape[0] == x.shape[0] and t.shape[1] == x.shape[1]
               for t in (cache.to_k, cache.to_v, cache.out))


def _attention_override(previous, cache, index, text: int, dim: int):
    """Widen the attention's keys and values to every image token (fresh for ``index``, cached
    for the rest) and store them; ``index`` None: a full call, the keys/values are stored as
    they are. Chains to ``previous`` (another pack's override) or calls the attention itself."""

    def widen(t: torch.Tensor, slot: str) -> torch.Tensor:
        img = t.narrow(dim, text, t.shape[dim] - text).movedim(dim, 1)  # [B, tokens, ...] view
        if index is not None:
            img = getattr(cache, slot).index_copy(1, index, img.to(getattr(cache, slot).dtype))
        setattr(cache, slot, img)
        img = img.movedim(1, dim)
        return img if not text else torch.cat([t.narrow(dim, 0, text), img.to(t.dtype)], dim=dim)

    def override(func, q, k, v, *args, **kwargs):
        expected = text + (index.numel() if index is not None else k.shape[dim] - text)
        if k.shape[dim] == expected and k.shape[dim] == v.shape[dim]:
            k, v = widen(k, "to_k"), widen(v, "to_v")
        if previous is not None:
            return previous(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)

    return override


def _install_attention(model, uid: str, layout: KVLayout, path: str, index: int) -> None:
    original = model.get_model_object(f"{path}.{layout.attn}.forward")
    signature = _forward_signature(model.get_model_object(f"{path}.{layout.attn}"))
    key = ("dit-kv", index)

    def attention(*args, **kwargs):
        call = call_of(uid)
        if call is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        x = a.get(layout.x_param)
        if not _placed(call, layout, x):
            return original(*args, **kwargs)
        n_img = x.shape[1]
        cache = call.block_cache(key)
        text = a[layout.text_param].shape[1] if layout.text_param else 0
        masked = layout.mask_param is not None and a.get(layout.mask_param) is not None
        rows = None
        if call.selection is not None and not masked and _kv_ready(cache, x):
            rows = _computed(call, n_img)
        to = a.get("transformer_options") or {}
        a["transformer_options"] = {**to, "optimized_attention_override": _attention_override(
            to.get("optimized_attention_override"), cache, rows, text, layout.kv_dim)}
        if rows is not None:
            a[layout.x_param] = x.index_select(1, rows)
            pe = a.get(layout.pe_param)
            if isinstance(pe, torch.Tensor):
                pe_rows = rows + text if not text else torch.cat([torch.arange(text, device=rows.device), rows + text])
                a[layout.pe_param] = pe.index_select(layout.pe_dim, pe_rows)
        out = original(*bound.args, **bound.kwargs)
        img = out[0] if layout.pair else out
        full = cache.merge("out", img, rows, n_img)
        return (full,) + tuple(out[1:]) if layout.pair else full

    register(model, "object", attention, f"{path}.{layout.attn}.forward")


def _install_rowwise(model, uid: str, layout: KVLayout, path: str, key) -> None:
    original = model.get_model_object(f"{path}.forward")

    def rowwise(x, *args, **kwargs):
        call = call_of(uid)
        if call is None or not _placed(call, layout, x):
            return original(x, *args, **kwargs)
        cache = call.block_cache(key)
        rows = _computed(call, x.shape[1]) if cache.ready(x, call.selection, ("out",)) else None
        out = original(x if rows is None else x.index_select(1, rows), *args, **kwargs)
        return cache.merge("out", out, rows, x.shape[1])

    register(model, "object", rowwise, f"{path}.forward")
