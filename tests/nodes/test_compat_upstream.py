"""ComfyUI 0.38.x behaviours imitated on the 0.3.75 we can run (issue 5, "Current ComfyUI").

Each test switches one upstream behaviour on (../shared/docs/comfyui-upstream.md), proves
that the imitation is active, and checks that the pack's hooks still give exactly the
result it gives without it:

- ``clone()`` copies only dicts and lists of ``model_options`` (``comfy.utils.deepcopy_list_dict``)
  and shares every other object between clones;
- ``BaseModel._apply_model`` passes a shallow copy of ``transformer_options`` (plus a new key);
- the per-step sampler callback is called with an extra argument;
- ``prepare_state(timestep, model_options)`` calls ON_PREPARE_STATE callbacks with 3 arguments;
- the multi-GPU path runs cond batches concurrently in threads (extra ``multigpu_thread_device`` key);
- DiT block-replace args carry keys we do not know (``rope_freqs``, ``t_emb`` ...);
- V3 ``Schema``/``Input`` gain keyword arguments (``advanced``, ``search_aliases``).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import tiny_models as tm
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io
from tiny_models import make_conds
from token_pruning_cache.nodes import _schema
from token_pruning_cache.nodes.hooks import cat_dit, cat_step
from token_pruning_cache.nodes.hooks.patching import ATTACHMENT_KEY
from token_pruning_cache.nodes.hooks.run import RunState
from token_pruning_cache.nodes.cat_node import CATPruneCache, apply_cat
from token_pruning_cache.nodes.dato_node import DaToPruneCache, apply_dato
from token_pruning_cache.nodes.sito_node import SiToTokenPruning, apply_sito

METHODS = ("sito", "dato", "cat")
# Two settings per method (two patches from one base must not interfere). DaTo uses a schedule
# with shallow and reused steps so that its step cache is exercised in short runs.
SETTINGS = {
    "sito": (dict(prune_ratio=0.5), dict(prune_ratio=0.3, prune_mlp=True)),
    "dato": (dict(prune_ratio=0.4, custom_schedule="F S1 R S1 F S1"), dict(prune_ratio=0.2, schedule="deepcache_5")),
    "cat": (dict(keep_ratio=0.3, warmup_steps=1), dict(keep_ratio=0.5, warmup_steps=0)),
}
APPLY = {"sito": apply_sito, "dato": apply_dato, "cat": apply_cat}
HW = (9, 7)
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_BASE: dict = {}


def base_model():
    """The SD1.5-like micro UNet of tiny_models, shared by the module."""
    if "sd15" not in _BASE:
        _BASE["sd15"] = tm.micro("sd15")
    return _BASE["sd15"]


def patch(method, model, which=0, **overrides):
    return APPLY[method](model, **{**SETTINGS[method][which], **overrides})


def sample(model, steps=STEPS, batch=1, cfg=1.5, callback=None, seed=0):
    latent = torch.zeros((batch, 4, *HW))
    positive, negative = make_conds("sd15", seed=seed)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed, callback=callback).float()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="token_pruning_cache")
    return caplog


def summary_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "token_pruning_cache" and r.levelno == logging.INFO]


# --------------------------------------------------------------------------------------
# clone() sharing holder objects
# --------------------------------------------------------------------------------------

def deepcopy_list_dict(obj, memo=None):
    """ComfyUI 0.38 ``comfy.utils.deepcopy_list_dict``: copies dicts and lists, shares the leaves."""
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_list_dict(i, memo) for i in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res


class _Holder:
    pass


@pytest.mark.parametrize("method", METHODS)
def test_clone_sharing_holders_two_patches_from_one_base(method, logs, monkeypatch):
    base = base_model()
    # results with 0.3.75's deep-copying clone
    expected = [sample(patch(method, base, 0)), sample(patch(method, base, 1))]
    expected_chain = sample(patch(method, patch(method, base, 0), 1))
    options_before = repr(base.model_options)

    original = comfy.model_patcher.ModelPatcher.clone

    def sharing(self, *args, **kwargs):
        n = original(self, *args, **kwargs)
        n.model_options = deepcopy_list_dict(self.model_options)
        return n

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "clone", sharing)
    probe = base.clone()
    holder = _Holder()
    probe.model_options.setdefault("transformer_options", {})["holder"] = holder
    assert probe.clone().model_options["transformer_options"]["holder"] is holder  # the imitation is active

    first, second = patch(method, base, 0), patch(method, base, 1)
    runs = [sample(first), sample(second), sample(first), sample(second)]
    chained = sample(patch(method, first, 1))
    assert torch.equal(runs[0], expected[0]) and torch.equal(runs[2], expected[0])
    assert torch.equal(runs[1], expected[1]) and torch.equal(runs[3], expected[1])
    assert torch.equal(chained, expected_chain)
    assert repr(base.model_options) == options_before
    assert not base.get_attachment(ATTACHMENT_KEY)
    # the two patches share their base, never their per-run state: both kept their own uid
    uids = [u for m in (first, second) for u, _ in m.get_attachment(ATTACHMENT_KEY)]
    assert len(set(uids)) == 2


# --------------------------------------------------------------------------------------
# _apply_model passing a shallow copy of transformer_options
# --------------------------------------------------------------------------------------

class _Opaque:
    """A value the pack cannot know (0.38 puts e.g. prefetch_dynamic_vbars objects here)."""


@pytest.mark.parametrize("method", METHODS)
def test_apply_model_shallow_copy_of_transformer_options(method, logs, monkeypatch):
    base = base_model()
    expected = sample(patch(method, base))
    leaked = []

    def probe(model):
        m = model.clone()

        def after(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            to = kwargs["transformer_options"] if "transformer_options" in kwargs else args[5]
            leaked.append("activations_shape" in to)  # set inside the UNet; visible here only without a copy
            return out

        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "upstream-probe", after)
        return m

    sample(probe(patch(method, base)), steps=1)
    assert leaked and all(leaked)  # 0.3.75: the UNet writes into the caller's dict

    original = comfy.model_base.BaseModel._apply_model

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        transformer_options = transformer_options.copy()  # 0.38.1 model_base.py
        transformer_options["prefetch_dynamic_vbars"] = _Opaque()
        return original(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    monkeypatch.setattr(comfy.model_base.BaseModel, "_apply_model", _apply_model)
    leaked.clear()
    out = sample(probe(patch(method, base)))
    assert leaked and not any(leaked)  # the imitation is active
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------
# per-step sampler callback with extra arguments
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_step_callback_with_extra_argument(method, logs, monkeypatch):
    base = base_model()
    seen = []

    def user_callback(*args):
        seen.append(len(args))

    expected = sample(patch(method, base), callback=user_callback)
    assert seen == [4] * STEPS
    original = comfy.samplers.KSAMPLER.sample

    def ksampler_sample(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs):
        if callback is not None:
            inner = callback

            def callback(i, denoised, x, total_steps):
                return inner(i, denoised, x, total_steps, extra_args.get("model_options"))
        return original(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs)

    monkeypatch.setattr(comfy.samplers.KSAMPLER, "sample", ksampler_sample)
    seen.clear()
    out = sample(patch(method, base), callback=user_callback)
    assert seen == [5] * STEPS  # the extra argument reached the user's callback through ours
    assert torch.equal(out, expected)  # and our step counting was not disturbed
    lines = summary_lines(logs)
    assert len(lines) == 2 and lines[0] == lines[1], lines


# --------------------------------------------------------------------------------------
# ON_PREPARE_STATE with (patcher, timestep, model_options)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_prepare_state_three_argument_callbacks(method, logs, monkeypatch):
    base = base_model()
    model = patch(method, base)
    ours = model.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE)
    for cb in ours:  # if the pack registers any, they must take the 0.38 signature
        inspect.signature(cb).bind(model, torch.tensor([1.0]), {})
    expected = sample(model)

    current = threading.local()
    original_calc = comfy.samplers._calc_cond_batch

    def calc_cond_batch(model_, conds, x_in, timestep, model_options):
        current.model_options = model_options
        return original_calc(model_, conds, x_in, timestep, model_options)

    def prepare_state(self, timestep, model_options=None, *rest):  # 0.38.1 ModelPatcher.prepare_state
        if model_options is None:
            model_options = current.model_options
        for callback in self.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            callback(self, timestep, model_options)

    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", calc_cond_batch)
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "prepare_state", prepare_state)
    calls = []

    def sparse_attention_like(patcher, timestep, model_options):  # a core 0.38 node's 3-argument callback
        calls.append(float(timestep.reshape(-1)[0]))
        model_options.setdefault("transformer_options", {})["sparse_attention_test"] = len(calls)

    with_callback = model.clone()
    with_callback.add_callback(CallbacksMP.ON_PREPARE_STATE, sparse_attention_like)
    out = sample(with_callback)
    assert len(calls) == STEPS
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------
# cond batches running concurrently in threads (0.38 multi-GPU path)
# --------------------------------------------------------------------------------------

# Deterministic settings: per-run RNG draws (SiTo noise, DaTo's first random base tokens) come from
# one generator per *device*; on real multi-GPU each thread has its own device, here both threads
# share the CPU one, so draws would interleave by scheduling. RNG-free settings keep the
# comparison exact; the threading of our per-call state is what is under test.
THREAD_SETTINGS = {
    "sito": dict(prune_ratio=0.5, noise_alpha=0.0),
    "dato": dict(prune_ratio=0.0, custom_schedule="F S1 R S1 F S1"),
    "cat": dict(keep_ratio=0.3, warmup_steps=1),
}


def _split_calc_cond_batch(threaded: bool, trace: list):
    """``_calc_cond_batch`` that runs each cond list (cond, uncond) as its own model call,
    concurrently in worker threads when ``threaded`` (as 0.38's ``_calc_cond_batch_multigpu``)."""
    original = comfy.samplers._calc_cond_batch

    def calc(model, conds, x_in, timestep, model_options):
        parts = [[c if j == i else None for j, c in enumerate(conds)] for i in range(len(conds))]
        barrier = threading.Barrier(len(parts)) if threaded else None

        def run(part):
            options = comfy.model_patcher.create_model_options_clone(model_options)
            options.setdefault("transformer_options", {})["multigpu_thread_device"] = x_in.device
            if barrier is not None:
                barrier.wait(timeout=60)  # both calls enter the model together
            trace.append(("start", threading.get_ident()))
            return original(model, part, x_in, timestep, options)

        if threaded:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                results = list(pool.map(run, parts))
        else:
            results = [run(p) for p in parts]
        return [results[i][i] for i in range(len(conds))]

    return calc


@pytest.mark.parametrize("method", METHODS)
def test_threaded_cond_batches_equal_sequential(method, logs, monkeypatch):
    base = base_model()
    model = APPLY[method](base, **THREAD_SETTINGS[method])
    blocks = []  # thread of every transformer block call, in order

    def hook(module, args):
        blocks.append(threading.get_ident())

    handles = [m.register_forward_pre_hook(hook) for name, m in base.model.diffusion_model.named_modules()
               if type(m).__name__ == "BasicTransformerBlock"]
    try:
        trace: list = []
        monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", _split_calc_cond_batch(False, trace))
        sequential = sample(model, batch=2)
        blocks.clear()
        monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", _split_calc_cond_batch(True, trace))
        threaded = sample(model, batch=2)
    finally:
        for h in handles:
            h.remove()
    threads = set(blocks)
    switches = sum(1 for a, b in zip(blocks, blocks[1:]) if a != b)
    assert len(threads) >= 2, "model calls did not run in worker threads"
    assert switches > 2 * STEPS, f"calls of the two threads did not interleave ({switches} switches)"
    assert torch.equal(threaded, sequential), f"rel {((threaded - sequential).norm() / sequential.norm()).item():.2e}"
    lines = summary_lines(logs)
    assert len(lines) == 2 and lines[0] == lines[1], lines


# --------------------------------------------------------------------------------------
# unknown keys in DiT block-replace args
# --------------------------------------------------------------------------------------

class _Sentinel:
    pass


def _dit_args(n_img=16, n_txt=4, c=8, single=False):
    g = torch.Generator().manual_seed(0)
    img = torch.randn((1, n_img + (n_txt if single else 0), c), generator=g)
    args = {"img": img, "vec": torch.randn((1, c), generator=g),
            "pe": torch.randn((1, 1, n_txt + n_img, 4, 2, 2), generator=g), "attn_mask": None,
            "transformer_options": {"block_index": 0, "unknown_option": _Sentinel()},
            # keys newer models pass that the pack does not know
            "rope_freqs": _Sentinel(), "t_emb": torch.randn((1, c), generator=g), "mod_segments": [1, 2, 3]}
    if not single:
        args["txt"] = torch.randn((1, n_txt, c), generator=g)
    return args


@pytest.mark.parametrize("kind", ["double_block", "single_block"])
def test_dit_block_replace_passes_unknown_keys_through(kind):
    n_img, n_txt = 16, 4
    uid = "cat-test"
    block = cat_dit.cat_dit_block(uid, (kind, 0))
    received = []

    def original_block(args):
        received.append(args)
        out = {"img": args["img"] * 2.0 + 1.0, "extra_out": _Sentinel()}
        if "txt" in args:
            out["txt"] = args["txt"]
        return out

    args = _dit_args(n_img, n_txt, single=kind == "single_block")
    unknown = {k: args[k] for k in ("rope_freqs", "t_emb", "mod_segments", "transformer_options")}

    def check_last():
        got = received[-1]
        for k, v in unknown.items():
            assert got[k] is v, k  # passed through untouched, same object

    # 1. no CAT call active on this thread: the block is the original one
    out = block(args, {"original_block": original_block})
    check_last()
    assert "extra_out" in out

    state = RunState(uid, "cat", [1.0, 0.5, 0.0], 1.0, 0.0, seed=0)
    state.data = cat_step.CATRun()

    def call(selection):  # the step wrapper's context, as it publishes it for the blocks
        return cat_step.CALL.entered(cat_step.CATCall(uid, state, ("u",), selection, n_img, levels={}))

    # 2. full step: runs everything, remembers the block's update
    with call(None):
        full = block(args, {"original_block": original_block})
    check_last()
    assert "extra_out" in full and torch.equal(full["img"], args["img"] * 2.0 + 1.0)
    # 3. pruned step: the block runs on the selected image tokens, unknown keys still there
    selection = torch.tensor([0, 3, 5, 9, 15])
    with call(selection):
        pruned = block(args, {"original_block": original_block})
    check_last()
    offset = n_txt if kind == "single_block" else 0
    assert received[-1]["img"].shape[1] == offset + selection.numel()
    assert received[-1]["pe"].shape[2] == n_txt + selection.numel()
    assert "extra_out" in pruned and pruned["img"].shape == args["img"].shape
    assert torch.allclose(pruned["img"], args["img"] * 2.0 + 1.0)  # affine block: cached update is exact
    assert cat_step.CALL.current is None  # the context is gone after the call


# --------------------------------------------------------------------------------------
# V3 Schema / Input keyword arguments
# --------------------------------------------------------------------------------------

def test_schema_build_drops_kwargs_this_comfyui_does_not_know():
    with pytest.raises(TypeError):  # the premise: 0.3.75 rejects the 0.38 keyword
        io.Float.Input(id="ratio", default=0.5, advanced=True)
    widget = _schema.build(io.Float.Input, id="ratio", default=0.5, min=0.0, max=1.0, advanced=True)
    assert isinstance(widget, io.Float.Input) and widget.id == "ratio" and widget.default == 0.5
    assert not hasattr(widget, "advanced")
    with pytest.raises(TypeError):
        io.Schema(node_id="X", search_aliases=["y"])
    schema = _schema.build(io.Schema, node_id="X", display_name="X", category="c", inputs=[widget],
                           outputs=[io.Model.Output()], search_aliases=["y"], is_dev_only=False)
    assert schema.node_id == "X" and not hasattr(schema, "search_aliases")


def test_schema_build_keeps_kwargs_the_target_accepts():
    class NewerInput:  # a 0.38-style Input with the new keyword arguments
        def __init__(self, id, default=None, tooltip=None, raw_link=None, advanced=None):
            self.id, self.default, self.tooltip, self.raw_link, self.advanced = id, default, tooltip, raw_link, advanced

    class KwargsInput:
        def __init__(self, id, **kwargs):
            self.id, self.kwargs = id, kwargs

    @dataclasses.dataclass
    class NewerSchema:
        node_id: str
        description: str = ""
        search_aliases: list = dataclasses.field(default_factory=list)
        is_dev_only: bool = False

    w = _schema.build(NewerInput, id="x", default=1, advanced=True, gradient_stops=[0, 1])
    assert w.advanced is True and not hasattr(w, "gradient_stops")
    k = _schema.build(KwargsInput, id="x", advanced=True, gradient_stops=[0, 1])
    assert k.kwargs == {"advanced": True, "gradient_stops": [0, 1]}
    s = _schema.build(NewerSchema, node_id="X", search_aliases=["a"], is_dev_only=True, price_badge="?")
    assert s.search_aliases == ["a"] and s.is_dev_only is True


@pytest.mark.parametrize("node", [SiToTokenPruning, DaToPruneCache, CATPruneCache], ids=lambda n: n.__name__)
def test_node_schemas_build_on_this_comfyui(node):
    schema = node.define_schema()
    assert schema.node_id == node.__name__
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)
