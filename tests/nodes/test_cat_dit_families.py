"""CAT Pruning on the DiTs users run in 2026: Wan 2.1/2.2 (text- and image-to-video; the 14B
I2V and 5B TI2V layouts), Qwen-Image, Chroma, HunyuanVideo and LTX-Video, through ComfyUI's
real sampler (``comfy.sample.sample``) with tiny random-weight models built from ComfyUI's own
classes (tests/tiny_models.py).

What is measured, and how (never from the pack's summary line, which is only checked to agree):
  * Which call is which: a forward pre-hook on the diffusion model records
    ``transformer_options["sigmas"]``, ``cond_or_uncond`` and the batch of every model call; the
    step is the index of that sigma in the run's schedule.
  * Rows through the layers that do the work: forward pre-hooks on the linear layers of every
    block, tagged by what they compute - the image stream's self-attention projections
    (``attn``), its cross-attention query/output (``cross``), its feed-forward (``ff``), on the
    Flux-style blocks the image stream's Q/K/V (``img``) and the single blocks' fused input layer
    (``joint``: text + image rows), and the text stream's projections (``text``, never pruned).
    The pack object-patches sub-module ``forward``s, so the hooks sit on the linear layers
    below them and see the rows that are really multiplied.
  * What the attention sees: an ``optimized_attention_override`` put on the model by the test
    (as another pack would) records the query and key lengths of every attention call; the
    pack's K/V-cache override chains to it, so it sees the keys the attention really gets.
  * The prediction after the pack's APPLY_MODEL wrapper: a ``model_function_wrapper`` on a
    clone of the patched model.
Step roles: steps ``< warmup_steps + 2`` are full, later steps are pruned with
``S = floor(keep_ratio * N_free)`` tokens of the frames the sampler denoises, plus every token of
the frames it keeps fixed (image-to-video start frames).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import pytest
import torch

import comfy.model_management

from tiny_models import build, make_conds, run_sampler, sample_sigmas, step_of
from token_pruning_cache.nodes.cat_node import apply_cat

SUMMARY = re.compile(r"^CAT: (\d+) pruned / (\d+) full of (\d+) steps on (\w+)")
TXT = 32  # text tokens of make_conds for these families
LOGGER = "token_pruning_cache"


@dataclass(frozen=True)
class Variant:
    kind: str  # tiny_models builder
    family: str  # what the node reports
    i2v: bool = False
    frames: int = 3  # latent frames (Qwen-Image, Chroma: images)
    hw: tuple = (8, 8)  # latent height, width
    patch: tuple = (1, 2, 2)
    cfg: float = 2.0  # cond + uncond batched
    fixed_frames: int = 0  # leading latent frames the sampler keeps fixed (always computed)
    image: bool = False  # a 4-D image latent (Chroma)

    @property
    def grid(self) -> tuple[int, int, int]:
        t = 1 if self.image or self.kind == "qwen_image" else self.frames
        return t, -(-self.hw[0] // self.patch[1]), -(-self.hw[1] // self.patch[2])

    @property
    def n(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def n_fixed(self) -> int:
        _, h, w = self.grid
        return self.fixed_frames * h * w

    def computed(self, keep: float) -> int:
        """Image tokens a pruned call computes: S of the free tokens + the fixed frames'."""
        return floor_keep(keep, self.n - self.n_fixed) + self.n_fixed

    @property
    def kv(self) -> bool:
        return self.family in ("wan", "qwen_image", "ltxv")


VARIANTS = {
    "wan21_t2v": Variant("wan21", "wan"),
    "wan21_i2v_14b": Variant("wan21_i2v", "wan", i2v=True),  # start image in the input channels
    "wan22_ti2v_5b_t2v": Variant("wan22_ti2v", "wan"),
    "wan22_ti2v_5b_i2v": Variant("wan22_ti2v", "wan", i2v=True, fixed_frames=1),
    "qwen_image": Variant("qwen_image", "qwen_image", hw=(8, 12)),
    "chroma": Variant("chroma", "chroma", hw=(8, 12), image=True),
    "hunyuan_video": Variant("hunyuan_video", "hunyuan_video"),
    # "v2 (replace)": guiding frame; ComfyUI's HunyuanVideo runs per-range modulation on one row only
    "hunyuan_video_i2v": Variant("hunyuan_video", "hunyuan_video", i2v=True, fixed_frames=1, cfg=1.0),
    "ltxv": Variant("ltxv", "ltxv", hw=(6, 6), patch=(1, 1, 1)),
    "ltxv_i2v": Variant("ltxv", "ltxv", i2v=True, hw=(6, 6), patch=(1, 1, 1), fixed_frames=1),
}
IDS = list(VARIANTS)
KV_IDS = [k for k in IDS if VARIANTS[k].kv]
RESIDUAL_IDS = [k for k in IDS if not VARIANTS[k].kv]

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


def floor_keep(keep_ratio, n):
    return int(keep_ratio * n + 1e-9)


_MODELS: dict = {}


def model(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = build(kind)
    return _MODELS[kind]


def sample(patched, v: Variant, steps=4, cfg=None, frames=None, hw=None, **kw):
    return run_sampler(patched, latent_hw=hw or v.hw, batch=1, steps=steps, cfg=v.cfg if cfg is None else cfg,
                       frames=frames or v.frames, i2v=v.i2v, **kw)


def summaries(caplog):
    out = []
    for r in caplog.records:
        m = SUMMARY.match(r.getMessage())
        if m:
            out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)))
    return out


# --------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------

def _tagged_linears(dm, family: str):
    """(module, tag, block name) for the linear layers whose rows show the work."""
    out = []
    if family == "wan":
        for i, b in enumerate(dm.blocks):
            out += [(m, "attn", f"blocks.{i}") for m in (b.self_attn.q, b.self_attn.k, b.self_attn.v, b.self_attn.o)]
            out += [(b.cross_attn.q, "cross", f"blocks.{i}"), (b.cross_attn.o, "cross", f"blocks.{i}"),
                    (b.cross_attn.k, "text", f"blocks.{i}"), (b.ffn[0], "ff", f"blocks.{i}")]
    elif family == "qwen_image":
        for i, b in enumerate(dm.transformer_blocks):
            a = b.attn
            out += [(m, "attn", f"transformer_blocks.{i}") for m in (a.to_q, a.to_k, a.to_v, a.to_out[0])]
            out += [(b.img_mlp.net[0].proj, "ff", f"transformer_blocks.{i}"),
                    (a.add_q_proj, "text", f"transformer_blocks.{i}"), (b.txt_mlp.net[0].proj, "text", f"transformer_blocks.{i}")]
    elif family == "ltxv":
        for i, b in enumerate(dm.transformer_blocks):
            out += [(m, "attn", f"transformer_blocks.{i}") for m in (b.attn1.to_q, b.attn1.to_k, b.attn1.to_v, b.attn1.to_out[0])]
            out += [(b.attn2.to_q, "cross", f"transformer_blocks.{i}"), (b.attn2.to_out[0], "cross", f"transformer_blocks.{i}"),
                    (b.attn2.to_k, "text", f"transformer_blocks.{i}"), (b.ff.net[0].proj, "ff", f"transformer_blocks.{i}")]
    else:  # Flux-style double + single blocks
        for i, b in enumerate(dm.double_blocks):
            out += [(b.img_attn.qkv, "img", f"double_blocks.{i}"), (b.txt_attn.qkv, "text", f"double_blocks.{i}")]
        for i, b in enumerate(dm.single_blocks):
            out.append((b.linear1, "joint", f"single_blocks.{i}"))
    return out


class CallLog:
    """Per diffusion-model call: sigma, cond_or_uncond, batch, rows through the tagged linear
    layers, (query, key) lengths of every attention call; and the predictions after the pack's
    APPLY_MODEL wrapper."""

    def __init__(self, base, family: str, hidden: bool = False):
        self.dm = base.model.diffusion_model
        self.family = family
        self.want_hidden = hidden
        self.calls: list[dict] = []
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x, sigma per row) of each call
        self.hidden: list[tuple] = []  # Flux-style: (tokens after img_in, tokens into final_layer)
        self.poison = False
        self._handles = []

    def wrap(self, patched):
        """A clone of ``patched`` whose predictions are recorded and whose attention calls pass
        through this log's override (installed the way another pack would)."""
        m = patched.clone()

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            x = args["input"]
            self.outputs.append(out.detach().clone())
            self.inputs.append((x.detach().clone(), args["timestep"].reshape(-1, *([1] * (x.dim() - 1))).clone()))
            return out
        m.set_model_unet_function_wrapper(wrapper)
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self._attention
        return m

    def held(self, k: int) -> torch.Tensor:
        """What call ``k`` returns for a token it did not recompute, in CAT's default noise space:
        the denoised estimate made from the previous call's velocity ``(x − x̂₀) / σ`` at this
        call's ``x`` and ``σ``."""
        (xp, sp), (x, s) = self.inputs[k - 1], self.inputs[k]
        return x - (xp - self.outputs[k - 1]) / sp * s

    def _attention(self, func, q, k, v, *args, **kwargs):
        dim = 2 if kwargs.get("skip_reshape") else 1
        if self.calls:
            self.calls[-1]["attn_calls"].append((q.shape[dim], k.shape[dim]))
        if self.poison and q.shape[dim] != k.shape[dim]:
            v = v.clone()
            v.narrow(dim, v.shape[dim] - 1, 1).add_(100.0)  # the last image token's value
        return func(q, k, v, *args, **kwargs)

    def __enter__(self):
        self._handles.append(self.dm.register_forward_pre_hook(self._start, with_kwargs=True))
        for module, tag, name in _tagged_linears(self.dm, self.family):
            self._handles.append(module.register_forward_pre_hook(self._rows(tag, name)))
        if self.want_hidden:
            self._handles.append(self.dm.img_in.register_forward_hook(self._img_in))
            self._handles.append(self.dm.final_layer.register_forward_pre_hook(self._final))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _start(self, module, args, kwargs):
        to = kwargs.get("transformer_options") or {}
        x = args[0] if args else kwargs["x"]
        self.calls.append({"sigma": float(to["sigmas"].reshape(-1)[0]), "cond_or_uncond": list(to["cond_or_uncond"]),
                           "batch": x.shape[0], "rows": [], "attn_calls": []})

    def _rows(self, tag, name):
        def hook(module, args):
            self.calls[-1]["rows"].append((tag, name, args[0].shape[1], args[0].shape[0]))
        return hook

    def _img_in(self, module, args, out):
        self._first = out.detach().clone()

    def _final(self, module, args):
        self.hidden.append((self._first, args[0].detach().clone()))


def run_logged(base, patched, v: Variant, hidden: bool = False, **kw):
    log = CallLog(base, v.family, hidden)
    with log:
        out = sample(log.wrap(patched), v, **kw)
    return out, log


def check_rows(log: CallLog, v: Variant, sigmas, warmup: int, keep: float, rows_per_call: int):
    """Every call's rows: pruned steps compute ``v.computed(keep)`` image tokens in every tagged
    image layer, full steps all ``v.n``; the text stream always its ``TXT`` tokens; the batch is
    ``rows_per_call``. Returns the steps of the calls."""
    steps = []
    want_pruned = v.computed(keep)
    for k, call in enumerate(log.calls):
        j = step_of(call["sigma"], sigmas)
        steps.append(j)
        pruned = j >= warmup + 2
        assert call["batch"] == rows_per_call, (k, call["batch"])
        image = want_pruned if pruned else v.n
        seen = {}
        for tag, name, n, b in call["rows"]:
            assert b == rows_per_call, (k, tag, name, b)
            seen.setdefault(tag, set()).add(n)
            want = {"text": TXT, "joint": TXT + image}.get(tag, image)
            assert n == want, (f"call {k} (step {j}, {'pruned' if pruned else 'full'}): {tag} of {name} "
                               f"had {n} rows, want {want}")
        wanted_tags = {"wan": {"attn", "cross", "ff", "text"}, "qwen_image": {"attn", "ff", "text"},
                       "ltxv": {"attn", "cross", "ff", "text"}}.get(v.family, {"img", "joint", "text"})
        assert set(seen) == wanted_tags, (k, sorted(seen))
    return steps


# --------------------------------------------------------------------------------------
# keep_ratio 1.0 is the unpatched model
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("vid", IDS)
def test_keep_ratio_one_is_bit_identical(vid, caplog):
    v = VARIANTS[vid]
    base = model(v.kind)
    ref = sample(base, v, steps=3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = sample(apply_cat(base, keep_ratio=1.0, warmup_steps=0), v, steps=3)
    assert torch.equal(out, ref), f"{vid}: keep_ratio 1.0 differs from the unpatched model"
    assert summaries(caplog) == [(1, 2, 3, v.family)], "the pruned path must have run (step 2 pruned)"


# --------------------------------------------------------------------------------------
# Pruned steps compute only the selected tokens (+ fixed frames); CFG rows
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("vid", IDS)
def test_pruned_steps_compute_only_the_selected_tokens(vid, caplog):
    v = VARIANTS[vid]
    base = model(v.kind)
    steps, warmup, keep = 4, 0, 0.3
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, log = run_logged(base, apply_cat(base, keep_ratio=keep, warmup_steps=warmup), v, steps=steps)
    t, h, w = v.grid
    latent_shape = (1, out.shape[1], *v.hw) if v.image else (1, out.shape[1], 1 if v.kind == "qwen_image" else v.frames, *v.hw)
    assert out.shape == latent_shape and torch.isfinite(out).all()
    rows = 1 if v.cfg == 1.0 else 2
    assert check_rows(log, v, sample_sigmas(base, steps), warmup, keep, rows) == list(range(steps))
    assert all(sorted(c["cond_or_uncond"]) == ([0] if rows == 1 else [0, 1]) for c in log.calls)
    # the prediction the sampler gets: on pruned steps only computed tokens change
    want = v.computed(keep)
    for k in range(1, len(log.outputs)):
        changed = _changed_tokens(log, k, v)
        if k >= warmup + 2:
            assert 0 < int(changed.sum()) <= want, (k, int(changed.sum()), want)
            if v.n_fixed:  # the fixed frame is computed (and its prediction refreshed) on every step
                assert changed[:v.n_fixed].all()
        else:
            assert int(changed.sum()) > want
    assert summaries(caplog) == [(2, 2, 4, v.family)]


def _changed_tokens(log: CallLog, k: int, v: Variant) -> torch.Tensor:
    """[N] bool: tokens whose prediction at call ``k`` is not the one held from call ``k - 1``
    (``CallLog.held``), frame-major."""
    t, h, w = v.grid
    d = ~torch.isclose(log.outputs[k], log.held(k), rtol=1e-4, atol=1e-5)
    if d.dim() == 4:
        d = d.unsqueeze(2)
    pt, ph, pw = v.patch
    d = torch.nn.functional.pad(d, (0, w * pw - d.shape[-1], 0, h * ph - d.shape[-2]))
    d = d.reshape(d.shape[0], d.shape[1], t, pt, h, ph, w, pw).any(dim=(0, 1, 3, 5, 7))
    return d.reshape(-1)


def test_cfg_one_drops_uncond_rows(caplog):
    v = VARIANTS["wan21_t2v"]
    base = model(v.kind)
    _, log = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=4, cfg=1.0)
    check_rows(log, v, sample_sigmas(base, 4), 0, 0.3, 1)
    assert all(c["cond_or_uncond"] == [0] for c in log.calls)


# --------------------------------------------------------------------------------------
# What the attention sees
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("vid", KV_IDS)
def test_kv_cache_selected_queries_attend_to_every_image_key(vid):
    """Wan, Qwen-Image, LTX-Video: on a pruned step the self-attention has the computed image
    tokens (plus, on Qwen-Image's joint attention, every text token) as queries and every image
    token's keys (fresh for the computed, cached for the rest); a value at the end of that longer
    key sequence (an uncomputed token unless it was selected) reaches the output."""
    v = VARIANTS[vid]
    base = model(v.kind)
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0)
    clean, log = run_logged(base, m, v, steps=4)
    text = TXT if v.family == "qwen_image" else 0
    sigmas = sample_sigmas(base, 4)
    widened = 0
    for call in log.calls:
        pruned = step_of(call["sigma"], sigmas) >= 2
        self_attn = [(q, k) for q, k in call["attn_calls"] if k == v.n + text]  # keys of every image token
        assert len(self_attn) == 2, call["attn_calls"]  # one per block
        for q, k in self_attn:
            assert k == v.n + text, (q, k)
            assert q == (v.computed(0.3) if pruned else v.n) + text, (q, k)
            widened += q != k
    assert widened == 2 * 2  # two blocks on each of the two pruned steps
    log2 = CallLog(base, v.family)
    log2.poison = True
    with log2:
        poisoned = sample(log2.wrap(m), v, steps=4)
    assert not torch.equal(clean, poisoned), "the computed tokens did not see the other tokens' values"


@pytest.mark.parametrize("vid", RESIDUAL_IDS)
def test_residual_blocks_attend_within_the_computed_tokens(vid):
    """Chroma, HunyuanVideo: the residual-update path (a documented deviation): the block runs on
    the text and the computed image tokens, so queries and keys have the same, shorter length."""
    v = VARIANTS[vid]
    base = model(v.kind)
    _, log = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=4)
    sigmas = sample_sigmas(base, 4)
    for call in log.calls:
        image = v.computed(0.3) if step_of(call["sigma"], sigmas) >= 2 else v.n
        joint = [(q, k) for q, k in call["attn_calls"] if q == k and q == TXT + image]
        assert len(joint) == 4, call["attn_calls"]  # 2 double + 2 single blocks


@pytest.mark.parametrize("vid", RESIDUAL_IDS + ["flux"])
def test_residual_update_reaches_the_tokens_it_does_not_compute(vid):
    """The Flux-style blocks add their update to their input in place (``img +=``). An
    uncomputed token gets its input plus the block's cached update; measured against the input
    the block changed in place, that update was 0 and uncomputed tokens left every block as they
    entered (their hidden state into the final layer equal to the one out of ``img_in``)."""
    v = VARIANTS.get(vid) or Variant("flux", "flux", hw=(8, 12), image=True)
    base = model(v.kind)
    _, log = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, hidden=True, steps=4)
    assert len(log.hidden) == len(log.calls) == 4
    for k, (first, last) in enumerate(log.hidden):
        same = (first == last).all(dim=-1).any(dim=0)  # tokens that no block changed
        assert int(same.sum()) == 0, f"call {k}: {int(same.sum())} tokens left every block unchanged"


def test_hunyuan_text_mask_follows_the_computed_tokens(caplog):
    """HunyuanVideo's LLaMA padding mask covers the joint sequence: a pruned block gets its
    columns for the computed image tokens and the text, so padded text tokens stay masked."""
    v = VARIANTS["hunyuan_video"]
    base = model(v.kind)
    pos, neg = make_conds(v.kind, text_mask=True)
    ref = sample(base, v, steps=4, cfg=1.0, positive=pos, negative=neg)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _, log = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=4, cfg=1.0,
                            positive=pos, negative=neg)
    check_rows(log, v, sample_sigmas(base, 4), 0, 0.3, 1)
    assert summaries(caplog) == [(2, 2, 4, "hunyuan_video")]
    # keep 1.0 with the mask: identical to the unpatched model
    assert torch.equal(sample(apply_cat(base, keep_ratio=1.0, warmup_steps=0), v, steps=4, cfg=1.0,
                              positive=pos, negative=neg), ref)


# --------------------------------------------------------------------------------------
# 3-D grid: clusters span frames; no state leak between runs of different shapes
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("vid", ["wan21_t2v", "wan22_ti2v_5b_i2v", "hunyuan_video", "ltxv_i2v", "qwen_image"])
def test_no_state_leak_between_runs_of_different_frame_counts_and_sizes(vid):
    """The same patched MODEL sampled at one size and frame count, then at another: the second
    run equals a fresh patched model's run of that shape, bit for bit."""
    v = VARIANTS[vid]
    base = model(v.kind)
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0)
    other = dict(frames=v.frames + 2, hw=(v.hw[0] + 2, v.hw[1] + 4))
    first = sample(m, v, steps=5)
    second = sample(m, v, steps=5, **other)
    fresh = sample(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=5, **other)
    assert torch.equal(second, fresh)
    assert torch.equal(sample(m, v, steps=5), first)


def test_video_selection_spreads_over_frames_and_covers_every_token():
    """On a 3-frame grid the staleness part reaches every token of every frame within
    ``1 + ⌈(N − S) / (S − ⌊cluster_share·S⌋)⌉`` pruned steps, as on an image grid (consecutive
    selections share at most the cluster part)."""
    v = VARIANTS["wan21_t2v"]
    base = model(v.kind)
    n, s = v.n, floor_keep(0.3, v.n)
    cluster_part = int(0.25 * s + 1e-9)
    rounds = 1 + -(-(n - s) // (s - cluster_part))
    _, log = run_logged(base, apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=2 + rounds, cfg=1.0)
    sel = [set(_changed_tokens(log, k, v).nonzero().flatten().tolist())
           for k in range(2, 2 + rounds)]
    assert all(len(x) == s for x in sel), [len(x) for x in sel]
    for a, b in zip(sel, sel[1:]):
        assert len(a & b) <= cluster_part
    assert set().union(*sel) == set(range(n))


# --------------------------------------------------------------------------------------
# Compatibility rows
# --------------------------------------------------------------------------------------

LORA_KEYS = {
    "wan": "diffusion_model.blocks.0.self_attn.q.weight",
    "qwen_image": "diffusion_model.transformer_blocks.0.attn.to_q.weight",
    "ltxv": "diffusion_model.transformer_blocks.0.attn1.to_q.weight",
    "chroma": "diffusion_model.double_blocks.0.img_attn.qkv.weight",
    "hunyuan_video": "diffusion_model.double_blocks.0.img_attn.qkv.weight",
}


def lora_like(base, family):
    m = base.clone()
    key = LORA_KEYS[family]
    weight = base.model.state_dict()[key]
    g = torch.Generator().manual_seed(3)
    assert m.add_patches({key: ((torch.randn(weight.shape, generator=g) * weight.std()).to(weight.dtype),)}, 1.0) == [key]
    return m


@pytest.mark.parametrize("vid", ["wan21_i2v_14b", "qwen_image", "ltxv", "chroma", "hunyuan_video"])
def test_after_a_lora_weight_patch(vid, caplog):
    v = VARIANTS[vid]
    base = model(v.kind)
    weights = {k: t.clone() for k, t in base.model.diffusion_model.state_dict().items()}
    lora = lora_like(base, v.family)
    ref = sample(lora, v)
    assert not torch.equal(ref, sample(base, v))  # the weight patch is applied
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, log = run_logged(base, apply_cat(lora, keep_ratio=0.3, warmup_steps=0), v)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert ((out - ref).norm() / ref.norm()).item() < 1.0
    check_rows(log, v, sample_sigmas(base, 4), 0, 0.3, 1 if v.cfg == 1.0 else 2)
    assert torch.equal(sample(apply_cat(lora, keep_ratio=1.0, warmup_steps=0), v), ref)
    comfy.model_management.unload_all_models()
    after = base.model.diffusion_model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights), "the LoRA diff stayed in the weights"


def _foreign_dit_patch(model_patcher, family, counter):
    """Another pack's ``dit`` block-replace patch on block 0 registered after ours, passing
    through (``original_block``), as SkipLayerGuidanceDiT does outside its window."""
    m = model_patcher.clone()

    def passthrough(args, extra):
        counter["n"] += 1
        return extra["original_block"](args)
    m.set_model_patch_replace(passthrough, "dit", "double_block", 0)
    return m


@pytest.mark.parametrize("vid", ["wan21_t2v", "qwen_image", "ltxv"])
def test_another_block_patch_after_ours_keeps_the_kv_path(vid):
    """K/V-cache families: our patches sit on the blocks' sub-modules, so a later ``dit``
    replace patch of the whole block wraps them; the result is the same as CAT alone."""
    v = VARIANTS[vid]
    base = model(v.kind)
    counter = {"n": 0}
    alone = sample(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v)
    out, log = run_logged(base, _foreign_dit_patch(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v.family, counter), v)
    assert counter["n"] == len(log.calls) == 4
    assert torch.equal(out, alone)
    check_rows(log, v, sample_sigmas(base, 4), 0, 0.3, 2)


def test_another_block_patch_after_ours_on_a_residual_block_runs_that_block_whole():
    """Residual-update families use ``dit`` replace patches, one per block and key: a later
    patch on the same block replaces ours, so that block computes every token (correct, less
    saving); the other blocks still compute the selected tokens only."""
    v = VARIANTS["hunyuan_video"]
    base = model(v.kind)
    counter = {"n": 0}
    out, log = run_logged(base, _foreign_dit_patch(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v.family, counter), v)
    assert torch.isfinite(out).all() and counter["n"] == 4
    sigmas = sample_sigmas(base, 4)
    for call in log.calls:
        pruned = step_of(call["sigma"], sigmas) >= 2
        rows = {name: n for tag, name, n, _ in call["rows"] if tag == "img"}
        assert rows["double_blocks.0"] == v.n
        assert rows["double_blocks.1"] == (v.computed(0.3) if pruned else v.n)


@pytest.mark.slow
@pytest.mark.parametrize("vid", ["wan22_ti2v_5b_i2v", "hunyuan_video"])
def test_torch_compile_dynamo_eager_backend(vid, caplog):
    """ComfyUI's TorchCompileModel node, dynamo "eager" backend: same result as the eager run,
    no new graphs on the second run, and the pruning still happens (rows measured)."""
    import torch._dynamo
    import torch._dynamo.utils as du
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    v = VARIANTS[vid]
    base = model(v.kind)
    comfy.model_management.unload_all_models()
    torch._dynamo.reset()
    expected = sample(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=5)
    compiled = TorchCompileModel.execute(apply_cat(base, keep_ratio=0.3, warmup_steps=0), "eager").result[0]
    first = sample(compiled, v, steps=5)
    graphs = int(du.counters["stats"].get("unique_graphs", 0))
    second = sample(compiled, v, steps=5)
    assert int(du.counters["stats"].get("unique_graphs", 0)) == graphs, "the second run compiled new graphs"
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(first, second)
    _, log = run_logged(base, compiled, v, steps=5)  # the work of a compiled run
    check_rows(log, v, sample_sigmas(base, 5), 0, 0.3, 1 if v.cfg == 1.0 else 2)
    comfy.model_management.unload_all_models()
    torch._dynamo.reset()


@pytest.mark.parametrize("vid", ["wan22_ti2v_5b_i2v", "qwen_image", "hunyuan_video"])
def test_interrupt_then_rerun(vid):
    """Interrupted in the middle of the pruned steps, then sampled again: the rerun is the clean
    run, bit for bit (no cache of the interrupted run survives)."""
    v = VARIANTS[vid]
    base = model(v.kind)
    m = apply_cat(base, keep_ratio=0.3, warmup_steps=0)
    clean = sample(m, v, steps=6)

    def callback(step, *rest):
        if step == 3:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(m, v, steps=6, callback=callback)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert torch.equal(sample(m, v, steps=6), clean)


@pytest.mark.parametrize("vid", ["wan21_t2v", "chroma"])
def test_input_model_untouched(vid):
    v = VARIANTS[vid]
    base = model(v.kind)
    ref = sample(base, v, steps=3)
    before = (repr(base.model_options), dict(base.object_patches), repr(base.wrappers))
    assert not torch.equal(sample(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, steps=3), ref)
    assert (repr(base.model_options), dict(base.object_patches), repr(base.wrappers)) == before
    assert torch.equal(sample(base, v, steps=3), ref)


def test_flux_kontext_reference_tokens_run_those_steps_in_full(caplog):
    """A block that sees more image tokens than the latent has (Flux Kontext's reference latents
    appended to the image stream) cannot place the selection: those calls run whole, the step
    keeps its raw prediction, and one warning says why."""
    base = build("flux")
    pos, neg = make_conds("flux")
    ref_latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    pos = [[c, {**d, "reference_latents": [ref_latent]}] for c, d in pos]
    neg = [[c, {**d, "reference_latents": [ref_latent]}] for c, d in neg]
    ref = run_sampler(base, latent_hw=(8, 8), batch=1, steps=4, cfg=1.0, positive=pos, negative=neg)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = run_sampler(apply_cat(base, keep_ratio=0.3, warmup_steps=0), latent_hw=(8, 8), batch=1, steps=4,
                          cfg=1.0, positive=pos, negative=neg)
    assert torch.equal(out, ref)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "reference latents" in warnings[0], warnings
    assert summaries(caplog) == [(0, 4, 4, "flux")]


def test_wan_reference_latent_tokens_run_those_steps_in_full(caplog):
    """Wan's ``reference_latent`` (the Fun/2.2 reference image, ``ref_conv``) puts its tokens
    before the latent's in the image stream: the K/V path cannot place the selection, so those
    calls run whole, keep their raw prediction (the unpatched result, bit for bit) and one warning
    says why."""
    import comfy.supported_models
    from tiny_models import _config, _wan_config, _wrap

    mc = _config(comfy.supported_models.WAN21_T2V, _wan_config(in_dim_ref_conv=16), torch.float32)
    base = _wrap(mc.get_model({}), 0)
    v = VARIANTS["wan21_t2v"]
    pos, neg = make_conds("wan21")
    reference = torch.randn(1, 16, 1, *v.hw, generator=torch.Generator().manual_seed(5))
    pos = [[c, {**d, "reference_latents": [reference]}] for c, d in pos]
    neg = [[c, {**d, "reference_latents": [reference]}] for c, d in neg]
    ref = sample(base, v, positive=pos, negative=neg)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = sample(apply_cat(base, keep_ratio=0.3, warmup_steps=0), v, positive=pos, negative=neg)
    assert torch.equal(out, ref)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "reference_latent" in warnings[0], warnings
    assert summaries(caplog) == [(0, 4, 4, "wan")]


def test_an_unsupported_dit_passes_through_with_one_warning_naming_it(caplog):
    """A DiT the node has no path for (Lumina 2's NextDiT) is returned unchanged with one warning
    that names its class, and samples as before."""
    import comfy.supported_models
    from tiny_models import _config, _wrap

    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 256,
           "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 4,
           "axes_dims": [16, 24, 24], "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
    m = _wrap(_config(comfy.supported_models.Lumina2, cfg, torch.float32).get_model({}), 0)
    options_before = repr(m.model_options)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = apply_cat(m, keep_ratio=0.3)
    assert out is m and repr(m.model_options) == options_before and not m.object_patches
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "NextDiT" in warnings[0] and "unchanged" in warnings[0], warnings
