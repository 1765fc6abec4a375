"""Idefics3 and SmolVLM (HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-*, SmolVLM2-*).

Image layout (do_image_splitting=True, the default): the processor resizes the image so
its longest edge is size["longest_edge"], then stretches it to rows x cols tiles of
max_image_size["longest_edge"] pixels and cuts the tiles out, row by row; a global copy
of the whole image, squashed to one tile, comes last. With do_image_splitting=False, or
an image that fits in one tile, only the global copy is used. Each tile goes through the
vision tower, and the connector's pixel shuffle folds every scale_factor x scale_factor
block of patches into one LLM token: a (side, side) grid per tile, row-major, with
side = image_size / patch_size / scale_factor.

In the prompt, every run of <image> tokens is announced by a marker text token:
<row_r_col_c> for tile (r, c) (1-based), <global-img> for the global copy. Those markers,
<fake_token_around_image> and newlines are text, not image columns.
"""
from __future__ import annotations

import re

import torch
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from flmm_demo.backends.base import Backend, ViewTokens

_TILE_MARKER = re.compile(r"<row_(\d+)_col_(\d+)>$")
GLOBAL_MARKER = "<global-img>"


def image_token_runs(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Positions of each maximal run of consecutive image tokens in a prompt (1, S), in order."""
    positions = (input_ids[0] == image_token_id).nonzero().flatten()
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def tile_box(row: int, col: int, rows: int, cols: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1) of tile (row, col), 0-based, of a rows x cols split of an image of size (w, h).

    The processor stretches the whole image onto the tile grid, so each tile covers an
    equal 1/cols x 1/rows share of the original image.
    """
    width, height = size
    return (col * width / cols, row * height / rows, (col + 1) * width / cols, (row + 1) * height / rows)


class Idefics3Backend(Backend):
    """Idefics3 / SmolVLM v1: SigLIP tiles + global image, pixel-shuffle connector, Llama decoder."""

    family = "idefics3"
    model_class = Idefics3ForConditionalGeneration
    # The prompt ends with "Assistant:"; the model's answer starts with a space.
    answer_prefix = " "

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    def flmm_text(self) -> str:
        # No F-LMM head was released for this family; the grounding prompt goes through the chat template.
        return self.chat_text([], self.grounding_prompt)

    def tile_side(self) -> int:
        """Tokens per side of one tile's grid after the pixel shuffle."""
        config = self.model.config
        patches = config.vision_config.image_size // config.vision_config.patch_size
        return patches // config.scale_factor

    def image_views(self, inputs: dict[str, torch.Tensor], input_size: tuple[int, int]) -> list[ViewTokens]:
        side = self.tile_side()
        width, height = input_size
        full_box = (0.0, 0.0, float(width), float(height))
        ids = inputs["input_ids"]
        runs = image_token_runs(ids, self.image_token_id)
        tiles: list[tuple[int, int, torch.Tensor]] = []
        global_view: ViewTokens | None = None
        previous_end = 0
        for run in runs:
            if run.numel() != side * side:
                raise ValueError(f"an image-token run has {run.numel()} tokens; the model expects {side}x{side} per tile")
            # The marker is the text right before the run (one added token in released tokenizers,
            # but decoding the gap also works where it is split into several).
            before = self.tokenizer.decode(ids[0, previous_end : int(run[0])].tolist(), skip_special_tokens=False)
            previous_end = int(run[-1]) + 1
            tile = _TILE_MARKER.search(before)
            if tile:
                tiles.append((int(tile.group(1)) - 1, int(tile.group(2)) - 1, run))
            elif before.endswith(GLOBAL_MARKER) and global_view is None:
                global_view = ViewTokens("global", (side, side), full_box, run)
            else:
                raise ValueError(
                    f"unexpected text {before[-40:]!r} before an image-token run; expected one Idefics3/SmolVLM image"
                )
        if global_view is None:
            raise ValueError("the prompt has no <global-img> image; expected one image per prompt")
        rows = max((r for r, _, _ in tiles), default=-1) + 1
        cols = max((c for _, c, _ in tiles), default=-1) + 1
        if len(tiles) != rows * cols:
            raise ValueError(f"found {len(tiles)} tiles, expected a full {rows}x{cols} grid")
        views = [
            ViewTokens(f"tile {r + 1},{c + 1}", (side, side), tile_box(r, c, rows, cols, input_size), run)
            for r, c, run in tiles
        ]
        return views + [global_view]


class SmolVLMBackend(Idefics3Backend):
    """SmolVLM2 (model_type smolvlm): the Idefics3 layout in its own model class.

    Its processor needs the `num2words` package (pip install num2words).
    """

    family = "smolvlm"
    model_class = SmolVLMForConditionalGeneration

