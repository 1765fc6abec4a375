"""Referring-segmentation scores: cIoU and gIoU (flmm.md section 9).

cIoU = sum of intersections / sum of unions over all expressions (large objects weigh more).
gIoU = mean over expressions of I / U; an empty prediction on an empty target counts 1.
Every result carries the protocol it was measured under, because the two protocols in use
(every sentence vs first sentence per object) give different numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from flmm_demo.training.refer import PROTOCOL_LABELS


def intersection_union(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """Pixel counts of pred & target and pred | target; both (H, W), truthy = object."""
    pred = _as_bool(pred)
    target = _as_bool(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in size; resize the prediction")
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


def expression_iou(intersection: int, union: int) -> float:
    """One expression's IoU; an empty prediction on an empty target counts 1."""
    return intersection / union if union > 0 else 1.0


def _as_bool(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)


@dataclass(frozen=True)
class SegmentationScores:
    """cIoU and gIoU in [0, 1] over n expressions, measured under `protocol`."""

    protocol: str
    ciou: float
    giou: float
    n: int
    intersection: int
    union: int

    @property
    def protocol_label(self) -> str:
        return PROTOCOL_LABELS.get(self.protocol, self.protocol)

    def as_dict(self) -> dict:
        return {**asdict(self), "protocol_label": self.protocol_label}


class IoUAccumulator:
    """Collects per-expression intersections and unions; `scores()` gives cIoU and gIoU.

    Counts scored by several processes combine exactly with `add_counts` per gathered
    expression. Never average per-process cIoUs: cIoU is a ratio of sums.
    """

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.intersection = 0
        self.union = 0
        self.iou_sum = 0.0
        self.n = 0

    def add(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
        """Score one expression's predicted mask (H, W) against its target (H, W); returns its IoU."""
        return self.add_counts(*intersection_union(pred, target))

    def add_counts(self, intersection: int, union: int) -> float:
        """Add one expression's pixel counts (e.g. scored by another process); returns its IoU."""
        iou = expression_iou(intersection, union)
        self.intersection += intersection
        self.union += union
        self.iou_sum += iou
        self.n += 1
        return iou

    def scores(self) -> SegmentationScores:
        if self.n == 0:
            raise ValueError("no expressions were scored")
        ciou = self.intersection / self.union if self.union > 0 else 1.0
        return SegmentationScores(
            protocol=self.protocol,
            ciou=ciou,
            giou=self.iou_sum / self.n,
            n=self.n,
            intersection=self.intersection,
            union=self.union,
        )


def format_table(rows: list[tuple[str, SegmentationScores]]) -> str:
    """A plain-text table: one row per (name, scores), cIoU and gIoU in percent."""
    header = f"{'dataset':<28} {'protocol':<8} {'cIoU':>6} {'gIoU':>6} {'n':>7}"
    lines = [header, "-" * len(header)]
    for name, s in rows:
        lines.append(f"{name:<28} {s.protocol:<8} {100 * s.ciou:6.2f} {100 * s.giou:6.2f} {s.n:7d}")
    for protocol in dict.fromkeys(s.protocol for _, s in rows):
        lines.append(f"protocol {protocol}: {PROTOCOL_LABELS.get(protocol, protocol)}")
    return "\n".join(lines)
