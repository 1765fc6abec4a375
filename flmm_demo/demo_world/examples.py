"""What the app shows and says while the demo model is active: it only knows coloured shapes.

The example images are listed with the demo world's scenes first and the photos captioned
as needing a real preset; an uploaded photo gets a one-line notice in the status.
Whether an image is a photo is judged from two cues, once a median filter has removed
noise and JPEG artefacts: a drawing of shapes needs few colour bins to cover most of its
pixels, and where it needs many (a gradient between two colours) it is smooth, with edges
only around the shapes; a photo needs many bins and has texture everywhere.
Measured: the four bundled photos are all flagged, and 1 of 200 scenes of the wide world
(a strong gradient behind 7 shapes) is flagged too; the notice then only says so.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Colour bins (16 levels a channel) that cover 90% of the pixels: 35-160 in the bundled
# photos, at most 24 in 199 of 200 wide-world scenes; and the share of edge pixels
# (Canny): 0.03-0.13 in the photos, under 0.02 in the smooth gradient scenes.
PHOTO_MIN_BINS = 28
PHOTO_MIN_EDGES = 0.025
PHOTO_CAPTION = "photo: needs a real preset (the demo model knows only coloured shapes)"
SHAPES_CAPTION = "coloured shapes: for the demo model"
PHOTO_NOTICE = ("This looks like a photo: the demo model knows only coloured shapes, so its answers will be "
                "about shapes. Choose a real preset in Settings to ask about photos.")


def _smoothed(image: Image.Image, side: int = 256) -> np.ndarray:
    """(H, W, 3) uint8: the image shrunk to `side` px on its long side, median-filtered (5x5)."""
    rgb = np.asarray(image.convert("RGB"))
    scale = side / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, (max(8, round(rgb.shape[1] * scale)), max(8, round(rgb.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    return cv2.medianBlur(np.ascontiguousarray(rgb), 5)


def colour_bins(smoothed: np.ndarray, cover: float = 0.9) -> int:
    """How many colour bins (16 levels a channel) cover `cover` of the pixels."""
    levels = (smoothed // 16).reshape(-1, 3).astype(np.int64)
    _, counts = np.unique(levels[:, 0] * 256 + levels[:, 1] * 16 + levels[:, 2], return_counts=True)
    share = np.cumsum(np.sort(counts)[::-1]) / counts.sum()
    return int(np.searchsorted(share, cover)) + 1


def edge_share(smoothed: np.ndarray) -> float:
    """The share of pixels on an edge (Canny, thresholds 30 / 90 on the grey image)."""
    return float((cv2.Canny(cv2.cvtColor(smoothed, cv2.COLOR_RGB2GRAY), 30, 90) > 0).mean())


def looks_like_photo(image: Image.Image) -> bool:
    """Whether the image looks like a photo rather than a drawing of shapes."""
    smoothed = _smoothed(image)
    return colour_bins(smoothed) >= PHOTO_MIN_BINS and edge_share(smoothed) >= PHOTO_MIN_EDGES


def example_samples(folder: str | Path, demo: bool) -> list[tuple[str, str]]:
    """(path, caption) of the images in folder, sorted by name: drawings first, then photos.
    With the demo model active (demo) the photos are captioned as needing a real preset."""
    paths = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    photo = {p: looks_like_photo(Image.open(p)) for p in paths}
    captions = (SHAPES_CAPTION, PHOTO_CAPTION) if demo else ("coloured shapes", "photo")
    return [(str(p), captions[photo[p]]) for p in sorted(paths, key=lambda p: (photo[p], p.name))]


def photo_notice(image: Image.Image, demo: bool) -> str:
    """The status line's notice for an uploaded image ('' unless the demo model is active
    and the image looks like a photo)."""
    return PHOTO_NOTICE if demo and looks_like_photo(image) else ""
