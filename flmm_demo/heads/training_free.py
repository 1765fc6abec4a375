"""Training-free grounding: a phrase's raw attention -> heat map -> SAM prompts or a mask.

Works with any LMM, no head needed. Two problems of raw attention are handled:

* Bias shared by every query. Causal LMMs pour attention onto a few "sink" tokens and
  onto the first image tokens (the top rows) whatever the word is. VL-SAM and "Your
  large multimodal model needs only a few attention heads for visual grounding" remove
  such patterns by comparing with a reference; here each channel's map (as a
  distribution over patches) minus the same channel's *baseline* is kept where positive.
  The baseline is the mean attention of all answer tokens (`answer_baseline`) when the
  caller has it, else the median map over all channels (the pattern most heads share).
* Most heads do not localise. Heads are ranked by (attention mass on the image) x
  (spatial concentration = 1 - normalised entropy of the corrected map) and only the
  best few are averaged, as the "few attention heads" paper selects localisation heads.

The heat map is normalised to [0, 1]; `heatmap_to_prompts` turns it into SAM points and
a box, `threshold_mask` into a mask (Otsu or relative threshold, largest component).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from flmm_demo.geometry import mask_box
from flmm_demo.heads.sam import decode_prompts
from flmm_demo.types import AnswerAttention


@dataclass(frozen=True)
class SamPrompts:
    """Prompts in image pixels. points: (N, 2) xy; labels: (N,) 1 = foreground; box: (4,) x0, y0, x1, y1."""

    points: np.ndarray
    labels: np.ndarray
    box: tuple[int, int, int, int] | None


def answer_baseline(attention: AnswerAttention) -> list[torch.Tensor]:
    """Per view (L*H, rows, cols): the mean attention of all answer tokens, the bias reference."""
    if attention.map_spans is not None:  # only span means were kept: the whole answer is one of them
        return attention.phrase_maps((0, len(attention.token_ids)))
    return [m.mean(0) for m in attention.maps]


def attention_heatmap(
    phrase_maps: torch.Tensor,
    *,
    baseline: torch.Tensor | None = None,
    num_heads: int | None = None,
    top_fraction: float = 0.05,
    min_channels: int = 4,
) -> torch.Tensor:
    """(L*H, rows, cols) phrase attention -> (rows, cols) heat map in [0, 1].

    baseline: (L*H, rows, cols) reference attention (e.g. `answer_baseline`); None uses
    the median over channels. num_heads only checks that channels = layers * heads.
    top_fraction / min_channels: how many of the best-ranked channels are averaged.
    """
    if phrase_maps.dim() != 3:
        raise ValueError(f"expected phrase maps of shape (layers*heads, rows, cols), got {tuple(phrase_maps.shape)}")
    channels, rows, cols = phrase_maps.shape
    if num_heads is not None and channels % num_heads:
        raise ValueError(f"{channels} channels is not a multiple of {num_heads} heads")
    maps = phrase_maps.float().clamp(min=0)
    image_mass = maps.sum((1, 2))  # share of each head's attention that lands on the image
    probs = maps / image_mass.clamp(min=1e-12).view(-1, 1, 1)
    if baseline is None:
        reference = probs.median(dim=0).values.expand_as(probs)
    else:
        if baseline.shape != phrase_maps.shape:
            raise ValueError(
                f"baseline shape {tuple(baseline.shape)} differs from the maps' {tuple(phrase_maps.shape)}"
            )
        base = baseline.float().clamp(min=0)
        reference = base / base.sum((1, 2), keepdim=True).clamp(min=1e-12)
    corrected = (probs - reference).clamp(min=0)
    mass = corrected.sum((1, 2))
    corrected = corrected / mass.clamp(min=1e-12).view(-1, 1, 1)

    cells = rows * cols
    if cells == 1:
        return torch.ones(1, 1) if image_mass.sum() > 0 else torch.zeros(1, 1)
    entropy = -(corrected * corrected.clamp(min=1e-12).log()).sum((1, 2))
    concentration = (1 - entropy / np.log(cells)).clamp(min=0) * (mass > 1e-6)
    score = image_mass * concentration
    k = min(channels, max(min_channels, int(round(top_fraction * channels))))
    top = score.topk(k).indices
    weights = score[top]
    if weights.sum() <= 0:
        return torch.zeros(rows, cols)
    heat = (corrected[top] * weights.view(-1, 1, 1)).sum(0) / weights.sum()
    return heat / heat.max().clamp(min=1e-12)


def _otsu_mask(heat: np.ndarray) -> np.ndarray:
    """(H, W) float -> (H, W) bool: above the threshold of Otsu's method on 256 equal bins
    between the heat map's minimum and maximum."""
    low, high = float(heat.min()), float(heat.max())
    if high <= low:
        return np.ones(heat.shape, dtype=bool)
    # Bin index of each value, as np.histogram(heat, bins=256) counts them.
    bins = np.minimum((heat - low) / (high - low) * 256, 255).astype(np.uint8)
    _, mask = cv2.threshold(bins, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return mask.astype(bool)


def threshold_mask(
    heatmap: np.ndarray | torch.Tensor,
    *,
    method: str = "otsu",
    relative: float = 0.5,
    components: int = 1,
) -> np.ndarray:
    """(H, W) heat map -> (H, W) bool mask.

    method: "otsu" (threshold by Otsu's method) or "relative" (heat >= relative * max).
    components: how many of the largest connected components to keep (0 keeps all).
    """
    heat = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"expected an (H, W) heat map, got shape {heat.shape}")
    peak = float(heat.max()) if heat.size else 0.0
    if peak <= 0:
        return np.zeros(heat.shape, dtype=bool)
    if method == "otsu":
        mask = _otsu_mask(heat)
    elif method == "relative":
        mask = heat >= min(relative, 1.0) * peak
    else:
        raise ValueError(f"unknown threshold method {method!r}; use 'otsu' or 'relative'")
    if components <= 0:
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.argsort(-areas)[:components]
    return np.isin(labels, keep)


def heatmap_to_prompts(
    heatmap: np.ndarray | torch.Tensor,
    *,
    num_points: int = 2,
    method: str = "otsu",
) -> SamPrompts:
    """(H, W) heat map -> positive points at its strongest peaks and the box of its main blob.

    Peaks are taken inside the thresholded mask, each at least 1/8 of the image diagonal
    from the others, so they spread over the object instead of stacking on one spot.
    """
    heat = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    mask = threshold_mask(heat, method=method)
    if not mask.any():
        return SamPrompts(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), None)
    remaining = np.where(mask, heat, -np.inf)
    radius = np.hypot(*heat.shape) / 8
    ys, xs = np.mgrid[: heat.shape[0], : heat.shape[1]]
    points = []
    for _ in range(num_points):
        index = int(np.argmax(remaining))
        if not np.isfinite(remaining.flat[index]):
            break
        y, x = divmod(index, heat.shape[1])
        points.append((x + 0.5, y + 0.5))
        remaining[(xs - x) ** 2 + (ys - y) ** 2 < radius**2] = -np.inf
    points_array = np.array(points, dtype=np.float64)
    return SamPrompts(points_array, np.ones(len(points), dtype=np.int64), mask_box(mask))


def heatmap_to_mask(
    heatmap: np.ndarray | torch.Tensor,
    *,
    sam: Any = None,
    sam_embedding: Any = None,
) -> tuple[np.ndarray, float]:
    """(H, W) heat map at the image size -> ((H, W) bool mask, score in [0, 1]).

    With a SamImageEncoderCache that has SAM's prompt model (`sam`) and the image's
    embedding, SAM decodes the mask from `heatmap_to_prompts` (score = SAM's predicted
    IoU); otherwise the heat map is thresholded (score = mean heat inside the mask).
    """
    heat = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    prompt_model = getattr(sam, "prompt_model", None)
    if prompt_model is not None and sam_embedding is not None:
        if tuple(sam_embedding.original_size) != heat.shape:
            raise ValueError(
                f"the heat map is {heat.shape[1]}x{heat.shape[0]} but SAM encoded a "
                f"{sam_embedding.original_size[1]}x{sam_embedding.original_size[0]} image; resize the heat map first"
            )
        prompts = heatmap_to_prompts(heat)
        if prompts.box is None:
            return np.zeros(heat.shape, dtype=bool), 0.0
        with torch.no_grad():
            logits, iou = decode_prompts(
                prompt_model,
                sam_embedding,
                points=prompts.points,
                point_labels=prompts.labels,
                box=prompts.box,
                multimask_output=True,
            )
        return (logits > 0).cpu().numpy(), float(np.clip(iou, 0.0, 1.0))
    mask = threshold_mask(heat)
    return mask, float(heat[mask].mean()) if mask.any() else 0.0
