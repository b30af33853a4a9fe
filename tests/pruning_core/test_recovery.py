"""Prune/recover exactness: kept tokens get their own output, pruned ones their stand-in's."""
import pytest
import torch

from token_pruning_cache.pruning_core.recovery import plan_from_order


def random_plan(batch, n, k, seed=0):
    """A valid random plan: k pruned per row, each pointing at a random kept token."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    kept = order[:, k:]
    pick = torch.randint(0, n - k, (batch, n), generator=g)
    stand_in = kept.gather(1, pick)
    return plan_from_order(order, k, stand_in), order, stand_in


def test_hand_made_plan():
    # tokens 0..5; prune 4 and 1 (in that order), 4 ← 0, 1 ← 5
    order = torch.tensor([[4, 1, 0, 2, 3, 5]])
    stand_in = torch.tensor([[0, 5, 2, 3, 0, 5]])
    plan = plan_from_order(order, 2, stand_in)
    assert plan.kept.tolist() == [[0, 2, 3, 5]]
    assert plan.n_kept == 4 and plan.n_pruned == 2 and plan.n_tokens == 6
    assert plan.source.tolist() == [[0, 3, 1, 2, 0, 3]]
    assert plan.pruned_mask().tolist() == [[False, True, False, False, True, False]]
    x = torch.arange(6.0).reshape(1, 6, 1)
    assert plan.recover(plan.prune(x)).flatten().tolist() == [0, 5, 2, 3, 0, 5]


@pytest.mark.parametrize("n,k", [(16, 8), (6305, 2522), (221, 0), (7, 6), (1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_identity_layer_round_trip(n, k, dtype):
    plan, order, stand_in = random_plan(3, n, k)
    x = torch.randn(3, n, 5).to(dtype)
    pruned_x = plan.prune(x)
    assert pruned_x.shape == (3, n - k, 5) and pruned_x.dtype == dtype
    out = plan.recover(pruned_x)
    assert out.shape == x.shape and out.dtype == dtype
    mask = plan.pruned_mask()
    assert mask.sum(1).tolist() == [k] * 3
    for b in range(3):
        kept = ~mask[b]
        assert torch.equal(out[b, kept], x[b, kept])
        assert torch.equal(out[b, mask[b]], x[b, stand_in[b, mask[b]]])


def test_per_token_layer_outputs_are_exact():
    """A layer that acts per token: kept tokens get exactly f(x_i), pruned ones exactly f(x_stand_in)."""
    plan, order, stand_in = random_plan(2, 300, 120, seed=1)
    x = torch.randn(2, 300, 8)

    def f(t):
        return torch.tanh(t) * 3 + t.square()

    out = plan.recover(f(plan.prune(x)))
    fx = f(x)
    mask = plan.pruned_mask()
    for b in range(2):
        assert torch.equal(out[b, ~mask[b]], fx[b, ~mask[b]])
        assert torch.equal(out[b, mask[b]], fx[b, stand_in[b, mask[b]]])


def test_mixing_layer_on_kept_tokens_only():
    """Attention-like layer: pruned tokens take no part; kept ones see only kept ones."""
    plan, order, stand_in = random_plan(2, 50, 20, seed=2)
    x = torch.randn(2, 50, 4)

    def mean_mix(t):
        return t + t.mean(dim=1, keepdim=True)

    out = plan.recover(mean_mix(plan.prune(x)))
    mask = plan.pruned_mask()
    for b in range(2):
        kept_mean = x[b, ~mask[b]].mean(0)
        torch.testing.assert_close(out[b, ~mask[b]], x[b, ~mask[b]] + kept_mean)
        torch.testing.assert_close(out[b, mask[b]], x[b, stand_in[b, mask[b]]] + kept_mean)


def test_rows_never_mix():
    plan, _, _ = random_plan(4, 40, 25, seed=3)
    y = torch.arange(4.0).reshape(4, 1, 1).expand(4, 15, 2)
    out = plan.recover(y)
    for b in range(4):
        assert (out[b] == b).all()


def test_source_points_into_kept_sequence():
    plan, order, stand_in = random_plan(3, 100, 60, seed=4)
    assert plan.source.min() >= 0 and plan.source.max() < plan.n_kept
    kept_index = plan.kept.gather(1, plan.source)
    mask = plan.pruned_mask()
    ids = torch.arange(100).expand(3, -1)
    assert torch.equal(kept_index[~mask], ids[~mask])
    assert torch.equal(kept_index[mask], stand_in[mask])
    assert plan.base is None


def test_merge_feeds_the_mean_of_each_group():
    # same hand-made plan: groups {0, 4} -> kept 0, {5, 1} -> kept 5; 2 and 3 alone
    order = torch.tensor([[4, 1, 0, 2, 3, 5]])
    stand_in = torch.tensor([[0, 5, 2, 3, 0, 5]])
    plan = plan_from_order(order, 2, stand_in)
    plan.merge = True
    x = torch.tensor([[[0.0], [10.0], [2.0], [3.0], [4.0], [5.0]]])
    assert plan.group_sizes().tolist() == [[2.0, 1.0, 1.0, 2.0]]
    assert plan.prune(x).flatten().tolist() == [2.0, 2.0, 3.0, 7.5]
    assert plan.recover(plan.prune(x)).flatten().tolist() == [2.0, 7.5, 2.0, 3.0, 2.0, 7.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_against_a_loop_and_alone_tokens_untouched(dtype):
    plan, order, stand_in = random_plan(3, 40, 17, seed=3)
    x = torch.randn(3, 40, 8).to(dtype)
    plain = plan.prune(x)
    plan.merge = True
    merged = plan.prune(x)
    assert merged.dtype == dtype and merged.shape == plain.shape
    sizes = plan.group_sizes()
    assert torch.equal(sizes.sum(1), torch.full((3,), 40.0))
    for b in range(3):
        for pos in range(plan.n_kept):
            members = (plan.source[b] == pos).nonzero().squeeze(1)
            expect = x[b, members].float().mean(0)
            torch.testing.assert_close(merged[b, pos].float(), expect, rtol=2e-3, atol=2e-3)
            if members.numel() == 1:  # stands in for nobody: enters exactly as it is
                assert torch.equal(merged[b, pos], plain[b, pos])
