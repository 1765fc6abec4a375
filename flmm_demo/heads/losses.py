"""F-LMM's mask loss: sigmoid BCE + Dice (eps 1), weight 1 each (flmm.md section 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_dice_per_mask(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Sigmoid BCE (mean over pixels) + Dice (eps 1) of each mask: (K, h, w) -> (K,).

    logits, target: (K, h, w); target in {0, 1}.
    """
    logits, target = logits.flatten(1).float(), target.flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * target).sum(1) + eps) / (probs.sum(1) + target.sum(1) + eps)
    return bce + dice


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Sigmoid BCE + Dice (eps 1), averaged over the K masks (F-LMM's mask loss).

    logits, target: (K, h, w); target in {0, 1}.
    """
    return bce_dice_per_mask(logits, target, eps).mean()
