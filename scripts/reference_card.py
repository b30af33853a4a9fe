#!/usr/bin/env python
"""The reference model card's figures: the loss curve and a sample grid.

    .venv/bin/python scripts/reference_card.py [--steps 20] [--seeds 8] [--from-cache PT]

Writes models/reference/loss_curve.png (from train_log.csv) and models/reference/samples.png
(one row per label, ``--seeds`` columns, ComfyUI's euler sampler, CFG 3 against the "no label"
context) next to a row of real emoji of each label for comparison (samples_real.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT / "benchmarks"))


def loss_curve(ref_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader((ref_dir / "train_log.csv").open()))
    seen = [int(r["images_seen"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(seen, [float(r["train_loss"]) for r in rows], label="training loss (min-SNR-5 weighted, running mean)")
    ax.plot(seen, [float(r["heldout_loss"]) for r in rows], "o-", label="held-out eps-MSE (EMA weights)")
    ax.set_xlabel("images seen")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = ref_dir / "loss_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grid(ref_dir: Path, steps: int, seeds: int, cfg: float, cached: Path | None = None) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from PIL import Image

    import quality
    import reference_data

    if cached is not None:  # the unpatched samples the quality benchmark cached (same layout)
        out = torch.load(cached)["out"]
        k = len(json.loads((ref_dir / "config.json").read_text())["labels"])
        labels = [i % k for i in range(out.shape[0])]
        seeds = out.shape[0] // k
    else:
        args = quality.parse_args(["--steps", str(steps), "--seeds", str(seeds), "--cfg", str(cfg), "--ref-dir",
                                   str(ref_dir)])
        quality.bootstrap(args)
        ref = quality.Reference(ref_dir)
        labels, noise = ref.batch(seeds)
        out = quality.sample(ref.patcher, ref, labels, noise, args)
        k = ref.num_labels
    rgb = reference_data.to_rgb_uint8(out)  # sample i: label i % k, seed i // k
    scale = 3
    grid = np.ones((k * 32, seeds * 32, 3), dtype=np.uint8) * 255
    for i in range(len(labels)):
        r, c = i % k, i // k
        grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = rgb[i]
    path = ref_dir / "samples.png"
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)

    real = np.load(ref_dir / "fid_reference.npz")
    x, y = torch.from_numpy(real["images"]).float() / 127.5 - 1.0, real["labels"]
    rows = []
    for lab in range(k):
        idx = np.flatnonzero(y == lab)[:seeds]
        row = np.ones((32, seeds * 32, 3), dtype=np.uint8) * 255
        for c, j in enumerate(idx):
            row[:, c * 32:(c + 1) * 32] = reference_data.to_rgb_uint8(x[j:j + 1])[0]
        rows.append(row)
    real_grid = np.concatenate(rows)
    real_path = ref_dir / "samples_real.png"
    Image.fromarray(real_grid).resize((real_grid.shape[1] * scale, real_grid.shape[0] * scale),
                                      Image.NEAREST).save(real_path)
    return path, real_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-dir", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--from-cache", type=Path, default=None, metavar="PT",
                    help="take the samples from a quality-benchmark cache file (bench_out/quality/cache/unpatched-*.pt)")
    args = ap.parse_args()
    print(loss_curve(args.ref_dir))
    print(*sample_grid(args.ref_dir, args.steps, args.seeds, args.cfg, args.from_cache))


if __name__ == "__main__":
    main()
