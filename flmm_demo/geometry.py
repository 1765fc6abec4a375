"""Pixel geometry: token grids onto the image, resizing masks and heat maps, mask boxes.

Sizes follow PIL: `size` is (width, height); arrays are (height, width).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .types import ImageView


def views_to_image(
    maps: list[torch.Tensor], views: list[ImageView], image_size: tuple[int, int],
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Paste per-view token maps onto the image and average where views overlap.

    maps[v]: (C, rows, cols) on view v's token grid. image_size: (W, H) of the original
    image; out_size: (w, h) of the result, default image_size (a smaller one is cheaper
    and covers the same image area). Returns (C, h, w) float32; pixels no view covers are 0.
    """
    width, height = image_size
    out_w, out_h = out_size or image_size
    # Pixel centres of the output, in original-image pixel coordinates.
    xs = (torch.arange(out_w, dtype=torch.float32) + 0.5) * (width / out_w)
    ys = (torch.arange(out_h, dtype=torch.float32) + 0.5) * (height / out_h)
    total = None
    coverage = torch.zeros(out_h, out_w)
    for grid_map, view in zip(maps, views):
        x0, y0, x1, y1 = view.box
        u = (xs - x0) / (x1 - x0) * 2 - 1  # -1..1 across the view (align_corners=False)
        v = (ys - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)[None]  # (1, h, w, 2)
        sampled = F.grid_sample(grid_map[None].float(), grid, mode="bilinear",
                                padding_mode="border", align_corners=False)[0]
        inside = ((grid[0, ..., 0].abs() <= 1) & (grid[0, ..., 1].abs() <= 1)).float()
        sampled = sampled * inside
        total = sampled if total is None else total + sampled
        coverage += inside
    if total is None:
        raise ValueError("no image views to paste")
    return total / coverage.clamp(min=1)


def resize_map(values: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) values -> (height, width) float32, bilinear (pixel centres aligned,
    antialiased when shrinking, as PIL resizes). size: (width, height)."""
    values = torch.as_tensor(np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values),
                             dtype=torch.float32)
    if values.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {tuple(values.shape)}")
    width, height = size
    if tuple(values.shape) == (height, width):
        return values.numpy().copy()
    resized = F.interpolate(values[None, None], size=(height, width), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized[0, 0].numpy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (height, width) bool, smooth (bilinear, then >= 0.5) rather than blocky.
    size: (width, height)."""
    return resize_map(np.asarray(mask, dtype=np.float32), size) >= 0.5


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a bool (H, W) mask, x1/y1 exclusive; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
