"""LLaVA-NeXT / LLaVA-1.6 (llava-hf/llava-v1.6-*-hf): a base grid plus anyres tiles.

Token layout of one image (vision_feature_select_strategy "default", CLS dropped),
f = vision image_size / patch_size features per tile side:

1. base view: f*f tokens of the whole image squashed to one tile -> covers the image.
2. tiles view: the image is resized (aspect kept) into the best pinpoint resolution,
   centred with padding, cut into tiles; the model stitches the tiles' features into
   one (rows*f, cols*f) grid, crops the padded rows (or columns) away ("unpad") and
   appends an image_newline token after each row. We return that unpadded grid as one
   view without the newline columns, its box being the region it covers.
"""
from __future__ import annotations

import math

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from flmm_demo.backends.base import Backend, ViewTokens
from flmm_demo.backends.llava import FLMM_LLAVA_TEXT, _size_entry, image_positions

FLMM_MISTRAL_TEXT = "[INST] {image}\n{question} [/INST]"


def unpadded_rows_cols(
    image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows [r0, r1) and columns [c0, c1) of the stitched feature grid kept by the model's unpadding."""
    h, w = image_hw
    gh, gw = grid_hw
    if w / h > gw / gh:
        new_h = int(round(h * (gw / w), 7))
        pad = (gh - new_h) // 2
        return (pad, gh - pad), (0, gw)
    new_w = int(round(w * (gh / h), 7))
    pad = (gw - new_w) // 2
    return (0, gh), (pad, gw - pad)


def fitted_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into target, aspect kept (the processor's rule)."""
    h, w = image_hw
    th, tw = target_hw
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


class LlavaNextBackend(Backend):
    """LLaVA-NeXT: anyres CLIP tiles with unpadding and image_newline, Mistral/Vicuna decoder."""

    family = "llava_next"
    model_class = LlavaNextForConditionalGeneration
    # F-LMM's LLaVA-NeXT heads read both grids: the base one resized onto the tiles', then the tiles'.
    head_input_grids = 2

    def flmm_text(self) -> str:
        # F-LMM's LLaVA-NeXT heads used the LLM's own instruction format (xtuner templates).
        template = getattr(self.processor, "chat_template", None) or ""
        text = FLMM_MISTRAL_TEXT if "[INST]" in template else FLMM_LLAVA_TEXT
        return text.format(image=self.processor.image_token, question=self.grounding_prompt)

    def image_views(self, inputs: dict[str, torch.Tensor], input_size: tuple[int, int]) -> list[ViewTokens]:
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
        image_processor = self.processor.image_processor
        tile = config.vision_config.image_size
        crop = _size_entry(image_processor.crop_size, "height") or tile
        if crop != tile:
            raise ValueError(f"processor crop size {crop} differs from the vision tower's {tile}; not supported")
        f = tile // config.vision_config.patch_size
        w, h = input_size
        positions = image_positions(inputs["input_ids"], self.image_token_id)

        base = ViewTokens("base", (f, f), (0.0, 0.0, float(w), float(h)), positions[: f * f])

        best_h, best_w = select_best_resolution((h, w), config.image_grid_pinpoints)
        grid_hw = (best_h // tile * f, best_w // tile * f)
        (r0, r1), (c0, c1) = unpadded_rows_cols((h, w), grid_hw)
        rows, cols = r1 - r0, c1 - c0
        expected = f * f + rows * (cols + 1)
        if positions.numel() != expected:
            raise ValueError(f"expected {expected} image tokens (base + {rows}x{cols} tiles + newlines), found {positions.numel()}")
        start = f * f
        index = torch.arange(rows * (cols + 1), device=positions.device).view(rows, cols + 1)[:, :cols]
        tile_positions = positions[start + index.flatten()]

        # Feature cell (r, c) covers best-resolution pixels [c*cell, (c+1)*cell); the resized
        # image sits at (pad_x, pad_y) there, scaled by (new_w / w, new_h / h).
        cell = tile / f
        new_h, new_w = fitted_size((h, w), (best_h, best_w))
        pad_x, pad_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        sx, sy = new_w / w, new_h / h
        box = ((c0 * cell - pad_x) / sx, (r0 * cell - pad_y) / sy, (c1 * cell - pad_x) / sx, (r1 * cell - pad_y) / sy)
        return [base, ViewTokens("tiles", (rows, cols), box, tile_positions)]
