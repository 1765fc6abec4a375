"""Mask heads: F-LMM's U-Net + SAM refiner, official checkpoints, training-free grounding.

    head = load_head("checkpoints/frozen_deepseek_vl_1_3b_unet_sam_l_iter_95080.pth", backend)
    sam = load_sam("checkpoints/sam_vit_l_0b3195.pth")
    embedding = sam.start(image).result()
    out = head.predict(phrase_maps, phrase_hidden, view, image_size, embedding)
"""
from __future__ import annotations

from pathlib import Path

import torch

from flmm_demo.heads.checkpoint import load_official_flmm
from flmm_demo.heads.flmm_head import FlmmHead, FlmmHeadConfig, HeadOutput, LmmShape
from flmm_demo.heads.refiner import SamRefiner
from flmm_demo.heads.sam import SAM_CHECKPOINT_NAMES, SamImageEmbedding, SamImageEncoderCache
from flmm_demo.heads.training_free import (
    SamPrompts,
    answer_baseline,
    attention_heatmap,
    heatmap_to_mask,
    heatmap_to_prompts,
    threshold_mask,
)
from flmm_demo.heads.unet import UNetMaskDecoder, crop_to_image

__all__ = [
    "FlmmHead",
    "FlmmHeadConfig",
    "HeadOutput",
    "SamImageEmbedding",
    "SamImageEncoderCache",
    "SamPrompts",
    "SamRefiner",
    "UNetMaskDecoder",
    "answer_baseline",
    "attention_heatmap",
    "crop_to_image",
    "heatmap_to_mask",
    "heatmap_to_prompts",
    "load_head",
    "load_official_flmm",
    "load_sam",
    "sam_variant_of",
    "threshold_mask",
]


def load_head(path: str | Path, lmm: LmmShape, device: str | torch.device = "cpu") -> FlmmHead:
    """A head for `lmm` (anything with num_layers, num_heads, hidden_size, e.g. a Backend).

    path: a folder written by FlmmHead.save_pretrained, or an official F-LMM .pth.
    Raises ValueError when the head was trained for an LMM of another shape.
    """
    path = Path(path)
    if path.is_dir():
        head = FlmmHead.from_pretrained(path, device=device)
        head.check_compatible(lmm)
        return head
    head = load_official_flmm(path, num_layers=lmm.num_layers, num_heads=lmm.num_heads, hidden_size=lmm.hidden_size,
                              input_grids=getattr(lmm, "head_input_grids", 1))
    return head.to(device)


def sam_variant_of(path: str | Path) -> str:
    """'vit_b' | 'vit_l' | 'vit_h' | 'vit_tiny' from a SAM checkpoint's file name (sam_vit_l_0b3195.pth -> 'vit_l')."""
    name = Path(path).name
    for variant in SAM_CHECKPOINT_NAMES:
        if variant in name:
            return variant
    raise ValueError(
        f"cannot tell the SAM variant of {name}; keep the original file name "
        f"({', '.join(SAM_CHECKPOINT_NAMES.values())})"
    )


def load_sam(path: str | Path, device: str | torch.device = "cpu", variant: str | None = None) -> SamImageEncoderCache:
    """A SAM image-encoder cache (with SAM's own prompt decoder) from an original SAM checkpoint
    or the demo world's sam_vit_tiny.safetensors."""
    return SamImageEncoderCache.from_checkpoint(variant or sam_variant_of(path), path, device=device)
