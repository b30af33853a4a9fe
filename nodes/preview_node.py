"""Token Pruning Preview node: draws what the pack's patches decided during the last run.

During sampling the pack's hooks record, per step and at the highest-resolution pruned level,
one small token map (row 0 of the batch: 0 kept / 1 base / 2 pruned for SiTo and DaTo,
0 recomputed / 2 cached for CAT) and each step's kind (full / shallow / reuse / pruned).
This node only draws them: one heatmap per recorded step range plus a strip of step kinds.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from . import hooks
from ._schema import build
from .params import CATEGORY

# RGB in [0, 1]
TOKEN_COLOURS = {
    "sito": {0: (0.55, 0.55, 0.55), 1: (0.20, 0.80, 0.30), 2: (0.90, 0.25, 0.20)},
    "dato": {0: (0.55, 0.55, 0.55), 1: (0.20, 0.80, 0.30), 2: (0.90, 0.25, 0.20)},
    "cat": {0: (0.20, 0.80, 0.30), 2: (0.25, 0.35, 0.85)},
}
STEP_COLOURS = {"full": (0.95, 0.95, 0.95), "shallow": (0.95, 0.80, 0.20), "reuse": (0.25, 0.35, 0.85),
                "pruned": (0.95, 0.55, 0.15)}
LEGEND = {"sito": "green base, grey kept, red pruned", "dato": "green base, grey kept, red pruned",
          "cat": "green recomputed, blue cached"}


def _colour_map(codes: torch.Tensor, palette: dict) -> torch.Tensor:
    img = torch.zeros(*codes.shape, 3)
    for code, rgb in palette.items():
        img[codes == code] = torch.tensor(rgb)
    return img


def _scale_to(img: torch.Tensor, height: int) -> torch.Tensor:
    """Nearest-neighbour scale of an ``[h, w, 3]`` image to ``height`` rows (tokens stay crisp)."""
    h, w, _ = img.shape
    f = max(1, height // max(h, 1))
    return img.repeat_interleave(f, 0).repeat_interleave(f, 1)


def _text(img: torch.Tensor, text: str) -> torch.Tensor:
    """Write ``text`` on a white band above ``img`` with PIL (shipped with ComfyUI)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - PIL always comes with ComfyUI
        return img
    band = Image.new("RGB", (img.shape[1], 14), (255, 255, 255))
    ImageDraw.Draw(band).text((2, 1), text, fill=(0, 0, 0))
    band_t = torch.tensor(list(band.getdata()), dtype=torch.float32).reshape(14, img.shape[1], 3) / 255.0
    return torch.cat([band_t, img], dim=0)


def _pad_to(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = torch.ones(h, w, 3)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def render(records, panels: int = 6, height: int = 128) -> torch.Tensor:
    """One row per recorded patch: token maps for up to ``panels`` steps, then a step-kind strip."""
    rows = []
    for method, rec in records:
        tiles = []
        steps = sorted(rec.token_maps)
        if steps:
            pick = [steps[round(i * (len(steps) - 1) / max(panels - 1, 1))] for i in range(min(panels, len(steps)))]
            for s in dict.fromkeys(pick):
                h, w, codes = rec.token_maps[s]
                tiles.append(_text(_scale_to(_colour_map(codes, TOKEN_COLOURS.get(method, TOKEN_COLOURS["sito"])), height),
                                   f"step {s + 1}/{rec.total_steps}"))
        if rec.step_kinds:
            n = max(rec.total_steps, max(rec.step_kinds) + 1)
            strip = torch.ones(1, n, 3)
            for s, kind in rec.step_kinds.items():
                strip[0, s] = torch.tensor(STEP_COLOURS.get(kind, (0.0, 0.0, 0.0)))
            cell = max(2, min(16, 512 // n))
            strip = strip.repeat_interleave(24, 0).repeat_interleave(cell, 1)
            kinds = list(rec.step_kinds.values())
            label = " ".join(f"{k}:{kinds.count(k)}" for k in STEP_COLOURS if kinds.count(k))
            tiles.append(_text(strip, label))
        if not tiles:
            continue
        th = max(t.shape[0] for t in tiles)
        row = torch.cat([torch.cat([_pad_to(t, th, t.shape[1]), torch.ones(th, 6, 3)], dim=1) for t in tiles], dim=1)
        rows.append(_text(row, f"{method.upper()}: {LEGEND.get(method, '')}"))
    if not rows:
        return _text(torch.ones(64, 320, 3), "no recorded run yet: sample with this model first")
    width = max(r.shape[1] for r in rows)
    return torch.cat([_pad_to(r, r.shape[0] + 6, width) for r in rows], dim=0)


class TokenPruningPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return build(
            io.Schema,
            node_id="TokenPruningPreview",
            display_name="Token Pruning Preview",
            category=CATEGORY,
            description=("Draws what the SiTo / DaTo / CAT patches on this model decided in its last sampling run: "
                         "which tokens were base, kept or pruned (recomputed or cached for CAT) at the "
                         "highest-resolution level, and which steps were full, shallow or reused."),
            inputs=[
                build(io.Model.Input, id="model", tooltip="The patched model that was just used for sampling."),
                build(io.Latent.Input, id="samples", tooltip="The sampler's output, so this node runs after sampling."),
                build(io.Int.Input, id="panels", default=6, min=1, max=32, tooltip="How many steps to draw per patch."),
            ],
            outputs=[build(io.Image.Output, tooltip="Heatmaps of the recorded decisions.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # always redraw: the record changes with every run of the model

    @classmethod
    def execute(cls, model, samples, panels=6) -> io.NodeOutput:
        image = render(hooks.last_records(model), panels=panels)
        return io.NodeOutput(image.unsqueeze(0).clamp(0, 1))
