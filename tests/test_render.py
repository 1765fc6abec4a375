"""The palette, overlays and mask exports on small real masks."""
from __future__ import annotations

import json
import zipfile

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_demo import render
from flmm_demo.types import GroundedPhrase, Phrase


def _grounded(text: str, mask: np.ndarray, start: int = 0) -> GroundedPhrase:
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None
    phrase = Phrase(text=text, char_span=(start, start + len(text)), token_span=(0, 1))
    return GroundedPhrase(phrase=phrase, mask=mask, box=box, score=0.9, heatmap=mask.astype(np.float32))


def _scene() -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A 40x30 grey image with a square (left) and a disc (right)."""
    image = Image.new("RGB", (40, 30), (128, 128, 128))
    square = np.zeros((30, 40), bool)
    square[5:15, 3:13] = True
    yy, xx = np.mgrid[:30, :40]
    disc = (yy - 18) ** 2 + (xx - 28) ** 2 <= 6 ** 2
    return image, square, disc


def test_palette_is_deterministic_and_distinct():
    assert render.palette(25) == render.palette(25)
    assert render.palette(5) == render.palette(25)[:5]
    colors = render.palette(25)
    assert len(set(colors)) == 25
    assert all(all(0 <= v <= 255 for v in c) for c in colors)
    first = np.array(colors[:10], dtype=float)
    gaps = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.eye(10) * 1e9
    assert gaps.min() > 60
    assert render.hex_colors(3) == ["#{:02x}{:02x}{:02x}".format(*c) for c in colors[:3]]


def test_overlay_paints_mask_pixels_in_phrase_colour():
    image, square, disc = _scene()
    colors = render.palette(2)
    out = np.asarray(render.overlay(image, [square, disc], colors, alpha=1.0, outline=False))
    assert out.shape == (30, 40, 3)
    assert (out[square] == colors[0]).all()
    assert (out[disc] == colors[1]).all()
    assert (out[~(square | disc)] == 128).all()

    half = np.asarray(render.overlay(image, [square], colors[:1], alpha=0.5, outline=False))
    expected = np.round(0.5 * 128 + 0.5 * np.array(colors[0]))
    assert np.abs(half[square].astype(float) - expected).max() <= 1


def test_overlay_dims_other_pixels_and_rejects_wrong_mask_size():
    image, square, _ = _scene()
    out = np.asarray(render.overlay(image, [square], render.palette(1), alpha=0.5, dim_others=True))
    assert out[~square].max() < 60
    bad = np.zeros((10, 10), bool)
    try:
        render.overlay(image, [bad], render.palette(1))
    except ValueError as err:
        assert "does not match" in str(err)
    else:
        raise AssertionError("a mask of the wrong size must be rejected")


def test_heatmap_overlay_is_brighter_where_attention_is_high():
    image, square, _ = _scene()
    heat = np.zeros((6, 8), np.float32)
    heat[1:3, 1:3] = 1.0  # low-resolution map, resized to the image
    out = np.asarray(render.heatmap_overlay(image, heat)).astype(float)
    assert out.shape == (30, 40, 3)
    assert out[8, 8].sum() > out[25, 35].sum()


def test_rle_round_trip_through_pycocotools():
    _, square, disc = _scene()
    for mask in (square, disc, np.zeros_like(square)):
        rle = render.mask_to_rle(mask)
        json.dumps(rle)
        assert rle["size"] == [30, 40]
        assert (render.rle_to_mask(rle) == mask).all()
        encoded = {"size": rle["size"], "counts": rle["counts"].encode()}
        assert int(mask_utils.area(encoded)) == int(mask.sum())


def test_png_zip_export(tmp_path):
    image, square, disc = _scene()
    grounded = [_grounded("a red square", square), _grounded("the disc", disc, 20)]
    path = render.export_png_zip(image, grounded, tmp_path / "masks.zip")
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        assert names == ["00_a_red_square.png", "01_the_disc.png", "overlay.png", "phrases.json"]
        with zf.open("01_the_disc.png") as f:
            png = np.asarray(Image.open(f))
        assert png.shape == (30, 40)
        assert ((png == 255) == disc).all()
        index = json.loads(zf.read("phrases.json"))
    assert [e["phrase"] for e in index] == ["a red square", "the disc"]
    assert index[0]["color"] == render.hex_colors(2)[0]
    assert index[0]["box"] == [3, 5, 13, 15]


def test_coco_json_export(tmp_path):
    image, square, disc = _scene()
    grounded = [_grounded("a red square", square), _grounded("the disc", disc, 20)]
    path = render.export_coco_json(image, grounded, tmp_path / "masks.json", file_name="scene.png")
    data = json.loads(path.read_text())
    assert data["images"] == [{"id": 1, "file_name": "scene.png", "width": 40, "height": 30}]
    assert [c["name"] for c in data["categories"]] == ["a red square", "the disc"]
    ann = data["annotations"][0]
    assert ann["bbox"] == [3, 5, 10, 10] and ann["area"] == 100
    assert (render.rle_to_mask(ann["segmentation"]) == square).all()
    assert (render.rle_to_mask(data["annotations"][1]["segmentation"]) == disc).all()


def test_with_legend_adds_a_swatch_row_per_label():
    image, square, disc = _scene()
    colors = render.palette(2)
    out = render.with_legend(image, ["square", "disc"], colors)
    assert out.width == 40 and out.height > 30 + 2 * 18
    arr = np.asarray(out)[30:]
    for color in colors:
        assert (arr == color).all(axis=-1).any()


def test_mask_colours_contrast_with_the_pixels_under_them():
    green = (60, 180, 75)
    array = np.full((30, 40, 3), 128, np.uint8)
    array[5:15, 3:13] = green  # a green square
    image = Image.fromarray(array)
    _, square, disc = _scene()
    first = render.contrasting_color(image, square)
    assert first != green and first in render.palette(10)
    assert np.linalg.norm(np.subtract(first, green)) >= 150
    second = render.contrasting_color(image, disc, taken=[first])
    assert second != first  # another mask's colour is not reused while others are free


def test_zip_export_with_chosen_colours_and_a_drawn_overlay(tmp_path):
    image, square, disc = _scene()
    grounded = [_grounded("a red square", square), _grounded("the disc", disc, 20)]
    colours = [(0, 130, 200), (245, 130, 48)]
    shown = Image.new("RGB", (20, 15), (1, 2, 3))  # the app's display-size overlay
    path = render.export_png_zip(image, grounded, tmp_path / "masks.zip", colours, overlay_image=shown)
    with zipfile.ZipFile(path) as zf:
        with zf.open("overlay.png") as f:
            assert Image.open(f).size == (20, 15)
        index = json.loads(zf.read("phrases.json"))
        with zf.open("00_a_red_square.png") as f:
            assert ((np.asarray(Image.open(f)) == 255) == square).all()  # the masks stay full size
    assert [e["color"] for e in index] == ["#0082c8", "#f58230"]


def test_heatmap_tiles_put_every_map_side_by_side():
    image, square, disc = _scene()
    tiles = render.heatmap_tiles(image, [square.astype(np.float32), disc.astype(np.float32)], ["a", "b"],
                                 render.palette(2))
    assert tiles.width == 2 * 40 + 4 and tiles.height > 30
