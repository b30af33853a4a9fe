"""CAT's per-run state and call context (nodes/hooks/cat_step.py)."""
from __future__ import annotations

import torch

from token_pruning_cache.nodes.hooks.cat_step import (CAT_CLUSTER, CAT_FULL, CAT_PRUNED, CAT_REFERENCE, BlockCache,
                                                       CATCall, CATRun, cat_role, full_step_count)
from token_pruning_cache.nodes.hooks.run import RunState


def test_step_roles_and_the_full_step_count():
    roles = [cat_role(i, 2) for i in range(6)]
    assert roles == [CAT_FULL, CAT_FULL, CAT_REFERENCE, CAT_CLUSTER, CAT_PRUNED, CAT_PRUNED]
    assert full_step_count(2) == roles.index(CAT_PRUNED)
    assert full_step_count(6) == 8  # the official schedule: pruning starts at step 8


def test_block_cache_stores_full_calls_and_merges_pruned_ones():
    cache = BlockCache()
    x = torch.arange(12.0).reshape(1, 6, 2)
    sel = torch.tensor([1, 4])
    assert not cache.ready(x, sel, ("out",))
    assert cache.merge("out", x, None, 6) is x
    assert cache.ready(x, sel, ("out",)) and not cache.ready(x, None, ("out",))
    assert not cache.ready(x[:, :5], sel, ("out",))  # another token count
    fresh = torch.full((1, 2, 2), -1.0)
    merged = cache.merge("out", fresh, sel, 6)
    assert torch.equal(merged[:, sel], fresh) and torch.equal(merged[:, [0, 2, 3, 5]], x[:, [0, 2, 3, 5]])
    assert cache.out is merged


def test_a_call_finds_its_level_and_its_chunks_caches():
    state = RunState("cat-test", "cat", [1.0, 0.0], 1.0, 0.0, seed=0)
    state.data = CATRun()
    sel, coarse = torch.tensor([0, 5]), torch.tensor([1])
    call = CATCall("cat-test", state, ("c",), sel, 16, levels={4: coarse})
    assert call.level(16) == (True, sel)
    assert call.level(4) == (True, coarse)
    assert call.level(9) == (False, None)
    a = call.block_cache(("attn1", 0))
    assert call.block_cache(("attn1", 0)) is a
    other = CATCall("cat-test", state, ("u",), sel, 16, levels={})
    assert other.block_cache(("attn1", 0)) is not a
