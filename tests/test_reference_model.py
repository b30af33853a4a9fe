"""The shipped reference model (models/reference/): it loads with ComfyUI's classes, it was
trained (not just saved), its judge knows the data, and the quality benchmark runs on it.

Nothing here trains: the tests read the shipped files. The held-out set and the FID-analogue
reference images ship in ``fid_reference.npz`` so no tarball is needed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy.ldm.modules.attention as attention
import comfy.model_base

import reference_model
from reference_judge import Judge

REF = reference_model.REFERENCE_DIR
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def reference():
    return reference_model.load_reference(REF)


@pytest.fixture(scope="module")
def heldout():
    d = np.load(REF / "fid_reference.npz")
    x = torch.from_numpy(d["heldout_images"]).float() / 127.5 - 1.0
    return x, torch.from_numpy(d["heldout_labels"]).long()


def test_builds_as_sd15_family_with_attention_at_every_level(reference):
    patcher, _, config = reference
    model = patcher.model
    assert type(model) is comfy.model_base.BaseModel
    assert model.model_type == comfy.model_base.ModelType.EPS
    # SD's discrete scaled-linear schedule: 1000 sigmas from ~0.029 to ~14.6
    sigmas = model.model_sampling.sigmas
    assert sigmas.shape[0] == 1000 and sigmas[0] == pytest.approx(0.0292, abs=1e-3)
    assert sigmas[-1] == pytest.approx(14.6146, abs=1e-3)
    dm = model.diffusion_model
    # one spatial transformer (self- and cross-attention) per block at every level, as in SD1.5
    # 3 levels x 1 res block (+ conv_in and 2 downsamplers) in, 3 x 2 out
    assert (len(dm.input_blocks), len(dm.output_blocks)) == (6, 6)
    transformers = [m for m in dm.modules() if isinstance(m, attention.SpatialTransformer)]
    assert len(transformers) == 3 + 1 + 6  # every input and output block of a level, and the middle
    block = next(m for m in dm.modules() if isinstance(m, attention.BasicTransformerBlock))
    assert block.attn2.to_k.in_features == config["unet_config"]["context_dim"]


def test_weights_are_fp16_and_small():
    import safetensors

    path = REF / "unet.safetensors"
    assert path.stat().st_size < 40 * 2**20
    with safetensors.safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        meta = f.metadata()
    cfg = json.loads((REF / "config.json").read_text())
    assert int(meta["step"]) == cfg["training"]["step"] > 0


def _heldout_loss(model, labels_module, x, y, seed=0) -> float:
    """eps-MSE on held-out emoji at fixed timesteps and noise (the trainer's held-out measure),
    through the UNet directly: x_t = sqrt(acp) x0 + sqrt(1 - acp) eps, acp = 1 / (1 + sigma^2)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(50, 950, x.shape[0]).round().long()
    eps = torch.randn(x.shape, generator=g)
    acp = (1.0 / (1.0 + model.model_sampling.sigmas.float()[t] ** 2)).view(-1, 1, 1, 1)
    xt = acp.sqrt() * x + (1 - acp).sqrt() * eps
    with torch.no_grad():
        pred = model.diffusion_model(xt, timesteps=t.float(), context=labels_module(y))
    return torch.nn.functional.mse_loss(pred, eps).item()


def test_trained_not_just_saved(reference, heldout):
    """Held-out denoising loss far below a freshly initialised model's of the same config."""
    patcher, labels_module, config = reference
    x, y = heldout
    x, y = x[:48], y[:48]
    trained = _heldout_loss(patcher.model, labels_module, x, y)
    torch.manual_seed(0)
    fresh = reference_model.build_base_model(config)
    reference_model.reset_parameters_(fresh.diffusion_model)
    fresh_labels = reference_model.make_label_context(config)
    untrained = _heldout_loss(fresh, fresh_labels, x, y)
    assert untrained > 0.5  # a fresh model predicts nothing like the noise
    assert trained < 0.35 * untrained, (trained, untrained)


def test_samples_through_comfy_sampler(reference):
    """The real sampler with CFG against the "no label" context denoises (the result is far from
    the sigma_max-scaled noise it starts from), and different labels give different pictures.
    (This early checkpoint overshoots the data's [-1, 1] range by far: its samples have a std of
    about 4.8 at 20 steps, which is why its pictures look saturated. The bound is loose on purpose.)"""
    import comfy.sample

    patcher, labels_module, config = reference
    pos, neg = reference_model.label_conds(labels_module, config, [0, 8])
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    out = comfy.sample.sample(patcher, noise, 20, 3.0, "euler", "normal", pos, neg, torch.zeros_like(noise),
                              disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()
    sigma_max = float(patcher.model.model_sampling.sigma_max)
    assert out.std() < 0.5 * sigma_max, (float(out.std()), sigma_max)  # measured 4.8 of 14.6 at this checkpoint
    assert (out[0] - out[1]).abs().mean() > 0.05  # label 0 (smileys) vs 8 (flags) from the same noise


def test_judge_knows_the_data(heldout):
    x, y = heldout
    judge = Judge.load(REF / "classifier.safetensors")
    with torch.no_grad():
        acc = (judge(x).argmax(-1) == y).float().mean().item()
    info = json.loads((REF / "classifier.json").read_text())
    assert acc == pytest.approx(info["heldout_accuracy"], abs=1e-3)
    assert acc > 3 / len(info["categories"])  # well above chance (1/9) on emoji it never saw


def test_quality_benchmark_smoke(tmp_path):
    """--tiny: 9 samples, 3 steps; unpatched is its own reference, a pruned run differs (CAT with
    no warm-up: steps 0 and 1 full, step 2 pruned)."""
    import quality

    report = quality.main(["--tiny", "--variants", "unpatched,sito@0.5,cat-w0@0.3,deepcache-5@0", "--out",
                           str(tmp_path), "--pairs", "unpatched:sito@0.5"])
    rows = {r["variant"]: r for r in report["rows"]}
    # per-sample errors (for paired comparisons) average to the row's error
    for r in rows.values():
        assert len(r["rel_errors"]) == report["samples"] == 9
        assert sum(r["rel_errors"]) / 9 == pytest.approx(r["rel_error"], abs=1e-5)
    assert "| sito@0.5 against unpatched | +" in (tmp_path / "quality-3-euler.md").read_text()
    assert rows["unpatched"]["rel_error"] == 0.0 and math.isinf(rows["unpatched"]["psnr"])
    assert rows["unpatched"]["ssim"] == pytest.approx(1.0)
    for name in ("sito@0.5", "cat-w0@0.3"):
        assert 0.0 < rows[name]["rel_error"] < 1.0, rows[name]
        assert math.isfinite(rows[name]["fid"]) and 0 <= rows[name]["accuracy"] <= 1
    # DeepCache at 3 steps: step 0 full, then shallow steps (the model is still called once a
    # step; the deep blocks are skipped), so the latent moves a little
    assert rows["deepcache-5@0"]["model_calls"] == rows["unpatched"]["model_calls"] == 3
    assert rows["deepcache-5@0"]["rel_error"] > 0
    # every ResBlock computes on full and pruned steps; the shallow steps skip the deep ones
    # (counted by hooks on the ResBlocks' first layers)
    assert rows["unpatched"]["block_calls"] == rows["sito@0.5"]["block_calls"] == 3 * 11
    assert 0 < rows["deepcache-5@0"]["block_calls"] < rows["unpatched"]["block_calls"]
    for suffix in (".json", ".md", "-grid.png", "-pareto.png"):
        assert (tmp_path / f"quality-3-euler{suffix}").is_file()
