"""The one mask box, mask / heat-map resize, Otsu threshold and mask outline, checked
against the hand-written versions they replaced (kept here as references)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flmm_demo.geometry import mask_box, resize_map, resize_mask
from flmm_demo.heads.training_free import threshold_mask
from flmm_demo.render import _edges


def _blobs(seed: int, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A smooth random (H, W) heat map with a few bright blobs."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    heat = rng.random(shape) * 0.2
    for _ in range(3):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(3, 12)
        heat += rng.uniform(0.3, 1.0) * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))
    return (heat / heat.max()).astype(np.float32)


def _old_otsu_mask(heat: np.ndarray) -> np.ndarray:
    hist, edges = np.histogram(heat, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return heat >= min(float(edges[int(np.argmax(between)) + 1]), float(heat.max()))


def _old_edges(mask: np.ndarray, width: int = 2) -> np.ndarray:
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


@pytest.mark.parametrize("seed", range(6))
def test_opencv_otsu_equals_the_old_histogram_otsu(seed):
    heat = _blobs(seed)
    new = threshold_mask(heat, components=0)
    old = _old_otsu_mask(heat)
    assert (new != old).mean() <= 0.002  # at most a value sitting on a bin edge differs
    assert threshold_mask(np.full((4, 4), 0.5, np.float32), components=0).all()


@pytest.mark.parametrize("seed", range(4))
def test_opencv_outline_equals_the_old_erosion(seed):
    mask = _blobs(seed) > 0.4
    mask[0, :10] = True  # touching the image border: the border is no edge
    for width in (1, 2, 3):
        assert np.array_equal(_edges(mask, width), _old_edges(mask, width))


def test_mask_box_is_exclusive_and_none_when_empty():
    mask = np.zeros((10, 20), bool)
    assert mask_box(mask) is None
    mask[2:5, 7:11] = True
    assert mask_box(mask) == (7, 2, 11, 5)


def test_resize_matches_pil_and_torch_bilinear():
    heat = _blobs(0, (24, 32))
    bigger = resize_map(heat, (96, 72))
    assert bigger.shape == (72, 96) and bigger.dtype == np.float32
    want = F.interpolate(torch.from_numpy(heat)[None, None], size=(72, 96), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(bigger, want[0, 0].numpy(), atol=1e-5)
    pil = np.asarray(Image.fromarray(heat).resize((96, 72), Image.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(bigger, pil, atol=1e-4)
    smaller = resize_map(heat, (10, 8))  # shrinking averages, as PIL does
    pil_small = np.asarray(Image.fromarray(heat).resize((10, 8), Image.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(smaller, pil_small, atol=2e-3)
    mask = heat > 0.5
    pil_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((96, 72), Image.BILINEAR)) > 127
    assert (resize_mask(mask, (96, 72)) != pil_mask).mean() < 0.002
    with pytest.raises(ValueError, match="2-D"):
        resize_map(np.zeros((2, 2, 3)), (4, 4))
