"""Where token grids lie in the image: resampling view maps onto image pixels."""
from __future__ import annotations

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
