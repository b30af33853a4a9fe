"""CAT Pruning node against the real ComfyUI sampler (``comfy.sample.sample``) with tiny
random-weight models of the real architectures: SD1.5-like and SDXL-like UNets, an SD3 MMDiT
and a Flux model.

What is measured, and how:
  * Rows through the attention. UNet: forward pre-hooks on every ``attn1``/``attn2`` and on the
    first layer of every feed-forward (``ff.net[0]``; the pack object-patches ``ff.forward``,
    so the hook sits one level below it and sees what really computes). The self-attention
    key/value projections are object-patched too (``attn1.to_k``/``to_v``), so their rows are
    counted where the matrix product happens: a torch function mode records every
    ``F.linear`` whose weight is one of those projections. The top attention
    level is found from the data: the blocks with the most tokens on a full step. DiTs:
    SD3: the rows through each joint block's image-stream Q/K/V projection, output projection and
    first feed-forward layer (``F.linear`` calls, as above). Flux: forward pre-hooks on the blocks
    themselves (``double_blocks[i]``/``single_blocks[i]``), which the ``dit`` replace patch calls
    through ``original_block`` with the tokens it really computes.
  * Which call is which: a forward pre-hook on the diffusion model records
    ``transformer_options["sigmas"]``, ``cond_or_uncond`` and the batch; the step is the index
    of that sigma in the run's sigma schedule.
  * The prediction after the pack's APPLY_MODEL wrapper: a ``model_function_wrapper`` on a
    clone of the patched model (the slot ComfyUI calls around ``apply_model``).
Step roles (docs/algorithms.md §4.3): steps ``< warmup_steps + 2`` are full (warm-up, reference,
clustering), later steps are pruned with ``S = floor(keep_ratio * N)`` recomputed image tokens.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch

import comfy.model_patcher
import comfy.supported_models

from tiny_models import build, run_sampler, sample_sigmas, seeded_fill_, step_of
from token_pruning_cache.nodes.cat_node import CATPruneCache, apply_cat
from token_pruning_cache.pruning_core.geometry import TokenGrid

SUMMARY = re.compile(r"^CAT: (\d+) pruned / (\d+) full of (\d+) steps on (\w+)")
UNET_HW = (8, 8)
DIT_HW = (16, 16)  # patch 2 -> 8x8 = 64 image tokens


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind)
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def sd15_top(models):
    return unet_top_names(models("sd15"), UNET_HW)


def floor_keep(keep_ratio, n):
    return int(keep_ratio * n + 1e-9)


def summaries(caplog):
    out = []
    for r in caplog.records:
        m = SUMMARY.match(r.getMessage())
        if m:
            out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)))
    return out


class _LinearRows(torch.overrides.TorchFunctionMode):
    """Records the rows of every ``F.linear`` call whose weight is one of ``weights`` (id -> tag)."""

    def __init__(self, log, weights):
        super().__init__()
        self.log, self.weights = log, weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and self.log.calls:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            tag = self.weights.get(id(weight))
            if tag is not None:
                self.log.calls[-1]["rows"].append((tag[0], tag[1], args[0].shape[1]))
        return func(*args, **kwargs)


class CallLog:
    """Per diffusion-model call: sigma, cond_or_uncond, batch, rows through attention / DiT blocks,
    and the prediction returned by ``apply_model`` (after the pack's APPLY_MODEL wrapper)."""

    def __init__(self, base, txt_tokens=0):
        self.dm = base.model.diffusion_model
        self.txt_tokens = txt_tokens
        self.calls: list[dict] = []
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x, sigma per row) of each call
        self._handles = []

    def wrap(self, patched):
        """A clone of ``patched`` whose ``apply_model`` outputs are recorded."""
        m = patched.clone()

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            self.outputs.append(out.detach().clone())
            self.inputs.append((args["input"].detach().clone(), args["timestep"].reshape(-1, 1, 1, 1).clone()))
            return out
        m.set_model_unet_function_wrapper(wrapper)
        return m

    def prediction(self, k: int, space: str = "noise") -> torch.Tensor:
        """Call ``k``'s output in ``space``: the denoised estimate ``apply_model`` returned, or the
        model's noise prediction recovered from it, ``ε = (x − x̂₀) / σ``."""
        if space == "denoised":
            return self.outputs[k]
        x, s = self.inputs[k]
        return (x - self.outputs[k]) / s

    def held(self, k: int, space: str = "noise") -> torch.Tensor:
        """What call ``k`` returns for a token it did not recompute: the previous call's denoised
        estimate ("denoised"), or the estimate made from the previous call's noise prediction
        ``ε = (x − x̂₀) / σ`` at this call's ``x`` and ``σ`` ("noise", the default)."""
        prev = self.outputs[k - 1]
        if space == "denoised":
            return prev
        (xp, sp), (x, s) = self.inputs[k - 1], self.inputs[k]
        return x - (xp - prev) / sp * s

    def changed(self, k: int, space: str = "noise", token_px: int = 1) -> torch.Tensor:
        """Per token of call ``k``'s grid: whether its output differs from :meth:`held` (so it was
        recomputed), over every row and channel."""
        out = self.outputs[k]
        same = torch.isclose(out, self.held(k, space), rtol=1e-4, atol=1e-5)
        return (~same).reshape(out.shape[0], out.shape[1], out.shape[2] // token_px, token_px,
                               out.shape[3] // token_px, token_px).any(dim=(0, 1, 3, 5))

    def __enter__(self):
        self._handles.append(self.dm.register_forward_pre_hook(self._start, with_kwargs=True))
        projections = {}
        for name, mod in self.dm.named_modules():
            kind = type(mod).__name__
            if kind == "BasicTransformerBlock":
                self._hook(mod.attn1, self._attn(name, "attn1"))
                self._hook(mod.attn2, self._attn(name, "attn2"))
                self._hook(mod.ff.net[0], self._rows(name, "ff", lambda a, k: a[0].shape[1]))
                projections[id(mod.attn1.to_k.weight)] = ("k1", name)
                projections[id(mod.attn1.to_v.weight)] = ("v1", name)
            elif name.startswith("joint_blocks.") and name.count(".") == 1:
                # SD3's K/V-cache path: the image stream's Q/K/V projection, output projection and
                # feed-forward are where the work is (the block itself sees every token)
                xb = mod.x_block
                for lin in (xb.attn.qkv, xb.attn.proj, xb.mlp.fc1):
                    projections[id(lin.weight)] = ("dit", name)
            elif name.startswith("double_blocks.") and name.count(".") == 1:
                self._hook(mod, self._rows(name, "dit", lambda a, k: k["img"].shape[1]))
            elif name.startswith("single_blocks.") and name.count(".") == 1:
                self._hook(mod, self._rows(name, "dit", lambda a, k: a[0].shape[1] - self.txt_tokens))
                self._hook(mod, self._rows(name, "pe", lambda a, k: k["pe"].shape[2] - self.txt_tokens))
        self._mode = _LinearRows(self, projections) if projections else None
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, mod, fn):
        self._handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))

    def _start(self, module, args, kwargs):
        to = kwargs.get("transformer_options") or {}
        x = args[0] if args else kwargs["x"]
        self.calls.append({"sigma": float(to["sigmas"].reshape(-1)[0]), "cond_or_uncond": list(to["cond_or_uncond"]),
                           "batch": x.shape[0], "rows": []})

    def _rows(self, name, what, count):
        def hook(module, args, kwargs):
            self.calls[-1]["rows"].append((what, name, count(args, kwargs)))
        return hook

    def _attn(self, name, what):
        def hook(module, args, kwargs):
            x = args[0]
            ctx = kwargs.get("context")
            kv = ctx.shape[1] if (what == "attn1" and ctx is not None) else None
            self.calls[-1]["rows"].append((what, name, x.shape[1]))
            if kv is not None:
                self.calls[-1]["rows"].append(("kv1", name, kv))
            self.calls[-1]["rows"].append(("batch", name, x.shape[0]))
        return hook


def check_run(log: CallLog, sigmas, warmup, keep_ratio, n_tokens, batch_rows, token_px, top_names=frozenset(),
              space="noise"):
    """Assert the role of every call and the rows that went through the pruned layers.

    ``n_tokens``: image tokens of the pruned grid; ``token_px``: latent pixels per token side;
    ``top_names``: the UNet transformer blocks of the pruned level; ``space``: the run's
    ``prediction_space``. Returns the step of each call."""
    s = floor_keep(keep_ratio, n_tokens)
    steps = []
    for k, call in enumerate(log.calls):
        j = step_of(call["sigma"], sigmas)
        steps.append(j)
        pruned = j >= warmup + 2
        rows = call["rows"]
        assert call["batch"] == batch_rows, (k, call["batch"])
        assert all(n == batch_rows for what, _, n in rows if what == "batch")
        if "dit" in {w for w, _, _ in rows}:
            counts = [n for what, _, n in rows if what in ("dit", "pe")]
            want = s if pruned else n_tokens
            assert counts and all(n == want for n in counts), (
                f"call {k} (step {j}, {'pruned' if pruned else 'full'}): image tokens per block {counts}, want {want}")
        else:
            assert top_names, "UNet rows need the names of the pruned level's blocks"
            for what, name, n in rows:
                is_top = name in top_names
                if what == "batch":
                    continue
                if what == "kv1":  # self-attention keys/values: always every token (fresh or cached)
                    assert not is_top or n == n_tokens, f"call {k} (step {j}): attn1 of {name} had {n} keys"
                    continue
                if is_top:
                    want = s if pruned else n_tokens
                    assert n == want, (f"call {k} (step {j}, {'pruned' if pruned else 'full'}): {what} of {name} "
                                       f"got {n} rows, want {want}")
                else:
                    assert n < n_tokens, f"{what} of {name} is not at the top level but saw {n} rows"
    # the prediction: on pruned steps only the selected tokens change
    for k in range(1, len(log.outputs)):
        j = steps[k]
        changed = log.changed(k, space, token_px)
        if j >= warmup + 2:
            assert int(changed.sum()) <= s, f"step {j}: {int(changed.sum())} tokens changed, at most {s} recomputed"
            assert int(changed.sum()) > 0
        else:
            assert int(changed.sum()) > s, f"full step {j} changed only {int(changed.sum())} tokens"
    return steps


def run_logged(base, patched, *, hw, batch, steps, cfg, txt_tokens=0, **kw):
    log = CallLog(base, txt_tokens)
    with log:
        out = run_sampler(log.wrap(patched), latent_hw=hw, batch=batch, steps=steps, cfg=cfg, **kw)
    return out, log


def unet_top_names(base, hw):
    """BasicTransformerBlocks of the highest-resolution attention level (found from the model's data
    flow: the blocks whose self-attention sees the most tokens on an unpatched 1-step run)."""
    log = CallLog(base)
    with log:
        run_sampler(base, latent_hw=hw, batch=1, steps=1, cfg=1.0)
    lens = {name: n for what, name, n in log.calls[0]["rows"] if what == "attn1"}
    top = max(lens.values())
    return {name for name, n in lens.items() if n == top}, top


# --------------------------------------------------------------------------------------
# keep_ratio 1.0 is the unpatched model
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_keep_ratio_one_is_bit_identical(models, kind, caplog):
    base = models(kind)
    hw = UNET_HW if kind in ("sd15", "sdxl") else DIT_HW
    cfg = 1.0 if kind in ("sd15", "sdxl") else 7.5  # CFG batches are covered on the UNet by the row tests
    ref = run_sampler(base, latent_hw=hw, batch=1, steps=3, cfg=cfg)
    m = apply_cat(base, keep_ratio=1.0, warmup_steps=0)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        out = run_sampler(m, latent_hw=hw, batch=1, steps=3, cfg=cfg)
    assert torch.equal(out, ref), f"{kind}: keep_ratio 1.0 differs from the unpatched model"
    family = {"sd15": "unet", "sdxl": "unet", "sd3": "mmdit", "flux": "flux"}[kind]
    assert summaries(caplog) == [(1, 2, 3, family)], "the pruned path must have run (step 2 pruned)"


# --------------------------------------------------------------------------------------
# Pruned steps recompute only the selected tokens
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,cfg", [(1, 7.5), (2, 1.0), (3, 7.5)], ids=["b1", "b2_cfg1", "b3"])
def test_unet_pruned_steps_recompute_only_selected_tokens(models, sd15_top, batch, cfg, caplog):
    base = models("sd15")
    top_names, n_tokens = sd15_top
    assert n_tokens == UNET_HW[0] * UNET_HW[1]  # SD1.5: attention at the full latent resolution
    steps, warmup = 4, 0
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=warmup)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        out, log = run_logged(base, m, hw=UNET_HW, batch=batch, steps=steps, cfg=cfg)
    assert out.shape == (batch, 4, *UNET_HW) and torch.isfinite(out).all()
    rows = batch * (1 if cfg == 1.0 else 2)
    assert check_run(log, sample_sigmas(base, steps), warmup, 0.3, n_tokens, rows, token_px=1,
                     top_names=top_names) == list(range(steps))
    if cfg == 1.0:
        assert all(c["cond_or_uncond"] == [0] for c in log.calls), "cfg 1.0 must drop uncond"
    else:
        assert all(sorted(c["cond_or_uncond"]) == [0, 1] for c in log.calls)
    # every top-level block was pruned on the pruned steps: attention, cross-attention and FF
    s = floor_keep(0.3, n_tokens)
    pruned_rows = {(what, name) for c in log.calls[warmup + 2:] for what, name, n in c["rows"] if n == s}
    for name in top_names:
        for what in ("attn1", "attn2", "ff", "k1", "v1"):
            assert (what, name) in pruned_rows, f"{what} of {name} not pruned"
    assert summaries(caplog) == [(2, 2, 4, "unet")]


def test_coarser_level_sizes_round_up():
    """A coarser level's token count identifies its block calls; odd sides round up, as the
    UNet's stride-2 convolutions do."""
    from token_pruning_cache.pruning_core.geometry import coarser_token_counts

    assert coarser_token_counts(TokenGrid(5, 7), 2) == [3 * 4, 2 * 2]
    assert coarser_token_counts(TokenGrid(64, 64), 3) == [1024, 256, 64]
    assert coarser_token_counts(TokenGrid(5, 7), 0) == []


def test_unet_coarser_levels_recompute_the_carried_selection(models, sd15_top, caplog):
    """max_downsample 2 on the two-level SD1.5-like UNet: the 1/2 level's blocks also run on the
    selection carried there, with the same keep ratio (its keys/values stay whole); the output
    matches in shape and is finite."""
    base = models("sd15")
    top_names, n_tokens = sd15_top
    n_coarse = ((UNET_HW[0] + 1) // 2) * ((UNET_HW[1] + 1) // 2)
    steps, warmup = 4, 0
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=warmup, max_downsample="2")
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        out, log = run_logged(base, m, hw=UNET_HW, batch=1, steps=steps, cfg=1.0)
    assert torch.isfinite(out).all()
    s = floor_keep(0.3, n_tokens)
    sigmas = sample_sigmas(base, steps)
    seen_pruned_coarse = False
    for call in log.calls:
        pruned = step_of(call["sigma"], sigmas) >= warmup + 2
        for what, name, n in call["rows"]:
            if what == "batch":
                continue
            if name in top_names:
                assert n == (n_tokens if (what == "kv1" or not pruned) else s), (what, name, n)
            elif what == "kv1" or not pruned:
                assert n == n_coarse, (what, name, n)  # keys/values (fresh or cached) and full steps: every token
            else:
                assert n == floor_keep(0.3, n_coarse), (what, name, n)
                seen_pruned_coarse = True
    assert seen_pruned_coarse, "no coarse-level block ran on fewer tokens on a pruned step"
    assert summaries(caplog) == [(2, 2, 4, "unet")]
    # "auto" prunes the selection's own level only
    _, log_auto = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0, max_downsample="auto"),
                             hw=UNET_HW, batch=1, steps=steps, cfg=1.0)
    coarse_rows = {n for c in log_auto.calls for what, name, n in c["rows"] if name not in top_names and what != "batch"}
    assert coarse_rows == {n_coarse}


def test_sdxl_prunes_its_own_top_attention_level(models, caplog):
    base = models("sdxl")
    top_names, n_tokens = unet_top_names(base, UNET_HW)
    assert n_tokens == (UNET_HW[0] // 2) * (UNET_HW[1] // 2)  # SDXL: first attention one level down
    steps, warmup = 4, 0
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=warmup)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        out, log = run_logged(base, m, hw=UNET_HW, batch=1, steps=steps, cfg=1.0)
    assert torch.isfinite(out).all()
    check_run(log, sample_sigmas(base, steps), warmup, 0.3, n_tokens, 1, token_px=2, top_names=top_names)
    assert summaries(caplog) == [(2, 2, 4, "unet")]


@pytest.mark.parametrize("kind,batch,cfg", [("sd3", 2, 7.5), ("sd3", 1, 1.0), ("flux", 1, 1.0), ("flux", 3, 7.5)])
def test_dit_pruned_steps_recompute_only_selected_image_tokens(models, kind, batch, cfg, caplog):
    base = models(kind)
    n_tokens = (DIT_HW[0] // 2) * (DIT_HW[1] // 2)
    steps, warmup = 4, 0
    txt = 256 if kind == "flux" else 0  # Flux single blocks see cat(txt, img); make_conds gives 256 T5 tokens
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=warmup)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        out, log = run_logged(base, m, hw=DIT_HW, batch=batch, steps=steps, cfg=cfg, txt_tokens=txt)
    assert out.shape == (batch, 16, *DIT_HW) and torch.isfinite(out).all()
    rows = batch * (1 if cfg == 1.0 else 2)
    check_run(log, sample_sigmas(base, steps), warmup, 0.3, n_tokens, rows, token_px=2)
    kinds = {name.split(".")[0] for c in log.calls for what, name, _ in c["rows"] if what == "dit"}
    assert kinds == ({"joint_blocks"} if kind == "sd3" else {"double_blocks", "single_blocks"})
    family = "mmdit" if kind == "sd3" else "flux"
    assert summaries(caplog) == [(2, 2, 4, family)]


def test_sd3_selected_tokens_attend_to_every_image_tokens_keys(models, monkeypatch):
    """The official K/V cache on SD3: on a pruned step the queries are the text tokens and the
    selected image tokens, the keys and values every text and image token (fresh for the selected,
    cached for the rest); a value at the end of that longer sequence reaches the image."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    base = models("sd3")
    seen, poison = [], {"on": False}
    real = mmdit.optimized_attention

    def attention(q, k, v, *a, **kw):
        seen.append((q.shape[1], k.shape[1]))
        if poison["on"] and q.shape[1] != k.shape[1]:
            v = v.clone()
            v[:, -1] += 100.0  # the last image token's value: cached (unselected) unless it was selected
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(mmdit, "optimized_attention", attention)
    n = (DIT_HW[0] // 2) * (DIT_HW[1] // 2)
    s = floor_keep(0.3, n)
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0)
    clean = run_sampler(m, latent_hw=DIT_HW, batch=1, steps=4, cfg=1.0)
    txt = {k - n for q, k in seen}
    assert len(txt) == 1
    (txt,) = txt
    pruned = [(q, k) for q, k in seen if q != k]
    assert pruned and all(q == txt + s and k == txt + n for q, k in pruned), set(seen)
    assert len(pruned) == 2 * len(base.model.diffusion_model.joint_blocks)  # steps 2 and 3
    poison["on"] = True
    poisoned = run_sampler(m, latent_hw=DIT_HW, batch=1, steps=4, cfg=1.0)
    assert not torch.equal(clean, poisoned), "the selected tokens did not see the other tokens' values"


def test_sd3_residual_shortcut_stays_available_for_comparison(models, monkeypatch):
    """``dit_kv_cache=False``: the pack's earlier way, the block on the selected tokens only."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    base = models("sd3")
    seen = []
    real = mmdit.optimized_attention
    monkeypatch.setattr(mmdit, "optimized_attention", lambda q, k, v, *a, **kw: (seen.append((q.shape[1], k.shape[1])),
                                                                                   real(q, k, v, *a, **kw))[1])
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0, dit_kv_cache=False)
    run_sampler(m, latent_hw=DIT_HW, batch=1, steps=4, cfg=1.0)
    assert all(q == k for q, k in seen) and len({q for q, _ in seen}) == 2  # full and pruned lengths


@pytest.mark.parametrize("before_merge", [True, False], ids=["raw", "merged"])
def test_the_change_signal_of_unrecomputed_tokens_follows_the_raw_output(models, monkeypatch, before_merge):
    """Official: the next selection is made from the model's raw output, so the change of a token
    that was not recomputed (its prediction is replaced by the previous one) still moves where
    the model moved it: UNet conv blocks run every token. With ``signal_before_merge=False``
    the signal is the merged prediction the sampler gets. Both in the default noise space: the
    signal is ``ε = (x − x̂₀) / σ`` of what the sampler received."""
    from token_pruning_cache.pruning_core.cat import CATState, prediction_tokens

    base = models("sd15")
    seen = []
    real = CATState.next_selection

    def next_selection(self, pred, row=0):
        seen.append((pred.clone(), self.selection.clone()))
        return real(self, pred, row)

    monkeypatch.setattr(CATState, "next_selection", next_selection)
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0, signal_before_merge=before_merge)
    log = CallLog(base)
    run_sampler(log.wrap(m), latent_hw=UNET_HW, batch=1, steps=5, cfg=1.0)
    assert len(seen) == 3  # steps 2, 3, 4 are pruned and make the next selection
    grid = TokenGrid(*UNET_HW)
    for k, (pred, selection) in enumerate(seen, start=2):
        given = prediction_tokens(log.prediction(k), grid)
        rest = torch.ones(grid.n, dtype=torch.bool).index_fill_(0, selection, False)
        assert torch.allclose(pred[:, selection], given[:, selection], rtol=1e-4, atol=1e-4)
        assert torch.allclose(pred[:, rest], given[:, rest], rtol=1e-4, atol=1e-4) != before_merge


@pytest.mark.parametrize("space", ["denoised", "noise"])
def test_unselected_tokens_keep_their_previous_prediction_in_the_chosen_space(models, space):
    """``prediction_space`` "denoised": an unselected token's output is its previous denoised
    estimate; "noise" (official): its previous noise prediction, so its output is
    ``x_t − σ_t·ε_{t−1}`` with ``ε_{t−1} = (x_{t−1} − x̂₀,t−1) / σ_{t−1}`` from the model's own calls.
    (With euler the two are the same value: an euler step keeps ``x − σ·ε`` fixed, so this runs
    euler_ancestral, whose added noise moves it.)"""
    base = models("sd15")
    log = CallLog(base)
    run_sampler(log.wrap(apply_cat(base, keep_ratio=0.3, warmup_steps=0, prediction_space=space)), latent_hw=UNET_HW,
                batch=1, steps=5, cfg=1.0, sampler="euler_ancestral")
    n = UNET_HW[0] * UNET_HW[1]
    for step in (2, 3, 4):  # the pruned steps (reference step 0, clustering step 1)
        out = log.outputs[step]
        as_denoised, as_noise = log.held(step, "denoised"), log.held(step, "noise")
        same = {name: torch.isclose(out, held, rtol=1e-5, atol=1e-6).all(dim=1).sum().item()
                for name, held in (("denoised", as_denoised), ("noise", as_noise))}
        assert same[space] == n - floor_keep(0.3, n), f"step {step}: {same}"
        assert same["noise" if space == "denoised" else "denoised"] < n // 10, f"step {step}: {same}"


# --------------------------------------------------------------------------------------
# Warm-up, summary, validation, unsupported models
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [2, None], ids=["warmup2", "default6"])
def test_warmup_is_respected(models, warmup, caplog):
    base = models("sd3")
    steps = 9
    kw = {} if warmup is None else {"warmup_steps": warmup}
    w = 6 if warmup is None else warmup
    m = apply_cat(base, keep_ratio=0.3, **kw)
    hw = (8, 8)  # 16 image tokens: S = 4
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        out, log = run_logged(base, m, hw=hw, batch=1, steps=steps, cfg=1.0)
    assert torch.isfinite(out).all()
    got = check_run(log, sample_sigmas(base, steps), w, 0.3, 16, 1, token_px=2)
    assert got == list(range(steps))
    first_pruned = next(j for j, c in zip(got, log.calls) if all(n == 4 for what, _, n in c["rows"] if what == "dit"))
    assert first_pruned == w + 2
    assert summaries(caplog) == [(steps - w - 2, w + 2, steps, "mmdit")]


def test_summary_line_once_per_run(models, caplog):
    base = models("sd3")
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0)
    with caplog.at_level(logging.INFO, logger="token_pruning_cache"):
        run_sampler(m, latent_hw=(8, 8), batch=1, steps=4, cfg=1.0)
        run_sampler(m, latent_hw=(8, 8), batch=1, steps=3, cfg=1.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CAT")]
    assert len(lines) == 2, lines
    assert summaries(caplog) == [(2, 2, 4, "mmdit"), (1, 2, 3, "mmdit")]
    assert "30% of tokens recomputed" in lines[0]


def test_validation_messages():
    assert CATPruneCache.validate_inputs() is True
    for bad in (dict(keep_ratio=0.0), dict(warmup_steps=-1), dict(num_clusters=0), dict(cluster_share=1.5),
                dict(staleness_decay=1.0), dict(start_percent=0.8, end_percent=0.2)):
        assert isinstance(CATPruneCache.validate_inputs(**bad), str), bad
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_cat(None, keep_ratio=0.0)
    with pytest.raises(ValueError, match="prediction_space"):
        apply_cat(None, prediction_space="velocity")


def _conv_only_unet():
    """A real ComfyUI SD1.x-class UNet built without any transformer block (transformer_depth 0,
    middle block without attention): neither a UNet with SpatialTransformer levels nor a DiT."""
    cfg = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False,
        "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
        "transformer_depth": [0, 0], "transformer_depth_output": [0, 0, 0, 0], "transformer_depth_middle": -1,
        "use_linear_in_transformer": False, "context_dim": 768,
    }
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    seeded_fill_(model.diffusion_model, 0)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_unsupported_model_passes_through_with_one_warning(caplog):
    m = _conv_only_unet()
    dm = m.model.diffusion_model
    assert not any("Transformer" in type(x).__name__ for x in dm.modules())
    options_before = repr(m.model_options)
    with caplog.at_level(logging.WARNING, logger="token_pruning_cache"):
        out = apply_cat(m, keep_ratio=0.3)
    assert out is m and repr(m.model_options) == options_before and not m.object_patches
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "UNetModel" in warnings[0].getMessage() and "unchanged" in warnings[0].getMessage()
    # and the model still samples as before
    assert torch.isfinite(run_sampler(out, latent_hw=(8, 8), batch=1, steps=1, cfg=1.0)).all()


def test_cached_kv_projections_match_projecting_the_cached_inputs(models):
    """A pruned step projects only the selected tokens' keys/values and takes the others from
    the block's cache. Projections are linear per token, so this equals projecting the cached
    K/V inputs of every token (the same model without the to_k/to_v object patches) up to
    float rounding, on every step of a run with CFG and at both eligible levels."""
    base = models("sd15")
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0, max_downsample="2")
    reference = m.clone()
    dropped = [k for k in list(reference.object_patches) if k.endswith((".attn1.to_k.forward", ".attn1.to_v.forward"))]
    assert dropped, "no key/value projection was patched"
    for k in dropped:
        del reference.object_patches[k]
    a = run_sampler(m, latent_hw=UNET_HW, batch=2, steps=5, cfg=7.5)
    b = run_sampler(reference, latent_hw=UNET_HW, batch=2, steps=5, cfg=7.5)
    assert not torch.equal(a, run_sampler(base, latent_hw=UNET_HW, batch=2, steps=5, cfg=7.5))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cat_first", [True, False], ids=["cat_then_sito", "sito_then_cat"])
def test_self_attention_shared_with_sito_one_node_yields_and_says_so(models, cat_first, caplog):
    """SiTo and CAT both shorten the top level's self-attention. The node applied first sees the
    other's patch after its own and leaves those calls alone, saying so in one warning; the other
    node does its work. (CAT first used to store SiTo's pruned output as its attention cache and
    then stay unpruned without a word.) The run is still a normal image."""
    from token_pruning_cache.nodes.sito_node import apply_sito

    base = models("sd15")
    ref = run_sampler(base, latent_hw=UNET_HW, batch=1, steps=4, cfg=1.0)
    if cat_first:
        m = apply_sito(apply_cat(base, keep_ratio=0.3, warmup_steps=0), prune_ratio=0.5)
    else:
        m = apply_cat(apply_sito(base, prune_ratio=0.5), keep_ratio=0.3, warmup_steps=0)
    from work_meter import WorkMeter

    with caplog.at_level(logging.INFO, logger="token_pruning_cache"), WorkMeter(base) as meter:
        out = run_sampler(m, latent_hw=UNET_HW, batch=1, steps=4, cfg=1.0)
    assert torch.isfinite(out).all()
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.6
    # which node did the work, from the model's own calls: the query lengths of the top level's
    # self-attention are SiTo's (N - floor(0.5 N), every step) or CAT's (floor(0.3 N), pruned steps 2-3)
    n = UNET_HW[0] * UNET_HW[1]
    top = [[q for _, q, _, full in c["attn1"] if full == n] for c in meter.calls]
    if cat_first:
        assert all(c and set(c) == {n - n // 2} for c in top), top
    else:
        assert top[0] == top[1] == [n] * len(top[0]) and all(set(c) == {floor_keep(0.3, n)} for c in top[2:]), top
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    first = "CAT Pruning:" if cat_first else "SiTo Token Pruning:"
    assert warnings[0].startswith(first), warnings
    assert re.search(r"\d+ calls left unpruned because another pack's self-attention patch .* comes after this node",
                     warnings[0]), warnings[0]
    if cat_first:  # SiTo pruned
        sito = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SiTo:")]
        assert len(sito) == 1 and re.search(r"[1-9]\d*/\d+ tokens pruned", sito[0]), sito
    else:  # CAT pruned its steps
        assert summaries(caplog) == [(2, 2, 4, "unet")]


def test_sd2_v_prediction_prunes_its_top_level(caplog):
    """The README lists SD2.x: on the SD2-v layout CAT recomputes S tokens of the top level on its
    pruned steps (measured at the layers), changes the image, and keep_ratio 1.0 is unpatched."""
    base = build("sd2v")
    top_names, n_tokens = unet_top_names(base, UNET_HW)
    assert n_tokens == UNET_HW[0] * UNET_HW[1]
    ref = run_sampler(base, latent_hw=UNET_HW, batch=1, steps=4, cfg=1.0)
    assert torch.equal(run_sampler(apply_cat(base, keep_ratio=1.0, warmup_steps=0), latent_hw=UNET_HW, batch=1,
                                   steps=4, cfg=1.0), ref)
    out, log = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0), hw=UNET_HW, batch=1, steps=4,
                          cfg=1.0)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    check_run(log, sample_sigmas(base, 4), 0, 0.3, n_tokens, 1, token_px=1, top_names=top_names)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_dit_input_model_untouched_after_sampling(models, kind):
    """MODEL in, MODEL out on the DiTs: after sampling the patched clone, the input model's
    options, patches and weights are as before and it samples the unpatched image again."""
    base = models(kind)
    ref = run_sampler(base, latent_hw=(8, 8), batch=1, steps=3, cfg=1.0)
    weights = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    before = (repr(base.model_options), dict(base.object_patches), repr(base.wrappers), repr(base.callbacks))
    patched = run_sampler(apply_cat(base, keep_ratio=0.3, warmup_steps=0), latent_hw=(8, 8), batch=1, steps=3,
                          cfg=1.0)
    assert not torch.equal(patched, ref)
    assert (repr(base.model_options), dict(base.object_patches), repr(base.wrappers), repr(base.callbacks)) == before
    after = base.model.diffusion_model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert torch.equal(run_sampler(base, latent_hw=(8, 8), batch=1, steps=3, cfg=1.0), ref)


# --------------------------------------------------------------------------------------
# Which tokens are recomputed: the selection, read from the predictions the sampler got
# --------------------------------------------------------------------------------------

def recomputed_tokens(log: CallLog, k: int) -> set[int]:
    """Tokens (latent pixels on the SD1.5 top level) whose prediction at call ``k`` is not the
    one held from call ``k - 1``: on a pruned step exactly the tokens it recomputed (every other
    token gets its previous prediction back, in the default noise space)."""
    return set(log.changed(k).flatten().nonzero().flatten().tolist())


def test_first_selection_is_the_tokens_that_changed_most(models):
    """With one cluster the first selection is the ``S`` tokens whose prediction moved most
    between the reference step and the clustering step (``g = ‖ε_t − ε_ref‖`` over channels, in
    the default noise space), both full steps, so ``g`` is computed here from the predictions the
    sampler received."""
    base = models("sd15")
    n = UNET_HW[0] * UNET_HW[1]
    s = floor_keep(0.3, n)
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0, num_clusters=1)
    _, log = run_logged(base, m, hw=UNET_HW, batch=1, steps=3, cfg=1.0)
    assert len(log.outputs) == 3  # step 0 reference, step 1 clustering, step 2 the first pruned step
    g = torch.linalg.vector_norm(log.prediction(1)[0] - log.prediction(0)[0], dim=0).flatten()
    want = set(torch.topk(g, s).indices.tolist())
    assert recomputed_tokens(log, 2) == want


def test_staleness_recomputes_every_token_within_a_few_pruned_steps(models):
    """Distributional balance: after the first selection, ``S − ⌊cluster_share·S⌋`` of each
    step's tokens are the least recently recomputed ones, so consecutive selections share at
    most ``⌊cluster_share·S⌋`` tokens and every token is recomputed within
    ``1 + ⌈(N − S) / (S − ⌊cluster_share·S⌋)⌉`` pruned steps (4 here: 64 tokens, S = 19).
    Random selections of 19 of 64 tokens would leave ~15 tokens never recomputed in 4 steps."""
    base = models("sd15")
    n = UNET_HW[0] * UNET_HW[1]
    s = floor_keep(0.3, n)
    cluster_part = int(0.25 * s + 1e-9)
    rounds = 1 + -(-(n - s) // (s - cluster_part))
    assert rounds == 4
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0)
    _, log = run_logged(base, m, hw=UNET_HW, batch=1, steps=2 + rounds, cfg=1.0)
    selections = [recomputed_tokens(log, k) for k in range(2, 2 + rounds)]
    assert all(len(sel) == s for sel in selections), [len(sel) for sel in selections]
    for a, b in zip(selections, selections[1:]):
        assert len(a & b) <= cluster_part, f"consecutive selections share {len(a & b)} tokens"
    assert set().union(*selections) == set(range(n))


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("window", [(0.0, 0.5), (0.4, 1.0), (0.3, 0.6)], ids=["first_half", "second_half", "middle"])
def test_partial_window_prunes_inside_and_is_untouched_outside(models, window):
    """start/end_percent: only steps whose sigma lies inside the window recompute a selection
    (shortened self-attention); the others run every token, and before the window opens the
    predictions are bit-identical to the unpatched run's."""
    from work_meter import WorkMeter

    base = models("sd15")
    steps = 8
    start, end = window
    sampling = base.get_model_object("model_sampling")
    hi, lo = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0, start_percent=start, end_percent=end)
    with WorkMeter(base, keep_outputs=True) as meter:
        run_sampler(m, latent_hw=UNET_HW, batch=1, steps=steps, cfg=1.0)
    with WorkMeter(base, keep_outputs=True) as plain:
        run_sampler(base, latent_hw=UNET_HW, batch=1, steps=steps, cfg=1.0)
    # steps 0 and 1 are full for CAT anyway (reference, clustering)
    inside = [k for k, c in enumerate(meter.calls) if lo <= c["sigma"] <= hi and k >= 2]
    assert 0 < len(inside) < steps - 2, inside
    assert set(meter.shortened_calls()) == set(inside)
    first_in = min(inside)
    for k in range(first_in):
        assert torch.equal(meter.calls[k]["out"], plain.calls[k]["out"]), f"call {k} before the window differs"
    assert not torch.equal(meter.calls[first_in]["out"], plain.calls[first_in]["out"])
