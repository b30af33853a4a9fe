"""The reference model's judge: a small CNN over 4x32x32 latents (see scripts/train_classifier.py).

``Judge(x)`` gives category logits; ``Judge.features(x)`` the 64 penultimate values that the
quality benchmark feeds to torchmetrics' FID as a custom feature extractor (``FeatureNet``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Judge(nn.Module):
    num_features = 64

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(_block(4, 32), nn.AvgPool2d(2), _block(32, 64), nn.AvgPool2d(2),
                                  _block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat = nn.Sequential(nn.Linear(128, self.num_features), nn.SiLU())
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.body(x.float().clamp(-1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: Path) -> None:
        import safetensors.torch

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(state, str(path), metadata={"num_classes": str(self.num_classes)})

    @classmethod
    def load(cls, path: Path) -> "Judge":
        import safetensors.torch
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            k = int(f.metadata()["num_classes"])
        judge = cls(k)
        judge.load_state_dict(safetensors.torch.load_file(str(path)))
        return judge.eval()


class FeatureNet(nn.Module):
    """The judge's penultimate features, as torchmetrics' FID wants a custom extractor."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(x)
