#!/usr/bin/env python
"""Where SiTo prunes on the trained reference model: the preview node's token maps beside the picture.

For a few labels, samples the reference model (20 euler steps, CFG 3) unpatched and with the
SiTo settings compared in docs/benchmarks.md, and draws, per setting, the token maps the
preview node draws (green base / grey kept / red pruned, block 0 of the top level, first row
of the batch) at a few steps, next to the unpatched picture. The emoji sit on a flat white
background: that is where a person expects redundancy.

    nice .venv/bin/python benchmarks/preview_maps.py --out docs/images/reference_token_maps.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import pack  # noqa: E402
import quality  # noqa: E402
import variants  # noqa: E402

SETTINGS = {"SiTo defaults": "sito@0.5", "SiTo recommended": "sito-qonly-merge-global-sim0@0.5",
            "random pruning": "random@0.5"}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="0,2,5", help="label indices to draw (one row group each)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--panels", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "reference_token_maps.png")
    ap.add_argument("--comfyui", default=str(ROOT / ".comfyui"))
    args = ap.parse_args(argv)
    qargs = quality.parse_args(["--steps", str(args.steps), "--comfyui", args.comfyui])
    quality.bootstrap(qargs)
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    def to_pil(t):
        return Image.fromarray((t.clamp(0, 1) * 255).byte().numpy())

    ref = quality.Reference(qargs.ref_dir)
    labels_all, noise_all = ref.batch(1)
    blocks = []
    for label in (int(x) for x in args.labels.split(",")):
        labels, noise = labels_all[label:label + 1], noise_all[label:label + 1]
        picture = quality.to_unit_rgb(quality.sample(ref.patcher, ref, labels, noise, qargs))[0]
        parts = [to_pil(F.interpolate(picture[None], size=(128, 128), mode="nearest")[0].permute(1, 2, 0))]
        for name, spec in SETTINGS.items():
            m = variants.patch(ref.patcher, variants.parse_variant(spec), seed=0)
            quality.sample(m, ref, labels, noise, qargs)
            drawn = to_pil(pack.preview_render(pack.last_records(m), panels=args.panels, height=128))
            tile = Image.new("RGB", (drawn.width, drawn.height + 16), "white")
            tile.paste(drawn, (0, 16))
            ImageDraw.Draw(tile).text((2, 2), f"{name}: {spec}", fill=(0, 0, 0))
            parts.append(tile)
        w = parts[0].width + 8 + max(p.width for p in parts[1:])
        h = max(parts[0].height, sum(p.height + 4 for p in parts[1:]))
        block = Image.new("RGB", (w, h), "white")
        block.paste(parts[0], (0, 0))
        y = 0
        for p in parts[1:]:
            block.paste(p, (parts[0].width + 8, y))
            y += p.height + 4
        blocks.append(block)
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height + 12 for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height + 12
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
