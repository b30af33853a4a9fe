"""scripts/make_checkpoint.py writes files ComfyUI's checkpoint loader accepts as the
intended family, with every UNet / text-encoder / VAE tensor present (nothing left
uninitialised by the loader)."""

from __future__ import annotations

import logging

import pytest
import torch

import comfy.model_base
import comfy.sd
from make_checkpoint import default_name, detect, make_checkpoint

# Warnings comfy.sd / model_base log when a checkpoint lacks tensors the model needs.
MISSING_MARKERS = ("unet missing", "clip missing", "Missing VAE keys", "no CLIP/text encoder weights",
                   "VAE not initalized", "not a checkpoint")


def _load(path, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    problems = [r.getMessage()[:300] for r in caplog.records if any(m in r.getMessage() for m in MISSING_MARKERS)]
    assert not problems, problems
    return model, clip, vae


@pytest.fixture(scope="module")
def sd15_path(comfy_dir):
    # Same file (name and parameters) as the end-to-end tests use: written once.
    return make_checkpoint(comfy_dir / "models" / "checkpoints" / "tpc_sd15_reduced.safetensors",
                           arch="sd15", reduced=True, seed=0)


def test_reduced_sd15_is_detected_and_loads_completely(sd15_path, caplog):
    assert detect(sd15_path) == "SD15"
    model, clip, vae = _load(sd15_path, caplog)
    unet_cfg = model.model.model_config.unet_config
    assert unet_cfg["model_channels"] == 320 and unet_cfg["context_dim"] == 768
    assert unet_cfg["channel_mult"] == [1, 2] and unet_cfg["transformer_depth"] == [1, 1]
    # The text encoder and the VAE work on the random weights.
    tokens = clip.tokenize("a lighthouse")
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    image = vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_original_key_layout(sd15_path):
    from safetensors import safe_open

    with safe_open(str(sd15_path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "first_stage_model.post_quant_conv.weight" in keys
    assert meta["arch"] == "sd15" and meta["reduced"] == "True" and meta["seed"] == "0"


def test_idempotent_and_seeded(tmp_path, sd15_path):
    from make_checkpoint import seeded_fill_

    mtime = sd15_path.stat().st_mtime_ns
    make_checkpoint(sd15_path, arch="sd15", reduced=True, seed=0)
    assert sd15_path.stat().st_mtime_ns == mtime, "same parameters must not rewrite the file"
    assert default_name("sdxl", True, 3) == "tpc_random_sdxl_reduced_s3.safetensors"
    # seeded: the weights are a function of the seed (what the checkpoint's tensors are filled with)
    def filled(seed):
        m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 8))
        seeded_fill_(m, seed)
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert torch.equal(filled(0), filled(0)) and not torch.equal(filled(0), filled(1))
    from safetensors import safe_open
    with safe_open(str(sd15_path), framework="pt") as f:
        assert f.metadata()["seed"] == "0"


@pytest.mark.slow
def test_reduced_sdxl_is_detected_as_sdxl_family(comfy_dir, caplog):
    # ~2.4 GB: the OpenCLIP-G text encoder alone is 695 M parameters and cannot be shrunk
    # (its architecture comes from ComfyUI's config file, not from the checkpoint).
    path = make_checkpoint(comfy_dir / "models" / "checkpoints" / "tpc_sdxl_reduced.safetensors",
                           arch="sdxl", reduced=True, seed=0)
    # ComfyUI matches SDXL-family UNets on their exact transformer_depth list; the reduced
    # layout is that of Segmind Vega, an SDXL subclass with the same runtime path.
    assert detect(path) == "Segmind_Vega"
    model, clip, vae = _load(path, caplog)
    assert isinstance(model.model, comfy.model_base.SDXL)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a lighthouse"), return_pooled=True)
    assert cond.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
