"""Token geometry: where a flat token sequence sits on the latent grid.

A UNet transformer block sees its activations as ``B × N × C`` tokens that come from a
``B × C × h × w`` feature map, row-major (``N = h·w``). Nothing here assumes a square grid
or even sides: SiTo's official code reshaped to ``√N × √N`` and broke on every non-square
image; we always carry ``(h, w)`` read from the live activation shape.

Video DiTs (Wan, HunyuanVideo, LTX-Video) patchify a ``B × C × T × H × W`` latent into
``t × h × w`` tokens, frame-major then row-major (``N = t·h·w``), as their 3-D patch embeddings
flatten it; ``TokenGrid(h, w, t)`` is that grid (``t = 1``: an image, every 2-D rule as before).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGrid:
    """An ``h × w`` token grid, flattened row-major; with ``t > 1`` frames, ``t`` such grids one
    after the other (frame-major, as video DiTs flatten their patches)."""

    h: int
    w: int
    t: int = 1  # frames (video latents); 1 for images

    @property
    def n(self) -> int:
        return self.t * self.h * self.w

    @property
    def dims(self) -> tuple[int, ...]:
        """``(h, w)`` for an image grid, ``(t, h, w)`` for a video grid (names a grid in messages)."""
        return (self.h, self.w) if self.t == 1 else (self.t, self.h, self.w)

    def windows(self, sy: int, sx: int) -> tuple[int, int]:
        """Number of whole ``sy × sx`` windows along each axis.

        Border rows/columns that do not fill a window hold no base token (as in SiTo).
        """
        return self.h // sy, self.w // sx

    def window_count(self, sy: int, sx: int) -> int:
        wy, wx = self.windows(sy, sx)
        return wy * wx

    def halved(self) -> "TokenGrid":
        """The next coarser UNet level: sides halved and rounded up, as stride-2 convolutions do."""
        return TokenGrid((self.h + 1) // 2, (self.w + 1) // 2)


def video_token_grid(shape, patch: tuple[int, int, int]) -> TokenGrid:
    """The token grid of a ``[..., T, H, W]`` latent patchified by ``patch = (pt, ph, pw)`` (sides
    padded up to whole patches, as ComfyUI's ``pad_to_patch_size`` does)."""
    t, h, w = (int(s) for s in shape[-3:])
    pt, ph, pw = patch
    return TokenGrid(-(-h // ph), -(-w // pw), -(-t // pt))


def latent_token_grid(h: int, w: int, factor: int) -> TokenGrid:
    """The token grid of an ``h × w`` latent at ``factor`` latent pixels per token side (a power
    of two: a UNet level's downsample factor, or a DiT's patch size)."""
    grid = TokenGrid(h, w)
    for _ in range(max(factor.bit_length() - 1, 0)):
        grid = grid.halved()
    return grid


def coarser_token_counts(grid: TokenGrid, halvings: int) -> list[int]:
    """Token counts of the next ``halvings`` coarser UNet levels; a count identifies the level
    of a block call."""
    sizes = []
    for _ in range(halvings):
        grid = grid.halved()
        sizes.append(grid.n)
    return sizes


def grid_from_shapes(n_tokens: int, activations_shape=None, original_shape=None) -> TokenGrid:
    """Recover the grid of an ``N``-token sequence.

    ``activations_shape`` (``[B, C, h, w]`` of the SpatialTransformer input) is exact and is
    preferred. Without it, the latent shape is divided by the smallest power of two whose
    ceil-halvings give ``N`` tokens, which is how ComfyUI's convolutions shrink odd sizes
    (65 → 33 → 17), unlike the ``//`` arithmetic of older ports.
    """
    if activations_shape is not None and len(activations_shape) >= 4:
        h, w = int(activations_shape[-2]), int(activations_shape[-1])
        if h * w == n_tokens:
            return TokenGrid(h, w)
    if original_shape is not None and len(original_shape) >= 4:
        grid = TokenGrid(int(original_shape[-2]), int(original_shape[-1]))
        for _ in range(8):
            if grid.n == n_tokens:
                return grid
            grid = grid.halved()
    raise ValueError(f"cannot place {n_tokens} tokens on a grid (activations {activations_shape}, latent {original_shape})")


def downsample_factor(grid: TokenGrid, original_shape) -> int:
    """Power-of-two factor between the latent and this grid (1 = full latent resolution)."""
    level = TokenGrid(int(original_shape[-2]), int(original_shape[-1]))
    f = 1
    # both sides: a side of 1 (or 2) stops shrinking, so height alone misreads 1×N latents
    while (level.h > grid.h or level.w > grid.w) and f < 1 << 8:
        level = level.halved()
        f *= 2
    return f


def window_base_offsets(grid: TokenGrid, sy: int, sx: int, device=None) -> torch.Tensor:
    """Flat index of the top-left token of every whole window, shape ``[wy·wx]`` (row-major)."""
    wy, wx = grid.windows(sy, sx)
    rows = torch.arange(wy, device=device) * sy
    cols = torch.arange(wx, device=device) * sx
    return (rows[:, None] * grid.w + cols[None, :]).reshape(-1)


def window_member_offsets(grid: TokenGrid, sy: int, sx: int, device=None) -> torch.Tensor:
    """Offsets of the ``sy·sx`` members of a window relative to its top-left token."""
    dy = torch.arange(sy, device=device)
    dx = torch.arange(sx, device=device)
    return (dy[:, None] * grid.w + dx[None, :]).reshape(-1)


def resize_token_map(values: torch.Tensor, src: TokenGrid, dst: TokenGrid) -> torch.Tensor:
    """Resize a per-token map ``[B, src.n]`` to another grid ``[B, dst.n]`` (area / nearest)."""
    if src == dst:
        return values
    b = values.shape[0]
    img = values.reshape(b, 1, src.h, src.w).float()
    if dst.h <= src.h and dst.w <= src.w:
        out = torch.nn.functional.adaptive_avg_pool2d(img, (dst.h, dst.w))
    else:
        out = torch.nn.functional.interpolate(img, size=(dst.h, dst.w), mode="nearest")
    return out.reshape(b, dst.n)
