#!/usr/bin/env python
"""Train the reference model's judge: a small CNN that tells the emoji category of a 32x32 latent.

The quality benchmark uses it as this pack's analogue of two standard metrics:
  * its accuracy on generated samples (does a sample of label y look like category y?) stands
    in for CLIP score;
  * its penultimate features (64 values) stand in for the Inception features behind FID.

It is trained on the same training split as the reference model (held-out emoji stay out),
class-balanced (People & Body is 60 % of the data), with flips and 1-2 pixel shifts.
Minutes on 2 CPU cores; never run by tests or CI. Writes
``models/reference/classifier.safetensors`` and the held-out accuracy into
``models/reference/classifier.json``.

    nice .venv/bin/python scripts/train_classifier.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import reference_data  # noqa: E402
from reference_judge import Judge  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    # Shift with white/transparent fill (the background value of every channel is 1 or -1).
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0.0)
    pad[:, :3, :2] = pad[:, :3, -2:] = 1.0
    pad[:, :3, :, :2] = pad[:, :3, :, -2:] = 1.0
    pad[:, 3:, :2] = pad[:, 3:, -2:] = -1.0
    pad[:, 3:, :, :2] = pad[:, 3:, :, -2:] = -1.0
    return pad[:, :, 2 + dy:34 + dy, 2 + dx:34 + dx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data = reference_data.load_dataset()
    x, y, held = data["images"].float(), data["labels"], data["holdout"]
    xt, yt, xh, yh = x[~held], y[~held], x[held], y[held]
    k = len(data["categories"])
    counts = torch.bincount(yt, minlength=k).float()
    sample_w = (1.0 / counts)[yt]

    judge = Judge(k)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = xt.shape[0] // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        judge.train()
        total = 0.0
        for _ in range(steps_per_epoch):
            idx = torch.multinomial(sample_w, 64, replacement=True, generator=gen)
            logits = judge(augment(xt[idx], gen))
            loss = torch.nn.functional.cross_entropy(logits, yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        judge.eval()
        with torch.no_grad():
            acc = (judge(xh).argmax(-1) == yh).float().mean().item()
        print(f"[judge] epoch {epoch + 1}: loss {total / steps_per_epoch:.3f}, held-out accuracy {acc:.3f}", flush=True)

    with torch.no_grad():
        pred = judge(xh).argmax(-1)
        per_class = {c: round(((pred == yh) & (yh == i)).sum().item() / max(1, (yh == i).sum().item()), 3)
                     for i, c in enumerate(data["categories"])}
        train_acc = (judge(xt).argmax(-1) == yt).float().mean().item()
    args.out.mkdir(parents=True, exist_ok=True)
    judge.save(args.out / "classifier.safetensors")
    info = {"categories": data["categories"], "epochs": args.epochs, "seed": args.seed,
            "heldout_accuracy": round(acc, 4), "train_accuracy": round(train_acc, 4),
            "heldout_per_category": per_class, "heldout_images": int(held.sum()),
            "features": judge.num_features}
    (args.out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
