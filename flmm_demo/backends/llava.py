"""LLaVA-1.5 (llava-hf/llava-1.5-*-hf): one CLIP grid of image tokens.

Both templates resize the longest side to the processor's input size and pad to a
centred square first, as LLaVA-1.5 itself was trained (image_aspect_ratio "pad") and
exactly as F-LMM's LLaVA processor does (so its head's crop arithmetic holds). Without
it llava-hf's processor centre-crops, and the parts of the image outside the crop could
not be grounded at all. The grid then covers the padded square.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from flmm_demo.backends.base import Backend, ViewTokens

FLMM_LLAVA_TEXT = "USER: {image}\n{question} ASSISTANT:"


def _size_entry(size: Any, key: str) -> int | None:
    """Read `key` from a processor size (dict or SizeDict)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def resize_and_pad_square(
    image: Image.Image, side: int, fill: tuple[int, int, int], min_short: int = 1
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """F-LMM's square input: longest side resized to `side` (bicubic; the short side
    int(short * side / long), at least min_short), centred on a `side` square of `fill`
    with the odd pixel of padding after.

    Returns the square and its placement (ox, oy, sx, sy) in the original image: square
    pixel x lies at ox + sx * x (y likewise), so boxes map back exactly.
    """
    w, h = image.size
    long = max(w, h)
    rw = side if w == long else max(int(w * side / long), min_short)
    rh = side if h == long else max(int(h * side / long), min_short)
    resized = image.resize((rw, rh), Image.BICUBIC) if (rw, rh) != (w, h) else image
    left, top = (side - rw) // 2, (side - rh) // 2
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(resized, (left, top))
    sx, sy = w / rw, h / rh
    return canvas, (-left * sx, -top * sy, sx, sy)


def mean_fill(image_processor: Any) -> tuple[int, int, int]:
    """The processor's mean colour as 0-255 RGB (what LLaVA pads with)."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(m * 255) for m in mean)


def clip_style_box(image_processor: Any, size: tuple[int, int]) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Where the processed square lies in an input image of `size`, for CLIP-style processors.

    Follows the processor's own steps: optional pad-to-square (do_pad), resize
    (shortest_edge keeping aspect with int() on the long side, or height/width),
    optional centre crop (crop_top = int((H - h) / 2)).
    Returns (box (x0, y0, x1, y1) in input pixels, processed (width, height)).
    """
    w, h = size
    ox = oy = 0.0  # top-left of the (maybe padded) canvas in input pixels
    if getattr(image_processor, "do_pad", False) and w != h:
        side = max(w, h)
        ox, oy = -float((side - w) // 2), -float((side - h) // 2)
        w = h = side
    rw, rh = w, h
    if getattr(image_processor, "do_resize", True):
        shortest = _size_entry(image_processor.size, "shortest_edge")
        if shortest:
            if w <= h:
                rw, rh = shortest, int(shortest * h / w)
            else:
                rw, rh = int(shortest * w / h), shortest
        else:
            rw, rh = _size_entry(image_processor.size, "width"), _size_entry(image_processor.size, "height")
    cx0, cy0, cw, ch = 0, 0, rw, rh
    if getattr(image_processor, "do_center_crop", False):
        cw, ch = _size_entry(image_processor.crop_size, "width"), _size_entry(image_processor.crop_size, "height")
        if cw > rw or ch > rh:
            raise ValueError("centre crop larger than the resized image is not supported; use a crop_size <= size")
        cx0, cy0 = int((rw - cw) / 2.0), int((rh - ch) / 2.0)
    sx, sy = rw / w, rh / h
    box = (ox + cx0 / sx, oy + cy0 / sy, ox + (cx0 + cw) / sx, oy + (cy0 + ch) / sy)
    return box, (cw, ch)


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(N,) sequence positions of the image placeholder tokens of a single prompt (1, S)."""
    return (input_ids[0] == image_token_id).nonzero().flatten()


class LlavaBackend(Backend):
    """LLaVA-1.5: CLIP ViT grid (CLS dropped), projector, Llama/Vicuna decoder."""

    family = "llava"
    model_class = LlavaForConditionalGeneration

    def flmm_text(self) -> str:
        return FLMM_LLAVA_TEXT.format(image=self.processor.image_token, question=self.grounding_prompt)

    def prepare_image(self, image: Image.Image, template: str) -> tuple[Image.Image, tuple[float, float, float, float]]:
        # The processor's own resize / centre crop are then no-ops on the square.
        image_processor = self.processor.image_processor
        if getattr(image_processor, "do_center_crop", False):
            side = _size_entry(image_processor.crop_size, "height")
        else:
            size = image_processor.size
            side = _size_entry(size, "shortest_edge") or _size_entry(size, "height")
        return resize_and_pad_square(image, side, mean_fill(image_processor))

    def image_views(self, inputs: dict[str, torch.Tensor], input_size: tuple[int, int]) -> list[ViewTokens]:
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
        box, (pw, ph) = clip_style_box(self.processor.image_processor, input_size)
        patch = config.vision_config.patch_size
        grid = (ph // patch, pw // patch)
        positions = image_positions(inputs["input_ids"], self.image_token_id)
        if positions.numel() != grid[0] * grid[1]:
            raise ValueError(f"expected {grid[0] * grid[1]} image tokens for a {grid} grid, found {positions.numel()}")
        return [ViewTokens("image", grid, box, positions)]
