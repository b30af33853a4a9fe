"""Smoke test of benchmarks/bench.py: the script runs end to end and its numbers make sense.

Runs the real script as a subprocess (its own ComfyUI bootstrap, its own argument parsing)
on the tiny SD1.5-family model at 64x64 px, one step, with ComfyUI's real sampler. No timing
is asserted; only that every number is finite, that the patches were live (SiTo's counted
FLOPs are below the unpatched model's) and that SiTo changes the result without destroying it.
The full-size run is the slow variant below.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
VARIANTS = "unpatched,sito@0.5,tome@0.5,random@0.5"


def _run(tmp_path: Path, *extra: str, timeout: int) -> dict:
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH), "--size", "64", "--steps", "1", "--variants", VARIANTS,
           "--out", str(out), "--markdown", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"bench.py failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    assert "| sito@0.5 |" in proc.stdout  # the markdown table was printed
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text())


def _check(report: dict) -> None:
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == VARIANTS.split(",")
    assert report["config"]["latent"] == [1, 4, 8, 8]
    for r in report["results"] + [report["unpatched_rerun"]]:
        for key in ("seconds_per_image", "speedup", "flops_per_model_call", "flops_ideal_speedup",
                    "peak_rss_delta_mib", "rel_error"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["variant"], key, r[key])
        assert r["finite"], r["variant"]
        assert r["seconds_per_image"] > 0
        # one euler step with CFG: a single batch-2 UNet call (cond and uncond batched)
        assert r["unet_calls"] == 1 and r["unet_batch"] == [2], r

    un, sito = rows["unpatched"], rows["sito@0.5"]
    assert un["rel_error"] == 0.0
    assert report["unpatched_rerun"]["rel_error"] == 0.0  # same seed, same noise: bit-identical
    # the patches were active while FLOPs were counted
    assert sito["flops_per_model_call"] < un["flops_per_model_call"]
    assert rows["random@0.5"]["flops_per_model_call"] < un["flops_per_model_call"]
    assert rows["tome@0.5"]["flops_per_model_call"] != un["flops_per_model_call"]
    # SiTo changes the latent without destroying it. At 8x8 latent tokens and one step the
    # real-size random-weight UNet gives ~0.52 (half of 64 tokens pruned at the only level
    # with attention), so the bound is "error smaller than the latent itself"; fidelity
    # proper is measured by the benchmark at 512 px, not asserted here.
    assert 0.0 < sito["rel_error"] < 1.0, sito["rel_error"]
    assert "32/64" in (sito["pack_summary"] or ""), sito["pack_summary"]  # K = 0.5 * 8 * 8 tokens pruned


def test_bench_smoke_tiny(tmp_path):
    """Tiny SD1.5-family UNet (about 107 M parameters): about 30 s on 2 cores."""
    _check(_run(tmp_path, "--tiny", timeout=300))


def test_bench_smoke_paired(tmp_path):
    """--paired: every variant timed next to its own unpatched run; speedup = median of the pairs."""
    report = _run(tmp_path, "--tiny", "--paired", "--repeats", "2", "--no-flops", "--skip-rerun", timeout=300)
    rows = {r["variant"]: r for r in report["results"]}
    assert report["config"]["paired"] is True
    assert len(rows["unpatched"]["seconds_all"]) == 2 * 3  # one unpatched run per variant and round
    for name in VARIANTS.split(",")[1:]:
        r = rows[name]
        assert len(r["seconds_all"]) == 2 and len(r["pair_speedups"]) == 2
        assert all(x > 0 and math.isfinite(x) for x in r["pair_speedups"])
        lo, hi = sorted(r["pair_speedups"])
        assert lo <= r["speedup"] <= hi  # the median of two pairs
    assert rows["unpatched"]["pair_speedups"] == []


def test_bench_smoke_paired_against_a_variant(tmp_path):
    """--paired-against: every other variant timed next to that variant; unpatched runs once."""
    report = _run(tmp_path, "--tiny", "--paired", "--paired-against", "sito@0.5", "--repeats", "2", "--no-flops",
                  "--skip-rerun", timeout=300)
    rows = {r["variant"]: r for r in report["results"]}
    assert report["config"]["paired_against"] == "sito@0.5"
    assert len(rows["unpatched"]["seconds_all"]) == 1
    assert len(rows["sito@0.5"]["seconds_all"]) == 2 * 2  # one per other variant and round
    for name in ("tome@0.5", "random@0.5"):
        r = rows[name]
        assert len(r["seconds_all"]) == 2 and r["pair_speedups"] == [] and len(r["pair_ratios"]) == 2
        assert all(x > 0 and math.isfinite(x) for x in r["pair_ratios"])
        lo, hi = sorted(r["pair_ratios"])
        assert lo <= r["paired_ratio"] <= hi
        # the speedup column is against the one unpatched run
        assert r["speedup"] == pytest.approx(rows["unpatched"]["seconds_per_image"] / r["seconds_per_image"])
    assert rows["sito@0.5"]["pair_ratios"] == [] and rows["sito@0.5"]["paired_ratio"] is None
    md = (tmp_path / "results.md").read_text()
    assert "Paired against `sito@0.5`" in md and "| tome@0.5 |" in md.split("Paired against")[1]


@pytest.mark.parametrize("extra, message", [
    (("--paired-against", "sito@0.5"), "needs --paired"),
    (("--paired", "--paired-against", "sito@0.3"), "must be one of the patched --variants"),
    (("--paired", "--paired-against", "unpatched"), "must be one of the patched --variants"),
])
def test_bench_paired_against_is_checked_before_anything_runs(extra, message):
    cmd = [sys.executable, str(BENCH), "--tiny", "--variants", VARIANTS, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_bench_smoke_full_size(tmp_path):
    """The real-size SD1.5 UNet (860 M parameters) at 64x64 px: minutes on 2 CPU cores (weight-bound)."""
    report = _run(tmp_path, timeout=1800)
    _check(report)
    assert report["model"]["unet_parameters"] > 800e6


# --------------------------------------------------------------------------------------
# The DiT path: --family mmdit (issue 4)
# --------------------------------------------------------------------------------------
MMDIT_STEPS = 10  # CAT: steps 0-5 full, 6 reference, 7 clustering, 8 and 9 pruned
MMDIT_VARIANTS = "unpatched,cat@0.3,lazycache@0.2"


def _run_mmdit(tmp_path: Path, variants: str, timeout: int = 300) -> subprocess.CompletedProcess:
    out = tmp_path / "mmdit.json"
    cmd = [sys.executable, str(BENCH), "--family", "mmdit", "--tiny", "--size", "128", "--steps", str(MMDIT_STEPS),
           "--variants", variants, "--out", str(out), "--markdown"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bench_smoke_mmdit_tiny(tmp_path):
    """Tiny SD3-shaped MMDiT (hidden 256, 2 joint blocks), 128x128 px = 64 image tokens, 10 steps: ~15 s."""
    proc = _run_mmdit(tmp_path, MMDIT_VARIANTS)
    assert proc.returncode == 0, f"bench.py failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    assert "| cat@0.3 |" in proc.stdout and "SD3-medium-shaped MMDiT" in proc.stdout
    report = json.loads((tmp_path / "mmdit.json").read_text())

    # which model: the JSON says family, depth and width
    assert report["config"]["family"] == "mmdit"
    m = report["model"]
    assert (m["arch"], m["family"], m["joint_blocks"], m["hidden_size"], m["heads"]) == \
        ("mmdit", "SD3-MMDiT-tiny", 2, 256, 4)
    assert m["context"] == [154, 4096] and m["pooled"] == 2048 and m["patch_size"] == 2
    assert report["config"]["latent"] == [1, 16, 16, 16]
    assert (m["image_tokens"], m["text_tokens"]) == (64, 154)

    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == MMDIT_VARIANTS.split(",")
    for r in report["results"] + [report["unpatched_rerun"]]:
        for key in ("seconds_per_image", "speedup", "flops_ideal_speedup", "peak_rss_delta_mib", "rel_error"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["variant"], key, r[key])
        assert r["finite"], r["variant"]
        assert r["unet_batch"] == [2], r  # CFG: cond and uncond in one batch-2 call

    un, cat, lazy = rows["unpatched"], rows["cat@0.3"], rows["lazycache@0.2"]
    assert un["rel_error"] == 0.0
    assert report["unpatched_rerun"]["rel_error"] == 0.0  # same seed, same noise: bit-identical
    assert un["unet_calls"] == cat["unet_calls"] == MMDIT_STEPS

    # CAT really pruned on the DiT: two pruned steps, fewer FLOPs per pruned call, a changed latent
    assert "2 pruned / 8 full of 10 steps on mmdit" in (cat["pack_summary"] or ""), cat["pack_summary"]
    assert cat["flops_per_pruned_call"] < un["flops_per_model_call"]
    assert cat["options"]["full_steps"] == 8 and cat["options"]["pruned_steps"] == 2
    assert 1.0 < cat["flops_ideal_speedup"] < MMDIT_STEPS / 8, cat["flops_ideal_speedup"]
    assert 0.0 < cat["rel_error"] < 1.0, cat["rel_error"]

    # LazyCache: its own skip count gives the ideal, and a skipped step runs no model call
    skipped = lazy["options"]["skipped_steps"]
    assert lazy["options"]["of_steps"] == MMDIT_STEPS
    assert lazy["flops_ideal_speedup"] == pytest.approx(MMDIT_STEPS / (MMDIT_STEPS - skipped))
    assert lazy["unet_calls"] == MMDIT_STEPS - skipped
    assert "LazyCache - skipped" in (lazy["pack_summary"] or "")


# --family wan / qwen: the Wan-2.1-1.3B- and Qwen-Image-shaped DiTs (issue 15)
# (family, bench args, latent, image tokens, text tokens, the family the CAT run summary names)
DIT_SMOKE = {
    "wan": (("--frames", "5", "--size", "64"), [1, 16, 2, 8, 8], 2 * 4 * 4, 512, "wan"),
    "qwen": (("--size", "128"), [1, 16, 1, 16, 16], 8 * 8, 64, "qwen_image"),
}


@pytest.mark.parametrize("family", sorted(DIT_SMOKE))
def test_bench_smoke_video_dits_tiny(tmp_path, family):
    """Tiny Wan (2 latent frames) and Qwen-Image through bench.py, 10 steps: the latent and token grid
    of the family, CAT pruning two steps (fewer FLOPs per pruned call, a changed latent), and on Wan
    core EasyCache allowed (its forward runs the DIFFUSION_MODEL wrappers) next to LazyCache."""
    extra, latent, image_tokens, text_tokens, summary_family = DIT_SMOKE[family]
    variants = "unpatched,cat@0.3,lazycache@0.2" + (",easycache@0.2" if family == "wan" else "")
    out = tmp_path / f"{family}.json"
    cmd = [sys.executable, str(BENCH), "--family", family, "--tiny", "--dit-depth", "1", *extra, "--steps",
           str(MMDIT_STEPS), "--variants", variants, "--out", str(out), "--markdown"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench.py failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    m = report["model"]
    assert m["arch"] == summary_family and m["blocks"] == 1 and m["hidden_size"] == 256
    assert report["config"]["latent"] == latent and m["latent"] == latent
    assert (m["image_tokens"], m["text_tokens"]) == (image_tokens, text_tokens)
    assert "-shaped DiT" in proc.stdout and "| cat@0.3 |" in proc.stdout

    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == variants.split(",")
    un, cat = rows["unpatched"], rows["cat@0.3"]
    assert report["unpatched_rerun"]["rel_error"] == 0.0
    assert un["unet_calls"] == cat["unet_calls"] == MMDIT_STEPS
    assert f"2 pruned / 8 full of 10 steps on {summary_family}" in (cat["pack_summary"] or ""), cat["pack_summary"]
    assert cat["flops_per_pruned_call"] < un["flops_per_model_call"]
    assert 0.0 < cat["rel_error"] < 1.0 and cat["finite"]
    for spec in variants.split(",")[2:]:  # the core caches: a skipped step runs no model call
        r = rows[spec]
        assert r["unet_calls"] == MMDIT_STEPS - r["options"]["skipped_steps"], r


def test_bench_cat_modifiers(tmp_path):
    """CAT's variant modifiers reach the node: wN sets the warm-up (so the full/pruned step split),
    residual the SD3 shortcut without the K/V cache (its pruned call attends only to the selected
    tokens: fewer FLOPs), merged the selection from the merged prediction (another image), x0 the
    denoised prediction space (another image), eps the noise space (the default: the same image)."""
    variants = "cat-w2@0.3,cat-w2-residual@0.3,cat-w2-merged@0.3,cat-w2-x0@0.3,cat-w2-eps@0.3"
    proc = _run_mmdit(tmp_path, "unpatched," + variants)
    assert proc.returncode == 0, f"bench.py failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    rows = {r["variant"]: r for r in json.loads((tmp_path / "mmdit.json").read_text())["results"]}
    rows.pop("unpatched")
    for r in rows.values():
        assert r["options"]["full_steps"] == 4 and r["options"]["pruned_steps"] == MMDIT_STEPS - 4, r["options"]
        assert f"{MMDIT_STEPS - 4} pruned / 4 full" in (r["pack_summary"] or ""), r["pack_summary"]
    kv, residual, merged, x0, eps = (rows[v] for v in variants.split(","))
    assert residual["flops_per_pruned_call"] < kv["flops_per_pruned_call"]
    assert kv["flops_per_pruned_call"] == merged["flops_per_pruned_call"]
    assert len({kv["rel_error"], residual["rel_error"], merged["rel_error"], x0["rel_error"]}) == 4
    assert eps["rel_error"] == kv["rel_error"]


def test_bench_mmdit_refuses_what_cannot_run(tmp_path):
    """UNet-only variants fail before anything is built; EasyCache fails after a probe call (the SD3 MMDiT
    of ComfyUI 0.3.75 never runs DIFFUSION_MODEL wrappers, so it would silently skip nothing)."""
    proc = _run_mmdit(tmp_path, "unpatched,sito@0.5,cat@0.3", timeout=60)
    assert proc.returncode != 0
    assert "UNet-only" in proc.stderr and "sito@0.5" in proc.stderr, proc.stderr[-2000:]

    proc = _run_mmdit(tmp_path, "unpatched,easycache@0.2")
    assert proc.returncode != 0
    assert "DIFFUSION_MODEL" in proc.stderr and "lazycache" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mmdit.json").exists()


def test_bench_dato_custom_schedule(tmp_path):
    """dato-custom@R runs the schedule given by --dato-schedule through the node's custom_schedule:
    the pack's summary line counts its steps and the ideal speedup is the schedule's own."""
    out = tmp_path / "custom.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--size", "64", "--steps", "3", "--no-flops", "--skip-rerun",
           "--variants", "unpatched,dato-custom@0", "--dato-schedule", "F S1 R", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = {r["variant"]: r for r in json.loads(out.read_text())["results"]}["dato-custom@0"]
    assert "1 full / 1 shallow / 1 reused of 3 steps" in (row["pack_summary"] or ""), row["pack_summary"]
    assert row["flops_ideal_speedup"] == pytest.approx(3 / 1.13)
    # caching changed the result (lower bound) without destroying it (upper bound: smaller than the latent)
    assert math.isfinite(row["rel_error"]) and 0 < row["rel_error"] < 1.0, row["rel_error"]

    proc = subprocess.run([sys.executable, str(BENCH), "--variants", "unpatched,dato-custom@0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "needs --dato-schedule" in proc.stderr


# Every bench.py variant behind a figure of docs/benchmarks.md, on the tiny UNet: the path runs and changes the
# latent (lower bound) without destroying it (upper bound). 10 steps, so that CAT (8 full steps
# with its default warm-up) prunes two of them.
README_VARIANTS = ("unpatched,dato-official@0.4,dato-official-dense@0.4,dato-aggressive@0.4,deepcache-5@0,"
                   "deepcache-10@0,cat@0.3,cat-ds1@0.3,easycache@0.2,sito-qonly@0.5,sito-ds2@0.5,sito-kept@0.5,"
                   "sito-merge@0.5,sito-global@0.5,dato-official-align@0.4,dato-official-kept-global@0.4")


def test_bench_readme_variants_run(tmp_path):
    out = tmp_path / "readme.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--size", "64", "--steps", "10", "--no-flops", "--skip-rerun",
           "--variants", README_VARIANTS, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == README_VARIANTS.split(",")
    for name, r in rows.items():
        assert r["finite"] and math.isfinite(r["rel_error"]), (name, r["rel_error"])
        if name in ("unpatched", "easycache@0.2"):  # EasyCache may skip nothing on a random model
            continue
        assert 0.0 < r["rel_error"] < 1.5, (name, r["rel_error"])
    # DaTo's option modifiers reach the node: same schedule, other base tokens / stand-ins
    assert rows["dato-official-kept-global@0.4"]["options"] == {"preset": "dato_official", "recovery": "kept",
                                                              "similarity_search": "global"}
    for name in ("dato-official-align@0.4", "dato-official-kept-global@0.4"):
        assert rows[name]["rel_error"] != rows["dato-official@0.4"]["rel_error"], name


# --profile labels the pack's and ToMe's selection and gather/scatter by wrapping public names
# (pruning_core.sito.sito_plan, PrunePlan.prune/recover, CATState's selections, cat.merge_prediction,
# comfy_extras.nodes_tomesd.get_functions, mmdit.optimized_attention). A renamed name makes the
# profile fail; a call that stops going through the name drops its label, which these catch.
TINY_UNET = ("--tiny", "--size", "64")
TINY_MMDIT = ("--family", "mmdit", "--tiny", "--size", "128")
PROFILE_LABELS = {
    "sito@0.5": (TINY_UNET, ("select: sito_plan", "gather: PrunePlan.prune", "gather: PrunePlan.recover",
                             "attn1 module [32 tokens]")),  # half of the 64 tokens pruned
    "tome@0.5": (TINY_UNET, ("select: tome matching", "gather: tome merge", "gather: tome unmerge")),
    "cat@0.3": (TINY_MMDIT, ("select: CAT next_selection", "gather: CAT merge_prediction", "attention core [")),
}


@pytest.mark.parametrize("variant", list(PROFILE_LABELS))
def test_bench_profile_runs(tmp_path, variant):
    """--profile (the 'where the time goes' figures of docs/benchmarks.md) on the tiny UNet / MMDiT: the
    variant's selection and gather/scatter regions are labelled, and none of them in the unpatched call."""
    model, labels = PROFILE_LABELS[variant]
    cmd = [sys.executable, str(BENCH), *model, "--profile", variant, "--out", str(tmp_path / "profile.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert variant in proc.stdout + proc.stderr
    prof = json.loads((tmp_path / f"profile_{variant.replace('@', '_')}.json").read_text())
    assert list(prof) == ["unpatched", variant]
    regions = prof[variant]["regions_ms"]
    assert "model call (1 CFG step)" in regions and prof[variant]["model_calls"] == 1
    for label in labels:
        assert any(k.startswith(label) for k in regions), (label, sorted(regions))
        assert label in proc.stdout, label
    assert not any(k.startswith(("select:", "gather:", "dit block")) for k in prof["unpatched"]["regions_ms"])


# SiTo taken apart (benchmarks/ablation.py, docs/benchmarks.md "Why SiTo trails ToMe"): each modifier
# reaches the planner. ToMe rebuilt from the pack's parts costs what ComfyUI's ToMe costs; bN prunes
# one block call per model call; the DaTo option modifiers combine with a custom schedule.
ABLATION_VARIANTS = ("unpatched,tome@0.5,sito-rbase-global-merge-qonly-cfgplan@0.5,sito-b0@0.5,"
                     "sito-rbase-rprune-wstand-cfgkey@0.5,sito-rprune@0.5,sito-wstand-cfgnoise@0.5,"
                     "dato-custom-align-merge-qonly@0.4")


def test_bench_sito_ablation_variants(tmp_path):
    out = tmp_path / "ablation.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--size", "64", "--steps", "1", "--skip-rerun",
           "--variants", ABLATION_VARIANTS, "--dato-schedule", "F", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    un, tome, rebuilt = rows["unpatched"], rows["tome@0.5"], rows["sito-rbase-global-merge-qonly-cfgplan@0.5"]
    assert rebuilt["options"]["ablation"] == {"base": "random", "cfg": "plan"}
    assert rebuilt["options"]["prune_kv"] is False and rebuilt["options"]["recovery"] == "merge"
    assert rebuilt["flops_per_model_call"] < un["flops_per_model_call"]
    assert rebuilt["flops_per_model_call"] == pytest.approx(tome["flops_per_model_call"], rel=0.02)
    calls = {name: re.search(r"in (\d+) block calls", r["pack_summary"] or "") for name, r in rows.items()}
    assert calls["sito-b0@0.5"] and calls["sito-rprune@0.5"], rows["sito-b0@0.5"]["pack_summary"]
    assert int(calls["sito-b0@0.5"][1]) == 1 < int(calls["sito-rprune@0.5"][1])  # one model call: one block
    for name, r in rows.items():
        assert r["finite"] and math.isfinite(r["rel_error"]), name
        if name != "unpatched":
            assert 0.0 < r["rel_error"] < 1.5, (name, r["rel_error"])
    assert rows["dato-custom-align-merge-qonly@0.4"]["options"] == {
        "preset": "custom", "schedule": "F", "align_cfg": True, "recovery": "merge", "prune_kv": False}
