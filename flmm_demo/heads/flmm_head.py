"""The F-LMM head: U-Net mask decoder plus an optional SAM refiner, with save/load.

    head = FlmmHead(FlmmHeadConfig(num_layers=24, num_heads=16, hidden_size=2048))
    out = head.predict(phrase_maps, phrase_hidden, view, image_size, sam_embedding)
    out.mask_logits  # (H, W) at the image size; mask = out.mask_logits > 0

`save_pretrained(dir)` writes config.json + model.safetensors; `from_pretrained(dir)`
reads them back. Official F-LMM .pth files load with `heads.checkpoint.load_official_flmm`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flmm_demo.heads.refiner import SamRefiner, dense_pad_value
from flmm_demo.heads.sam import SamImageEmbedding, sam_geometry
from flmm_demo.heads.unet import UNetMaskDecoder, covers_image, crop_to_image
from flmm_demo.types import ImageView

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# (layers, heads, hidden) of the LLMs F-LMM released heads for, to name them in errors.
KNOWN_LMMS = {
    (24, 16, 2048): "DeepSeek-VL-1.3B",
    (30, 32, 4096): "DeepSeek-VL-7B",
    (32, 32, 4096): "LLaVA-1.5-7B / LLaVA-NeXT-7B",
    (18, 8, 2048): "MiniGemini-2B",
}


def describe_lmm(channels: int, layers: int, hidden: int) -> str:
    """E.g. '384 attention channels (24 layers x 16 heads, hidden 2048: DeepSeek-VL-1.3B-like)'."""
    heads = channels // layers if layers else 0
    name = KNOWN_LMMS.get((layers, heads, hidden))
    suffix = f": {name}-like" if name else ""
    return f"{channels} attention channels ({layers} layers x {heads} heads, hidden {hidden}{suffix})"


@dataclass(frozen=True)
class FlmmHeadConfig:
    """What a head must agree on with its LMM.

    num_layers, num_heads: of the LLM's decoder (channels = num_layers * num_heads).
    hidden_size: the LLM's hidden size (input of the refiner's text projection).
    sam_variant: 'vit_b' | 'vit_l' | 'vit_h', the SAM image encoder the refiner was trained
    with (F-LMM used vit_l); 'vit_tiny' for the demo world's own small SAM.
    sam_checkpoint: path of that SAM checkpoint when training, if known (informational).
    input_grids: 1 for one token grid over the whole image (LLaVA-1.5, DeepSeek-VL); 2 for
        F-LMM's LLaVA-NeXT heads, fed the base grid resized bilinearly onto the tile grid
        and the tile grid itself, stacked on the channels ([base L*H, tiles L*H]).
    """

    num_layers: int
    num_heads: int
    hidden_size: int
    sam_variant: str = "vit_l"
    use_refiner: bool = True
    sam_checkpoint: str | None = None
    input_grids: int = 1

    @property
    def in_channels(self) -> int:
        return self.num_layers * self.num_heads * self.input_grids


class LmmShape(Protocol):
    """What a head needs to know about its LMM (a Backend has these attributes)."""

    num_layers: int
    num_heads: int
    hidden_size: int


class HeadOutput(NamedTuple):
    """mask_logits: (H, W) float32 on the CPU at the image size (SAM-refined when possible);
    unet_logits: (h, w) U-Net logits on its own grid, cropped to the image area."""

    mask_logits: torch.Tensor
    unet_logits: torch.Tensor


class FlmmHead(nn.Module):
    """mask_head (U-Net) + sam (SamRefiner, when config.use_refiner)."""

    def __init__(self, config: FlmmHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_head = UNetMaskDecoder(config.in_channels)
        self.sam = (
            SamRefiner(config.hidden_size, config.num_layers, sam_geometry(config.sam_variant))
            if config.use_refiner else None
        )

    def check_compatible(self, lmm: LmmShape) -> None:
        """Raise ValueError when this head was trained for an LMM of another shape."""
        config = self.config
        expected = (config.num_layers, config.num_heads, config.hidden_size)
        if (lmm.num_layers, lmm.num_heads, lmm.hidden_size) != expected:
            raise ValueError(
                f"this head expects {describe_lmm(config.in_channels, config.num_layers, config.hidden_size)} "
                f"but the model has {lmm.num_layers * lmm.num_heads} ({lmm.num_layers} x {lmm.num_heads}, "
                f"hidden {lmm.hidden_size}); use the head trained for this LMM"
            )

    @torch.no_grad()
    def predict(
        self,
        phrase_maps: torch.Tensor | Sequence[torch.Tensor],
        phrase_hidden: torch.Tensor | None,
        view: ImageView | Sequence[ImageView],
        image_size: tuple[int, int],
        sam_embedding: SamImageEmbedding | None = None,
    ) -> HeadOutput:
        """Ground one phrase.

        phrase_maps: (L*H, rows, cols) the phrase's attention on the view's token grid.
        phrase_hidden: (L, n, D) hidden states of the phrase tokens (needed by the refiner).
        view: the grid's place in the image; image_size: (W, H) of the original image.
        Lists of maps and views (AnswerAttention.phrase_maps / .views) are accepted: the
        first view that covers the whole image is used, as F-LMM's heads see one grid.
        sam_embedding: the image's SAM embedding; without it (or without a refiner) the
        U-Net logits are resized bilinearly to the image size.
        To ground several phrases of one answer exactly as F-LMM does, use predict_phrases.
        """
        return self.predict_phrases([phrase_maps], [phrase_hidden], view, image_size, sam_embedding)[0]

    @torch.no_grad()
    def predict_phrases(
        self,
        phrase_maps: Sequence[torch.Tensor | Sequence[torch.Tensor]],
        phrase_hidden: Sequence[torch.Tensor | None],
        view: ImageView | Sequence[ImageView],
        image_size: tuple[int, int],
        sam_embedding: SamImageEmbedding | None = None,
    ) -> list[HeadOutput]:
        """Ground the phrases of one answer together, as F-LMM's `ground` does.

        phrase_maps[i], phrase_hidden[i]: as in `predict`, for phrase i. Differs from
        calling predict per phrase in one way: the SAM dense prompt of every phrase is
        padded with min(-1, min over all phrases' U-Net logits), F-LMM's batch rule.
        """
        if len(phrase_maps) != len(phrase_hidden):
            raise ValueError(f"got maps for {len(phrase_maps)} phrases but hidden states for {len(phrase_hidden)}")
        if not phrase_maps:
            return []
        grids = []
        for maps in phrase_maps:
            if self.config.input_grids == 2:
                maps, grid_view = base_and_tiles(maps, view, image_size)
            elif not isinstance(view, ImageView):
                maps, grid_view = pick_full_view(maps, view, image_size)
            else:
                grid_view = view
            if maps.dim() != 3:
                raise ValueError(f"expected phrase_maps of shape (layers*heads, rows, cols), got {tuple(maps.shape)}")
            grids.append(maps)
        param = self.mask_head.conv_seg.weight
        logits = self.mask_head(torch.stack(grids).to(device=param.device, dtype=param.dtype))[:, 0]
        unet_logits = crop_to_image(logits, grid_view.box, image_size).float()  # (P, h, w)
        width, height = image_size
        refine = self.sam is not None and sam_embedding is not None and all(h is not None for h in phrase_hidden)
        if refine:
            if sam_embedding.original_size != (height, width):
                raise ValueError(
                    f"the SAM embedding is of a {sam_embedding.original_size[1]}x{sam_embedding.original_size[0]} "
                    f"image but the phrase belongs to a {width}x{height} one; encode the same image"
                )
            pad_value = dense_pad_value(unet_logits)
            mask_logits = [
                self.sam(unet, hidden, sam_embedding, pad_value).float()
                for unet, hidden in zip(unet_logits, phrase_hidden)
            ]
        else:
            mask_logits = F.interpolate(unet_logits[None], size=(height, width), mode="bilinear")[0]
        return [HeadOutput(mask.cpu(), unet.cpu()) for mask, unet in zip(mask_logits, unet_logits)]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (float32) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        tensors = {name: t.detach().float().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> FlmmHead:
        """Load a head written by save_pretrained, computing in `dtype` (float32 by default:
        weights may be stored in half precision to keep the file small, but half-precision
        convolutions are slow on a CPU)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found; expected a folder written by FlmmHead.save_pretrained "
                "(for an official F-LMM .pth use flmm_demo.heads.load_official_flmm)"
            )
        config = FlmmHeadConfig(**json.loads(config_path.read_text()))
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in load_file(str(directory / WEIGHTS_NAME)).items()}
        return cls.from_state_dict(config, state).to(device).eval()

    @classmethod
    def from_state_dict(cls, config: FlmmHeadConfig, state: dict[str, torch.Tensor]) -> FlmmHead:
        """A head whose every tensor comes from `state` (names as in state_dict(); strict).

        Built on the meta device, so no time is spent on a random initialisation.
        """
        with torch.device("meta"):
            head = cls(config)
        head.load_state_dict(state, strict=True, assign=True)
        return head


def pick_full_view(
    maps: Sequence[torch.Tensor], views: Sequence[ImageView], image_size: tuple[int, int]
) -> tuple[torch.Tensor, ImageView]:
    """The first (maps, view) pair whose view box covers the whole (W, H) image."""
    width, height = image_size
    for grid_map, view in zip(maps, views):
        if covers_image(view.box, image_size):
            return grid_map, view
    raise ValueError(
        f"none of the views {[v.name for v in views]} covers the whole {width}x{height} image; "
        "an F-LMM head needs one grid over the full image"
    )


def base_and_tiles(
    maps: Sequence[torch.Tensor], views: Sequence[ImageView], image_size: tuple[int, int]
) -> tuple[torch.Tensor, ImageView]:
    """F-LMM's LLaVA-NeXT head input: (2*L*H, rows, cols) and the grid it lies on.

    maps / views: [base (L*H, f, f) over the whole image, tiles (L*H, rows, cols)], as the
    LLaVA-NeXT backend returns them. The base grid is resized bilinearly to the tile grid
    and put first. F-LMM takes the unpadded tile grid for the image itself (its masks are
    compared with the image's resized to that grid), so the grid's box is the whole image.
    """
    if isinstance(views, ImageView) or len(views) != 2 or not covers_image(views[0].box, image_size):
        raise ValueError("a two-grid (LLaVA-NeXT) head needs the base view over the whole image and the tiles view")
    base, tiles = maps
    resized = F.interpolate(base[None].float(), size=tuple(tiles.shape[-2:]), mode="bilinear")[0]
    width, height = image_size
    grid_view = ImageView(views[1].name, views[1].grid, (0.0, 0.0, float(width), float(height)))
    return torch.cat([resized, tiles.float()], 0), grid_view
