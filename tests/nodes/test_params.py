"""Each node parameter is declared once (nodes/params.py): the schema, the apply function and
validation read the same table."""
from __future__ import annotations

import inspect

import pytest

from token_pruning_cache.nodes import cat_node, dato_node, sito_node

NODES = {"sito": (sito_node, sito_node.SiToTokenPruning), "dato": (dato_node, dato_node.DaToPruneCache),
         "cat": (cat_node, cat_node.CATPruneCache)}


@pytest.mark.parametrize("method", list(NODES))
def test_the_schema_shows_the_table(method):
    module, node = NODES[method]
    schema = {i.id: i for i in node.define_schema().inputs if i.id != "model"}
    widgets = [p for p in module.PARAMS.params if p.widget]
    assert list(schema) == [p.id for p in widgets]
    for p in widgets:
        assert schema[p.id].default == p.default, p.id


@pytest.mark.parametrize("method", list(NODES))
def test_apply_and_validation_take_their_defaults_from_the_table(method):
    module, node = NODES[method]
    for fn in (getattr(module, f"apply_{method}"), node.execute):
        assert all(p.default is inspect.Parameter.empty for n, p in inspect.signature(fn).parameters.items()
                   if n != "model"), f"{fn.__name__} writes a default of its own"
    defaults = [p.default for p in inspect.signature(node.validate_inputs).parameters.values()]
    assert set(defaults) == {None}  # "not given": the table fills it


def test_resolve_fills_defaults_and_rejects_unknown_options():
    o = sito_node.PARAMS.resolve({"prune_ratio": 0.7})
    assert o["prune_ratio"] == 0.7 and o["sx"] == 2 and o["recovery"] == "base"
    assert sito_node.PARAMS.resolve({"sx": None}, skip_none=True)["sx"] == 2
    with pytest.raises(TypeError, match="prune_rato"):
        sito_node.PARAMS.resolve({"prune_rato": 0.7})
