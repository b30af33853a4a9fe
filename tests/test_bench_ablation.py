"""benchmarks/ablation.py's similarity-space switch (``xin``): measured on the block input, which the
planner recovers from ``norm1(x)`` through the norm's own weight and bias.

The random-weight benchmark models have identity norms (weight 1, bias 0), where ``xin`` changes
nothing, so the recovery is checked here on a norm with a non-trivial affine: the plan made from
``norm1(x)`` with ``xin`` must be the plan made from the unnormalised-affine input, and differ from
the plan made on ``norm1(x)`` as it is.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pack  # noqa: E402

pack.bootstrap(str(ROOT / ".comfyui"))  # idempotent; conftest has loaded the pack already
import ablation  # noqa: E402
from token_pruning_cache.pruning_core.geometry import TokenGrid  # noqa: E402

BLOCK = ("input", 1, 0)


def _call():
    # the same draws for every planner (cfg "key": the call's keyed generator)
    return SimpleNamespace(generator=torch.Generator().manual_seed(3), chunks=1, block=BLOCK)


@pytest.mark.parametrize("base", ["sim", "random"])
def test_xin_measures_similarity_before_the_norms_affine(base):
    grid = TokenGrid(8, 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, grid.n, 32, generator=gen) + 3.0 * torch.randn(1, 1, 32, generator=gen)
    plain = torch.nn.functional.layer_norm(x, (32,))  # the block input, centred and scaled per token
    weight = torch.rand(32, generator=gen) * 2.0 + 0.1
    bias = torch.randn(32, generator=gen)
    n = plain * weight + bias  # what the attention patch sees: norm1(x) with its affine

    def plan(tokens, space=None):
        planner = ablation.parts_planner(0.5, base, "sim", "nearest", "global", "merge", "key", space=space)
        return planner(tokens, grid, None, _call())

    on_input = plan(plain)
    xin = plan(n, space={BLOCK: (weight, bias)})
    as_is = plan(n)
    assert torch.equal(xin.kept, on_input.kept) and torch.equal(xin.source, on_input.source)
    assert not (torch.equal(as_is.kept, on_input.kept) and torch.equal(as_is.source, on_input.source))


def test_norm1_affines_name_every_eligible_block_as_block_call_does():
    """The table ``xin`` reads is keyed like ``BlockCall.block``: (ComfyUI's block, its index, the
    transformer index), one entry per eligible block of the model, each that block's norm1."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_sd15

    model = tiny_sd15()
    paths = pack.transformer_block_paths(model, 1)
    table = ablation.norm1_affines(model, 1)
    assert len(table) == len(paths) >= 2
    dm = model.model.diffusion_model
    for path in paths:
        names = path.split(".")
        key = ({"input_blocks": "input", "output_blocks": "output"}[names[0]], int(names[1]), int(names[-1]))
        assert table[key][0] is not None
        assert torch.equal(table[key][0], dm.get_submodule(path).norm1.weight)
