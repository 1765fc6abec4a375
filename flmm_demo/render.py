"""Drawing and exporting grounded masks: the one colour palette, overlays, RLE, files.

Everything that turns a `GroundedPhrase` into pixels or bytes lives here, so the app and
the CLI colour the same phrase the same way and write the same files.
"""
from __future__ import annotations

import colorsys
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from flmm_demo.geometry import resize_map
from flmm_demo.types import GroundedPhrase

RGB = tuple[int, int, int]

# Hand-picked first colours (distinct on photos and on white), then golden-ratio hues.
_BASE_COLORS: list[RGB] = [
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (0, 130, 200),    # blue
    (245, 130, 48),   # orange
    (145, 30, 180),   # purple
    (70, 240, 240),   # cyan
    (240, 50, 230),   # magenta
    (210, 245, 60),   # lime
    (0, 128, 128),    # teal
    (170, 110, 40),   # brown
]


def palette(n: int) -> list[RGB]:
    """The first `n` colours of the palette, (r, g, b) in 0..255; the same `n` gives the same list."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colors = list(_BASE_COLORS[:n])
    golden = 0.618033988749895
    i = 0
    while len(colors) < n:
        hue = (0.11 + i * golden) % 1.0
        sat = 0.65 + 0.3 * ((i // 7) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.9)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
        i += 1
    return colors


def hex_colors(n: int) -> list[str]:
    """The same colours as `palette(n)`, as '#rrggbb' strings (for HTML and Gradio)."""
    return [hex_color(c) for c in palette(n)]


def hex_color(color: RGB) -> str:
    """'#rrggbb' of an (r, g, b) colour."""
    return "#{:02x}{:02x}{:02x}".format(*color)


def contrasting_color(image: Image.Image, mask: np.ndarray, taken: Sequence[RGB] = ()) -> RGB:
    """The palette colour that stands out best on the pixels under `mask`.

    A green mask on a green triangle hides the triangle; this picks, among the hand-picked
    colours not in `taken` (the other masks' colours), the first one far from the mean
    colour under the mask, else the farthest one. image: (W, H) PIL; mask: (H, W) bool.
    """
    mask = _check_mask(mask, image.size)
    under = _as_rgb_array(image)[mask].mean(0) if mask.any() else np.full(3, 128.0, np.float32)
    free = [c for c in _BASE_COLORS if c not in taken] or list(_BASE_COLORS)
    distance = [float(np.linalg.norm(np.asarray(c, np.float32) - under)) for c in free]
    # Far enough to read at a glance; palette order keeps the usual colours first.
    return next((c for c, d in zip(free, distance) if d >= _CONTRAST), free[int(np.argmax(distance))])


_CONTRAST = 150.0  # RGB distance (of 441 max) between a mask colour and the pixels under it


def _as_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 copy of the image in 0..255."""
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _check_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) view of `mask`; raises if it does not match the image `size` (W, H)."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (size[1], size[0]):
        raise ValueError(f"mask shape {mask.shape} does not match image size {size[1]}x{size[0]} (HxW)")
    return mask


def overlay(
    image: Image.Image,
    masks: Sequence[np.ndarray],
    colors: Sequence[RGB],
    alpha: float = 0.5,
    dim_others: bool = False,
    outline: bool = True,
) -> Image.Image:
    """Paint each mask in its colour over the image.

    image: PIL image of size (W, H). masks[i]: (H, W) bool. colors[i]: (r, g, b).
    alpha: opacity of the colour fill in [0, 1]. dim_others: darken every pixel outside
    all masks so the selection stands out. outline: draw a solid 2 px border in the
    mask's colour. Later masks are painted over earlier ones. Returns a new RGB image.
    """
    if len(masks) != len(colors):
        raise ValueError(f"got {len(masks)} masks but {len(colors)} colours")
    alpha = float(np.clip(alpha, 0.0, 1.0))
    out = _as_rgb_array(image)
    bool_masks = [_check_mask(m, image.size) for m in masks]
    if dim_others:
        union = np.zeros(out.shape[:2], dtype=bool)
        for m in bool_masks:
            union |= m
        out[~union] *= 0.35
    for mask, color in zip(bool_masks, colors):
        out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
        if outline:
            out[_edges(mask)] = color
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _edges(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool: mask pixels within `width` px (4-connected steps) of the mask's border;
    the image's own border is not one."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = cv2.erode(mask.astype(np.uint8), cross, iterations=width, borderType=cv2.BORDER_CONSTANT,
                      borderValue=1)
    return mask & ~inner.astype(bool)


def heatmap_overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Blend a (H, W) attention heat map in [0, 1] over the image (dark blue -> yellow)."""
    heat = resize_map(heatmap, image.size)
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    # A small two-stop colour ramp: keeps it dependency-free and readable in print.
    cold = np.array([20, 20, 120], dtype=np.float32)
    hot = np.array([255, 230, 40], dtype=np.float32)
    color = cold + heat[..., None] * (hot - cold)
    base = _as_rgb_array(image)
    out = (1.0 - alpha) * base + alpha * color
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def heatmap_tiles(image: Image.Image, heatmaps: Sequence[np.ndarray], labels: Sequence[str],
                  colors: Sequence[RGB], tile_side: int = 320, columns: int = 3) -> Image.Image:
    """Every phrase's raw attention side by side: one `heatmap_overlay` tile per heat map,
    at most `tile_side` px a side, each captioned with its label beside a swatch of its colour."""
    if not heatmaps:
        raise ValueError("no heat maps to tile")
    scale = min(1.0, tile_side / max(image.size))
    small = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    tiles = [with_legend(heatmap_overlay(small, h), [label], [color])
             for h, label, color in zip(heatmaps, labels, colors)]
    width, height = tiles[0].size
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * width + (columns - 1) * 4, rows * height + (rows - 1) * 4), "white")
    for i, tile in enumerate(tiles):
        out.paste(tile, ((i % columns) * (width + 4), (i // columns) * (height + 4)))
    return out


def legend(labels: Sequence[str], colors: Sequence[RGB], width: int = 320) -> Image.Image:
    """A small white image listing each label beside a swatch of its colour."""
    font = ImageFont.load_default()
    row = 20
    img = Image.new("RGB", (width, max(row, row * len(labels)) + 8), "white")
    draw = ImageDraw.Draw(img)
    for i, (label, color) in enumerate(zip(labels, colors)):
        y = 4 + i * row
        draw.rectangle([6, y + 2, 22, y + 16], fill=tuple(color), outline=(0, 0, 0))
        draw.text((30, y + 3), label, fill=(0, 0, 0), font=font)
    return img


def with_legend(image: Image.Image, labels: Sequence[str], colors: Sequence[RGB]) -> Image.Image:
    """The image with `legend(labels, colors)` appended below it."""
    if not labels:
        return image.convert("RGB")
    key = legend(labels, colors, width=image.width)
    out = Image.new("RGB", (image.width, image.height + key.height), "white")
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(key, (0, image.height))
    return out


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of a (H, W) bool mask: {'size': [H, W], 'counts': str}.

    Compressed RLE as pycocotools writes it, with `counts` decoded to a str so the dict
    is JSON-serialisable.
    """
    arr = np.asfortranarray(np.asarray(mask).astype(np.uint8))
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {arr.shape}")
    rle = mask_utils.encode(arr)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of `mask_to_rle`: (H, W) bool."""
    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(bool)


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe form of a phrase."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return slug[:max_len] or "phrase"


def mask_file_name(index: int, phrase: str) -> str:
    """`NN_<phrase>.png`: the one name a phrase's mask file gets (zip export, CLI)."""
    return f"{index:02d}_{slug(phrase)}.png"


def export_png_zip(image: Image.Image, grounded: Sequence[GroundedPhrase], path: str | Path,
                   colors: Sequence[RGB] | None = None, overlay_image: Image.Image | None = None) -> Path:
    """Write a zip of one binary PNG per phrase (255 = inside) plus the coloured overlay.

    Files: `NN_<phrase>.png` (mode 'L', image size), `overlay.png`, `phrases.json`
    (index, phrase, file, colour, box, score). colors: one per phrase (default
    `palette(len(grounded))`). overlay_image: an overlay already drawn (the app's
    display-size one), stored as overlay.png instead of drawing one at full size, which
    takes seconds on a 30-megapixel photo. Returns the zip's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = palette(len(grounded)) if colors is None else list(colors)
    if len(colors) != len(grounded):
        raise ValueError(f"got {len(grounded)} phrases but {len(colors)} colours")
    index = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, (g, color) in enumerate(zip(grounded, colors)):
            mask = _check_mask(g.mask, image.size)
            name = mask_file_name(i, g.phrase.text)
            buf = io.BytesIO()
            # Level 1: a binary mask compresses almost as well, several times faster.
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", compress_level=1)
            zf.writestr(name, buf.getvalue())
            index.append({
                "index": i,
                "phrase": g.phrase.text,
                "file": name,
                "color": hex_color(color),
                "box": list(g.box) if g.box is not None else None,
                "score": float(g.score),
            })
        buf = io.BytesIO()
        drawn = overlay_image if overlay_image is not None else overlay(image, [g.mask for g in grounded], colors)
        drawn.save(buf, format="PNG")
        zf.writestr("overlay.png", buf.getvalue())
        zf.writestr("phrases.json", json.dumps(index, indent=2))
    return path


def coco_dict(image: Image.Image, grounded: Sequence[GroundedPhrase], file_name: str = "image.png") -> dict:
    """COCO-style results: one image, one category per phrase, one RLE annotation per phrase."""
    width, height = image.size
    annotations, categories = [], []
    for i, g in enumerate(grounded):
        mask = _check_mask(g.mask, image.size)
        rle = mask_to_rle(mask)
        area = int(mask.sum())
        if g.box is not None:
            x0, y0, x1, y1 = g.box
            bbox = [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]
        else:
            bbox = [0, 0, 0, 0]
        categories.append({"id": i + 1, "name": g.phrase.text})
        annotations.append({
            "id": i + 1,
            "image_id": 1,
            "category_id": i + 1,
            "segmentation": rle,
            "area": area,
            "bbox": bbox,
            "iscrowd": 0,
            "score": float(g.score),
            "phrase": g.phrase.text,
            "char_span": list(g.phrase.char_span),
        })
    return {
        "images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
        "categories": categories,
        "annotations": annotations,
    }


def export_coco_json(
    image: Image.Image, grounded: Sequence[GroundedPhrase], path: str | Path, file_name: str = "image.png"
) -> Path:
    """Write `coco_dict(...)` as JSON to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_dict(image, grounded, file_name), indent=2))
    return path
