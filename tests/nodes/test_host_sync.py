"""No host synchronisation in the hot path: each node sampled on a tiny model with every host sync
recorded (tests/sync_meter.py), on the CPU.

On a GPU each ``.item()``, ``bool(tensor)``, ``.cpu()``, ``nonzero``, ``bincount``, boolean-mask
index or Python branch on a tensor value makes the host wait for the device: once per transformer
block it would eat what pruning saves. What is pinned here, for SiTo, DaTo and CAT (UNet, SD3 with
and without the K/V cache, Flux):

* after the first step, no sync at all while a block-level patch function of the model is on the
  stack (attention patches, object patches of layers, DiT block replacements), whoever asks for it;
* per step outside the blocks, at most ``PACK_PER_STEP`` syncs asked for by the pack (today: the
  one read of the step's sigma in the CALC_COND_BATCH wrapper, which decides start/end_percent),
  and no more from ComfyUI's own code than the unpatched model makes at that step (none, with
  euler in ComfyUI 0.3.75);
* the runs do the work they are meant to (pruned steps, shallow and reused steps, CAT's
  clustering and later selections), so the bound is not met by doing nothing.

The first step is exempt (per-run setup: the sigma list, index tables built once per grid). What
the meter cannot see on a CPU, a copy to the device of a tensor made on the CPU, is listed in its
docstring; the GPU check (scripts/gpu_check.sh) measures the real thing.
"""
from __future__ import annotations

import pytest
import torch

import comfy.sample

from sync_meter import SyncMeter, block_functions
from tiny_models import LATENT_CHANNELS, build, make_conds, micro
from token_pruning_cache.nodes import hooks
from token_pruning_cache.nodes.cat_node import apply_cat
from token_pruning_cache.nodes.dato_node import apply_dato
from token_pruning_cache.nodes.sito_node import apply_sito
from token_pruning_cache.pruning_core.selection import plan_random, pruned_count

PACK_PER_STEP = 1  # the sigma of the step, read once by the CALC_COND_BATCH wrapper
UNET_HW = (16, 16)  # micro SD1.5: 16x16 and 8x8 token levels
DIT_HW = (16, 16)  # patch 2: 8x8 image tokens


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = micro("sd15") if kind == "micro-sd15" else build(kind)
        return cache[kind]
    return get


def kind_of(name: str) -> str:
    return "sd15" if name.endswith("sd15") else name


def sample(patcher, kind: str, hw, steps: int, batch: int = 1) -> SyncMeter:
    """One euler run with CFG (cond and uncond batched) under the meter."""
    latent = torch.zeros((batch, LATENT_CHANNELS[kind], *hw))
    pos, neg = make_conds(kind)
    noise = comfy.sample.prepare_noise(latent, 0)
    meter = SyncMeter(block_functions(patcher))
    with meter:
        comfy.sample.sample(patcher, noise, steps, 7.5, "euler", "normal", pos, neg, latent, seed=0,
                            disable_pbar=True, callback=meter.callback)
    return meter


_BASELINES: dict = {}


def baseline(models, name: str, hw, steps: int, batch: int = 1) -> dict:
    """Syncs per step of the unpatched model (ComfyUI's own), for the same run."""
    key = (name, hw, steps, batch)
    if key not in _BASELINES:
        _BASELINES[key] = sample(models(name), kind_of(name), hw, steps, batch).per_step()
    return _BASELINES[key]


def check_hot_path(meter: SyncMeter, base: dict, steps: int) -> None:
    in_blocks = [s for s in meter.syncs if s.in_block and s.step >= 1]
    assert not in_blocks, "host syncs inside block-level patch functions:\n" + "\n".join(map(str, in_blocks))
    for step in range(1, steps):
        outside = [s for s in meter.syncs if s.step == step and not s.in_block]
        pack = [s for s in outside if s.owner == "pack"]
        others = [s for s in outside if s.owner != "pack"]
        assert len(pack) <= PACK_PER_STEP, f"step {step}: {len(pack)} syncs of the pack:\n" + "\n".join(map(str, pack))
        assert len(others) <= base.get(step, 0), (f"step {step}: {len(others)} syncs outside the pack, "
                                                  f"{base.get(step, 0)} unpatched:\n" + "\n".join(map(str, others)))


def record_of(patched):
    (method, record), = hooks.last_records(patched)
    return record


# --------------------------------------------------------------------------------------
# SiTo
# --------------------------------------------------------------------------------------
SITO_CASES = {
    "default": dict(prune_ratio=0.5, max_downsample="2"),
    "kept-global-xattn-mlp": dict(prune_ratio=0.6, max_downsample="2", recovery="kept", similarity_search="global",
                                  prune_cross_attn=True, prune_mlp=True),
    "merge-qonly-kept-local": dict(prune_ratio=0.5, max_downsample="2", recovery="merge", prune_kv=False),
    "kept-local": dict(prune_ratio=0.5, max_downsample="2", recovery="kept"),
}


@pytest.mark.parametrize("case", list(SITO_CASES))
def test_sito_has_no_host_sync_in_blocks(models, case):
    steps = 4
    patched = apply_sito(models("micro-sd15"), **SITO_CASES[case])
    meter = sample(patched, "sd15", UNET_HW, steps)
    check_hot_path(meter, baseline(models, "micro-sd15", UNET_HW, steps), steps)
    maps = record_of(patched).token_maps
    assert sorted(maps) == list(range(steps))  # pruned on every step
    for h, w, codes in maps.values():  # the preview's maps reach the host when the run ends
        assert codes.device.type == "cpu" and codes.shape == (h, w) and int((codes == 2).sum()) > 0


def test_sito_real_width_unet_and_batch_two(models):
    """The tiny SD1.5 with the real 320-channel first level, two images per run (CFG batch 4)."""
    steps = 3
    patched = apply_sito(models("sd15"), prune_ratio=0.5)
    meter = sample(patched, "sd15", (8, 8), steps, batch=2)
    check_hot_path(meter, baseline(models, "sd15", (8, 8), steps, batch=2), steps)
    assert sorted(record_of(patched).token_maps) == list(range(steps))


# --------------------------------------------------------------------------------------
# DaTo
# --------------------------------------------------------------------------------------
DATO_CASES = {
    "official": dict(prune_ratio=0.4),
    "sign-flip-align-kept": dict(prune_ratio=0.5, sign_flip=True, align_cfg=True, recovery="kept",
                                 schedule="dato_aggressive"),
    "deepcache-5-merge-global": dict(prune_ratio=0.3, schedule="deepcache_5", recovery="merge",
                                     similarity_search="global", max_downsample="2"),
}


@pytest.mark.parametrize("case", list(DATO_CASES))
def test_dato_has_no_host_sync_in_blocks(models, case):
    steps = 10
    patched = apply_dato(models("micro-sd15"), **DATO_CASES[case])
    meter = sample(patched, "sd15", UNET_HW, steps)
    check_hot_path(meter, baseline(models, "micro-sd15", UNET_HW, steps), steps)
    record = record_of(patched)
    kinds = set(record.step_kinds.values())
    assert {"full", "shallow"} <= kinds, record.step_kinds  # the cached layers ran both ways
    assert record.token_maps  # and computed steps were pruned


# --------------------------------------------------------------------------------------
# CAT: per-step selection (clustering, later selections, carried coarser levels) and the DiTs
# --------------------------------------------------------------------------------------
CAT_CASES = {
    "unet-all-levels": ("micro-sd15", UNET_HW, dict(keep_ratio=0.3, warmup_steps=1, max_downsample="8")),
    "unet-sd15-real-width": ("sd15", (8, 8), dict(keep_ratio=0.3, warmup_steps=1)),
    "sd3-kv-cache": ("sd3", DIT_HW, dict(keep_ratio=0.3, warmup_steps=1)),
    "sd3-residual-merged-signal": ("sd3", DIT_HW, dict(keep_ratio=0.4, warmup_steps=0, dit_kv_cache=False,
                                                       signal_before_merge=False)),
    "flux": ("flux", DIT_HW, dict(keep_ratio=0.3, warmup_steps=1)),
}


@pytest.mark.parametrize("case", list(CAT_CASES))
def test_cat_has_no_host_sync_in_blocks(models, case):
    name, hw, options = CAT_CASES[case]
    steps = 7
    patched = apply_cat(models(name), **options)
    meter = sample(patched, kind_of(name), hw, steps)
    check_hot_path(meter, baseline(models, name, hw, steps), steps)
    kinds = record_of(patched).step_kinds
    first_pruned = options["warmup_steps"] + 2  # warm-up, reference, clustering
    # pruned from the first pruned step on: the clustering step and at least three later
    # selections (bincount-sized quotas) ran inside the measured steps
    assert [s for s, k in kinds.items() if k == "pruned"] == list(range(first_pruned, steps))
    assert steps - first_pruned >= 3


# --------------------------------------------------------------------------------------
# The meter itself: it sees each kind of sync, attributed to the right place
# --------------------------------------------------------------------------------------
PLANTED = {
    "item": lambda n: n.sum().item(),
    "python-branch": lambda n: 1 if n.mean() > 0 else 0,
    "int": lambda n: int(n.shape[1] + n[0, 0, 0].long()),
    "0-d-index": lambda n: n[0, torch.tensor(1)],
    "bool-mask": lambda n: n[n > 0],
    "nonzero": lambda n: (n[0, :, 0] > 0).nonzero(),
    "bincount-minlength": lambda n: torch.bincount(torch.zeros(4, dtype=torch.long), minlength=8),
    "cpu": lambda n: n.cpu(),
    "tolist": lambda n: n[0, 0, :2].tolist(),
    "to-cpu": lambda n: n.to("cpu"),
}


def planted_pruning(model, fn):
    """Random pruning through the pack's block hooks, with ``fn(n)`` run in every block call."""
    m = model.clone()
    uid = hooks.new_uid("planted")

    def planner(n, grid, state, call):
        fn(n)
        k = pruned_count(0.5, grid.n, grid.window_count(2, 2))
        return plan_random(n.shape[0], grid, k, 2, 2, call.generator, n.device, call.chunks)

    hooks.install_block_pruning(m, uid, hooks.BlockPruning(max_downsample=2), planner)
    hooks.install_run_lifecycle(m, uid, "random", 0.0, 1.0, 0, lambda state: "planted")
    return m


@pytest.mark.parametrize("kind", list(PLANTED))
def test_meter_sees_a_sync_planted_in_a_block(models, kind):
    steps = 2
    meter = sample(planted_pruning(models("micro-sd15"), PLANTED[kind]), "sd15", UNET_HW, steps)
    planted = [s for s in meter.syncs if s.owner == "test"]
    assert planted and all(s.in_block for s in planted), [str(s) for s in meter.syncs]
    assert {s.step for s in planted} == set(range(steps))
    with pytest.raises(AssertionError, match="inside block-level patch functions"):
        check_hot_path(meter, baseline(models, "micro-sd15", UNET_HW, steps), steps)


def test_meter_sees_a_sync_planted_in_a_step_wrapper(models):
    """A wrapper is not a block: its syncs count per step, outside the blocks."""
    import comfy.patcher_extension

    steps = 3
    m = models("micro-sd15").clone()

    def wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        float(out.abs().max())
        return out

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.planted", wrapper)
    meter = sample(m, "sd15", UNET_HW, steps)
    planted = [s for s in meter.syncs if s.owner == "test"]
    assert [s.step for s in planted] == list(range(steps)) and not any(s.in_block for s in planted)
    with pytest.raises(AssertionError, match="syncs outside the pack"):
        check_hot_path(meter, baseline(models, "micro-sd15", UNET_HW, steps), steps)


def test_meter_sees_comfyui_own_setup_syncs(models):
    """The unpatched run: ComfyUI reads its sigma schedule back before the first step, and then
    never again per step (the baseline the nodes are held to)."""
    per_step = baseline(models, "micro-sd15", UNET_HW, 4)
    assert per_step.get(0, 0) > 0
    assert all(per_step.get(s, 0) == 0 for s in range(1, 4)), per_step
