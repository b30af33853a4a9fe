"""Compatibility and robustness matrix (issue 5): every node of the pack against what ComfyUI
users actually do, through ComfyUI's real sampler (``comfy.sample.sample``).

Every row is parametrised over the three methods with the settings of ``SETTINGS`` (SiTo
r=0.5, DaTo default preset r=0.4, CAT keep 0.3 with one warm-up step so that pruned steps
happen in short runs). A row passes when the patched model gives a finite result close to the
same run of the unpatched (or identically co-patched) model, *not equal* to it, *and* the
method actually did its work, measured from the model's own calls (tests/work_meter.py: self-
attention query rows not computed, ResBlocks skipped, model calls answered from a cache; never
from the pack's summary line), or - where the row allows it - when the node gives one clear
warning instead and then is bit-identical to the reference wherever it measurably did nothing.

Speed. Most rows use "micro" models built like ``tiny_models`` (same ComfyUI classes and
configs, same seeded init, real context/pooled widths) with 64 instead of 320 base channels:
the matrix has ~250 sampler runs and the 320-channel models cost 5-20x more on two CPU
cores. ``tiny_models.build`` itself is used for the (slow) dtype rows.
The module runs torch on one thread (``TPC_TORCH_THREADS`` overrides): on a shared 2-core
machine two intra-op threads spin against each other and a 4-step run is ~10x slower.

``scripts/compat_table.py`` turns a junit xml of this file into the table of docs/compatibility.md; each test
records ``theme`` / ``row`` / ``method`` (and ``status=warn`` when it passed by warning).
"""
from __future__ import annotations

import inspect
import logging
import os
import threading

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import tiny_models as tm
from tiny_models import build, make_conds
from work_meter import WorkMeter
from token_pruning_cache.nodes.cat_node import CATPruneCache, apply_cat
from token_pruning_cache.nodes.dato_node import DaToPruneCache, apply_dato, schedule_maker
from token_pruning_cache.nodes.sito_node import SiToTokenPruning, apply_sito

METHODS = ("sito", "dato", "cat")
SETTINGS = {
    "sito": dict(prune_ratio=0.5),
    # every kind of step, and a refresh after reused steps, at any step count (the presets
    # themselves are tested in test_dato_node.py)
    "dato": dict(prune_ratio=0.4, custom_schedule="F S1 R F S1 R"),
    "cat": dict(keep_ratio=0.3, warmup_steps=1),
}
APPLY = {"sito": apply_sito, "dato": apply_dato, "cat": apply_cat}
NODES = {"sito": SiToTokenPruning, "dato": DaToPruneCache, "cat": CATPruneCache}
PREFIX = {"sito": "SiTo:", "dato": "DaTo:", "cat": "CAT:"}
LOGGER = "token_pruning_cache"

HW = (13, 19)  # latent of the resolution rows: non-square, no side a multiple of 2, 8, 16 or 64
SMALL = (9, 7)  # latent of most other rows (odd sides too), to keep the fast part within budget
STACK_HW = (8, 12)  # stacking rows: HyperTile only tiles sides that have a divisor >= 4
STEPS = 6  # DaTo's schedule below fits 6 steps exactly; CAT (warm-up 1) prunes from step 3 (4th)
# CFG on (cond + uncond batched). Random-weight models make larger scales chaotic: at cfg 5 any
# perturbation of the prediction, pruning included, gives a relative error of ~1 after 4 steps.
CFG = 1.5
# "Close to the unpatched run": relative L2 distance of the final latents. Random-weight
# models amplify every perturbation, so this is loose; broken recovery/caching gives > 1 (an
# unrelated image is ~1.4). DaTo's rows take shallow and reused steps on top of its pruning: per
# image of the batch-3 row, pruning alone (r=0.4, every step full) is up to 0.53 from the
# unpatched run and the schedule below up to 0.60 (F S1x5, F R F R F R: 0.60 too).
CLOSE = 0.6
CLOSE_CACHED = 0.7


def close(*methods: str) -> float:
    return max(CLOSE_CACHED if m == "dato" else CLOSE for m in methods)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_torch_thread")]


# --------------------------------------------------------------------------------------
# Models, sampling, probes
# --------------------------------------------------------------------------------------

_MODELS: dict = {}
_REFS: dict = {}
_REF_WORK: dict = {}  # reference key -> WorkMeter of that reference run
# Per test (reset by the autouse fixture below): the WorkMeter of every sample() call that was
# not a reference run, in order, and the key of the reference the test used last.
_RUNS: list = []
_LAST_REF: dict = {}


@pytest.fixture(autouse=True)
def _fresh_work_log():
    _RUNS.clear()
    _LAST_REF.clear()
    yield


def micro(kind: str = "sd15", dtype: torch.dtype = torch.float32):
    """Shared micro model (never modified by tests: nodes clone; see test_zz_shared_models_untouched)."""
    key = ("micro", kind, dtype)
    if key not in _MODELS:
        model = tm.micro(kind, dtype)
        _MODELS[key] = model
        _MODELS[key + ("snapshot",)] = _snapshot(model)
    return _MODELS[key]


def tiny(kind: str, dtype: torch.dtype = torch.float32):
    key = ("tiny", kind, dtype)
    if key not in _MODELS:
        _MODELS[key] = build(kind, dtype=dtype)
    return _MODELS[key]


def _snapshot(model) -> dict:
    # ComfyUI patches weights in place when a clone with weight patches (a LoRA) is loaded and
    # restores them on unload: compare the model as it is when nothing is loaded.
    comfy.model_management.unload_all_models()
    return {
        "weights": {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()},
        "options": repr(model.model_options),
        "patches": {k: list(v) for k, v in model.patches.items()},
        "object_patches": dict(model.object_patches),
        "attachments": dict(model.attachments),
        "wrappers": repr(model.wrappers),
        "callbacks": repr(model.callbacks),
    }


def assert_unchanged(model, snap: dict) -> None:
    now = _snapshot(model)
    for key in ("options", "patches", "object_patches", "attachments", "wrappers", "callbacks"):
        assert now[key] == snap[key], key
    bad = [k for k, v in snap["weights"].items() if not torch.equal(v, now["weights"][k])]
    assert not bad, bad[:5]


def patch(method: str, model, **overrides):
    return APPLY[method](model, **{**SETTINGS[method], **overrides})


def sample(model, hw=SMALL, batch=1, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal", seed=0, denoise=1.0,
           latent=None, positive=None, negative=None, callback=None) -> torch.Tensor:
    """``comfy.sample.sample`` as KSampler calls it (plus an optional step callback)."""
    kind = tm._kind_of(model)
    if latent is None:
        latent = torch.zeros((batch, tm.LATENT_CHANNELS[kind], *hw))
    if positive is None or negative is None:
        positive, negative = make_conds(kind, seed=seed)
    noise = comfy.sample.prepare_noise(latent, seed)
    meter = WorkMeter(model)
    meter.steps = steps
    _RUNS.append(meter)
    with meter:
        out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                  denoise=denoise, disable_pbar=True, seed=seed, callback=callback)
    return out.float().cpu()


def reference(key, model, **kw) -> torch.Tensor:
    """Cached run of an unpatched (or only co-patched) model; ``key`` must identify model + settings.
    Its WorkMeter is kept apart from the test's own runs (what the co-patches alone do)."""
    if key not in _REFS:
        _REFS[key] = sample(model, **kw)
        _REF_WORK[key] = _RUNS.pop()
    _LAST_REF["key"] = key
    return _REFS[key]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def assert_close(out, ref, tol=CLOSE, differs=True) -> float:
    """Upper bound (close to the reference) and, with ``differs``, lower bound: not the
    reference itself (a node that passes the model through fails here)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    err = rel(out, ref)
    assert err < tol, f"relative error {err:.3f} >= {tol}"
    if differs:
        assert not torch.equal(out, ref), "patched output is bit-identical to the reference: the node did nothing"
    return err


def summaries(caplog, method) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith(PREFIX[method])]


def our_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def expected_work(method: str, steps: int) -> dict:
    """What a run of ``steps`` steps with SETTINGS[method] must measurably do.

    SiTo: prune self-attention tokens. DaTo: prune, and skip ResBlocks on the steps its
    schedule (resampled to ``steps``) makes shallow or reused. CAT (warm-up 1): prune from step
    3 on, so only runs of 4 steps or more.
    """
    if method == "sito":
        return {"pruned": True, "cached": False}
    if method == "dato":
        schedule = schedule_maker(custom_schedule=SETTINGS["dato"]["custom_schedule"])[0](steps, 1)
        return {"pruned": True, "cached": schedule.shallow_count + schedule.reuse_count > 0}
    return {"pruned": steps >= SETTINGS["cat"]["warmup_steps"] + 3, "cached": False}


def measured_work(run: WorkMeter, ref: WorkMeter | None = None) -> dict:
    """Work of ``run`` beyond what the reference run (same co-patches, without our node) did."""
    base_deficit = ref.row_deficit() if ref is not None else 0
    base_cached = len(ref.cached_calls()) if ref is not None else 0
    return {"pruned": run.row_deficit() > base_deficit, "cached": len(run.cached_calls()) > base_cached}


def did_work(method: str, run: WorkMeter, ref: WorkMeter | None = None) -> bool:
    want = expected_work(method, run.steps)
    got = measured_work(run, ref)
    return all(got[k] for k, needed in want.items() if needed)


def last_reference_work() -> WorkMeter | None:
    return _REF_WORK.get(_LAST_REF.get("key"))


def assert_worked(caplog, method, runs=1):
    """The last ``runs`` sampler runs of this test (reference runs excluded) each did the work
    ``expected_work`` names, measured by their WorkMeter against the test's last reference."""
    assert len(_RUNS) >= runs, f"expected {runs} measured run(s), got {len(_RUNS)}"
    ref = last_reference_work()
    for run in _RUNS[-runs:]:
        assert did_work(method, run, ref), (
            f"{method} did not do its work: {run.summary()} (reference: {ref.summary() if ref else 'none'}; "
            f"needed {expected_work(method, run.steps)})")


def assert_stepped_aside(out, ref, method):
    """A node that warned: wherever it measurably did nothing, the output is the reference's,
    bit for bit; where it still did part of its work (DaTo's caching), the output differs."""
    run, base = _RUNS[-1], last_reference_work()
    got = measured_work(run, base)
    if not any(got.values()):
        assert torch.equal(out, ref), f"{method} warned and measurably did nothing, yet changed the output"
    else:
        assert not torch.equal(out, ref), f"{method} measurably worked ({got}) but the output is the reference's"


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


@pytest.fixture
def compat(record_property, request, caplog):
    """Record the table coordinates of this test for scripts/compat_table.py; a row whose run
    logged a warning of ours is recorded as ``status=warn`` (shown as ⚠ when it passes)."""
    callspec = getattr(request.node, "callspec", None)
    method = callspec.params.get("method", "all") if callspec else "all"
    state = {"warned": False}

    class Row:
        def __call__(self, theme: str, row: str):
            record_property("theme", theme)
            record_property("row", row)
            record_property("method", method)

        def warn(self, why: str):
            if not state["warned"]:
                state["warned"] = True
                record_property("status", "warn")
                record_property("warning", why)

    row = Row()
    yield row
    ours = [r.getMessage() for r in caplog.get_records("call") if r.name == LOGGER and r.levelno >= logging.WARNING]
    if ours:
        row.warn(ours[0])


class CallProbe:
    """APPLY_MODEL-level call log: (sigma, cond_or_uncond, batch, h, w) per model call, plus
    the query length of every self-attention call tagged with the call it belongs to."""

    def __init__(self, model):
        self.calls: list[tuple] = []
        self.attn: list[tuple] = []  # (call index, q tokens, full tokens)
        self._current = threading.local()
        self.model = model.clone()
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "compat-probe", self._wrapper)

    def _wrapper(self, executor, *args, **kwargs):
        # BaseModel.apply_model -> execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        to = kwargs["transformer_options"] if "transformer_options" in kwargs else args[5]
        x, t = args[0], args[1]
        self.calls.append((float(t.reshape(-1)[0]), list(to.get("cond_or_uncond") or []), x.shape[0],
                           x.shape[-2], x.shape[-1]))
        self._current.index = len(self.calls) - 1
        try:
            return executor(*args, **kwargs)
        finally:
            self._current.index = None

    def __enter__(self):
        dm = self.model.model.diffusion_model
        self._handles = []

        def hook(module, args, kwargs):
            to = kwargs.get("transformer_options") or {}
            shape = to.get("activations_shape")
            full = int(shape[-2]) * int(shape[-1]) if shape else None
            self.attn.append((getattr(self._current, "index", None), args[0].shape[1], full))

        for name, mod in dm.named_modules():
            if name.endswith("attn1"):
                self._handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def shortened_calls(self) -> set[int]:
        return {i for i, q, full in self.attn if full is not None and q < full}


# --------------------------------------------------------------------------------------
# Resolutions
# --------------------------------------------------------------------------------------

RESOLUTIONS = [
    pytest.param("sd15", (13, 19), id="sd15-13x19"),
    pytest.param("sdxl", (13, 19), id="sdxl-13x19"),
    pytest.param("sd15", (16, 16), id="sd15-16x16", marks=pytest.mark.slow),
    pytest.param("sdxl", (10, 7), id="sdxl-10x7", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,hw", RESOLUTIONS)
def test_resolution(method, kind, hw, logs, compat):
    compat("Resolution", f"{'SD1.5' if kind == 'sd15' else 'SDXL'}-like, {hw[0]}×{hw[1]} latent")
    base = micro(kind)
    ref = reference(("res", kind, hw), base, hw=hw)
    out = sample(patch(method, base), hw=hw)
    assert_close(out, ref, close(method))
    assert_worked(logs, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resolution_65x97(method, logs, compat):
    compat("Resolution", "SD1.5-like, 65×97 latent (520×776 px), cfg 1")
    base = micro("sd15")
    kw = dict(hw=(65, 97), steps=4, cfg=1.0)  # 6305 tokens: one chunk per call keeps the row ~1 min
    ref = reference(("res", "sd15", (65, 97)), base, **kw)
    out = sample(patch(method, base), **kw)
    assert_close(out, ref, close(method))
    assert_worked(logs, method)


# --------------------------------------------------------------------------------------
# Batches, CFG, cond/uncond split, regional conditioning
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_batch_with_cfg(method, batch, logs, compat):
    compat("Batch & CFG", f"batch {batch}, CFG {CFG:g}")
    base = micro("sd15")
    ref = reference(("batch", batch), base, batch=batch)
    out = sample(patch(method, base), batch=batch)
    assert_close(out, ref, close(method))
    for i in range(batch):  # every image of the batch, not only the batch as a whole
        assert_close(out[i:i + 1], ref[i:i + 1], close(method))
    assert_worked(logs, method)


@pytest.mark.parametrize("method", METHODS)
def test_cfg_one_drops_uncond(method, logs, compat):
    compat("Batch & CFG", "cfg 1.0 (uncond dropped)")
    base = micro("sd15")
    ref = reference(("cfg1",), base, cfg=1.0)
    probe = CallProbe(patch(method, base))
    with probe:
        out = sample(probe.model, cfg=1.0)
    assert probe.calls and all(c[1] == [0] for c in probe.calls), probe.calls  # ComfyUI really dropped uncond
    assert_close(out, ref, close(method))
    assert_worked(logs, method)


class _OneChunkAtATime:
    """``comfy.samplers.model_management`` reporting no free memory: ``_calc_cond_batch`` then
    puts a single chunk in each model call (what happens on a nearly full GPU)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def get_free_memory(*args, **kwargs):
        return 0


@pytest.fixture
def split_cond_uncond(monkeypatch):
    monkeypatch.setattr(comfy.samplers, "model_management", _OneChunkAtATime(comfy.model_management))


@pytest.mark.parametrize("method", METHODS)
def test_cond_uncond_as_separate_calls(method, split_cond_uncond, logs, compat):
    compat("Batch & CFG", "cond and uncond as separate model calls at the same sigma")
    base = micro("sd15")
    ref = reference(("batch", 2), base, batch=2)  # the unpatched run with cond+uncond batched
    probe = CallProbe(patch(method, base))
    with probe:
        out = sample(probe.model, batch=2)
    by_sigma: dict = {}
    for sigma, cou, b, h, w in probe.calls:
        assert len(cou) == 1 and b == 2, probe.calls
        by_sigma.setdefault(sigma, []).append(tuple(cou))
    assert len(by_sigma) == STEPS and all(sorted(v) == [(0,), (1,)] for v in by_sigma.values()), by_sigma
    assert_close(out, ref, close(method))
    assert_worked(logs, method)
    if method in ("sito", "cat"):  # self-attention ran on fewer tokens in cond AND in uncond calls
        kinds = {tuple(probe.calls[i][1]) for i in probe.shortened_calls()}
        assert kinds == {(0,), (1,)}, kinds


def _area(cond, area, strength=1.0):
    """ConditioningSetArea: ``area`` = (h, w, y, x) in latent units, stored in the cond dict."""
    return [[c[0], {**c[1], "area": area, "strength": strength, "set_area_to_bounds": False}] for c in cond]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_area_conditioning_many_chunks(method, kind, logs, compat):
    compat("Batch & CFG", "area/regional conds: >2 chunks of different sizes per step"
           + ("" if kind == "sd15" else " (SDXL)"))
    base = micro(kind)
    pos, neg = make_conds(kind, seed=0)
    pos2, neg2 = make_conds(kind, seed=1)
    positive = pos + _area(pos2, (8, 8, 0, 0)) + _area(neg2, (8, 8, 5, 11), 0.8)
    negative = neg + _area(neg2, (7, 9, 3, 2))  # an odd-sized region
    kw = dict(hw=HW, positive=positive, negative=negative)
    ref = reference(("area", kind), base, **kw)
    probe = CallProbe(patch(method, base))
    with probe:
        out = sample(probe.model, **kw)
    shapes = {(h, w) for _, _, _, h, w in probe.calls}
    assert {(13, 19), (8, 8), (7, 9)} <= shapes, shapes
    assert max(len(c[1]) for c in probe.calls) > 2, probe.calls  # ComfyUI batched >2 chunks into one call
    assert_close(out, ref, close(method))
    assert_worked(logs, method)


# --------------------------------------------------------------------------------------
# Samplers, step counts, img2img, hires fix
# --------------------------------------------------------------------------------------

SAMPLERS = ["euler", "heun", "dpmpp_2m", "lcm"] + [pytest.param(s, marks=pytest.mark.slow)
                                                   for s in ("euler_ancestral", "dpm_2", "dpmpp_sde")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler(method, sampler, logs, compat):
    compat("Samplers", sampler)
    base = micro("sd15")
    ref = reference(("sampler", sampler), base, sampler=sampler)
    out = sample(patch(method, base), sampler=sampler)
    assert_close(out, ref, close(method))
    assert_worked(logs, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [1, 4, pytest.param(20, marks=pytest.mark.slow),
                                   pytest.param(50, marks=pytest.mark.slow)])
def test_steps(method, steps, logs, compat):
    compat("Steps", f"{steps} step{'s' if steps > 1 else ''}")
    base = micro("sd15")
    hw = (8, 8) if steps >= 20 else SMALL
    ref = reference(("steps", steps), base, hw=hw, steps=steps)
    out = sample(patch(method, base), hw=hw, steps=steps)
    active = expected_work(method, steps)["pruned"]  # CAT warms up: 1 step = nothing to do
    assert_close(out, ref, close(method) if steps > 1 else 0.75, differs=active)  # 1 step: the raw x0 at sigma_max
    if not active:
        assert torch.equal(out, ref), "warm-up steps only, yet the output differs from the unpatched run"
        assert measured_work(_RUNS[-1]) == {"pruned": False, "cached": False}, _RUNS[-1].summary()
    lines = summaries(logs, method)
    assert len(lines) == 1 and f"{steps} steps" in lines[0], lines
    assert_worked(logs, method)  # (DaTo's step 0 is always full)


def _init_latent(kind="sd15", hw=SMALL, batch=1, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, tm.LATENT_CHANNELS[kind], *hw), generator=g) * 3.0


@pytest.mark.parametrize("method", METHODS)
def test_img2img_denoise_half(method, logs, compat):
    compat("img2img & hires fix", "img2img, denoise 0.5")
    base = micro("sd15")
    init = _init_latent()
    ref = reference(("img2img",), base, latent=init, denoise=0.5, steps=8)
    out = sample(patch(method, base), latent=init, denoise=0.5, steps=8)
    assert_close(out, ref, close(method))
    assert "8 steps" in summaries(logs, method)[-1]
    assert_worked(logs, method)


@pytest.mark.parametrize("method", METHODS)
def test_hires_fix_two_pass(method, logs, compat):
    compat("img2img & hires fix", "two-pass hires fix, same patched model (no stale state)")
    base = micro("sd15")
    small, big = (6, 8), (11, 15)

    def upscale(x):
        return comfy.utils.common_upscale(x, big[1], big[0], "nearest-exact", "disabled")

    ref1 = reference(("hires1",), base, hw=small, steps=10)
    ref2 = reference(("hires2",), base, latent=upscale(ref1), denoise=0.5, steps=10)
    model = patch(method, base)
    first = sample(model, hw=small, steps=10)
    second = sample(model, latent=upscale(first), denoise=0.5, steps=10)
    assert_close(first, ref1, close(method))
    assert_close(second, ref2, close(method))
    fresh = sample(patch(method, base), latent=upscale(first), denoise=0.5, steps=10)
    assert torch.equal(second, fresh), f"second pass depends on the first: rel {rel(second, fresh):.2e}"
    assert_worked(logs, method, runs=3)


# --------------------------------------------------------------------------------------
# Stacking with LoRA, our own nodes, core patch nodes, ControlNet-/IPAdapter-style patches
# --------------------------------------------------------------------------------------

LORA_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def lora_like(model, strength=1.0):
    """What LoraLoader does to a MODEL: a clone with a weight diff registered via add_patches."""
    m = model.clone()
    weight = model.model.state_dict()[LORA_KEY]
    g = torch.Generator().manual_seed(3)
    diff = (torch.randn(weight.shape, generator=g) * weight.float().std()).to(weight.dtype)
    assert m.add_patches({LORA_KEY: (diff,)}, strength) == [LORA_KEY]
    return m


@pytest.mark.parametrize("method", METHODS)
def test_after_lora(method, logs, compat):
    compat("Stacking", "after a LoRA (add_patches weight diff on attn1.to_q)")
    base = micro("sd15")
    lora = lora_like(base)
    lora_patches = {k: list(v) for k, v in lora.patches.items()}
    ref = reference(("lora",), lora)
    ours_on_base = sample(patch(method, base))
    out = sample(patch(method, lora))
    assert_close(out, ref, close(method))
    assert rel(out, ours_on_base) > 1e-3, "the LoRA weight patch was lost under our patch"
    assert {k: list(v) for k, v in lora.patches.items()} == lora_patches
    assert_worked(logs, method, runs=2)


NEXT = {"sito": "dato", "dato": "cat", "cat": "sito"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("second", ["same", "next"])
def test_two_of_ours_chained(method, second, logs, compat):
    other = method if second == "same" else NEXT[method]
    compat("Stacking", "same node twice" if second == "same" else "followed by another of our nodes")
    base = micro("sd15")
    ref = reference(("default",), base)
    out = sample(patch(other, patch(method, base)))
    assert_close(out, ref, close(method, other), differs=False)  # lower bound: one of the branches below
    warnings = our_warnings(logs)
    assert len(warnings) <= 1, warnings
    if warnings:
        compat.warn(warnings[0])
        assert_stepped_aside(out, ref, method)
    else:  # no warning: both instances must have done their work
        assert not torch.equal(out, ref), "no warning, yet the output is the reference's"
        assert_worked(logs, method)
        assert_worked(logs, other)
        # measured by the image as well: the chain is neither node alone ...
        chain_run = _RUNS[-1]
        for alone in {method, other}:
            single = sample(patch(alone, base))
            if method == other == "cat":
                # ... except CAT twice with the same settings: inside the model the inner instance's
                # call context shadows the outer's, so the blocks do exactly one CAT's work
                # (measured: the same self-attention rows skipped); the outer instance selects from
                # the inner one's merged prediction, so its image is close to one CAT's, not equal
                assert chain_run.row_deficit() == _RUNS[-1].row_deficit() > 0
                assert float((out - single).abs().max()) <= 0.05 * float(single.abs().max())
            else:
                assert not torch.equal(out, single), f"the chain gives the image of {alone} alone: one node did nothing"


def _tome(model):
    from comfy_extras.nodes_tomesd import TomePatchModel
    return TomePatchModel.execute(model, ratio=0.3).result[0]


def _hypertile(model):
    from comfy_extras.nodes_hypertile import HyperTile
    out = HyperTile.execute(model, tile_size=32, swap_size=2, max_depth=0, scale_depth=False)
    return out[0] if isinstance(out, tuple) else out.result[0]  # 0.3.75's HyperTile returns a plain tuple


def _easycache(model):
    from comfy_extras.nodes_easycache import EasyCacheNode
    return EasyCacheNode.execute(model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                 verbose=False).result[0]


def _freeu(model):
    from comfy_extras.nodes_freelunch import FreeU_V2
    return FreeU_V2().patch(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]


CORE = {"ToMe": _tome, "HyperTile": _hypertile, "EasyCache": _easycache, "FreeU_V2": _freeu}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("core", list(CORE))
@pytest.mark.parametrize("order", ["core-first", pytest.param("ours-first", marks=pytest.mark.slow)])
def test_with_core_patch_node(method, core, order, logs, compat):
    """``core-first``: MODEL -> core node -> ours; ``ours-first``: MODEL -> ours -> core node."""
    compat("Stacking", f"{core} {'before' if order == 'core-first' else 'after'} ours in the graph")
    base = micro("sd15")
    torch.manual_seed(0)  # HyperTile draws its tiling from torch's global RNG
    ref = reference(("core", core), CORE[core](base), hw=STACK_HW, steps=8)
    model = patch(method, CORE[core](base)) if order == "core-first" else CORE[core](patch(method, base))
    torch.manual_seed(0)
    out = sample(model, hw=STACK_HW, steps=8)
    assert_close(out, ref, close(method), differs=False)  # lower bound: one of the branches below
    warnings = our_warnings(logs)
    assert len(warnings) <= 1, warnings
    if warnings:
        compat.warn(warnings[0])
        assert_stepped_aside(out, ref, method)
    else:
        assert not torch.equal(out, ref), "no warning, yet the output is the reference's"
        assert_worked(logs, method)


@pytest.mark.parametrize("method", METHODS)
def test_in_place_block_patch_does_not_corrupt_caches(method, logs, compat):
    """FreeU_V2's output_block_patch scales ``h`` in place. Whatever we cache across steps must
    not be that tensor: the same run with a copy-first FreeU must give the identical result."""
    compat("Stacking", "FreeU_V2 editing h in place vs a copying FreeU: identical")
    base = micro("sd15")
    # DaTo: cache 2 block pairs deep with runs of shallow steps, so that a running output block
    # (128 channels, FreeU's b2 level here) receives a cached tensor as its input h
    over = dict(cache_depth=2, schedule="deepcache_5") if method == "dato" else {}

    def copying_freeu(model):
        m = _freeu(model)
        patches = m.model_options["transformer_options"]["patches"]["output_block_patch"]
        freeu = patches[-1]
        patches[-1] = lambda h, hsp, transformer_options: freeu(h.clone(), hsp.clone(), transformer_options)
        return m

    in_place = sample(_freeu(patch(method, base, **over)), hw=STACK_HW, steps=10)
    copying = sample(copying_freeu(patch(method, base, **over)), hw=STACK_HW, steps=10)
    assert torch.equal(in_place, copying), \
        f"an in-place block patch changed our cached features: rel {rel(in_place, copying):.2e}"
    assert_worked(logs, method, runs=2)


@pytest.mark.parametrize("method", METHODS)
def test_controlnet_style_residual(method, logs, compat):
    compat("Stacking", "ControlNet-style residual (input/output block patches)")
    base = micro("sd15")
    calls = {"in": 0, "out": 0}

    def add_residual(model):
        m = model.clone()

        def input_patch(h, transformer_options):
            calls["in"] += 1
            return h + 0.05 * h.mean(dim=1, keepdim=True)

        def output_patch(h, hsp, transformer_options):
            calls["out"] += 1
            return h, hsp + 0.05

        m.set_model_input_block_patch(input_patch)
        m.set_model_output_block_patch(output_patch)
        return m

    ref = reference(("controlnet",), add_residual(base))
    before = dict(calls)
    out = sample(add_residual(patch(method, base)))
    assert calls["in"] > before["in"] and calls["out"] > before["out"]
    assert_close(out, ref, close(method))
    assert_worked(logs, method)


@pytest.mark.parametrize("method", METHODS)
def test_attn2_replace_ipadapter_style(method, logs, compat):
    compat("Stacking", "attn2 replace patch (IPAdapter-style, needs full query length)")
    from comfy.ldm.modules.attention import optimized_attention

    base = micro("sd15")
    seen = {"calls": 0, "mismatch": []}

    def ip_adapter_like(q, k, v, extra_options):
        seen["calls"] += 1
        shape = extra_options["activations_shape"]
        expected = shape[-2] * shape[-1]  # IPAdapter derives its mask size from q's token count
        if q.shape[1] != expected:
            seen["mismatch"].append((tuple(extra_options["block"]), q.shape[1], expected))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    def add_replace(model):
        m = model.clone()
        for block in (("input", 1), ("output", 3)):  # the highest-resolution transformer blocks
            m.set_model_attn2_replace(ip_adapter_like, *block)
        return m

    ref = reference(("attn2-replace",), add_replace(base))
    seen["calls"] = 0
    out = sample(add_replace(patch(method, base)))
    assert seen["calls"] > 0
    assert_close(out, ref, close(method), differs=False)  # lower bound: one of the branches below
    warnings = our_warnings(logs)
    if seen["mismatch"]:
        # pruned queries reached another pack's attn2 replacement: only acceptable with one warning
        assert len(warnings) == 1 and "attn2" in warnings[0], (seen["mismatch"][:3], warnings)
        compat.warn(warnings[0])
        assert_stepped_aside(out, ref, method)
    else:
        assert len(warnings) <= 1, warnings
        assert not torch.equal(out, ref), "no warning, yet the output is the reference's"
        assert_worked(logs, method)


# --------------------------------------------------------------------------------------
# dtypes, torch.compile
# --------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CLOSE = {"fp32": CLOSE, "fp16": CLOSE, "bf16": 0.75}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_dtype_micro(method, dtype, logs, compat):
    compat("dtypes", f"{dtype} weights")
    base = micro("sd15", DTYPES[dtype])
    assert base.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.dtype == DTYPES[dtype]
    ref = reference(("dtype", dtype), base)
    out = sample(patch(method, base))
    assert_close(out, ref, DTYPE_CLOSE[dtype])
    assert_worked(logs, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dtype_tiny_models(method, dtype, logs, compat):
    compat("dtypes", f"{dtype} weights, tiny_models.build (320 ch)")
    base = tiny("sd15", DTYPES[dtype])
    ref = reference(("dtype-tiny", dtype), base, hw=(8, 8), steps=STEPS)
    out = sample(patch(method, base), hw=(8, 8), steps=STEPS)
    assert_close(out, ref, DTYPE_CLOSE[dtype])
    assert_worked(logs, method)


def _fresh_compile_state() -> None:
    """Empty ComfyUI's model cache and dynamo's before a compile test.

    Models left loaded by earlier tests get unloaded (and garbage-collected) whenever ComfyUI
    needs room, which can fall between a test's two runs and retrace a frame for reasons that
    are not ours.
    """
    import gc

    import torch._dynamo

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()
    torch._dynamo.reset()


def _unique_graphs() -> int:
    import torch._dynamo.utils as du
    return int(du.counters["stats"].get("unique_graphs", 0))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torch_compile_dynamo_graphs(method, logs, compat):
    """ComfyUI's TorchCompileModel node with dynamo's "eager" backend: the same tracing, guards
    and recompilations as inductor without the C++ code generation (8-10 min per model here)."""
    compat("torch.compile", "TorchCompileModel (dynamo, eager backend): correct, no recompile per step/run")
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    _fresh_compile_state()
    base = micro("sd15")
    expected = sample(patch(method, base), steps=8)
    compiled = TorchCompileModel.execute(patch(method, base), "eager").result[0]
    first = sample(compiled, steps=8)
    graphs1 = _unique_graphs()
    second = sample(compiled, steps=8)
    graphs2 = _unique_graphs()
    assert_close(first, expected, 1e-4, differs=False)  # compiled vs eager, both patched
    assert torch.equal(first, second)
    assert graphs2 == graphs1, f"the second run compiled {graphs2 - graphs1} new graphs"
    assert_worked(logs, method, runs=3)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TPC_COMPILE_INDUCTOR"),
                    reason="inductor on CPU: 8-10 min of C++ code generation per model on this machine; "
                           "set TPC_COMPILE_INDUCTOR=1 to run")
@pytest.mark.parametrize("method", METHODS)
def test_torch_compile_inductor(method, logs, compat):
    compat("torch.compile", "TorchCompileModel node, inductor backend (CPU)")
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    _fresh_compile_state()
    base = micro("sd15")
    expected = sample(patch(method, base))
    compiled = TorchCompileModel.execute(patch(method, base), "inductor").result[0]
    first = sample(compiled)
    graphs1 = _unique_graphs()
    second = sample(compiled)
    graphs2 = _unique_graphs()
    assert_close(first, expected, 1e-2, differs=False)
    assert_close(second, expected, 1e-2, differs=False)
    assert graphs2 == graphs1
    assert_worked(logs, method, runs=3)


# --------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_same_patched_model_queued_twice(method, logs, compat):
    compat("Lifecycle", "same patched MODEL sampled twice (execution cache re-serves it)")
    model = patch(method, micro("sd15"))
    a = sample(model, steps=10)
    b = sample(model, steps=10)
    assert torch.equal(a, b)
    lines = summaries(logs, method)
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert_worked(logs, method, runs=2)


def _interrupt_by_callback(at_step):
    def callback(step, *rest):
        if step == at_step:
            comfy.model_management.interrupt_current_processing(True)
        # what the server's progress-bar hook (main.py) does on every step
        comfy.model_management.throw_exception_if_processing_interrupted()
    return callback


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["step-callback", pytest.param("inside-block", marks=pytest.mark.slow)])
def test_interrupt_then_rerun(method, where, logs, compat):
    compat("Lifecycle", f"interrupt mid-sampling ({where.replace('-', ' ')}), then run again")
    base = micro("sd15")
    trip = {"armed": False, "count": 0}

    def tripwire(n, extra):  # another pack's attn1 output patch: interrupts in the middle of a step
        if trip["armed"]:
            trip["count"] += 1
            if trip["count"] == 9:
                comfy.model_management.interrupt_current_processing(True)
                comfy.model_management.throw_exception_if_processing_interrupted()
        return n

    def build_model():
        m = patch(method, base).clone()
        m.set_model_attn1_output_patch(tripwire)
        return m

    clean = sample(build_model(), steps=10)
    model = build_model()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            if where == "step-callback":
                sample(model, steps=10, callback=_interrupt_by_callback(4))
            else:
                trip["armed"] = True
                sample(model, steps=10)
    finally:
        trip["armed"] = False
        comfy.model_management.interrupt_current_processing(False)
    again = sample(model, steps=10)
    assert torch.equal(again, clean), f"rerun after interrupt differs: rel {rel(again, clean):.2e}"
    assert_worked(logs, method)


@pytest.mark.parametrize("method", METHODS)
def test_input_model_unchanged(method, compat):
    compat("Lifecycle", "input MODEL's weights, patches, wrappers unchanged")
    base = lora_like(micro("sd15"))  # a MODEL that already carries a weight patch and an attn1 patch
    base.set_model_attn1_patch(lambda n, c, v, extra: (n, c, v))
    snap = _snapshot(base)
    ref = sample(base)
    sample(patch(method, base))
    sample(patch(NEXT[method], base))  # (chains are the Stacking rows; here: two patches of one base)
    assert_unchanged(base, snap)
    assert torch.equal(sample(base), ref)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

BAD = [
    ("sito", dict(prune_ratio=0.8), "0.75"),
    ("sito", dict(prune_ratio=-0.1), "prune_ratio"),
    ("sito", dict(prune_ratio=0.5, sx=1, sy=1), "window"),
    ("sito", dict(prune_ratio=0.5, sx=0, sy=2), "sx"),
    ("sito", dict(prune_ratio=0.5, start_percent=0.7, end_percent=0.2), "start_percent"),
    ("dato", dict(prune_ratio=0.9), "0.75"),
    ("dato", dict(prune_ratio=0.4, custom_schedule="F S1x3 banana"), "custom_schedule"),
    ("dato", dict(prune_ratio=0.4, custom_schedule="S0 R R"), "custom_schedule"),
    ("dato", dict(prune_ratio=0.4, schedule="no_such_preset"), "no_such_preset"),
    ("dato", dict(prune_ratio=0.4, start_percent=0.9, end_percent=0.1), "start_percent"),
    ("cat", dict(keep_ratio=0.0), "keep_ratio"),
    ("cat", dict(keep_ratio=1.5), "keep_ratio"),
    ("cat", dict(keep_ratio=0.3, warmup_steps=-1), "warmup_steps"),
    ("cat", dict(keep_ratio=0.3, start_percent=1.0, end_percent=0.0), "start_percent"),
]


def _validate_kwargs(method, kwargs):
    params = inspect.signature(NODES[method].validate_inputs).parameters
    return {k: v for k, v in kwargs.items() if k in params}


@pytest.mark.parametrize("method,kwargs,fragment", BAD, ids=[f"{m}-" + "-".join(f"{k}={v}" for k, v in kw.items())
                                                              for m, kw, _ in BAD])
def test_bad_input_rejected_at_validation(method, kwargs, fragment, compat):
    compat("Bad input", "out-of-range ratio/window/percent, bad preset, unparsable schedule")
    problem = NODES[method].validate_inputs(**_validate_kwargs(method, kwargs))
    assert isinstance(problem, str) and fragment in problem, problem
    with pytest.raises(ValueError) as info:  # the node refuses too (API callers may skip validation)
        APPLY[method](micro("sd15"), **kwargs)
    assert fragment in str(info.value)
    assert info.traceback[-1].path.name == f"{method}_node.py", info.traceback[-1]  # raised by the node itself


@pytest.mark.parametrize("method", METHODS)
def test_defaults_validate(method, compat):
    compat("Bad input", "defaults and matrix settings pass validation")
    assert NODES[method].validate_inputs() is True
    assert NODES[method].validate_inputs(**_validate_kwargs(method, SETTINGS[method])) is True


class WeirdDiffusion(torch.nn.Module):
    """A diffusion model the pack does not know (no input_blocks, no DiT blocks)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_unsupported_model_passes_through_with_one_warning(method, logs, compat):
    compat("Bad input", "unsupported model class: pass-through + one warning naming it")
    base = micro("sd15").clone()
    base.add_object_patch("diffusion_model", WeirdDiffusion(base.model.diffusion_model))
    out = patch(method, base)
    assert out is base
    warnings = our_warnings(logs)
    assert len(warnings) == 1 and "WeirdDiffusion" in warnings[0], warnings


# --------------------------------------------------------------------------------------
# Last: nothing above modified the shared models
# --------------------------------------------------------------------------------------

def test_zz_shared_models_untouched(compat):
    compat("Lifecycle", "shared input models untouched after the whole matrix")
    checked = 0
    for key, model in list(_MODELS.items()):
        if key[0] == "micro" and len(key) == 3:
            assert_unchanged(model, _MODELS[key + ("snapshot",)])
            checked += 1
    if not checked:
        pytest.skip("no shared model was used (test selected alone)")
