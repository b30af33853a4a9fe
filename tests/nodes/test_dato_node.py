"""DaTo Prune + Cache node against the real ComfyUI sampler (``comfy.sample.sample``) with tiny
random-weight UNets of the real architectures (SD1.5-like and SDXL-like).

What is measured, and how:
  * Which UNet layers really computed, per model call: forward pre-hooks on a *child* of
    every ResBlock (``in_layers[0]``) and every SpatialTransformer (``norm``). The pack
    object-patches the ``forward`` of the blocks it may skip; a skipped layer never reaches
    its children, so these hooks count the original computation only, whenever they are
    registered (no dependency on the order of ``apply_dato`` and the instrumentation).
  * Which call is which: a forward pre-hook on the diffusion model itself (the
    DIFFUSION_MODEL level; it fires even when the pack answers a reuse step from its cache)
    records ``transformer_options["sigmas"]``, ``cond_or_uncond`` and the batch size.
  * The expected kind of every call comes from the sigma schedule: a call at
    ``sigmas[j]`` belongs to step ``j`` (Heun's second evaluation of step ``i`` is at
    ``sigmas[i+1]``) and must do what ``schedule[j]`` says.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch

import comfy.controlnet
import comfy.samplers
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from tiny_models import build, make_conds, run_sampler, sample_sigmas, step_of
from work_meter import ModuleHooks
from token_pruning_cache.nodes.dato_node import DEFAULT_PRESET, PRESETS, DaToPruneCache, apply_dato
from token_pruning_cache.pruning_core.schedule import FULL, REUSE, Schedule

HW = (8, 8)
SUMMARY = re.compile(r"^DaTo: (\d+) full / (\d+) shallow / (\d+) reused of (\d+) steps")


@pytest.fixture(scope="module")
def sd15():
    return build("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return build("sdxl")


@pytest.fixture(scope="module")
def sd15_ref(sd15):
    """Unpatched 2-step euler run (CFG on, batch 1), shared by the bit-identity tests."""
    return run_sampler(sd15, latent_hw=HW, batch=1, steps=2)


# --------------------------------------------------------------------------------------
# Instrumentation
# --------------------------------------------------------------------------------------

class CallLog(ModuleHooks):
    """Per diffusion-model call: sigma, cond_or_uncond, batch, output, and what really computed."""

    def __init__(self, patcher):
        super().__init__(patcher)
        self.calls: list[dict] = []

    def install(self) -> None:
        self.before(self.dm, self._start, with_kwargs=True)
        self.after(self.dm, self._end)
        conv_in = self.dm.input_blocks[0][0]  # never object-patched: rank 0 always runs unless the step is reused
        self.before(conv_in, self._hit("conv_in", "input_blocks.0.0"))
        for name, mod in self.dm.named_modules():
            if isinstance(mod, ResBlock):
                self.before(mod.in_layers[0], self._hit("res", name))
            elif isinstance(mod, SpatialTransformer):
                self.before(mod.norm, self._hit("st", name))
            elif name.endswith("attn1"):
                self.before(mod, self._attn(name))

    def _start(self, module, args, kwargs):
        to = kwargs.get("transformer_options") or {}
        x = args[0] if args else kwargs["x"]
        self.calls.append({"sigma": float(to["sigmas"].reshape(-1)[0]), "cond_or_uncond": list(to["cond_or_uncond"]),
                           "batch": x.shape[0], "res": [], "st": [], "attn1": [], "conv_in": [], "eps": None})

    def _end(self, module, args, out):
        self.calls[-1]["eps"] = out.detach().clone()

    def _hit(self, kind, name):
        def hook(module, args):
            self.calls[-1][kind].append(name)
        return hook

    def _attn(self, name):
        def hook(module, args):
            self.calls[-1]["attn1"].append((name, args[0].shape[1]))
        return hook


def names_of(dm, cls) -> list[str]:
    return [n for n, m in dm.named_modules() if isinstance(m, cls)]


def depth_cap(dm) -> int:
    return len(dm.input_blocks) - 1


def live_names(dm, cls, step) -> list[str]:
    """Names of ``cls`` layers that must compute on a step of this kind (independent of the pack):
    full = all; shallow d = input_blocks[i < d] and their mirrors output_blocks[j >= L_out - d];
    reuse = none."""
    names = names_of(dm, cls)
    if step.kind == FULL:
        return names
    if step.kind == REUSE:
        return []
    n_out = len(dm.output_blocks)
    out = []
    for n in names:
        part, idx = n.split(".")[0], n.split(".")[1] if "." in n else "0"
        if part == "input_blocks" and int(idx) < step.depth:
            out.append(n)
        elif part == "output_blocks" and int(idx) >= n_out - step.depth:
            out.append(n)
    return out


def assert_calls_follow(log: CallLog, schedule: Schedule, sigmas: list[float]) -> list[int]:
    """Every call computed exactly the layers its step's kind allows. Returns the step of each call."""
    dm = log.dm
    steps = []
    for k, call in enumerate(log.calls):
        j = step_of(call["sigma"], sigmas)
        steps.append(j)
        step = schedule[j]
        assert sorted(call["res"]) == sorted(live_names(dm, ResBlock, step)), (
            f"call {k} (step {j}, {step}) computed ResBlocks {call['res']}")
        assert sorted(call["st"]) == sorted(live_names(dm, SpatialTransformer, step)), (
            f"call {k} (step {j}, {step}) computed SpatialTransformers {call['st']}")
        assert len(call["conv_in"]) == (0 if step.kind == REUSE else 1), f"call {k} (step {j}, {step}): conv_in"
    return steps


def summaries(caplog) -> list[tuple[int, int, int, int]]:
    out = []
    for r in caplog.records:
        m = SUMMARY.match(r.getMessage())
        if m:
            out.append(tuple(int(g) for g in m.groups()))
    return out


def expected_counts(schedule: Schedule) -> tuple[int, int, int, int]:
    return schedule.full_count, schedule.shallow_count, schedule.reuse_count, len(schedule)


# --------------------------------------------------------------------------------------
# Bit identity
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(schedule="pruning_only"), dict(custom_schedule="F")],
                         ids=["pruning_only", "custom_F"])
def test_all_full_steps_and_ratio_zero_are_bit_identical(sd15, sd15_ref, opts):
    m = apply_dato(sd15, prune_ratio=0.0, **opts)
    out = run_sampler(m, latent_hw=HW, batch=1, steps=2)
    assert torch.equal(out, sd15_ref), f"{opts}: all-full schedule with ratio 0 differs from the unpatched model"


# --------------------------------------------------------------------------------------
# Reuse and shallow steps skip the right work
# --------------------------------------------------------------------------------------

def test_reuse_steps_do_not_run_the_unet(sd15):
    n_res = len(names_of(sd15.model.diffusion_model, ResBlock))
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule="F R R R")
    with CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=4, cfg=1.0)
    assert torch.isfinite(out).all()
    assert len(log.calls) == 4, "one diffusion-model call per euler step expected"
    assert sum(len(c["res"]) for c in log.calls) == n_res, "F R R R must cost one UNet evaluation of ResBlocks"
    assert [len(c["res"]) for c in log.calls] == [n_res, 0, 0, 0]
    # a reused step returns exactly the previous prediction of that chunk
    for c in log.calls[1:]:
        assert torch.equal(c["eps"], log.calls[0]["eps"])


@pytest.mark.parametrize("depth", [1, 2, 9], ids=["S1", "S2", "S9_clamped"])
def test_shallow_steps_run_only_the_outer_blocks(sd15, depth):
    dm = sd15.model.diffusion_model
    text = f"F S{depth} S{depth} S{depth}"
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text)
    sigmas = sample_sigmas(sd15, 4)
    with CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=4, cfg=1.0)
    assert torch.isfinite(out).all()
    schedule = Schedule.parse(text).clamp_depth(depth_cap(dm))
    assert assert_calls_follow(log, schedule, sigmas) == [0, 1, 2, 3]
    shallow = log.calls[1]
    assert not any(n.startswith("middle_block") for n in shallow["res"]), "middle block ran on a shallow step"
    if depth == 1:
        # SD1.5 layout: input_blocks[0] is the conv_in (no ResBlock); the last output block computes
        assert shallow["res"] == ["output_blocks.3.0"] and shallow["st"] == ["output_blocks.3.1"]


# --------------------------------------------------------------------------------------
# Samplers, step counts, CFG
# --------------------------------------------------------------------------------------

MIXED = "F S1 R S1 F R"


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_samplers_keep_the_schedule_aligned_to_steps(sd15, sampler, caplog):
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=MIXED)
    sigmas = sample_sigmas(sd15, 6)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"), CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=6, sampler=sampler, cfg=1.0)
    assert torch.isfinite(out).all() and out.shape == (1, 4, *HW)
    schedule = Schedule.parse(MIXED)
    steps = assert_calls_follow(log, schedule, sigmas)
    if sampler == "heun":
        # two evaluations per step (the last step one): step i's second call is at sigma_{i+1}
        assert steps == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    else:
        assert steps == [0, 1, 2, 3, 4, 5]
    assert summaries(caplog) == [expected_counts(schedule)]


OFFICIAL_PRESETS = {  # preset -> (its schedule at n steps, its counts at 10 and 20 steps)
    # each kind keeps its share of the other steps (50 steps: 4/20/25 of 49 -> 10 steps: 1/4/4 of 9)
    "dato_official": (lambda n: Schedule.dato_search_old(n), {10: (2, 4, 4, 10), 20: (3, 8, 9, 20)}),
    # all five full steps kept
    "dato_official_dense": (lambda n: Schedule.dato_search_old().resample(n, keep_refreshes=True),
                            {10: (5, 4, 1, 10), 20: (5, 11, 4, 20)}),
}


@pytest.mark.parametrize("preset", list(OFFICIAL_PRESETS))
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_official_presets_at_10_20_50_steps(sd15, steps, preset, caplog):
    m = apply_dato(sd15, prune_ratio=0.4, schedule=preset)  # the official 50-step list, resampled
    sigmas = sample_sigmas(sd15, steps)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"), CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=steps, cfg=1.0)
    assert torch.isfinite(out).all()
    make, counts = OFFICIAL_PRESETS[preset]
    schedule = make(steps)
    # the counts are fixed numbers (not the code under test compared with itself) at every step count
    assert expected_counts(schedule) == {**counts, 50: (5, 20, 25, 50)}[steps]
    assert assert_calls_follow(log, schedule, sigmas) == list(range(steps))
    assert summaries(caplog) == [expected_counts(schedule)]
    assert schedule.reuse_count > 0 and schedule.shallow_count > 0, "the preset must exercise shallow and reuse steps"


def test_default_preset_is_the_share_keeping_official_list():
    assert DEFAULT_PRESET == "dato_official"
    assert PRESETS[DEFAULT_PRESET](20, 1) == Schedule.dato_search_old().resample(20)


@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_cfg_on_and_off(sd15, cfg):
    text = "F S1 R S1"
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text)
    sigmas = sample_sigmas(sd15, 4)
    with CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=4, cfg=cfg)
    assert torch.isfinite(out).all()
    assert assert_calls_follow(log, Schedule.parse(text), sigmas) == [0, 1, 2, 3]
    if cfg == 1.0:
        assert all(c["cond_or_uncond"] == [0] and c["batch"] == 1 for c in log.calls), "cfg 1.0 must drop uncond"
    else:
        assert all(sorted(c["cond_or_uncond"]) == [0, 1] and c["batch"] == 2 for c in log.calls)


@pytest.mark.parametrize("how", ["prompt_lengths", "no_concat"])
def test_cond_and_uncond_as_separate_calls(sd15, how, monkeypatch, caplog):
    """ComfyUI runs cond and uncond as separate model calls at the same sigma when their conds
    cannot be concatenated: naturally with prompt lengths whose lcm padding is too large
    (77 vs 13 tokens), or by forcing the batching decision (``can_concat_cond``)."""
    pos, _ = make_conds("sd15", seed=0)
    if how == "prompt_lengths":
        _, neg = make_conds("sd15", seed=1, tokens=13)
    else:
        _, neg = make_conds("sd15", seed=1)
        monkeypatch.setattr(comfy.samplers, "can_concat_cond", lambda c1, c2: c1 is c2)
    text = "F S1 R S1"
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text)
    sigmas = sample_sigmas(sd15, 4)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"), CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=4, positive=pos, negative=neg)
    assert torch.isfinite(out).all()
    # really separate: two batch-1 calls per step, one cond and one uncond
    assert len(log.calls) == 8 and all(c["batch"] == 1 and len(c["cond_or_uncond"]) == 1 for c in log.calls)
    steps = assert_calls_follow(log, Schedule.parse(text), sigmas)
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]
    for a, b in zip(log.calls[0::2], log.calls[1::2]):
        assert sorted(a["cond_or_uncond"] + b["cond_or_uncond"]) == [0, 1]
    # each chunk reuses its *own* previous prediction
    for k in (4, 5):
        prev = next(c for c in log.calls[2:4] if c["cond_or_uncond"] == log.calls[k]["cond_or_uncond"])
        assert torch.equal(log.calls[k]["eps"], prev["eps"])
    assert summaries(caplog) == [(1, 2, 1, 4)]


# --------------------------------------------------------------------------------------
# State across runs
# --------------------------------------------------------------------------------------

def test_second_run_at_other_resolution_does_not_leak(sd15):
    text = "F S1 R S1"
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text)
    a1 = run_sampler(m, latent_hw=(8, 8), batch=1, steps=4, cfg=1.0)
    b = run_sampler(m, latent_hw=(12, 16), batch=1, steps=4, cfg=1.0)
    a2 = run_sampler(m, latent_hw=(8, 8), batch=1, steps=4, cfg=1.0)
    assert b.shape == (1, 4, 12, 16) and torch.isfinite(b).all()
    assert torch.equal(a1, a2), "the 8x8 run changed after a 12x16 run with the same patched model (state leak)"
    fresh = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text)
    assert torch.equal(run_sampler(fresh, latent_hw=(12, 16), batch=1, steps=4, cfg=1.0), b), (
        "the 12x16 run depends on the 8x8 run before it (state leak)")


def test_summary_line_once_per_run(sd15, caplog):
    text = "F S1 R S1 S1 R"
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        run_sampler(m, latent_hw=HW, batch=1, steps=6, cfg=1.0)
        run_sampler(m, latent_hw=HW, batch=1, steps=6, cfg=1.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DaTo")]
    assert len(lines) == 2, lines
    assert summaries(caplog) == [(1, 3, 2, 6)] * 2
    assert "r=0.4 pruned" in lines[0]


# --------------------------------------------------------------------------------------
# ControlNet residuals and other packs' block patches
# --------------------------------------------------------------------------------------

class ConstantControl(comfy.controlnet.ControlBase):
    """A minimal real ControlNet object: it travels in the conditioning like
    ``comfy.controlnet.ControlNet`` and returns per-block residuals (``output`` for the skip
    connections of every input block, ``middle``) that the UNet's ``apply_control`` adds.
    Residuals are non-zero only at the chosen sigmas. Shapes are those of the tiny SD1.5 UNet."""

    CHANNELS = (320, 320, 320, 640)  # outputs of input_blocks 0..3
    FACTORS = (1, 1, 2, 2)

    def __init__(self, active_sigmas, scale=0.5):
        super().__init__()
        self.active_sigmas = list(active_sigmas)
        self.scale = scale
        self.seen: list[tuple[float, bool]] = []

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        sigma = float(t.reshape(-1)[0])
        active = any(abs(sigma - s) <= 1e-5 * max(s, 1.0) for s in self.active_sigmas)
        self.seen.append((sigma, active))
        b, _, h, w = x_noisy.shape
        gen = torch.Generator().manual_seed(7)

        def residual(ch, f):
            r = torch.randn((1, ch, -(-h // f), -(-w // f)), generator=gen) * self.scale
            return (r if active else torch.zeros_like(r)).expand(b, -1, -1, -1).to(x_noisy.dtype).clone()

        outputs = [residual(c, f) for c, f in zip(self.CHANNELS, self.FACTORS)]
        return {"input": [], "middle": [residual(640, 2)], "output": outputs}

    def copy(self):
        c = ConstantControl(self.active_sigmas, self.scale)
        self.copy_to(c)
        c.seen = self.seen
        return c


def _with_control(kind, control):
    pos, neg = make_conds(kind, seed=0)
    pos[0][1]["control"] = control
    pos[0][1]["control_apply_to_uncond"] = True
    return pos, neg


def _output_patch(active_sigmas):
    """Another pack's output_block_patch: adds a constant to the skip input of the last output block."""
    def patch(h, hsp, transformer_options):
        sigma = float(transformer_options["sigmas"].reshape(-1)[0])
        if transformer_options["block"] == ("output", 3) and any(abs(sigma - s) <= 1e-5 * max(s, 1.0)
                                                                  for s in active_sigmas):
            hsp = hsp + 0.5
        return h, hsp
    return patch


@pytest.mark.parametrize("how", ["controlnet", "output_block_patch"])
def test_control_residuals_still_applied_on_full_and_shallow_steps(sd15, how, caplog):
    text = "F S1 S1"  # steps 1-2 shallow: only input_blocks[0] and output_blocks[3] live
    sigmas = sample_sigmas(sd15, 3)

    def run(active, steps=3, dato=True):
        if how == "controlnet":
            base = sd15
            pos, neg = _with_control("sd15", ConstantControl(active))
        else:
            base = sd15.clone()
            base.set_model_output_block_patch(_output_patch(active))
            pos, neg = make_conds("sd15", seed=0)
        model = apply_dato(base, prune_ratio=0.0, custom_schedule=text) if dato else base
        with CallLog(sd15) as log:
            run_sampler(model, latent_hw=HW, batch=1, steps=steps, cfg=1.0, positive=pos, negative=neg)
        return log.calls

    with caplog.at_level(logging.WARNING):
        off = run([])
        on_full = run([sigmas[0]])
        on_shallow = run([sigmas[2]])
        unpatched_first = run([sigmas[0]], steps=1, dato=False)  # sigma_max is step 0 of any 'normal' run
    assert not [r for r in caplog.records if "could not be applied" in r.getMessage()], "control shape mismatch"
    schedule = Schedule.parse(text)
    for calls in (off, on_full, on_shallow):
        log = CallLog(sd15)
        log.calls = calls
        assert_calls_follow(log, schedule, sigmas)
    # full step: the residual changes the prediction exactly as on the unpatched model
    assert not torch.equal(on_full[0]["eps"], off[0]["eps"]), "control had no effect on a full step"
    assert torch.equal(on_full[0]["eps"], unpatched_first[0]["eps"]), "full step with control differs from unpatched"
    # shallow step: identical history up to step 2, then the live outer blocks carry the residual
    assert torch.equal(on_shallow[1]["eps"], off[1]["eps"])
    diff = (on_shallow[2]["eps"] - off[2]["eps"]).abs().max().item()
    assert diff > 1e-3, f"control residual lost on a shallow step (max |delta eps| = {diff})"


# --------------------------------------------------------------------------------------
# Validation, unsupported models, SDXL
# --------------------------------------------------------------------------------------

def test_validation_messages():
    msg = DaToPruneCache.validate_inputs(custom_schedule="F Q")
    assert isinstance(msg, str) and "custom_schedule" in msg
    assert isinstance(DaToPruneCache.validate_inputs(custom_schedule="S1 F"), str), "a schedule must start with F"
    assert isinstance(DaToPruneCache.validate_inputs(schedule="nope"), str)
    assert isinstance(DaToPruneCache.validate_inputs(prune_ratio=0.9), str)
    assert DaToPruneCache.validate_inputs(custom_schedule="F S1x3 R") is True
    assert DaToPruneCache.validate_inputs() is True
    with pytest.raises(ValueError, match="custom_schedule"):
        apply_dato(None, custom_schedule="F Q")


def test_unsupported_model_passes_through_with_one_warning(caplog):
    m = build("sd3")
    options_before = repr(m.model_options)
    with caplog.at_level(logging.WARNING, logger="token_pruning_cache"):
        out = apply_dato(m, prune_ratio=0.4)
    assert out is m and repr(m.model_options) == options_before and not m.object_patches
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "passed through" in warnings[0].getMessage()


def test_sdxl_bit_identical_at_ratio_zero(sdxl):
    ref = run_sampler(sdxl, latent_hw=HW, batch=1, steps=2, cfg=1.0)
    out = run_sampler(apply_dato(sdxl, prune_ratio=0.0, schedule="pruning_only"), latent_hw=HW, batch=1, steps=2,
                      cfg=1.0)
    assert torch.equal(out, ref)


def test_sdxl_uses_its_own_depth_and_level(sdxl, caplog):
    dm = sdxl.model.diffusion_model
    assert depth_cap(dm) == 5 and len(dm.output_blocks) == 6
    text = "F S1 S9 R"  # S9 is clamped to SDXL's 5 block pairs (SD1.5 here: 3)
    m = apply_dato(sdxl, prune_ratio=0.4, custom_schedule=text)
    sigmas = sample_sigmas(sdxl, 4)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"), CallLog(sdxl) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=4)
    assert torch.isfinite(out).all()
    schedule = Schedule.parse(text).clamp_depth(5)
    assert assert_calls_follow(log, schedule, sigmas) == [0, 1, 2, 3]
    # SDXL's highest-resolution level has no transformer: a depth-1 step runs one ResBlock only
    assert log.calls[1]["res"] == ["output_blocks.5.0"] and log.calls[1]["st"] == []
    assert "middle_block.0" not in log.calls[2]["res"] and "input_blocks.5.0" not in log.calls[2]["res"]
    assert summaries(caplog) == [(1, 2, 1, 4)]
    # token pruning follows the model: SDXL's first attention level is 4x4 here (downsample 2)
    lengths = {n for c in log.calls for _, n in c["attn1"]}
    full_level = (HW[0] // 2) * (HW[1] // 2)
    assert full_level not in lengths, f"SDXL's top attention level was not pruned: {sorted(lengths)}"
    assert full_level - int(0.4 * full_level) in lengths and (HW[0] // 4) * (HW[1] // 4) in lengths


# --------------------------------------------------------------------------------------
# Dynamics: which map the planner gets, and what each dynamics option changes
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro15():
    from tiny_models import micro
    return micro("sd15")


class PlanSpy:
    """Wraps the node's ``dato_plan``: records, per planner call, the model call it belongs to
    (the index in ``log.calls``), the dynamics map it was given, the call's cond_or_uncond and
    the plan's base tokens."""

    def __init__(self, monkeypatch, log):
        import token_pruning_cache.nodes.dato_node as node
        from token_pruning_cache.pruning_core.dato import dato_plan as real
        self.log, self.seen = log, []

        def spy(x, grid, cfg, dynamics, dynamics_grid, generator, cond_or_uncond=None):
            plan = real(x, grid, cfg, dynamics, dynamics_grid, generator, cond_or_uncond)
            self.seen.append({"call": len(log.calls) - 1, "map": None if dynamics is None else dynamics.clone(),
                              "grid": dynamics_grid, "cond_or_uncond": cond_or_uncond,
                              "base": None if plan is None else plan.base.clone()})
            return plan
        monkeypatch.setattr(node, "dato_plan", spy)


@pytest.mark.usefixtures("one_torch_thread")
def test_dynamics_map_comes_from_the_last_two_evaluations_of_the_same_chunk(micro15, monkeypatch):
    """Cond and uncond in separate calls: each chunk's map is D of *its own* last two computed
    predictions; a reused step adds no evaluation, so the map of the step after it is still
    the one from before the reuse; shallow steps are evaluations."""
    _, neg = make_conds("sd15", seed=1)
    pos, _ = make_conds("sd15", seed=0)
    monkeypatch.setattr(comfy.samplers, "can_concat_cond", lambda c1, c2: c1 is c2)
    text = "F F R F S1 F"
    m = apply_dato(micro15, prune_ratio=0.4, custom_schedule=text, noise_alpha=0.0)
    with CallLog(micro15) as log:
        spy = PlanSpy(monkeypatch, log)
        run_sampler(m, latent_hw=HW, batch=1, steps=6, positive=pos, negative=neg)
    sigmas = sample_sigmas(micro15, 6)
    schedule = Schedule.parse(text)
    assert len(log.calls) == 12 and all(len(c["cond_or_uncond"]) == 1 for c in log.calls)
    computed: dict = {0: [], 1: []}  # chunk -> its computed predictions so far
    checked = {"none": 0, "map": 0, "after_reuse": 0}
    for k, call in enumerate(log.calls):
        chunk = call["cond_or_uncond"][0]
        step = schedule[step_of(call["sigma"], sigmas)]
        plans = [s for s in spy.seen if s["call"] == k]
        if step.kind == REUSE:
            assert not plans, f"call {k}: a reused step planned pruning"
            assert torch.equal(call["eps"], computed[chunk][-1])
            continue
        assert plans, f"call {k} ({step}) planned no pruning"
        prev = computed[chunk]
        for p in plans:
            assert p["cond_or_uncond"] == [chunk]
            if len(prev) < 2:
                assert p["map"] is None, f"call {k}: a map before two evaluations of chunk {chunk}"
                checked["none"] += 1
            else:
                want = ((prev[-1].float() - prev[-2].float()).abs().mean(dim=1)).reshape(1, -1)
                torch.testing.assert_close(p["map"], want, rtol=0, atol=0)
                assert p["grid"] == (HW[0], HW[1]) or (p["grid"].h, p["grid"].w) == HW
                checked["map"] += 1
                if schedule[step_of(call["sigma"], sigmas) - 1].kind == REUSE:
                    checked["after_reuse"] += 1
        computed[chunk].append(call["eps"])
    assert checked["none"] > 0 and checked["map"] > 0 and checked["after_reuse"] > 0, checked
    # and the maps really are per chunk: cond and uncond maps differ
    maps = {tuple(p["cond_or_uncond"]): p["map"] for p in spy.seen if p["map"] is not None}
    assert set(maps) == {(0,), (1,)} and not torch.equal(maps[(0,)], maps[(1,)])


@pytest.mark.usefixtures("one_torch_thread")
def test_base_tokens_are_the_argmax_of_the_map_in_a_real_run(micro15, monkeypatch):
    """noise_alpha 0: every planner call that has a map anchors each window on its most
    dynamic token (the map resized to the block's grid is the identity at the top level)."""
    from token_pruning_cache.pruning_core.selection import select_base_tokens
    from token_pruning_cache.pruning_core.geometry import TokenGrid

    m = apply_dato(micro15, prune_ratio=0.4, schedule="pruning_only", noise_alpha=0.0)
    with CallLog(micro15) as log:
        spy = PlanSpy(monkeypatch, log)
        run_sampler(m, latent_hw=HW, batch=1, steps=4)
    with_map = [p for p in spy.seen if p["map"] is not None]
    assert with_map and len(with_map) < len(spy.seen)
    grid = TokenGrid(*HW)
    for p in with_map:
        assert torch.equal(p["base"], select_base_tokens(p["map"], grid, 2, 2))


@pytest.mark.usefixtures("one_torch_thread")
def test_align_cfg_in_a_real_cfg_batch(micro15, monkeypatch):
    """CFG batch (cond + uncond in one call): with align_cfg every plan's cond rows carry the
    uncond rows' base tokens; without it they differ in some call."""
    def bases(align):
        m = apply_dato(micro15, prune_ratio=0.4, schedule="pruning_only", align_cfg=align)
        with CallLog(micro15) as log:
            spy = PlanSpy(monkeypatch, log)
            run_sampler(m, latent_hw=HW, batch=1, steps=4, cfg=7.5)
        assert all(sorted(s["cond_or_uncond"]) == [0, 1] for s in spy.seen)
        out = []
        for s in spy.seen:
            c = s["cond_or_uncond"].index(0)
            out.append((s["base"][c], s["base"][1 - c]))
        return out

    aligned = bases(True)
    assert aligned and all(torch.equal(c, u) for c, u in aligned)
    assert not all(torch.equal(c, u) for c, u in bases(False))


DYNAMICS_OPTIONS = [dict(noise_alpha=0.0), dict(dynamics_weight=0.0), dict(dynamics_weight=5.0),
                    dict(sign_flip=True), dict(align_cfg=True), dict(seed=1)]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("opts", DYNAMICS_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_each_dynamics_option_changes_the_base_tokens_and_the_image(micro15, monkeypatch, opts):
    """Against the default setting, the same run: each option changes the base tokens of some
    block call that has a map, and the final latent; the number of pruned tokens per call is
    the same (the option changes which tokens, not how many)."""
    def run(**kw):
        m = apply_dato(micro15, prune_ratio=0.4, schedule="pruning_only", **kw)
        with CallLog(micro15) as log:
            spy = PlanSpy(monkeypatch, log)
            out = run_sampler(m, latent_hw=HW, batch=1, steps=4, cfg=7.5)
        return out, spy.seen, log

    ref_out, ref_plans, ref_log = run()
    out, plans, log = run(**opts)
    assert len(plans) == len(ref_plans) > 0
    assert [len(c["attn1"]) for c in log.calls] == [len(c["attn1"]) for c in ref_log.calls]
    assert sorted(n for c in log.calls for _, n in c["attn1"]) == sorted(n for c in ref_log.calls for _, n in c["attn1"])
    assert any(n < HW[0] * HW[1] for c in log.calls for _, n in c["attn1"]), "nothing was pruned"
    changed = [k for k, (a, b) in enumerate(zip(plans, ref_plans)) if not torch.equal(a["base"], b["base"])]
    assert changed, f"{opts}: no block call chose other base tokens than the default"
    if opts != dict(seed=1):
        # the options act on the dynamics score: the calls without a map (the first two steps)
        # draw the same random base tokens as the default
        assert all(plans[k]["map"] is not None for k in changed) or "align_cfg" in opts
    assert not torch.equal(out, ref_out), f"{opts}: same image as the default"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("opts", [dict(recovery="kept"), dict(recovery="merge"), dict(similarity_search="global")],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_recovery_options_change_what_pruned_tokens_copy(micro15, monkeypatch, opts):
    """DaTo's recovery settings (as on SiTo): the same pruned-token counts as the default and, on
    the first block call (no dynamics yet, the same seeded base tokens), other stand-ins (or ToMe
    averaging); another image."""
    import token_pruning_cache.nodes.dato_node as node
    from token_pruning_cache.pruning_core.dato import dato_plan as real

    def run(**kw):
        plans = []

        def spy(*args, **kwargs):
            plan = real(*args, **kwargs)
            plans.append(plan)
            return plan
        monkeypatch.setattr(node, "dato_plan", spy)
        m = apply_dato(micro15, prune_ratio=0.4, schedule="pruning_only", **kw)
        return run_sampler(m, latent_hw=HW, batch=1, steps=3, cfg=7.5), [p for p in plans if p is not None]

    ref_out, ref_plans = run()
    out, plans = run(**opts)
    assert len(plans) == len(ref_plans) > 0
    assert all(a.n_pruned == b.n_pruned for a, b in zip(plans, ref_plans))
    assert torch.equal(plans[0].base, ref_plans[0].base)
    if opts.get("recovery") == "merge":
        assert all(p.merge for p in plans) and not any(p.merge for p in ref_plans)
    else:
        assert not torch.equal(plans[0].source, ref_plans[0].source)
    assert not torch.equal(out, ref_out)


def test_sd2_v_prediction_prunes_and_caches():
    """The README lists SD2.x: on the SD2-v layout (linear proj_in, 64-channel heads,
    v-prediction) DaTo shortens the top level's self-attention, skips ResBlocks on shallow and
    reused steps, changes the image and stays finite; ratio 0 + all-full is the unpatched run."""
    from work_meter import WorkMeter

    m2 = build("sd2v")
    ref = run_sampler(m2, latent_hw=HW, batch=1, steps=4, cfg=1.0)
    assert torch.equal(run_sampler(apply_dato(m2, prune_ratio=0.0, schedule="pruning_only"), latent_hw=HW,
                                   batch=1, steps=4, cfg=1.0), ref)
    with WorkMeter(m2) as meter:
        out = run_sampler(apply_dato(m2, prune_ratio=0.4, custom_schedule="F S1 R F"), latent_hw=HW, batch=1,
                          steps=4, cfg=1.0)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert len(meter.calls) == 4
    assert meter.cached_calls() == [1, 2] and meter.calls[2]["res"] == 0
    assert set(meter.shortened_calls()) == {0, 1, 3}
    n = HW[0] * HW[1]
    assert {q for c in meter.calls for _, q, _, full in c["attn1"] if full == n} == {n - int(0.4 * n)}


# --------------------------------------------------------------------------------------
# start/end_percent
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [(0.0, 0.5), (0.4, 1.0), (0.3, 0.6)], ids=["first_half", "second_half", "middle"])
def test_partial_window_follows_the_schedule_inside_and_runs_full_outside(sd15, window):
    """Steps whose sigma lies outside the window compute every layer on every token; steps inside
    do what the schedule says (their caches were filled by the full steps before) with shortened
    self-attention on computed steps; before the window opens the predictions are the unpatched
    run's, bit for bit."""
    steps, text = 6, "F S1 R S1 R S1"
    start, end = window
    sampling = sd15.get_model_object("model_sampling")
    hi, lo = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    sigmas = sample_sigmas(sd15, steps)
    m = apply_dato(sd15, prune_ratio=0.4, custom_schedule=text, start_percent=start, end_percent=end)
    with CallLog(sd15) as log:
        run_sampler(m, latent_hw=HW, batch=1, steps=steps, cfg=1.0)
    with CallLog(sd15) as plain:
        run_sampler(sd15, latent_hw=HW, batch=1, steps=steps, cfg=1.0)
    inside = [lo <= c["sigma"] <= hi for c in log.calls]
    assert 0 < sum(inside) < steps, inside
    scheduled = Schedule.parse(text)
    effective = Schedule.parse(" ".join(str(scheduled[j]) if inside[j] else "F" for j in range(steps)))
    assert assert_calls_follow(log, effective, sigmas) == list(range(steps))
    full_rows = plain.calls[0]["attn1"]
    for k, c in enumerate(log.calls):
        if not inside[k]:
            assert c["attn1"] == full_rows, f"call {k} outside the window was pruned"
        elif effective[k].kind != REUSE:
            assert c["attn1"] != full_rows and all(n <= f for (_, n), (_, f) in zip(c["attn1"], full_rows)), k
    first_in = inside.index(True)
    for k in range(first_in):
        assert torch.equal(log.calls[k]["eps"], plain.calls[k]["eps"]), f"call {k} before the window differs"
    assert not torch.equal(log.calls[first_in]["eps"], plain.calls[first_in]["eps"])


def _self_attention_rows(patcher):
    """(query tokens, key tokens) of every top-level self-attention call, read from the call itself."""
    rows, handles = [], []

    def hook(module, args, kwargs):
        shape = (kwargs.get("transformer_options") or {}).get("activations_shape")
        ctx = kwargs.get("context")
        if shape is not None and int(shape[-2]) * int(shape[-1]) == HW[0] * HW[1]:
            rows.append((args[0].shape[1], args[0].shape[1] if ctx is None else ctx.shape[1]))
    for mod in patcher.model.diffusion_model.modules():
        if type(mod).__name__ == "BasicTransformerBlock":
            handles.append(mod.attn1.register_forward_pre_hook(hook, with_kwargs=True))
    return rows, handles


@pytest.mark.parametrize("prune_kv", [True, False])
def test_prune_kv_decides_whether_keys_are_shortened(sd15, sd15_ref, prune_kv):
    """Every step full and r=0.5: the queries are shortened either way; the keys and values only
    with prune_kv on (off: every token stays a key, as ComfyUI's ToMe)."""
    n = HW[0] * HW[1]
    m = apply_dato(sd15, prune_ratio=0.5, schedule="pruning_only", prune_kv=prune_kv)
    rows, handles = _self_attention_rows(sd15)
    try:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=2)
    finally:
        for h in handles:
            h.remove()
    assert rows and all(q == n // 2 for q, _ in rows[len(rows) // 2:])  # second step: the dynamics map exists
    assert {k for _, k in rows} == ({n // 2} if prune_kv else {n})
    assert torch.isfinite(out).all() and not torch.equal(out, sd15_ref)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("align", [True, False])
def test_align_cfg_holds_when_cond_and_uncond_run_apart(micro15, monkeypatch, align):
    """Cond and uncond as separate calls: with align_cfg the cond call plans from the uncond
    chunk's map and draws the same noise (per step and block), so every block call of a step
    chooses the same base tokens in both; without it the chunks choose from their own maps."""
    _, neg = make_conds("sd15", seed=1)
    pos, _ = make_conds("sd15", seed=0)
    monkeypatch.setattr(comfy.samplers, "can_concat_cond", lambda c1, c2: c1 is c2)
    m = apply_dato(micro15, prune_ratio=0.4, custom_schedule="F", align_cfg=align)
    with CallLog(micro15) as log:
        spy = PlanSpy(monkeypatch, log)
        run_sampler(m, latent_hw=HW, batch=1, steps=5, positive=pos, negative=neg)
    sigmas = sample_sigmas(micro15, 5)
    by_step: dict = {}
    for p in spy.seen:
        call = log.calls[p["call"]]
        by_step.setdefault(step_of(call["sigma"], sigmas), {}).setdefault(call["cond_or_uncond"][0], []).append(p)
    compared = 0
    for step, chunks in by_step.items():
        assert set(chunks) == {0, 1}
        for c, u in zip(chunks[0], chunks[1]):
            if c["map"] is None or u["map"] is None:
                continue
            compared += 1
            assert torch.equal(c["map"], u["map"]) == align
            assert torch.equal(c["base"], u["base"]) == align
    assert compared >= 4


@pytest.mark.parametrize("preset, counts, sampler", [("searched_20_balanced", (3, 4, 13, 20), "euler"),
                                                     ("searched_20_fast", (2, 4, 14, 20), "euler"),
                                                     ("searched_20_dpmpp_2m_balanced", (3, 5, 12, 20), "dpmpp_2m"),
                                                     ("searched_20_dpmpp_2m_fast", (3, 4, 13, 20), "dpmpp_2m")])
def test_searched_presets_run_their_lists_at_20_steps(sd15, preset, counts, sampler, caplog):
    """The schedule search's presets: at 20 steps exactly the searched list (fixed counts of
    full / shallow / reused steps), followed call by call through the real sampler they were
    searched for."""
    from token_pruning_cache.nodes.dato_node import SEARCHED
    m = apply_dato(sd15, prune_ratio=0.0, schedule=preset)
    sigmas = sample_sigmas(sd15, 20)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"), CallLog(sd15) as log:
        out = run_sampler(m, latent_hw=HW, batch=1, steps=20, cfg=1.0, sampler=sampler)
    assert torch.isfinite(out).all()
    schedule = Schedule.parse(SEARCHED[preset])
    assert expected_counts(schedule) == counts
    assert assert_calls_follow(log, schedule, sigmas) == list(range(20))
    assert summaries(caplog) == [counts]
