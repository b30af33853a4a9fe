"""DaTo's step decision (nodes/hooks/dato_cache.py): what a call can run given the schedule and the cache."""
from __future__ import annotations

import torch

from token_pruning_cache.nodes.hooks.dato_cache import DaToRun, StepEntry, record_dynamics, step_to_run
from token_pruning_cache.nodes.hooks.run import RunState
from token_pruning_cache.pruning_core.schedule import Schedule, Step


def _state(schedule: str, step: int, active: bool = True) -> RunState:
    s = RunState("dato-test", "dato", [3.0, 2.0, 1.0, 0.0], start_sigma=3.0, end_sigma=0.0, seed=0)
    s.data = DaToRun(schedule=Schedule.parse(schedule))
    s.step, s.active = step, active
    return s


X = torch.zeros(2, 4, 8, 8)
CACHED = StepEntry(tuple(X.shape), X.dtype, eps=torch.ones(2, 4, 8, 8), blocks={"output_blocks.0": torch.zeros(1)})


def test_the_schedule_decides_when_the_cache_fits():
    assert step_to_run(_state("F S2 R", 1), CACHED, X, 1) == Step.shallow(2)
    assert step_to_run(_state("F S2 R", 2), CACHED, X, 1) == Step.reuse()
    assert step_to_run(_state("F S2 R", 0), CACHED, X, 1) == Step.full()
    assert step_to_run(_state("F S2", 5), CACHED, X, 1) == Step.shallow(2)  # past the end: the last step


def test_nothing_fitting_in_the_cache_means_a_full_step():
    assert step_to_run(_state("F S2 R", 1), None, X, 1) == Step.full()
    other = StepEntry((1, 4, 8, 8), X.dtype, CACHED.eps, CACHED.blocks)  # another batch size
    assert step_to_run(_state("F S2 R", 2), other, X, 1) == Step.full()
    half = StepEntry(tuple(X.shape), torch.float16, CACHED.eps, CACHED.blocks)
    assert step_to_run(_state("F S2 R", 1), half, X, 1) == Step.full()


def test_outside_start_end_every_step_is_full():
    assert step_to_run(_state("F S2 R", 2, active=False), CACHED, X, 1) == Step.full()


def test_a_reuse_step_without_a_prediction_runs_shallow_at_the_smallest_depth():
    no_eps = StepEntry(tuple(X.shape), X.dtype, None, CACHED.blocks)
    assert step_to_run(_state("F S2 R", 2), no_eps, X, 3) == Step.shallow(3)


def test_dynamics_are_the_change_between_two_predictions_of_a_chunk():
    run = DaToRun(schedule=Schedule.parse("F"))
    a, b = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    record_dynamics(run, ("c",), a)
    assert run.dynamics[("c",)].map is None
    record_dynamics(run, ("c",), b)
    assert torch.equal(run.dynamics[("c",)].map, torch.full((1, 4), 2.0))
    record_dynamics(run, ("u",), b)  # another chunk has its own history
    assert run.dynamics[("u",)].map is None
