"""Shape scenes drawn outside the demo world's generator, to check that it generalises.

Issue 15's goals are checked on a generator the project does not see: coloured shapes
drawn with OpenCV, with their own layout, colours and geometry, within the demo
vocabulary. This module is such a generator, written apart from
`flmm_demo.demo_world.scenes` and never used for training: OpenCV draws every shape
(`cv2.fillPoly`, `cv2.circle`, `cv2.polylines`), the colours are its own RGB values,
the triangle is equilateral, the cross has its own arm width, and shapes sit in the
cells of a jittered grid instead of being placed at random. It only borrows the demo
world's data classes (`Scene`, `SceneObject`) so the evaluation can score it with the
same code and wording.

Two kinds of scene, as in the issue:

- close (`varied=False`): conditions near the training ones: a mid-grey canvas with
  mild noise, 160-256 px on the short side, filled shapes of the three size classes,
  turned by at most 10 degrees, 2-5 shapes, PNG;
- varied (`varied=True`): other canvas sizes (128-400 px) with aspect ratios up to 2:1;
  white, dark, tinted or noisy backgrounds; continuous shape sizes (8-50% of the short
  side); squares, triangles and crosses turned up to 25 degrees; a quarter of the shapes
  drawn as thin outlines; JPEG quality 60-90.

    python benchmarks/outside_scenes.py --out outputs/outside --n 6   # save a few to look at
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from flmm_demo.demo_world.scenes import SHAPES, SIZES, Scene, SceneObject  # noqa: E402

# Colours as a drawing tool offers them; each scene jitters them a little.
PALETTE = {
    "red": (225, 30, 30), "yellow": (245, 220, 25), "green": (30, 170, 60),
    "cyan": (30, 210, 225), "blue": (30, 60, 230), "purple": (145, 45, 190),
}
VARIED_BACKGROUNDS = ("white", "dark", "tinted", "noisy")


def size_class(diameter: float, short_side: int) -> str:
    """The demo vocabulary's size word for a diameter (thresholds halfway between the classes)."""
    ratio = diameter / short_side
    small_hi, medium_lo = SIZES["small"][1], SIZES["medium"][0]
    medium_hi, big_lo = SIZES["medium"][1], SIZES["big"][0]
    return "small" if ratio < (small_hi + medium_lo) / 2 else "medium" if ratio < (medium_hi + big_lo) / 2 else "big"


def _outline_points(shape: str, cx: float, cy: float, d: float, angle: float) -> np.ndarray:
    """(K, 2) int32 polygon of a square, an equilateral triangle or a cross."""
    r = d / 2
    if shape == "square":
        pts = cv2.boxPoints(((cx, cy), (d * 0.82, d * 0.82), math.degrees(angle)))
        return np.round(pts).astype(np.int32)
    if shape == "triangle":
        turns = [math.radians(a) + angle for a in (-90, 30, 150)]
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in turns]
    elif shape == "cross":
        w = r * 0.3
        local = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                 (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        pts = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]
    else:
        raise ValueError(shape)
    return np.round(np.array(pts)).astype(np.int32)


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, d: float, angle: float, colour, thickness: int):
    """Draw one shape on canvas (in place); thickness 0 fills it."""
    colour = tuple(int(c) for c in colour)
    if shape == "circle":
        cv2.circle(canvas, (round(cx), round(cy)), round(d / 2), colour, -1 if thickness == 0 else thickness,
                   lineType=cv2.LINE_AA if thickness else cv2.LINE_8)
        return
    pts = _outline_points(shape, cx, cy, d, angle)
    if thickness == 0:
        cv2.fillPoly(canvas, [pts], colour)
    else:
        cv2.polylines(canvas, [pts], True, colour, thickness, lineType=cv2.LINE_AA)


def _background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    if kind == "grey":
        img = np.full((height, width, 3), rng.uniform(110, 170)) + rng.normal(0, 4, (height, width, 3))
    elif kind == "white":
        img = np.full((height, width, 3), 255.0)
    elif kind == "dark":
        img = np.full((height, width, 3), rng.uniform(0, 45)) + rng.uniform(-5, 5, 3)
    elif kind == "tinted":
        img = np.full((height, width, 3), 1.0) * rng.uniform(150, 240, 3)
    else:  # noisy
        img = rng.uniform(80, 180) + rng.normal(0, rng.uniform(15, 40), (height, width, 3))
    return img


def outside_scene(seed: int, varied: bool) -> Scene:
    """One scene (see the module docstring), fully determined by seed and varied."""
    rng = np.random.default_rng([seed, 15, int(varied)])
    short = int(rng.integers(128, 401) if varied else rng.integers(160, 257))
    long_ = int(round(short * rng.uniform(1.0, 2.0 if varied else 1.4)))
    width, height = (long_, short) if rng.random() < 0.6 else (short, long_)
    n = int(rng.integers(2, 6))
    kind = VARIED_BACKGROUNDS[int(rng.integers(0, len(VARIED_BACKGROUNDS)))] if varied else "grey"
    canvas = np.clip(_background(rng, kind, width, height), 0, 255).astype(np.uint8)
    # A jittered grid with at least n cells, one shape per cell, cells in random order.
    cols = max(1, min(n, round(math.sqrt(n * width / height))))
    rows = math.ceil(n / cols)
    cells = rng.permutation(rows * cols)[:n]
    cell_w, cell_h = width / cols, height / rows
    objects, taken = [], []
    for depth, cell in enumerate(cells):
        r_, c_ = divmod(int(cell), cols)
        room = min(cell_w, cell_h) * 0.9
        if varied:
            d = min(room, short * rng.uniform(0.08, 0.5))
        else:
            lo, hi = SIZES[list(SIZES)[int(rng.integers(0, 3))]]
            d = min(room, short * rng.uniform(lo, hi))
        d = max(d, 10.0)
        cy = (r_ + 0.5) * cell_h + rng.uniform(-1, 1) * max(0.0, (cell_h - d) / 2 - 2)
        for _ in range(20):  # shapes of one column: keep the left-to-right order clear
            cx = (c_ + 0.5) * cell_w + rng.uniform(-1, 1) * max(0.0, (cell_w - d) / 2 - 2)
            if all(abs(cx - x) >= 0.05 * short for x in taken):
                break
        else:
            continue
        taken.append(cx)
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        name = list(PALETTE)[int(rng.integers(0, len(PALETTE)))]
        colour = np.clip(np.array(PALETTE[name]) + rng.uniform(-12, 12, 3), 0, 255)
        angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-25, 25) if varied else rng.uniform(-10, 10))
        thickness = int(rng.integers(2, 5)) if varied and rng.random() < 0.25 else 0
        _draw(canvas, shape, cx, cy, d, angle, colour, thickness)
        mask = np.zeros((height, width), np.uint8)
        _draw(mask, shape, cx, cy, d, angle, (1, 1, 1), thickness)
        objects.append(SceneObject(name, shape, size_class(d, short), cx, cy, d, depth, mask.astype(bool), angle,
                                   filled=thickness == 0))
    quality = None
    if varied:
        quality = int(rng.integers(60, 91))
        ok, buffer = cv2.imencode(".jpg", canvas[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        canvas = cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1].copy()
    objects.sort(key=lambda o: o.cx)
    return Scene(image=canvas, objects=tuple(objects), seed=seed, background=kind, jpeg_quality=quality)


def outside_scenes(seed: int, n: int, varied: bool) -> list[Scene]:
    """n scenes of seeds seed, seed + 1, ..."""
    return [outside_scene(seed + i, varied) for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/outside"))
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for varied in (False, True):
        for scene in outside_scenes(args.seed, args.n, varied):
            path = args.out / f"{'varied' if varied else 'close'}-{scene.seed}.png"
            scene.pil().save(path)
            print(path, ", ".join(o.phrase for o in scene.objects))


if __name__ == "__main__":
    main()
