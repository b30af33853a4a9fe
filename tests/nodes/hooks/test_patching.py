"""The pack's registrations: every function it hands to ComfyUI runs eagerly.

Our input patches pass their plan to the output partner through thread-local objects, which
``torch.compile`` would not replay (see ``hooks.patching.eager``). All registrations go through
``hooks.patching.register``; this test reads back what the patched clone carries — attention patch
lists, DiT block replacements and object patches — on every model family and method setting
that registers something different, so a registration that bypasses the helper fails here.
"""
from __future__ import annotations

import pytest

import tiny_models as tm
from token_pruning_cache.nodes.hooks import patching
from token_pruning_cache.nodes.cat_node import apply_cat
from token_pruning_cache.nodes.dato_node import apply_dato
from token_pruning_cache.nodes.sito_node import apply_sito

CASES = {
    "sito-all-slots": ("micro-sd15", lambda m: apply_sito(m, prune_ratio=0.5, prune_cross_attn=True, prune_mlp=True)),
    "dato": ("micro-sd15", lambda m: apply_dato(m, prune_ratio=0.4)),
    "cat-unet": ("micro-sd15", lambda m: apply_cat(m, keep_ratio=0.3)),
    "cat-mmdit": ("sd3", lambda m: apply_cat(m, keep_ratio=0.3)),
    "cat-flux": ("flux", lambda m: apply_cat(m, keep_ratio=0.3)),
}


def _model(kind: str):
    return tm.micro("sd15") if kind == "micro-sd15" else tm.build(kind)


def registered_functions(patcher) -> dict[str, object]:
    """Every function a ModelPatcher carries for the model's forward: name -> function."""
    found = {}
    to = patcher.model_options.get("transformer_options", {})
    for slot, fns in (to.get("patches") or {}).items():
        for i, fn in enumerate(fns):
            found[f"patches.{slot}[{i}]"] = fn
    for slot, table in (to.get("patches_replace") or {}).items():
        for key, fn in table.items():
            found[f"patches_replace.{slot}.{key}"] = fn
    for name, obj in patcher.object_patches.items():
        if callable(obj) and not isinstance(obj, type) and name.endswith("forward"):
            found[f"object_patches.{name}"] = obj
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_registered_function_is_kept_out_of_compiled_graphs(case):
    kind, apply = CASES[case]
    base = _model(kind)
    assert registered_functions(base) == {}, "the fixture model must start without patches"
    patched = apply(base)
    found = registered_functions(patched)
    assert found, f"{case}: nothing was registered"
    plain = [name for name, fn in found.items() if not getattr(fn, "_torchdynamo_disable", False)]
    assert plain == [], f"{case}: registered without patching.eager: {plain}"
    assert registered_functions(base) == {}, "the input model was modified"


def test_register_rejects_an_unknown_slot():
    with pytest.raises(KeyError):
        patching.register(tm.micro("sd15").clone(), "attn3", lambda *a: a)
