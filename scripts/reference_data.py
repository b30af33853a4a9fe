#!/usr/bin/env python
"""The reference model's training data: Google's emoji at 32x32, from the npm registry.

Why emoji: they are colour pictures with many kinds of content (faces, animals, food, flags,
objects, symbols) and a category label for each, in one small, registry-installable, freely
licensed package (``emoji-datasource-google@16.0.0``: package MIT, images Apache-2.0). MNIST
(the other registry candidate) is greyscale, so three of the four latent channels would be
copies of one another; Noto's glyphs are the same designs as this package in a font.

What it builds (``.data/`` is git-ignored; nothing here runs in tests or CI unless asked for):
  .data/emoji-datasource-google-16.0.0.tgz   the tarball, from ``npm pack`` (the registry)
  .data/emoji32.pt                           {"images": (N, 4, 32, 32) float16 in [-1, 1],
                                              "labels": (N,) int64, "names": [...],
                                              "categories": [...], "group": (N,) int64}

The four "latent" channels are RGB composited on white plus alpha, in [-1, 1]; the pixels
*are* the latent (no VAE), so a sample is looked at directly. ``group`` numbers the base
emoji, so that an emoji's skin-tone variants fall on the same side of the held-out split.

Usage: python scripts/reference_data.py [--out .data] [--export-eval models/reference/fid_reference.npz]
Importable: ``load_dataset(data_dir) -> dict`` (builds it first if missing).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / ".data"
PACKAGE = "emoji-datasource-google@16.0.0"
TARBALL = "emoji-datasource-google-16.0.0.tgz"
SIZE = 32
# 'Component' holds the five bare skin-tone swatches: not pictures of anything.
CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
# Every 20th base emoji (with all its skin tones) is held out of training.
HOLDOUT_EVERY = 20


def fetch_tarball(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    tgz = data_dir / TARBALL
    if not tgz.is_file():
        print(f"[data] npm pack {PACKAGE} -> {data_dir}")
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=data_dir, check=True, stdout=subprocess.DEVNULL)
    return tgz


def to_latent(png_bytes: bytes, size: int = SIZE) -> np.ndarray:
    """RGBA PNG -> (4, size, size) float32 in [-1, 1]: RGB over white, then alpha."""
    im = Image.open(io.BytesIO(png_bytes)).convert("RGBA")
    # Premultiplied box filter (2x2 at 64 -> 32), so the colour of transparent pixels does
    # not bleed into the edges.
    a = np.asarray(im, dtype=np.float32) / 255.0
    rgb, alpha = a[..., :3], a[..., 3:4]
    premul = np.concatenate([rgb * alpha, alpha], axis=-1)
    h, w = premul.shape[:2]
    f = h // size
    small = premul.reshape(size, f, size, f, 4).mean(axis=(1, 3))
    rgb_s, alpha_s = small[..., :3], small[..., 3:4]
    on_white = rgb_s + (1.0 - alpha_s)  # premultiplied colour over a white background
    out = np.concatenate([on_white, alpha_s], axis=-1).clip(0.0, 1.0)
    return (out.transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)


def build(data_dir: Path = DATA_DIR) -> Path:
    out = data_dir / "emoji32.pt"
    if out.is_file():
        return out
    tgz = fetch_tarball(data_dir)
    with tarfile.open(tgz) as tf:
        meta = json.load(tf.extractfile("package/emoji.json"))
        members = {m.name: m for m in tf.getmembers()}
        images, labels, names, groups = [], [], [], []
        for gi, e in enumerate(sorted(meta, key=lambda e: e["sort_order"])):
            if e["category"] not in CATEGORIES:
                continue
            variants = [(e["image"], e["name"])]
            for v in (e.get("skin_variations") or {}).values():
                variants.append((v["image"], e["name"]))
            for img, name in variants:
                m = members.get(f"package/img/google/64/{img}")
                if m is None:
                    continue
                images.append(to_latent(tf.extractfile(m).read()))
                labels.append(CATEGORIES.index(e["category"]))
                names.append(name)
                groups.append(gi)
    data = {
        "images": torch.from_numpy(np.stack(images)).half(),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "names": names,
        "categories": list(CATEGORIES),
        "group": torch.tensor(groups, dtype=torch.int64),
        "source": f"npm {PACKAGE}, img/google/64, RGB over white + alpha, box-filtered to {SIZE}px",
    }
    torch.save(data, out)
    print(f"[data] {len(images)} images -> {out}")
    return out


def load_dataset(data_dir: Path = DATA_DIR) -> dict:
    data = torch.load(build(Path(data_dir)), weights_only=False)
    data["holdout"] = (data["group"] % HOLDOUT_EVERY) == 0
    return data


def export_eval_set(path: Path, data_dir: Path = DATA_DIR, n: int = 1024, seed: int = 0) -> Path:
    """The files the quality benchmark and the tests need without the tarball: ``n`` random
    images of the whole set (FID-analogue reference) and every held-out image (held-out
    loss), as uint8 (``round((x + 1) * 127.5)``), with their labels."""
    d = load_dataset(data_dir)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d["labels"]), generator=g)[:n]

    def u8(x):
        return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()

    np.savez_compressed(path, images=u8(d["images"][idx]), labels=d["labels"][idx].numpy(),
                        heldout_images=u8(d["images"][d["holdout"]]), heldout_labels=d["labels"][d["holdout"]].numpy(),
                        categories=np.array(d["categories"]))
    return path


def to_rgb_uint8(latent: torch.Tensor) -> np.ndarray:
    """(B, 4, H, W) latent in [-1, 1] -> (B, H, W, 3) uint8 RGB (the channels over white)."""
    x = ((latent[:, :3].float().clamp(-1, 1) + 1.0) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--export-eval", type=Path, default=None, metavar="NPZ",
                    help="also write the shipped evaluation set (models/reference/fid_reference.npz)")
    args = ap.parse_args()
    d = load_dataset(args.out)
    if args.export_eval:
        print(f"[data] evaluation set -> {export_eval_set(args.export_eval, args.out)}")
    counts = torch.bincount(d["labels"], minlength=len(CATEGORIES)).tolist()
    print(f"{len(d['labels'])} images, held out {int(d['holdout'].sum())}; per category: "
          + ", ".join(f"{c} {n}" for c, n in zip(CATEGORIES, counts)))


if __name__ == "__main__":
    main()
