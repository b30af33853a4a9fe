"""The schedule search (benchmarks/schedule_search.py) on the shipped reference model, in small:
genomes and schedule strings map both ways, the front is the non-dominated set, and a tiny
run writes a front whose schedules the DaTo node accepts, then resumes from its evaluations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import schedule_search as ss  # noqa: E402


def test_genome_and_schedule_text_map_both_ways():
    x = ss.schedule_genome("F S1x2 R F", 0.3, 5, 3)
    assert x == [4, 1, 1, 0, 4, ss.RATIOS.index(0.3)]
    assert ss.genome_schedule(x, 5, 3) == ("F S1x2 R F", 0.3)
    # step 0 is always full, whatever the gene says; depths beyond the search's are clamped
    assert ss.genome_schedule([0, 2, 2, 0, 3, 0], 5, 3) == ("F S2x2 R S3", 0.0)
    assert ss.schedule_genome("F S5 R", 0.0, 3, 2) == [3, 2, 0, 0]


def test_front_is_the_non_dominated_set():
    recs = [{"error": e, "cost": c, "i": i} for i, (e, c) in enumerate([(0.0, 1.0), (0.2, 0.5), (0.3, 0.6),
                                                                        (0.1, 0.9), (0.5, 0.2), (0.6, 0.2)])]
    assert [r["i"] for r in ss.pareto(recs)] == [4, 1, 3, 0]


def test_schedule_cost_sums_the_measured_step_costs():
    costs = {0.0: {"F": 1.0, "S1": 0.2, "R": 0.0}}
    assert ss.schedule_cost("F S1x2 R", 0.0, costs) == pytest.approx((1.0 + 0.4) / 4)


def test_tiny_search_writes_a_front_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "schedule_search.py"), "--tiny", "--threads", "1", "--no-timing",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "front-3-euler.json").read_text())
    assert (tmp_path / "front-3-euler.png").stat().st_size > 0
    front = report["front"]
    assert front and report["presets"]
    # the unpatched schedule is on the front with no error; every point is a schedule the node takes
    assert any(r["schedule"] == "Fx3" and r["prune_ratio"] == 0 and r["error"] == 0 for r in front)
    assert all(r["ideal_speedup"] >= 1.0 - 1e-9 for r in front)
    assert sorted((r["ideal_speedup"] for r in front), reverse=True) == [r["ideal_speedup"] for r in front]
    from token_pruning_cache.nodes.dato_node import DaToPruneCache
    for r in front:
        assert DaToPruneCache.validate_inputs(prune_ratio=r["prune_ratio"], custom_schedule=r["schedule"]) is True
        assert 0.0 <= r["holdout"]["rel_error"] < 2.0
    first = json.loads((tmp_path / "evaluations-3-euler.json").read_text())["evaluations"]
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = {r["key"]: r for r in json.loads((tmp_path / "evaluations-3-euler.json").read_text())["evaluations"]}
    assert all(again[r["key"]] == r for r in first), "resume must keep the earlier evaluations"
    # the same evaluations priced by a measured (clock) cost model: errors kept, costs re-priced
    costs = {f"{r:g}": {"F": 1.0 - r, "S1": 0.25, "S2": 0.5, "R": 0.01} for r in ss.RATIOS}
    (tmp_path / "clock.json").write_text(json.dumps({"costs": costs}))
    proc = subprocess.run(cmd + ["--resume", "--step-costs", str(tmp_path / "clock.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    clock = json.loads((tmp_path / "front-3-euler-clock.json").read_text())
    assert clock["cost_model"] == "clock: clock.json"
    priced = {r["key"]: r for r in json.loads((tmp_path / "evaluations-3-euler.json").read_text())["evaluations"]}
    table = {float(r): row for r, row in costs.items()}
    for r in first:
        assert priced[r["key"]]["error"] == r["error"]
        assert priced[r["key"]]["cost"] == pytest.approx(ss.schedule_cost(r["schedule"], r["prune_ratio"], table))
    assert any(r["prune_ratio"] > 0 and r["cost"] != priced[r["key"]]["cost"] for r in first)


def test_step_costs_file_must_cover_every_searched_ratio_and_kind(tmp_path):
    costs = {f"{r:g}": {"F": 1.0, "S1": 0.2, "R": 0.0} for r in ss.RATIOS}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"costs": costs}))
    assert ss.load_step_costs(path, 1)[0.5] == {"F": 1.0, "R": 0.0, "S1": 0.2}
    with pytest.raises(SystemExit, match="no cost for S2 at prune ratio 0"):
        ss.load_step_costs(path, 2)
    del costs["0.3"]
    path.write_text(json.dumps({"costs": costs}))
    with pytest.raises(SystemExit, match="at prune ratio 0.3"):
        ss.load_step_costs(path, 1)
