"""The step-cost measurement (benchmarks/step_costs.py): which steps a kind's cost is read from,
the interpolation of unmeasured prune ratios, and a tiny real run through ComfyUI's sampler
whose file the schedule search accepts as its cost model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import schedule_search as ss  # noqa: E402
import step_costs as sc  # noqa: E402


def test_probe_schedule_has_a_set_up_step_then_each_kind():
    assert sc.probe_kinds(2, 2) == ["F", "F", "F", "S1", "S1", "S2", "S2", "R", "R"]


def test_kind_cost_is_the_median_step_time_over_the_paired_unpatched_step():
    kinds = ["F", "F", "F", "S1", "S1", "R"]
    patched = [99.0, 8.0, 12.0, 2.0, 3.0, 0.0]  # step 0 carries the set-up: left out
    unpatched = [50.0, 10.0, 10.0]
    assert sc.kind_costs(kinds, patched, unpatched) == {"F": 1.0, "S1": 0.25, "R": 0.0}


def test_unmeasured_ratios_are_interpolated_between_measured_ones():
    filled = sc.fill_ratios({"0": {"F": 1.0, "S1": 0.2}, "0.5": {"F": 0.5, "S1": 0.1}})
    assert list(filled) == [f"{r:g}" for r in sc.RATIOS]
    assert filled["0.2"] == {"F": pytest.approx(0.8), "S1": pytest.approx(0.16)}
    # held at the ends
    assert sc.fill_ratios({"0.1": {"F": 0.9}, "0.3": {"F": 0.7}})["0.5"] == {"F": 0.7}


def test_tiny_run_writes_costs_the_schedule_search_accepts(tmp_path):
    out = tmp_path / "costs.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_costs.py"), "--tiny", "--size", "64", "--ratios", "0,0.5",
           "--max-depth", "2", "--per-kind", "1", "--fill", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["measured_ratios"] == ["0", "0.5"]
    assert result["interpolated_ratios"] == ["0.1", "0.2", "0.3", "0.4"]
    for r in ("0", "0.5"):
        raw = result["raw_seconds"][r][0]
        assert len(raw["dato"]) == len(sc.probe_kinds(2, 1)) and len(raw["unpatched"]) == 3
        assert all(t >= 0 for t in raw["dato"] + raw["unpatched"])
        assert result["costs"][r]["F"] > 0
    costs = ss.load_step_costs(out, 2)
    assert set(costs) == set(ss.RATIOS) and set(costs[0.3]) == {"F", "R", "S1", "S2"}
    assert "(interpolated)" in out.with_suffix(".md").read_text()
