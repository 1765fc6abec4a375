"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (Qwen/Qwen2-VL-*-Instruct, Qwen/Qwen2.5-VL-*-Instruct,
Qwen/Qwen3-VL-*-Instruct).

Image layout: the processor resizes the whole image (aspect kept approximately) to
sides that are multiples of patch_size * merge_size, cuts it into patch_size patches
(image_grid_thw = (1, grid_h, grid_w)), and the vision tower merges every
merge_size x merge_size block into one LLM token. So the image tokens form one
(grid_h / merge, grid_w / merge) grid, row-major, that spans the full original image.

Positions: the LLM uses M-RoPE, 3-D (time, row, column) positions for image tokens and
1-D ones for text after them, offset by `rope_deltas` (max position + 1 - length). The
prefill passes the exact 3-D positions of the prompt; forwards over the cache (the
teacher-forced answer, and generate) continue from the prompt's rope_deltas, which we
set on the model for every prompt so no stale value from another image is ever used.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from flmm_demo.backends.base import Backend, Prompt, ViewTokens
from flmm_demo.backends.llava import image_positions


class Qwen2VLBackend(Backend):
    """Qwen2-VL: dynamic-resolution ViT, 2x2 patch merger, Qwen2 decoder with M-RoPE."""

    family = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration

    def __init__(self, model: PreTrainedModel, processor: Any, *, grounding_prompt: str | None = None):
        super().__init__(model, processor, grounding_prompt=grounding_prompt)
        self._mrope: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (prompt key, positions, delta)

    def flmm_text(self) -> str:
        # No F-LMM head was released for Qwen; the grounding prompt goes through the chat template.
        return self.chat_text([], self.grounding_prompt)

    def image_views(self, inputs: dict[str, torch.Tensor], input_size: tuple[int, int]) -> list[ViewTokens]:
        grid_thw = inputs["image_grid_thw"]
        if grid_thw.shape[0] != 1 or int(grid_thw[0, 0]) != 1:
            raise ValueError(f"expected one still image (image_grid_thw (1, 3) with t=1), got {grid_thw.tolist()}")
        merge = self.model.config.vision_config.spatial_merge_size
        grid = (int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge)
        positions = image_positions(inputs["input_ids"], self.image_token_id)
        if positions.numel() != grid[0] * grid[1]:
            raise ValueError(f"expected {grid[0] * grid[1]} image tokens for a {grid} grid, found {positions.numel()}")
        width, height = input_size
        return [ViewTokens("image", grid, (0.0, 0.0, float(width), float(height)), positions)]

    # ------------------------------------------------------------ M-RoPE
    def mrope_positions(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, 1, S) M-RoPE positions of the prompt and its rope delta (1, 1).

        Text after the prompt sits at position index + delta on all three axes.
        """
        if self._mrope is None or self._mrope[0] != prompt.key:
            inputs = prompt.inputs
            positions, delta = self.model.model.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"],
            )
            self._mrope = (prompt.key, positions, delta)
        return self._mrope[1], self._mrope[2]

    def prefill_inputs(self, prompt: Prompt) -> dict[str, Any]:
        positions, _ = self.mrope_positions(prompt)
        inputs = super().prefill_inputs(prompt)
        inputs["mm_token_type_ids"] = prompt.inputs["mm_token_type_ids"][:, :-1]
        inputs["position_ids"] = positions[:, :, :-1]
        return inputs

    def cached_forward_inputs(self, prompt: Prompt, new_ids: torch.Tensor) -> dict[str, Any]:
        # Only text follows the cached prefix, so its positions are (cache length + i) + delta.
        # The model (and generate) add delta themselves when no attention mask and no image
        # grid are given; set the delta of *this* prompt first.
        _, delta = self.mrope_positions(prompt)
        self.model.model.rope_deltas = delta
        return {"input_ids": new_ids}


class Qwen25VLBackend(Qwen2VLBackend):
    """Qwen2.5-VL: as Qwen2-VL (windowed ViT, same merged grid and M-RoPE layout)."""

    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration


class Qwen3VLBackend(Qwen2VLBackend):
    """Qwen3-VL: 16 px patches merged 2x2 (one LLM token per 32 px), DeepStack visual features
    added to the first decoder layers at the image positions (during the prefill only: the
    answer that follows is text), Qwen3 decoder with interleaved M-RoPE. Same grid and
    position layout as Qwen2-VL."""

    family = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
