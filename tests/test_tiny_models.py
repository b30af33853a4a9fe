"""Validate the test harness itself (tests/tiny_models.py).

Every other in-process test builds on these tiny models, so this file checks that each
family really samples through ComfyUI's samplers, is reproducible, reacts to the seed,
stays finite in the dtypes ComfyUI may pick, and - importantly for a token-pruning pack -
that its attention blocks actually influence the output (a harness whose attention is a
no-op would make every pruning test pass vacuously).

Sizes are kept small (8x8 latents, 2 steps) so the whole file runs in well under a
minute on 2 CPU cores; tiny_models' defaults (16x24, 4 steps) are for the pack's tests.
"""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm

HW = (8, 8)
STEPS = 2


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(kind, dtype=torch.float32):
        key = (kind, dtype)
        if key not in cache:
            cache[key] = tm.build(kind, dtype=dtype, seed=0)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference_runs():
    # kind -> euler / cfg 1.0 / seed 0 result, reused by the determinism and seed tests
    # (cfg 1.0 skips the unconditional pass, so the re-runs cost half).
    return {}


def _run(patcher, **kw):
    kw.setdefault("latent_hw", HW)
    kw.setdefault("steps", STEPS)
    return tm.run_sampler(patcher, **kw)


@pytest.mark.parametrize("cfg", [7.5, 1.0])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("kind", tm.KINDS)
def test_samples_finite_with_right_shape(models, reference_runs, kind, sampler, cfg):
    # One image per run keeps the matrix cheap; the euler/cfg-1.0 run uses two so the
    # batch handling is covered too (and becomes the reference for the next test).
    batch = 2 if (sampler, cfg) == ("euler", 1.0) else 1
    out = _run(models(kind), sampler=sampler, cfg=cfg, batch=batch)
    assert out.shape == (batch, tm.LATENT_CHANNELS[kind], *HW)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3  # non-trivial: the sampler moved away from the zero latent
    if batch == 2:
        # prepare_noise draws different noise per batch item
        assert not torch.allclose(out[0], out[1])
        reference_runs[kind] = out


@pytest.mark.parametrize("kind", tm.KINDS)
def test_deterministic_and_seed_sensitive(models, reference_runs, kind):
    patcher = models(kind)
    first = reference_runs.get(kind)
    if first is None:  # test run in isolation
        first = _run(patcher, sampler="euler", cfg=1.0, batch=2)
    again = _run(patcher, sampler="euler", cfg=1.0, batch=2)
    assert torch.equal(first, again), "same seed must reproduce the latent bit for bit"

    other = _run(patcher, sampler="euler", cfg=1.0, batch=2, seed=1)
    rel = (other - first).norm() / first.norm()
    assert rel > 0.05, f"a different seed should change the result clearly (rel diff {rel:.4f})"


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_builder_seed_changes_weights(kind):
    # The builders share one seeded initialiser, so checking it on the two cheap models
    # is enough (re-building the 100M+ parameter UNets three times would cost ~10 s).
    a = tm.build(kind, seed=0).model.diffusion_model.state_dict()
    b = tm.build(kind, seed=0).model.diffusion_model.state_dict()
    c = tm.build(kind, seed=1).model.diffusion_model.state_dict()
    name = next(k for k in a if k.endswith(".weight") and a[k].ndim >= 2)
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())


# One step, one image, no CFG batch: enough to push every layer through the dtype. CPU
# fp16 matmuls are slow and sd2v/sdxl add no layer type that sd15 lacks, so the fast suite
# keeps the two DiTs in both dtypes and sd15 in bf16; the rest runs with -m slow.
_SLOW = pytest.mark.slow
_DTYPE_CASES = [
    ("sd3", torch.float16), ("sd3", torch.bfloat16), ("flux", torch.float16), ("flux", torch.bfloat16),
    ("sd15", torch.bfloat16), pytest.param("sd15", torch.float16, marks=_SLOW),
    pytest.param("sd2v", torch.float16, marks=_SLOW), pytest.param("sd2v", torch.bfloat16, marks=_SLOW),
    pytest.param("sdxl", torch.float16, marks=_SLOW), pytest.param("sdxl", torch.bfloat16, marks=_SLOW),
]


@pytest.mark.parametrize("kind,dtype", _DTYPE_CASES, ids=lambda v: {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(v, v))
def test_reduced_precision_finite(kind, dtype):
    patcher = tm.build(kind, dtype=dtype)
    assert patcher.model.get_dtype() == dtype
    out = _run(patcher, steps=1, batch=1, cfg=1.0)
    assert torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3


def test_img2img_path(models):
    # latent + denoise < 1 goes through the partial-schedule path of KSampler.
    patcher = models("sd3")
    start = torch.randn((1, 16, *HW), generator=torch.Generator().manual_seed(3))
    out = _run(patcher, latent=start, denoise=0.5, cfg=1.0)
    assert out.shape == start.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, start)


def test_make_conds_shapes():
    expect = {"sd15": (768, None), "sd2v": (1024, None), "sdxl": (2048, 1280), "sd3": (4096, 2048), "flux": (4096, 768)}
    for kind, (dim, pooled) in expect.items():
        pos, neg = tm.make_conds(kind, batch=3, seed=0)
        for cond in (pos, neg):
            assert len(cond) == 1 and len(cond[0]) == 2
            ctx, extras = cond[0]
            assert ctx.shape[0] == 3 and ctx.shape[2] == dim
            if pooled is None:
                assert "pooled_output" not in extras
            else:
                assert extras["pooled_output"].shape == (3, pooled)
        assert not torch.equal(pos[0][0], neg[0][0])


# ---- the harness must make attention matter ------------------------------------------
def _one_step(patcher):
    return _run(patcher, steps=1, batch=1, cfg=1.0)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_unet_highres_self_attention_matters(models):
    # Zero the self-attention output of the highest-resolution level (input block 1 in
    # the tiny SD1.5) through ComfyUI's own attn1_output_patch hook: the output has to
    # move clearly, otherwise pruning those tokens could never show an effect.
    base = models("sd15")
    ref = _one_step(base)
    patched = base.clone()
    patched.set_model_attn1_output_patch(
        lambda out, extra: out * 0 if tuple(extra["block"]) == ("input", 1) else out
    )
    assert _rel(_one_step(patched), ref) > 0.05


def test_sdxl_has_no_highres_attention(models):
    unet = models("sdxl").model.diffusion_model
    # Layout: [0] conv_in, [1] full-res ResBlock, [2] down, [3] ResBlock + transformer, ...
    # Like SDXL, the full-resolution level has no transformer; the next level has one.
    def has_transformer(block):
        return any(type(m).__name__ == "SpatialTransformer" for m in block)

    assert not has_transformer(unet.input_blocks[1])
    assert has_transformer(unet.input_blocks[3])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_dit_blocks_matter(models, kind):
    # Replace the first joint/double block by an identity through ComfyUI's "dit"
    # patches_replace hook (the same mechanism SD3 and Flux expose to patches).
    base = models(kind)
    ref = _one_step(base)
    patched = base.clone()

    def skip(args, extra):
        return {"img": args["img"], "txt": args["txt"]}

    patched.set_model_patch_replace(skip, "dit", "double_block", 0)
    assert _rel(_one_step(patched), ref) > 0.05
