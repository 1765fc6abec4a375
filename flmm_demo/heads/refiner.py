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

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from flmm_demo.heads.sam import SamImageEmbedding

PROMPT_DIM = 256
SAM_IMAGE_SIZE = 1024
SAM_EMBEDDING_SIZE = 64
LOW_RES_MASK_SIZE = 256


class SamPromptModel(nn.Module):
    """SAM's prompt encoder and mask decoder at the sizes of every released SAM (b, l, h)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_encoder = PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )


class SamRefiner(nn.Module):
    """Refines one phrase's U-Net logits with SAM.

    hidden_size: the LLM's hidden size (2048 for DeepSeek-VL-1.3B); num_layers: its
    number of decoder layers (one learned mixing weight each).
    """

    def __init__(self, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.model = SamPromptModel()
        self.text_layer_weights = nn.Parameter(torch.ones(num_layers))
        self.text_proj = nn.Linear(hidden_size, PROMPT_DIM)

    @classmethod
    def from_sam(cls, sam: Sam, hidden_size: int = 1, num_layers: int = 1) -> SamRefiner:
        """A refiner holding an original SAM's prompt encoder and decoder (for prompt_masks)."""
        refiner = cls(hidden_size, num_layers)
        refiner.model.prompt_encoder.load_state_dict(sam.prompt_encoder.state_dict())
        refiner.model.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
        return refiner

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
    ) -> torch.Tensor:
        """unet_logits: (h, w) cropped to the image area; returns (H, W) logits at the image size."""
        box = mask_logits_to_box(unet_logits, embedding.original_size)
        return self.decode(
            embedding,
            box=box,
            dense_logits=dense_prompt(unet_logits, embedding.input_size, embedding.img_size),
            text_tokens=self.text_embeddings(phrase_hidden),
        )[0]

    def decode(
        self,
        embedding: SamImageEmbedding,
        *,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        dense_logits: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, float]:
        """Decode one mask from any mix of prompts given in original-image pixels.

        points: (N, 2) xy; point_labels: (N,) 1 = foreground, 0 = background;
        box: (4,) x0, y0, x1, y1; dense_logits: (1, 1, 256, 256); text_tokens: (n, 256).
        Returns ((H, W) logits at the original size, predicted IoU). With multimask_output
        the candidate with the highest predicted IoU is returned.
        """
        param = self.text_proj.weight
        resize = ResizeLongestSide(embedding.img_size)
        point_prompt = None
        if points is not None:
            coords = resize.apply_coords(np.asarray(points, dtype=np.float64), embedding.original_size)
            labels = np.ones(len(coords)) if point_labels is None else np.asarray(point_labels)
            point_prompt = (
                torch.as_tensor(coords, dtype=param.dtype, device=param.device)[None],
                torch.as_tensor(labels, dtype=torch.int, device=param.device)[None],
            )
        box_prompt = None
        if box is not None:
            scaled = resize.apply_boxes(np.asarray(box, dtype=np.float64).reshape(1, 4), embedding.original_size)
            box_prompt = torch.as_tensor(scaled, dtype=param.dtype, device=param.device)
        if dense_logits is not None:
            dense_logits = dense_logits.to(device=param.device, dtype=param.dtype)
        sparse, dense = self.model.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=dense_logits)
        if text_tokens is not None:
            sparse = torch.cat([sparse.to(dense), text_tokens[None].to(dense)], dim=1)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=embedding.features.to(device=param.device, dtype=param.dtype),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(dense),
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        best = int(iou[0].argmax())
        logits = postprocess_masks(low_res[:, best : best + 1], embedding)
        return logits[0, 0], float(iou[0, best])


def dense_prompt(unet_logits: torch.Tensor, input_size: tuple[int, int], img_size: int = SAM_IMAGE_SIZE) -> torch.Tensor:
    """(h, w) logits -> (1, 1, 256, 256) SAM mask prompt.

    Resized to input_size (the resized image), padded right/bottom to img_size with
    min(-1, min logit) so the padding reads as background, resized to 256x256.
    """
    pad_value = min(-1.0, unet_logits.min().item())
    x = F.interpolate(unet_logits[None, None].float(), size=input_size, mode="bilinear")
    h, w = x.shape[-2:]
    x = F.pad(x, (0, img_size - w, 0, img_size - h), value=pad_value)
    return F.interpolate(x, size=(LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE), mode="bilinear")


def mask_logits_to_box(unet_logits: torch.Tensor, original_size: tuple[int, int]) -> np.ndarray:
    """(h, w) logits -> (4,) box [x0, y0, x1 + 1, y1 + 1] of sigmoid > 0.5 at the original (H, W).

    The whole image when nothing is above 0.5.
    """
    probs = F.interpolate(unet_logits[None, None].float().sigmoid(), size=original_size, mode="bilinear")[0, 0]
    ys, xs = torch.where(probs > 0.5)
    if len(ys) == 0:
        height, width = original_size
        return np.array([0.0, 0.0, width, height])
    return np.array([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1], dtype=np.float64)


def postprocess_masks(low_res: torch.Tensor, embedding: SamImageEmbedding) -> torch.Tensor:
    """(B, 1, 256, 256) decoder logits -> (B, 1, H, W): to img_size, crop the padding, to the original size."""
    x = F.interpolate(low_res.float(), size=(embedding.img_size, embedding.img_size), mode="bilinear")
    h, w = embedding.input_size
    return F.interpolate(x[..., :h, :w], size=embedding.original_size, mode="bilinear")
