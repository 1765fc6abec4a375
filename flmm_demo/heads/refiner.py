"""F-LMM's SAM mask refiner: U-Net logits + phrase hidden states -> a sharper mask.

SAM's prompt encoder and mask decoder (trained by F-LMM; the image encoder stays the
original frozen SAM) take three cues, as in F-LMM's `SAMWrapper`:
  * dense prompt: the U-Net logits, resized to the resized-image size, padded right/bottom
    to 1024 with min(-1, min logit), resized to 256x256;
  * box prompt: the box of sigmoid(logits) > 0.5 at the original image size
    ([x0, y0, x1 + 1, y1 + 1], the whole image when empty), scaled to the 1024 frame;
  * language cue: the phrase tokens' hidden states of all LLM layers, mixed with
    softmax(text_layer_weights) and projected by text_proj to one sparse token each.
Sparse tokens are [2 box corners, text tokens]; one mask is decoded (multimask off).
Module names match the released checkpoints: `model.prompt_encoder.*`, `model.mask_decoder.*`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flmm_demo.geometry import mask_box, resize_map
from flmm_demo.heads.sam import (
    LOW_RES_MASK_SIZE,
    RELEASED_SAM,
    SAM_IMAGE_SIZE,
    SamGeometry,
    SamImageEmbedding,
    SamPromptModel,
    decode_prompts,
)


class SamRefiner(nn.Module):
    """Refines one phrase's U-Net logits with SAM.

    hidden_size: the LLM's hidden size (2048 for DeepSeek-VL-1.3B); num_layers: its
    number of decoder layers (one learned mixing weight each). geometry: sizes of the SAM
    whose image encoder it works with (the released models', or the demo world's TINY_SAM).
    """

    def __init__(self, hidden_size: int, num_layers: int, geometry: SamGeometry = RELEASED_SAM) -> None:
        super().__init__()
        self.model = SamPromptModel(geometry)
        self.text_layer_weights = nn.Parameter(torch.ones(num_layers))
        self.text_proj = nn.Linear(hidden_size, geometry.prompt_dim)

    def text_embeddings(self, phrase_hidden: torch.Tensor) -> torch.Tensor:
        """(L, n, D) hidden states of the phrase tokens (embedding output excluded) -> (n, 256)."""
        num_layers = self.text_layer_weights.shape[0]
        if phrase_hidden.dim() != 3 or phrase_hidden.shape[0] != num_layers:
            raise ValueError(
                f"expected the phrase's hidden states as (layers={num_layers}, tokens, hidden), "
                f"got {tuple(phrase_hidden.shape)}"
            )
        weights = self.text_layer_weights.float().softmax(0)
        mixed = (phrase_hidden.float().to(weights.device) * weights.view(-1, 1, 1)).sum(0)
        return self.text_proj(mixed.to(self.text_proj.weight.dtype))

    def forward(
        self,
        unet_logits: torch.Tensor,
        phrase_hidden: torch.Tensor,
        embedding: SamImageEmbedding,
        pad_value: float | None = None,
    ) -> torch.Tensor:
        """unet_logits: (h, w) cropped to the image area; returns (H, W) logits at the image size.

        pad_value: fill of the dense prompt outside the resized image; default
        min(-1, min of these logits). F-LMM refines all phrases of an image together and
        uses min(-1, min over all of their logits): pass that to match it (see
        `dense_pad_value`).
        """
        geometry = self.model.geometry
        if embedding.img_size != geometry.img_size or embedding.features.shape[1] != geometry.prompt_dim:
            raise ValueError(
                f"this refiner was trained with a SAM of {geometry.img_size} px input and {geometry.prompt_dim}-dim "
                f"embeddings, but the image was encoded at {embedding.img_size} px with "
                f"{embedding.features.shape[1]} dims; load the SAM the head was trained with"
            )
        box = mask_logits_to_box(unet_logits, embedding.original_size)
        logits, _ = decode_prompts(
            self.model,
            embedding,
            box=box,
            dense_logits=dense_prompt(unet_logits, embedding.input_size, embedding.img_size, pad_value,
                                      geometry.low_res_size),
            text_tokens=self.text_embeddings(phrase_hidden),
        )
        return logits


def dense_pad_value(unet_logits: Sequence[torch.Tensor]) -> float:
    """min(-1, smallest logit of all the phrases' (h, w) U-Net logits): F-LMM's dense-prompt fill."""
    return min(-1.0, min(logits.min().item() for logits in unet_logits))


def dense_prompt(
    unet_logits: torch.Tensor,
    input_size: tuple[int, int],
    img_size: int = SAM_IMAGE_SIZE,
    pad_value: float | None = None,
    low_res_size: int = LOW_RES_MASK_SIZE,
) -> torch.Tensor:
    """(h, w) logits -> (1, 1, m, m) SAM mask prompt (m = low_res_size, 256 for released SAMs).

    Resized to input_size (the resized image), padded right/bottom to img_size with
    pad_value (default min(-1, min logit)) so the padding reads as background, resized
    to m x m.
    """
    if pad_value is None:
        pad_value = dense_pad_value([unet_logits])
    x = F.interpolate(unet_logits[None, None].float(), size=input_size, mode="bilinear")
    h, w = x.shape[-2:]
    x = F.pad(x, (0, img_size - w, 0, img_size - h), value=pad_value)
    return F.interpolate(x, size=(low_res_size, low_res_size), mode="bilinear")


def mask_logits_to_box(unet_logits: torch.Tensor, original_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(h, w) logits -> box (x0, y0, x1, y1), x1/y1 exclusive, of sigmoid > 0.5 at the original (H, W).

    The whole image when nothing is above 0.5.
    """
    height, width = original_size
    probs = resize_map(unet_logits.detach().float().sigmoid(), (width, height))
    box = mask_box(probs > 0.5)
    return (0, 0, width, height) if box is None else box
