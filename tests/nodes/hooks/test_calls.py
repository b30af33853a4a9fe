"""Call contexts and the model-call helpers of nodes/hooks/calls.py."""
from __future__ import annotations

import threading

import pytest

from token_pruning_cache.nodes.hooks.calls import CallSlot, chunk_key, cond_rows, transformer_options_of


def test_call_slot_restores_the_previous_call_also_when_the_model_raises():
    slot = CallSlot()
    assert slot.current is None
    with slot.entered("outer"):
        with slot.entered("inner"):
            assert slot.current == "inner"
        assert slot.current == "outer"
        with pytest.raises(RuntimeError):
            with slot.entered("failing"):
                raise RuntimeError("model failed")
        assert slot.current == "outer"
    assert slot.current is None


def test_call_slot_is_per_thread():
    slot, seen = CallSlot(), []
    with slot.entered("main"):
        t = threading.Thread(target=lambda: seen.append(slot.current))
        t.start()
        t.join()
        assert slot.current == "main"
    assert seen == [None]


def test_chunk_key_prefers_uuids_then_cond_flags():
    assert chunk_key({"uuids": ["a", "b"], "cond_or_uncond": [0, 1]}) == ("a", "b")
    assert chunk_key({"cond_or_uncond": [1, 0]}) == (1, 0)
    assert chunk_key({}) == ()


def test_cond_rows_of_cfg_batches():
    assert cond_rows(4, [1, 0]) == [2, 3]
    assert cond_rows(3, [0, 1, 1]) == [0]
    assert cond_rows(2, [1]) == []
    assert cond_rows(2, None) == [0, 1]


def test_transformer_options_from_keyword_or_last_dict():
    to = {"x": 1}
    assert transformer_options_of((), {"transformer_options": to}) is to
    assert transformer_options_of((1, {"a": 0}, to), {}) is to
    assert transformer_options_of((1,), {}) == {}
