"""SiTo node against the real ComfyUI sampler with tiny random-weight models of the real
architectures (SD1.5-, SD2-v- and SDXL-like)."""
from __future__ import annotations

import logging

import pytest
import torch

from tiny_models import build, run_sampler
from token_pruning_cache.nodes import hooks
from token_pruning_cache.nodes.hooks.patching import ATTACHMENT_KEY
from token_pruning_cache.nodes.sito_node import SiToTokenPruning, apply_sito


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def tame(patcher, gain=0.05):
    """Scale every transformer sub-layer's output projection down.

    The tiny models' random weights make each attention block decisive (switching one off
    changes the output by 16-78 %), so any pruning decorrelates the result completely. Real
    diffusion models update the residual stream in small steps; with small block outputs the
    error of pruning becomes measurable and comparable between methods.
    """
    for name, mod in patcher.model.diffusion_model.named_modules():
        if name.endswith(("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")):
            mod.weight.mul_(gain)
            if mod.bias is not None:
                mod.bias.mul_(gain)
    return patcher


def random_pruning(model, ratio, max_downsample=1):
    """Cost-free random pruning through the same hooks: the baseline SiTo must beat."""
    from token_pruning_cache.pruning_core.selection import plan_random, pruned_count
    m = model.clone()
    uid = hooks.new_uid("random")

    def planner(n, grid, state, call):
        k = pruned_count(ratio, grid.n, grid.window_count(2, 2))
        return plan_random(n.shape[0], grid, k, 2, 2, call.generator, n.device, call.chunks)

    hooks.install_block_pruning(m, uid, hooks.BlockPruning(max_downsample=max_downsample), planner)
    hooks.install_run_lifecycle(m, uid, "random", 0.0, 1.0, 0, lambda state: "random")
    return m


@pytest.fixture(scope="module")
def sd15():
    return tame(build("sd15"))


@pytest.fixture(scope="module")
def sdxl():
    return tame(build("sdxl"))


def attn1_lengths(patcher):
    """Record the query length of every self-attention call (forward pre-hooks on attn1)."""
    seen = []
    handles = []
    for name, mod in patcher.model.diffusion_model.named_modules():
        if name.endswith("attn1"):
            handles.append(mod.register_forward_pre_hook(lambda m, a, kw, name=name: seen.append((name, a[0].shape[1])),
                                                         with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_ratio_zero_is_bit_identical(sd15, sampler):
    ref = run_sampler(sd15, sampler=sampler, steps=3)
    out = run_sampler(SiToTokenPruning.execute(sd15, prune_ratio=0.0).result[0], sampler=sampler, steps=3)
    assert torch.equal(out, ref)


def test_outside_active_range_is_bit_identical(sd15):
    ref = run_sampler(sd15, steps=3)
    m = apply_sito(sd15, prune_ratio=0.5, start_percent=1.0, end_percent=1.0)
    assert torch.equal(run_sampler(m, steps=3), ref)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_half_ratio_changes_output_but_stays_close(sd15, sampler):
    ref = run_sampler(sd15, sampler=sampler, steps=3)
    out = run_sampler(apply_sito(sd15, prune_ratio=0.5), sampler=sampler, steps=3)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert 0 < err < 0.25, err
    # No "closer than random pruning" here: with the CFG halves pruned alike (as both are now),
    # random pruning is about as faithful as SiTo on this random-weight model and on the trained
    # reference model (docs/benchmarks.md, "Why SiTo trails ToMe"). SiTo's selection itself is
    # checked against brute force in tests/pruning_core/test_sito.py.


@pytest.mark.parametrize("method", ["random", "sito"])
def test_cfg_halves_are_pruned_alike_batched_together_or_apart(sd15, method, monkeypatch):
    """The planners draw their noise per (step, block) and once per CFG chunk: a sample's cond
    and uncond passes are pruned alike, so the image does not depend on whether ComfyUI batches
    them (batch 2: two samples, so rows of different samples still draw differently)."""
    import comfy.samplers

    def make():
        return random_pruning(sd15, 0.5) if method == "random" else apply_sito(sd15, prune_ratio=0.5, noise_alpha=5.0)
    together = run_sampler(make(), batch=2, steps=3)
    monkeypatch.setattr(comfy.samplers, "can_concat_cond", lambda c1, c2: c1 is c2)
    apart = run_sampler(make(), batch=2, steps=3)
    ref = run_sampler(sd15, batch=2, steps=3)
    assert rel_err(together, ref) > 1e-3  # pruning happened
    assert rel_err(apart, together) < 1e-4, rel_err(apart, together)
    # the two samples of the batch are still pruned differently (a row's own draws)
    from token_pruning_cache.pruning_core.selection import chunk_draw
    g = torch.Generator().manual_seed(0)
    rows = chunk_draw(torch.rand, 4, 6, g, "cpu", chunks=2)
    assert torch.equal(rows[:2], rows[2:]) and not torch.equal(rows[0], rows[1])


def test_attention_runs_on_kept_tokens_only(sd15):
    m = apply_sito(sd15, prune_ratio=0.5)
    seen, handles = attn1_lengths(sd15)
    try:
        run_sampler(m, latent_hw=(16, 24), batch=1, steps=1)
    finally:
        for h in handles:
            h.remove()
    full = 16 * 24
    top = [n for name, n in seen if n != full // 4]  # level-0 calls (16x24 tokens, pruned)
    assert top and all(n == full - int(0.5 * full) for n in top), seen[:6]


def test_input_model_untouched(sd15):
    ref = run_sampler(sd15, steps=2)
    before = {k: v.clone() for k, v in sd15.model.diffusion_model.state_dict().items()}
    options_before = repr(sd15.model_options)
    m = apply_sito(sd15, prune_ratio=0.7, prune_cross_attn=True, prune_mlp=True)
    run_sampler(m, steps=2)
    assert repr(sd15.model_options) == options_before
    assert not sd15.object_patches and not sd15.get_attachment(ATTACHMENT_KEY)
    after = sd15.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ComfyUI keeps the last patched clone loaded; sampling the original again unpatches it:
    # the FF object patches are gone and the output is exactly the unpatched one
    assert torch.equal(run_sampler(sd15, steps=2), ref)
    for name, mod in sd15.model.diffusion_model.named_modules():
        if name.endswith(".ff"):
            assert getattr(mod.forward, "__func__", None) is type(mod).forward


@pytest.mark.parametrize("opts", [dict(prune_kv=False), dict(prune_cross_attn=True), dict(prune_mlp=True),
                                  dict(prune_self_attn=False, prune_mlp=True), dict(sx=3, sy=3, prune_ratio=0.85),
                                  dict(recovery="kept"), dict(recovery="merge"),
                                  dict(recovery="merge", prune_kv=False, prune_cross_attn=True, prune_mlp=True)])
def test_variants_sample(sd15, opts):
    ref = run_sampler(sd15, steps=2)
    out = run_sampler(apply_sito(sd15, **{"prune_ratio": 0.5, **opts}), steps=2)
    assert torch.isfinite(out).all() and 0 < rel_err(out, ref) < 0.5


def test_merge_recovery_reaches_the_layers(sd15):
    """recovery=merge feeds group means: same pruned set as base recovery, different output."""
    ref = run_sampler(sd15, steps=2)
    base = run_sampler(apply_sito(sd15, prune_ratio=0.5), steps=2)
    merged = run_sampler(apply_sito(sd15, prune_ratio=0.5, recovery="merge"), steps=2)
    assert not torch.equal(merged, base)
    assert torch.isfinite(merged).all() and 0 < rel_err(merged, ref) < 0.5


def test_sdxl_auto_level_prunes_the_32x32_level(sdxl):
    ref = run_sampler(sdxl, steps=2, latent_hw=(16, 16))
    m = apply_sito(sdxl, prune_ratio=0.5)
    seen, handles = attn1_lengths(sdxl)
    try:
        out = run_sampler(m, steps=2, latent_hw=(16, 16))
    finally:
        for h in handles:
            h.remove()
    assert hooks.attention_levels(sdxl)[0] == 2
    assert any(n == 64 - 32 for _, n in seen), sorted({n for _, n in seen})  # the 8x8 level, half pruned
    assert 0 < rel_err(out, ref) < 0.5
    zero = run_sampler(apply_sito(sdxl, prune_ratio=0.0), steps=2, latent_hw=(16, 16))
    assert torch.equal(zero, ref)


def test_sd2_v_prediction():
    m = tame(build("sd2v"))
    ref = run_sampler(m, steps=2)
    assert torch.equal(run_sampler(apply_sito(m, prune_ratio=0.0), steps=2), ref)
    out = run_sampler(apply_sito(m, prune_ratio=0.5), steps=2)
    assert 0 < rel_err(out, ref) < 0.5


def test_seed_determinism_seed_matters_and_summary_line(sd15, caplog):
    m = apply_sito(sd15, prune_ratio=0.5, seed=3)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        a = run_sampler(m, steps=2)
        b = run_sampler(m, steps=2)
    assert torch.equal(a, b)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SiTo:")]
    assert len(lines) == 2 and "active in 2/2 steps" in lines[0] and "tokens pruned" in lines[0]
    # the seed is used: another seed, another image (same pruning amount)
    assert not torch.equal(run_sampler(apply_sito(sd15, prune_ratio=0.5, seed=4), steps=2), a)


def test_validation_messages():
    msg = SiToTokenPruning.validate_inputs(prune_ratio=0.8, sx=2, sy=2)
    assert isinstance(msg, str) and "0.75" in msg
    assert SiToTokenPruning.validate_inputs(prune_ratio=0.8, sx=3, sy=3) is True
    assert isinstance(SiToTokenPruning.validate_inputs(prune_ratio=0.5, sx=1, sy=1), str)
    with pytest.raises(ValueError, match="0.75"):
        apply_sito(None, prune_ratio=0.9)


def test_unsupported_model_passes_through_with_one_warning(caplog):
    m = build("sd3")
    with caplog.at_level(logging.WARNING, logger="token_pruning_cache"):
        out = apply_sito(m, prune_ratio=0.5)
    assert out is m
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MMDIT" in warnings[0].getMessage().upper()


# --------------------------------------------------------------------------------------
# Each option changes what it names, against the default setting
# --------------------------------------------------------------------------------------

class LayerRows:
    """Rows through every transformer sub-layer as it really ran, keyed by (what, level tokens):
    attn1 queries ("q1") and keys ("k1", the ``context`` it was given), attn2 queries ("q2"),
    the feed-forward's first layer ("ff"; the pack object-patches ``ff.forward``, so the hook
    sits one level below it). The level of a block call is read from ``activations_shape``."""

    def __init__(self, patcher):
        self.dm = patcher.model.diffusion_model
        self.rows: list[tuple[str, int, int]] = []
        self._level = {}

    def __enter__(self):
        self._handles = []
        for name, mod in self.dm.named_modules():
            if type(mod).__name__ == "BasicTransformerBlock":
                self._handles += [mod.attn1.register_forward_pre_hook(self._attn(name, "1"), with_kwargs=True),
                                  mod.attn2.register_forward_pre_hook(self._attn(name, "2"), with_kwargs=True),
                                  mod.ff.net[0].register_forward_pre_hook(self._ff(name))]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _attn(self, name, which):
        def hook(module, args, kwargs):
            shape = (kwargs.get("transformer_options") or {}).get("activations_shape")
            full = int(shape[-2]) * int(shape[-1])
            self._level[name] = full
            self.rows.append(("q" + which, full, args[0].shape[1]))
            if which == "1":
                ctx = kwargs.get("context")
                self.rows.append(("k1", full, args[0].shape[1] if ctx is None else ctx.shape[1]))
        return hook

    def _ff(self, name):
        def hook(module, args):
            self.rows.append(("ff", self._level[name], args[0].shape[1]))
        return hook

    def of(self, what, full) -> set[int]:
        return {n for w, f, n in self.rows if w == what and f == full}


@pytest.fixture(scope="module")
def micro15():
    from tiny_models import micro
    return tame(micro("sd15"))


TOP, HALF = 64, 16  # tokens of the two attention levels of an 8x8 latent
OPTION_ROWS = {  # option -> rows per (layer, level) that differ from the default's
    "prune_kv=False": (dict(prune_kv=False), {("k1", TOP): {TOP}}),
    "prune_cross_attn": (dict(prune_cross_attn=True), {("q2", TOP): {TOP // 2}}),
    "prune_mlp": (dict(prune_mlp=True), {("ff", TOP): {TOP // 2}}),
    "mlp_only": (dict(prune_self_attn=False, prune_mlp=True),
                 {("q1", TOP): {TOP}, ("k1", TOP): {TOP}, ("ff", TOP): {TOP // 2}}),
    "sx3_sy3": (dict(sx=3, sy=3, prune_ratio=0.85), {("q1", TOP): {TOP - 54}, ("k1", TOP): {TOP - 54}}),  # 4 windows
    "max_downsample_2": (dict(max_downsample="2"), {("q1", HALF): {HALF // 2}, ("k1", HALF): {HALF // 2}}),
    "recovery_kept": (dict(recovery="kept"), {}),
    "recovery_merge": (dict(recovery="merge"), {}),
    "sim_beta": (dict(sim_beta=3.0), {}),
    "noise_alpha_0": (dict(noise_alpha=0.0), {}),
    "search_global": (dict(similarity_search="global"), {}),
    "seed": (dict(seed=1), {}),
}
DEFAULT_ROWS = {("q1", TOP): {TOP // 2}, ("k1", TOP): {TOP // 2}, ("q2", TOP): {TOP}, ("ff", TOP): {TOP},
                ("q1", HALF): {HALF}, ("k1", HALF): {HALF}, ("q2", HALF): {HALF}, ("ff", HALF): {HALF}}


@pytest.fixture(scope="module")
def sito_default(micro15):
    m = apply_sito(micro15, prune_ratio=0.5)
    with LayerRows(micro15) as rows:
        out = run_sampler(m, latent_hw=(8, 8), batch=1, steps=3)
    return out, rows


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", list(OPTION_ROWS))
def test_each_option_changes_what_it_names_against_the_default(micro15, sito_default, name):
    """Against default SiTo (r=0.5) on the same run: the rows through the layers the option is
    about change as it says (and no others), and the image changes."""
    default_out, default_rows = sito_default
    assert {key: default_rows.of(*key) for key in DEFAULT_ROWS} == DEFAULT_ROWS
    opts, changed = OPTION_ROWS[name]
    m = apply_sito(micro15, **{"prune_ratio": 0.5, **opts})
    with LayerRows(micro15) as rows:
        out = run_sampler(m, latent_hw=(8, 8), batch=1, steps=3)
    want = {**DEFAULT_ROWS, **changed}
    assert {key: rows.of(*key) for key in want} == want
    assert torch.isfinite(out).all()
    assert not torch.equal(out, default_out), f"{name}: the same image as default SiTo"
    ref = run_sampler(micro15, latent_hw=(8, 8), batch=1, steps=3)
    assert 0 < rel_err(out, ref) < 0.5


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("window", [(0.0, 0.5), (0.4, 1.0), (0.3, 0.6)], ids=["first_half", "second_half", "middle"])
def test_partial_window_prunes_inside_and_is_untouched_outside(micro15, window):
    """start/end_percent: steps whose sigma lies outside the window run the unpatched layers
    (no shortened self-attention), steps inside are pruned; a window that starts later leaves
    the first steps' predictions bit-identical to the unpatched run."""
    from tiny_models import sample_sigmas, step_of
    from work_meter import WorkMeter

    steps = 6
    start, end = window
    m = apply_sito(micro15, prune_ratio=0.5, start_percent=start, end_percent=end)
    sampling = micro15.get_model_object("model_sampling")
    hi, lo = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    sigmas = sample_sigmas(micro15, steps)
    with WorkMeter(micro15, keep_outputs=True) as meter:
        run_sampler(m, latent_hw=(8, 8), batch=1, steps=steps, cfg=1.0)
    with WorkMeter(micro15, keep_outputs=True) as plain:
        run_sampler(micro15, latent_hw=(8, 8), batch=1, steps=steps, cfg=1.0)
    shortened = set(meter.shortened_calls())
    inside = [k for k, c in enumerate(meter.calls) if lo <= c["sigma"] <= hi]
    assert 0 < len(inside) < steps, (inside, sigmas)
    assert shortened == set(inside), (sorted(shortened), inside)
    first_in = min(inside)
    assert all(step_of(meter.calls[k]["sigma"], sigmas) == k for k in range(steps))
    # before the window opens the run is the unpatched one: same token counts, same predictions
    for k in range(first_in):
        assert meter.calls[k]["attn1"] == plain.calls[k]["attn1"]
        assert torch.equal(meter.calls[k]["out"], plain.calls[k]["out"]), f"call {k} before the window differs"
    assert not torch.equal(meter.calls[first_in]["out"], plain.calls[first_in]["out"])
