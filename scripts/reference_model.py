"""The pack's trained reference model: an SD1.5-family UNet built from ComfyUI's own classes.

``models/reference/`` ships the weights (``unet.safetensors``, fp16, EMA) and ``config.json``
with everything needed to rebuild the model: the UNet config as
``comfy.model_detection`` writes it, the head layout, the label set and how the
conditioning is made. This module is the one place that turns those files into what a
ComfyUI node receives as MODEL (a ``ModelPatcher`` over ``comfy.model_base.BaseModel``,
eps-prediction, SD's scaled-linear discrete schedule) plus the conditioning for a label.

Conditioning: a learned embedding maps a label to ``context_tokens`` tokens of width
``context_dim``; the extra last row is the "no label" embedding that label dropout trained,
used as the negative prompt so classifier-free guidance works as it does with a text prompt.

Requires ComfyUI importable with ``--cpu`` applied (``make_checkpoint.ensure_comfy_importable``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT / "models" / "reference"

# The architecture (SD1.5 family, shrunk): 3 levels with a spatial transformer (self- and
# cross-attention) at every level, as SD1.5 has at its three attention levels. At a 32x32
# latent the top level's self-attention sees 1,024 tokens.
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 128,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# SD15's supported-model config forces 8 heads; this width wants 32-channel heads.
HEADS = {"num_heads": -1, "num_head_channels": 32}
CONTEXT_TOKENS = 4


def default_config(categories: list[str]) -> dict:
    return {
        "family": "SD15 (comfy.supported_models.SD15 + comfy.model_base.BaseModel, ModelType.EPS)",
        "unet_config": UNET_CONFIG,
        "heads": HEADS,
        "context_tokens": CONTEXT_TOKENS,
        "labels": list(categories),
        "null_label": len(categories),
        "latent": "4 channels: RGB composited on white, then alpha; [-1, 1]; 32x32; no VAE",
    }


def build_base_model(config: dict, dtype: torch.dtype = torch.float32):
    """A fresh ``BaseModel`` (weights uninitialised, as ComfyUI's ops create them)."""
    import comfy.model_base
    import comfy.supported_models

    mc = comfy.supported_models.SD15(dict(config["unet_config"]))
    mc.unet_config.update(config["heads"])
    mc.set_inference_dtype(dtype, None)
    return comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.EPS)


def reset_parameters_(module: torch.nn.Module) -> None:
    """PyTorch's default init for every layer: ComfyUI's ops skip it (torch.empty)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    for m in module.modules():
        for cls in kinds:
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break


class LabelContext(torch.nn.Module):
    """Label -> ``tokens`` context tokens of width ``dim``; row ``num_labels`` is "no label"."""

    def __init__(self, num_labels: int, tokens: int, dim: int):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.table = torch.nn.Embedding(num_labels + 1, tokens * dim)
        torch.nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(labels.shape[0], self.tokens, self.dim)


def make_label_context(config: dict) -> LabelContext:
    return LabelContext(len(config["labels"]), config["context_tokens"], config["unet_config"]["context_dim"])


def load_config(ref_dir: Path | str = REFERENCE_DIR) -> dict:
    return json.loads((Path(ref_dir) / "config.json").read_text())


def load_reference(ref_dir: Path | str = REFERENCE_DIR, dtype: torch.dtype = torch.float32):
    """(ModelPatcher, LabelContext, config) from the shipped files, on the CPU."""
    import comfy.model_patcher
    import safetensors.torch

    ref_dir = Path(ref_dir)
    config = load_config(ref_dir)
    state = safetensors.torch.load_file(str(ref_dir / "unet.safetensors"))
    model = build_base_model(config, dtype)
    unet = {k[len("unet."):]: v.to(dtype) for k, v in state.items() if k.startswith("unet.")}
    model.diffusion_model.load_state_dict(unet, strict=True)
    labels = make_label_context(config)
    labels.load_state_dict({"table.weight": state["labels.table.weight"].float()})
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), labels.eval(), config


@torch.no_grad()
def label_conds(labels_module: LabelContext, config: dict, labels: list[int] | torch.Tensor):
    """ComfyUI (positive, negative) conditioning for a batch of labels; the negative is
    the "no label" context. Either side is ``[[tensor (B, tokens, dim), {}]]``."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    pos = labels_module(labels)
    neg = labels_module(torch.full_like(labels, config["null_label"]))
    return [[pos, {}]], [[neg, {}]]
