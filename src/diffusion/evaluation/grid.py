"""Image grids with numpy and Pillow.

torchvision is not a dependency: its PyPI build does not import beside the pinned CPU torch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Image.Image:
    """Tile images into one RGB picture, row by row (torchvision's ``make_grid`` layout).

    Args:
        images: (N, 3, H, W) float in [0, 1] (values outside are clipped) or (N, 1, H, W) grey.
        nrow: images per row; the last row may be short.
        padding: pixels between images and around the border.
        pad_value: grey level of the padding, in [0, 1] (white by default).
    Returns:
        a PIL RGB image of size (ncol * (W + p) + p, nrows * (H + p) + p).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow: expected >= 1, got {nrow}")
    n, c, h, w = images.shape
    x = images.detach().float().cpu().clamp(0.0, 1.0).expand(n, 3, h, w)
    pixels = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    ncol = min(nrow, max(n, 1))
    nrows = max(1, -(-n // ncol))
    grid = np.full(
        (nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), round(pad_value * 255), np.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return Image.fromarray(grid)  # (H, W, 3) uint8 is read as RGB


def pairs(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Interleave two (N, C, H, W) batches as (2N, C, H, W): original, reconstruction, original, ...

    With an even ``nrow`` each original then sits beside its reconstruction in :func:`make_grid`.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # (N, 2, C, H, W) -> (2N, C, H, W)
