"""DeepSeek-VL (transformers port, deepseek-community/deepseek-vl-*-chat).

The image is resized (longest side to the SigLIP input size) and padded to a centred
square with the mean colour the way F-LMM's own processor does it, before the
transformers processor sees it; the single (24x24 for the real model) grid covers that
padded square. F-LMM's head was trained with "User: <image>{question}\n\n
Assistant:" after BOS, empty system prompt (flmm.md section 5); the answer follows
"Assistant:" after a space, as in DeepSeek's conversation format.
"""
from __future__ import annotations

import torch
from transformers import DeepseekVLForConditionalGeneration

from flmm_demo.backends.base import Backend, ViewTokens
from flmm_demo.backends.llava import _size_entry, image_positions, mean_fill, resize_and_pad_square

FLMM_DEEPSEEK_TEXT = "User: {image}{question}\n\nAssistant:"


def padded_square_box(image_processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1), in input pixels, of the square DeepSeek-VL's processor produces.

    Longest side -> `side` (the other rounded, at least min_size), then centred padding.
    """
    if not getattr(image_processor, "do_pad", True):
        raise ValueError("DeepSeek-VL's processor must pad to square (do_pad=True) for a square token grid")
    side = _size_entry(image_processor.size, "height")
    w, h = size
    scale = side / max(w, h)
    min_size = getattr(image_processor, "min_size", 1)
    rw, rh = max(round(w * scale), min_size), max(round(h * scale), min_size)
    off_x = (side - rw) // 2 if rh > rw else 0
    off_y = (side - rh) // 2 if rw > rh else 0
    sx, sy = rw / w, rh / h
    return (-off_x / sx, -off_y / sy, (side - off_x) / sx, (side - off_y) / sy)


class DeepseekVLBackend(Backend):
    """DeepSeek-VL 1.3B/7B-chat port: SigLIP grid, MLP aligner, Llama decoder."""

    family = "deepseek_vl"
    model_class = DeepseekVLForConditionalGeneration
    answer_prefix = " "

    def flmm_text(self) -> str:
        return FLMM_DEEPSEEK_TEXT.format(image=self.processor.image_token, question=self.grounding_prompt)

    def prepare_image(self, image, template: str):
        # F-LMM's processor: short side int(short * side / long), at least min_size (the
        # transformers port rounds instead), centred padding. The port then sees a square.
        image_processor = self.processor.image_processor
        side = _size_entry(image_processor.size, "height")
        min_size = getattr(image_processor, "min_size", 1)
        return resize_and_pad_square(image, side, mean_fill(image_processor), min_short=min_size)

    def image_views(self, inputs: dict[str, torch.Tensor], input_size: tuple[int, int]) -> list[ViewTokens]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        positions = image_positions(inputs["input_ids"], self.image_token_id)
        if positions.numel() != side * side:
            raise ValueError(f"expected {side * side} image tokens for a {side}x{side} grid, found {positions.numel()}")
        box = padded_square_box(self.processor.image_processor, input_size)
        return [ViewTokens("image", (side, side), box, positions)]
