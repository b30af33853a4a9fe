"""Prune and recover: the one gather/scatter pair every method shares.

A :class:`PrunePlan` is made once per block call from per-row indices. ``prune`` keeps the
tokens that go through the layer (queries, keys and values alike); ``recover`` gives every
token of the full sequence the layer output of its *source*: its own output when it was
kept, the output of the kept token that stands in for it when it was pruned. Both are a
single ``gather``; rows of the batch (images, and the cond/uncond halves of a CFG batch)
never mix.

With ``merge`` set, ``prune`` feeds each kept token in as the mean of itself and the pruned
tokens it stands in for (one ``scatter_add``), so the output they all share is computed for
the centre of the group rather than for one of its members — ToMe's averaging on SiTo's
selection. A token that stands in for nobody enters unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrunePlan:
    kept: torch.Tensor  # [B, N-K] flat indices of the tokens that go through the layer
    source: torch.Tensor  # [B, N] position in the kept sequence whose output each token gets
    n_tokens: int
    base: torch.Tensor | None = None  # [B, M] base tokens, when the method has them (for previews)
    merge: bool = False  # kept tokens enter as the mean of themselves and the tokens copying them

    @property
    def n_kept(self) -> int:
        return self.kept.shape[1]

    @property
    def n_pruned(self) -> int:
        return self.n_tokens - self.kept.shape[1]

    def prune(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` → ``[B, N-K, C]`` (the group means when ``merge`` is set)."""
        if not self.merge:
            return x.gather(1, self.kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        index = self.source.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        total = x.new_zeros(x.shape[0], self.n_kept, x.shape[-1]).scatter_add_(1, index, x)
        return total / self.group_sizes().to(x.dtype).unsqueeze(-1)

    def group_sizes(self) -> torch.Tensor:
        """``[B, N-K]``: how many tokens receive each kept token's output (itself included)."""
        ones = torch.ones(self.source.shape, dtype=torch.float32, device=self.source.device)
        sizes = torch.zeros(self.source.shape[0], self.n_kept, dtype=torch.float32, device=self.source.device)
        return sizes.scatter_add_(1, self.source, ones)

    def recover(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, N-K, C]`` → ``[B, N, C]``."""
        return y.gather(1, self.source.unsqueeze(-1).expand(-1, -1, y.shape[-1]))

    def pruned_mask(self) -> torch.Tensor:
        """``[B, N]`` bool, True where a token was pruned (for the preview node and tests)."""
        mask = torch.ones(self.kept.shape[0], self.n_tokens, dtype=torch.bool, device=self.kept.device)
        mask.scatter_(1, self.kept, False)
        return mask


def plan_from_order(order: torch.Tensor, n_pruned: int, stand_in: torch.Tensor) -> PrunePlan:
    """Build a plan from a per-row token order whose first ``n_pruned`` entries are pruned.

    ``stand_in[b, i]`` is the flat index of the kept token whose output token ``i`` receives
    if it is pruned (ignored for kept tokens). It must point at a kept token.
    """
    b, n = order.shape
    pruned, kept = order[:, :n_pruned], order[:, n_pruned:]
    position = torch.empty(b, n, dtype=torch.long, device=order.device)
    position.scatter_(1, kept, torch.arange(n - n_pruned, device=order.device).expand(b, -1))
    source = position.clone()
    source.scatter_(1, pruned, position.gather(1, stand_in.gather(1, pruned)))
    return PrunePlan(kept=kept, source=source, n_tokens=n)
