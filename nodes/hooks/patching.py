"""Registration: the only place the pack hands functions to a ``ModelPatcher``.

Every patch of the pack goes through :func:`register` (attention patch slots, object patches,
DiT block replacements) or :func:`add_wrapper` (keyed wrappers of ``comfy.patcher_extension``),
and every wrapped function goes through :func:`eager` first. We never copy a model's
``_forward`` and never take the single-slot ``model_function_wrapper``, so other packs'
patches, ControlNet residuals and LoRA keep working around ours.
"""
from __future__ import annotations

import torch

KEY_PREFIX = "token_pruning_cache"  # wrapper keys: f"{KEY_PREFIX}.{uid}"
ATTACHMENT_KEY = "token_pruning_cache"  # ModelPatcher attachment: list of (uid, method) on this model

_ATTENTION_SLOTS = {
    "attn1": "set_model_attn1_patch", "attn1_output": "set_model_attn1_output_patch",
    "attn2": "set_model_attn2_patch", "attn2_output": "set_model_attn2_output_patch",
}


def eager(fn):
    """Keep one of our patch functions out of ``torch.compile`` graphs (TorchCompileModel).

    Our input patches hand their plan to the output partner through thread-local objects.
    Dynamo does not replay such writes inside a compiled region, so the partner would read a
    stale plan. Running the patch functions eagerly (a graph break around each) keeps them
    right, and the model's own layers still compile. Feature-detected: torch without
    ``torch.compiler.disable`` cannot compile ComfyUI models anyway.
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return fn if disable is None else disable(fn)


def register(model, slot: str, fn, *where):
    """Hand one of our functions to ComfyUI. Returns the registered (eager) function.

    ``slot``: an attention slot (``attn1``, ``attn1_output``, ``attn2``, ``attn2_output``),
    ``"object"`` (``where`` = the attribute path of an object patch) or ``"dit"`` (``where`` =
    block kind and index of a DiT block-replace patch).
    """
    fn = eager(fn)
    if slot == "object":
        model.add_object_patch(where[0], fn)
    elif slot == "dit":
        model.set_model_patch_replace(fn, "dit", *where)
    else:
        getattr(model, _ATTENTION_SLOTS[slot])(fn)
    return fn


def wrapper_kinds():
    """ComfyUI's wrapper kinds (``WrappersMP``): OUTER_SAMPLE, CALC_COND_BATCH, APPLY_MODEL, ..."""
    import comfy.patcher_extension as pe
    return pe.WrappersMP


def add_wrapper(model, kind: str, uid: str, fn) -> None:
    """A keyed wrapper of patch ``uid`` (one key per patch, so several of ours can stack)."""
    model.add_wrapper_with_key(kind, f"{KEY_PREFIX}.{uid}", fn)


def attach(model, uid: str, method: str) -> None:
    """Note on ``model`` that patch ``uid`` of ``method`` is installed (read by the preview node)."""
    attached = list(model.get_attachment(ATTACHMENT_KEY) or [])
    model.set_attachments(ATTACHMENT_KEY, attached + [(uid, method)])


def attached(model) -> list[tuple[str, str]]:
    return list(model.get_attachment(ATTACHMENT_KEY) or [])
