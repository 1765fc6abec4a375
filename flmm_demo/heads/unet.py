"""F-LMM's mask decoder: a small U-Net that turns attention maps into mask logits.

The input is one phrase's attention over the image-token grid, one channel per
(layer, head) of the LMM. Module names follow the mmseg UNet that F-LMM trained
(`encoder.1.1.convs.0.conv.weight`, `decoder.0.upsample.interp_upsample.1.gn.bias`, ...)
so the released checkpoints load without renaming.

Input handling, as in F-LMM's `UNetHead`:
  1. each channel is divided by its spatial sum (clamped at 1e-12), so every map is a
     distribution over patches;
  2. bilinear upsampling by max(1, 64 / max(h, w)) in float32 (24x24 -> 64x64);
  3. zero padding at the bottom/right to a multiple of 8 (three 2x2 max-pools);
  4. the network, then a crop back to the upsampled size and a 1x1 conv to one logit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = 64
NUM_STAGES = 4
UPSAMPLE_TARGET = 64  # F-LMM's `upsample_input`


class ConvNormReLU(nn.Module):
    """conv (no bias) -> GroupNorm(1 group) -> ReLU; names `conv` and `gn` as in mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(num_groups=1, num_channels=out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gn(self.conv(x)))


class ConvBlock(nn.Module):
    """Two 3x3 ConvNormReLU layers (mmseg's BasicConvBlock with num_convs=2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormReLU(in_channels, out_channels, 3),
            ConvNormReLU(out_channels, out_channels, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Upsample2x(nn.Module):
    """Bilinear x2 upsampling computed in float32 (F-LMM patches mmseg's Upsample this way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [2 * s for s in x.shape[-2:]]
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)


class InterpConv(nn.Module):
    """Bilinear x2 upsample, then 1x1 ConvNormReLU; `interp_upsample.1` is the conv, as in mmseg."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.interp_upsample = nn.Sequential(Upsample2x(), ConvNormReLU(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interp_upsample(x)


class UpConvBlock(nn.Module):
    """One decoder step: upsample the deeper features, concatenate [skip, upsampled], ConvBlock."""

    def __init__(self, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.conv_block = ConvBlock(2 * skip_channels, skip_channels)
        self.upsample = InterpConv(in_channels, skip_channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([skip, self.upsample(x)], dim=1))


class UNetMaskDecoder(nn.Module):
    """Attention maps (B, C, h, w) -> mask logits (B, 1, h', w') on the upsampled grid.

    in_channels = num_layers * num_heads of the LMM (384 for DeepSeek-VL-1.3B, 1024 for
    LLaVA-1.5-7B). h' = floor(h * s), w' = floor(w * s) with s = max(1, 64 / max(h, w)).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = [BASE_CHANNELS * 2**i for i in range(NUM_STAGES)]  # 64, 128, 256, 512
        # Stage 0 is a ConvBlock at index 0; stages 1-3 are [MaxPool, ConvBlock], so their
        # blocks sit at index 1, matching the released names `encoder.{i}.1.*`.
        stages = [nn.Sequential(ConvBlock(in_channels, widths[0]))]
        for i in range(1, NUM_STAGES):
            stages.append(nn.Sequential(nn.MaxPool2d(kernel_size=2), ConvBlock(widths[i - 1], widths[i])))
        self.encoder = nn.ModuleList(stages)
        # decoder[i] brings stage i+1 back to stage i; it runs deepest first.
        self.decoder = nn.ModuleList(UpConvBlock(widths[i + 1], widths[i]) for i in range(NUM_STAGES - 1))
        self.conv_seg = nn.Conv2d(widths[0], 1, kernel_size=1)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        """attn: (B, C, h, w) attention in [0, 1] -> logits (B, 1, h', w') float32."""
        if attn.dim() != 4 or attn.shape[1] != self.in_channels:
            raise ValueError(
                f"expected attention maps of shape (batch, {self.in_channels}, h, w), got {tuple(attn.shape)}"
            )
        x = prepare_attention(attn.to(self.conv_seg.weight.dtype))
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, 2 ** (NUM_STAGES - 1))
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
        return self.conv_seg(x[..., :h, :w])


def upsample_factor(h: int, w: int, target: int = UPSAMPLE_TARGET) -> float:
    """F-LMM's input scale: max(1, target / max(h, w)); 24x24 -> 64/24."""
    return max(1.0, target / max(h, w))


def prepare_attention(attn: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h', w'): per-channel sum normalisation, then bilinear upsampling.

    The upsampling uses `scale_factor` (not a target size) exactly as F-LMM does, so the
    output size is floor(h * s) and the sampling grid follows s, in float32.
    """
    x = attn / attn.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    h, w = x.shape[-2:]
    scale = upsample_factor(h, w)
    if scale > 1.0:
        x = F.interpolate(x.float(), scale_factor=scale, mode="bilinear").to(attn.dtype)
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, h, w) at the bottom/right so h and w are multiples of `multiple`."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, math.ceil(w / multiple) * multiple - w, 0, math.ceil(h / multiple) * multiple - h))


# F-LMM computes the crop from integers of the processor's frame, so its ratios are exact.
# Ours come from a view box in original pixels, where a ratio that should be whole can
# come out as 14.999999999999998 (a 200x376 image in DeepSeek-VL's 384 frame) and int()
# would drop a cell. The true ratios are fractions with the processor side (hundreds)
# as denominator, so snapping within 1e-6 only absorbs float error.
_SNAP = 1e-6


def _floor(value: float) -> int:
    return math.floor(value + _SNAP)


def crop_window(out_size: int, pad_before: float, image_side: float, padded_side: float) -> tuple[int, int]:
    """(start, length) of the image inside one axis of an output grid of `out_size` cells.

    F-LMM's rule for images padded to a centred square: start = int(pad_before * n / padded),
    length = int(image_side * n / padded + 0.5), all lengths in the same unit. F-LMM uses
    the processor's frame (resized image side, its padding and the padded side, e.g. 384
    for DeepSeek-VL, 336 for LLaVA-1.5); a view box in original pixels whose ratios equal
    that frame's gives the same numbers.
    """
    start = _floor(pad_before * out_size / padded_side)
    length = _floor(image_side * out_size / padded_side + 0.5)
    return start, max(1, min(length, out_size - start))


def covers_image(view_box: tuple[float, float, float, float], image_size: tuple[int, int]) -> bool:
    """Whether the view box (x0, y0, x1, y1) spans the whole (W, H) image.

    Boxes derived from a processor's scale carry float error (701.9999999999999 for 702),
    so a thousandth of a pixel is forgiven.
    """
    x0, y0, x1, y1 = view_box
    width, height = image_size
    tol = 1e-3
    return x0 <= tol and y0 <= tol and x1 >= width - tol and y1 >= height - tol


def crop_to_image(
    logits: torch.Tensor,
    view_box: tuple[float, float, float, float],
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Crop (..., h, w) logits that span `view_box` down to the image area.

    view_box: (x0, y0, x1, y1) in original-image pixels covered by the token grid; for a
    pad-to-square view it is (-pad_left, -pad_top, W + pad_right, H + pad_bottom).
    image_size: (W, H). Returns (..., mh, mw) following F-LMM's crop rule.
    """
    x0, y0, x1, y1 = view_box
    width, height = image_size
    if not covers_image(view_box, image_size):
        raise ValueError(
            f"the view {view_box} does not cover the whole {width}x{height} image; F-LMM's heads "
            "expect a grid over the full (possibly padded) image"
        )
    h, w = logits.shape[-2:]
    top, mh = crop_window(h, -y0, height, y1 - y0)
    left, mw = crop_window(w, -x0, width, x1 - x0)
    return logits[..., top : top + mh, left : left + mw]
