"""Synthetic scenes of coloured shapes, with exact masks and the language about them.

A scene is 2-5 shapes (6-7 in the held-out mode) on a textured background. The wide
world (`wide=True`) draws what users draw: any rotation, sizes tiny to large, white,
black, tinted, gradient, noisy or textured backgrounds, filled and outlined shapes,
JPEG artefacts, aspect ratios up to 2:1 and 1-7 shapes that may overlap; the classic
world stays exactly as it was, seed for seed. Everything is deterministic given a seed.
The same module writes the text the tiny LMM learns
(descriptions, questions and answers, referring expressions) and a RefCOCO-style
dataset folder so the grounding code reads it like the real thing.

Canonical order of objects is left to right by the centre of the shape.
"""
from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from flmm_demo.prompts import VCOT_HINT, VCOT_LEAD, VCOT_REGION_ALONE

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 205, 30),
    "green": (40, 165, 55),
    "cyan": (40, 200, 215),
    "blue": (35, 70, 215),
    "purple": (150, 50, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Diameter of a shape as a fraction of the image's short side, per size class.
SIZES: dict[str, tuple[float, float]] = {"small": (0.17, 0.21), "medium": (0.27, 0.32), "big": (0.39, 0.45)}
SIZE_WORD = {"small": "small", "medium": "", "big": "big"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DESCRIBE_PROMPTS = (
    "describe the image.",
    "please give me a description of the image.",
    "what is in the image?",
    "what do you see?",
)
MIN_VISIBLE = 0.6  # each shape keeps at least this fraction of its pixels after occlusion

# The wide world. Sizes are continuous from tiny to large (the size word follows the range
# the diameter falls in); colours are drawn around several prototypes per name (the
# project's own and the pure RGB ones a user's drawing tool offers).
WIDE_SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.23), "medium": (0.23, 0.35), "big": (0.35, 0.52)}
WIDE_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((215, 35, 35), (255, 0, 0), (190, 20, 40)),
    "yellow": ((235, 205, 30), (255, 255, 0), (250, 215, 70)),
    "green": ((40, 165, 55), (0, 200, 0), (0, 128, 0)),
    "cyan": ((40, 200, 215), (0, 255, 255), (0, 180, 200)),
    "blue": ((35, 70, 215), (0, 0, 255), (30, 90, 250)),
    "purple": ((150, 50, 185), (128, 0, 128), (160, 32, 240)),
}
BACKGROUNDS: tuple[str, ...] = ("white", "black", "tinted", "gradient", "noisy", "textured")
WIDE_MIN_VISIBLE = 0.5
WIDE_MAX_ASPECT = 2.0
# Rotations that map a shape onto itself: the angle a viewer sees is the rotation modulo this.
SYMMETRY_DEGREES = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "cross": 90.0}


@dataclass(frozen=True)
class SceneObject:
    """One shape. mask: (H, W) bool, the pixels where it is visible (after occlusion).

    cx, cy: centre of the drawn shape in pixels; diameter: its nominal size in pixels;
    depth: drawing order (0 is at the back); angle: its rotation in radians (0 for
    circles); filled: False when only its outline is drawn (the mask is then the outline).
    """

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    diameter: float
    depth: int
    mask: np.ndarray
    angle: float = 0.0
    filled: bool = True

    @property
    def rotation_degrees(self) -> float:
        """How far the shape looks turned from upright, in [0, half its symmetry angle]:
        a square turned 80 degrees looks turned 10; always 0 for circles."""
        period = SYMMETRY_DEGREES[self.shape]
        if period == 0:
            return 0.0
        turned = math.degrees(self.angle) % period
        return min(turned, period - turned)

    @property
    def phrase(self) -> str:
        """'small red circle' (no article)."""
        return " ".join(w for w in (SIZE_WORD[self.size], self.colour, self.shape) if w)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the visible mask, x1/y1 exclusive."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class Scene:
    """image: (H, W, 3) uint8. objects: left to right by centre. background: one of
    BACKGROUNDS; jpeg_quality: the JPEG quality the image went through (None: none)."""

    image: np.ndarray
    objects: tuple[SceneObject, ...]
    seed: int
    background: str = "textured"
    jpeg_quality: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.shape[1], self.image.shape[0]

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, d: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a non-circular shape of diameter d, rotated by angle (radians)."""
    r = d / 2
    if shape == "square":
        s = r * 0.86
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(0.0, -r), (r * 0.95, r * 0.72), (-r * 0.95, r * 0.72)]
    elif shape == "cross":
        a, w = r, r * 0.36
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s_ = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in pts]


def _shape_mask(shape: str, cx: float, cy: float, d: float, angle: float, width: int, height: int,
                outline: int = 0) -> np.ndarray:
    """(H, W) bool of the full (unoccluded) shape; outline > 0: only its outline, that many px wide."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    fill, line = (None, 1) if outline else (1, None)
    if shape == "circle":
        r = d / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=max(1, outline))
    else:
        draw.polygon(_polygon(shape, cx, cy, d, angle), fill=fill, outline=line, width=max(1, outline))
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float32 low-saturation textured background."""
    base = rng.uniform(70, 200) + rng.uniform(-15, 15, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(0, 4)
    if kind == 0:  # gradient
        ang = rng.uniform(0, 2 * np.pi)
        tex = (np.cos(ang) * xx + np.sin(ang) * yy) / max(width, height) * rng.uniform(20, 50)
    elif kind == 1:  # stripes
        ang, period = rng.uniform(0, np.pi), rng.uniform(8, 30)
        tex = np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * 2 * np.pi / period) * rng.uniform(6, 16)
    elif kind == 2:  # checker
        cell = int(rng.integers(8, 28))
        tex = (((xx // cell) + (yy // cell)) % 2 * 2 - 1) * rng.uniform(5, 14)
    else:  # blotches: coarse noise upsampled
        coarse = rng.normal(0, 1, size=(height // 16 + 2, width // 16 + 2)).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)) * rng.uniform(8, 18)
    img = base[None, None, :] + tex[..., None]
    return img + rng.normal(0, rng.uniform(3, 10), size=(height, width, 3))


def make_scene(seed: int, min_objects: int = 2, max_objects: int = 5, wide: bool = False) -> Scene:
    """One scene, fully determined by seed (and wide: the wide world, see make_wide_scene).

    Shapes are placed at random with overlaps allowed, but each keeps at least
    MIN_VISIBLE of its area and their centres are apart enough that 'left of' and the
    left-to-right order are clear.
    """
    if wide:
        return make_wide_scene(seed, min_objects, max_objects)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        short = int(rng.integers(160, 257))
        long_ = int(min(320, round(short * rng.uniform(1.0, 1.5))))
        width, height = (long_, short) if rng.random() < 0.5 else (short, long_)
        n = int(rng.integers(min_objects, max_objects + 1))
        placed = _place_objects(rng, n, width, height)
        if placed is not None:
            break
    else:
        raise RuntimeError(f"could not place {min_objects}-{max_objects} shapes for seed {seed}")
    img = _background(rng, width, height)
    objects = []
    for depth, (colour, shape, size, cx, cy, d, angle, mask) in enumerate(placed):
        rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-18, 18, size=3)
        full = _shape_mask(shape, cx, cy, d, angle, width, height)
        img[full] = rgb + rng.normal(0, 6, size=(int(full.sum()), 3))
        objects.append(SceneObject(colour, shape, size, cx, cy, d, depth, mask, angle))
    objects.sort(key=lambda o: o.cx)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return Scene(image=image, objects=tuple(objects), seed=seed)


def make_wide_scene(seed: int, min_objects: int = 1, max_objects: int = 7) -> Scene:
    """One scene of the wide world, fully determined by seed: a canvas of 128-320 px on
    its short side and an aspect ratio up to 2:1; one of BACKGROUNDS; shapes at any
    rotation, of continuous sizes (WIDE_SIZES), a quarter of them outlined only, each
    keeping WIDE_MIN_VISIBLE of its pixels; the image then JPEG-compressed (quality
    50-95) two times in three."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        short = int(rng.integers(128, 321))
        long_ = int(round(short * rng.uniform(1.0, WIDE_MAX_ASPECT)))
        width, height = (long_, short) if rng.random() < 0.5 else (short, long_)
        n = int(rng.integers(min_objects, max_objects + 1))
        placed = _place_wide_objects(rng, n, width, height)
        if placed is not None:
            break
    else:
        raise RuntimeError(f"could not place {min_objects}-{max_objects} shapes for seed {seed}")
    kind = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    img = _wide_background(rng, kind, width, height)
    objects = []
    for depth, (colour, shape, size, cx, cy, d, angle, outline, mask) in enumerate(placed):
        prototypes = WIDE_COLOURS[colour]
        rgb = np.array(prototypes[int(rng.integers(0, len(prototypes)))], np.float32) + rng.uniform(-15, 15, size=3)
        full = _shape_mask(shape, cx, cy, d, angle, width, height, outline)
        img[full] = rgb + rng.normal(0, rng.uniform(0, 6), size=(int(full.sum()), 3))
        objects.append(SceneObject(colour, shape, size, cx, cy, d, depth, mask, angle, filled=outline == 0))
    objects.sort(key=lambda o: o.cx)
    image = np.clip(img, 0, 255).astype(np.uint8)
    quality = int(rng.integers(50, 96)) if rng.random() < 2 / 3 else None
    if quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        image = np.asarray(Image.open(buffer).convert("RGB"))
    return Scene(image=image, objects=tuple(objects), seed=seed, background=kind, jpeg_quality=quality)


def _wide_background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float32 background of a kind of BACKGROUNDS."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "white":
        img = np.full((height, width, 3), rng.uniform(238, 255), np.float32)
    elif kind == "black":
        img = np.full((height, width, 3), rng.uniform(0, 30), np.float32)
    elif kind == "tinted":  # a flat pale or muted colour, never one of the shapes' hues at full strength
        img = np.broadcast_to(rng.uniform(90, 235) + rng.uniform(-35, 35, size=3), (height, width, 3)).copy()
    elif kind == "gradient":  # between two random tints, in any direction
        a, b = rng.uniform(20, 245, size=3), rng.uniform(20, 245, size=3)
        ang = rng.uniform(0, 2 * np.pi)
        t = np.cos(ang) * xx + np.sin(ang) * yy
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        img = a + (b - a) * t[..., None]
    elif kind == "noisy":
        img = rng.uniform(60, 200) + rng.normal(0, rng.uniform(12, 35), size=(height, width, 3))
        return img.astype(np.float32)
    elif kind == "textured":
        return _background(rng, width, height).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return (img + rng.normal(0, rng.uniform(0, 4), size=(height, width, 3))).astype(np.float32)


def _place_wide_objects(rng: np.random.Generator, n: int, width: int, height: int):
    """Like _place_objects for the wide world: any angle, continuous sizes, outlines
    (outline width in px, 0: filled). None when the shapes do not fit."""
    short = min(width, height)
    sizes = list(WIDE_SIZES) if n <= 4 else ["small", "small", "medium"]
    full_masks, params = [], []
    min_dx = 0.06 * short
    for _ in range(n):
        size = sizes[int(rng.integers(0, len(sizes)))]
        d = max(10.0, rng.uniform(*WIDE_SIZES[size]) * short)
        colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        outline = int(max(2, round(d * rng.uniform(0.05, 0.12)))) if rng.random() < 0.25 else 0
        angle = 0.0 if shape == "circle" else float(rng.uniform(0, 2 * np.pi))
        for _ in range(60):
            cx = rng.uniform(d / 2 + 2, width - d / 2 - 2)
            cy = rng.uniform(d / 2 + 2, height - d / 2 - 2)
            if any(abs(cx - p[3]) < min_dx for p in params):
                continue
            m = _shape_mask(shape, cx, cy, d, angle, width, height, outline)
            if _visible_ok(full_masks + [m], WIDE_MIN_VISIBLE):
                full_masks.append(m)
                params.append((colour, shape, size, cx, cy, d, angle, outline))
                break
        else:
            return None
    return [p + (v,) for p, v in zip(params, _visible(full_masks))]


def _place_objects(rng: np.random.Generator, n: int, width: int, height: int):
    """Draw n shapes' parameters and visible masks; None when they do not fit."""
    short = min(width, height)
    sizes = list(SIZES)
    if n >= 6:  # crowded held-out scenes: mostly small and medium shapes
        sizes = ["small", "small", "medium"]
    specs = []
    for _ in range(n):
        size = sizes[int(rng.integers(0, len(sizes)))]
        d = rng.uniform(*SIZES[size]) * short
        specs.append((list(COLOURS)[int(rng.integers(0, len(COLOURS)))], SHAPES[int(rng.integers(0, len(SHAPES)))], size, d))
    full_masks, params = [], []
    min_dx = 0.06 * short
    for colour, shape, size, d in specs:
        for _ in range(60):
            cx = rng.uniform(d / 2 + 2, width - d / 2 - 2)
            cy = rng.uniform(d / 2 + 2, height - d / 2 - 2)
            if any(abs(cx - p[3]) < min_dx for p in params):
                continue
            angle = 0.0 if shape == "circle" else rng.uniform(-0.2, 0.2)
            m = _shape_mask(shape, cx, cy, d, angle, width, height)
            trial = full_masks + [m]
            if _visible_ok(trial):
                full_masks.append(m)
                params.append((colour, shape, size, cx, cy, d, angle))
                break
        else:
            return None
    visible = _visible(full_masks)
    return [p + (v,) for p, v in zip(params, visible)]


def _visible(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Later masks occlude earlier ones."""
    out, cover = [], np.zeros_like(full_masks[0])
    for m in reversed(full_masks):
        out.append(m & ~cover)
        cover |= m
    return out[::-1]


def _visible_ok(full_masks: list[np.ndarray], min_visible: float = MIN_VISIBLE) -> bool:
    return all(v.sum() >= min_visible * m.sum() for v, m in zip(_visible(full_masks), full_masks))


def scene_stream(seed: int, n: int, held_out: bool = False, wide: bool = False) -> Iterator[Scene]:
    """n scenes of the split named by seed; held_out: crowded scenes of 6-7 shapes;
    wide: the wide world (1-7 shapes, or 6-7 when held_out)."""
    lo, hi = (6, 7) if held_out else (1, 7) if wide else (2, 5)
    for i in range(n):
        yield make_scene(seed * 1_000_003 + i, lo, hi, wide=wide)


# ----------------------------------------------------------------------------- language


RELATIONS = ("left of", "right of", "above", "below")


def _relation(scene: Scene, rel: str, i: int, anchor: int) -> bool | None:
    """Whether object i is `rel` the anchor; None when too close to call."""
    a, b = scene.objects[i], scene.objects[anchor]
    margin = 0.05 * min(scene.size)
    delta = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[rel]
    if abs(delta) < margin:
        return None
    return delta > 0


def _attribute_candidates(obj: SceneObject) -> list[tuple[str, Callable[[SceneObject], bool]]]:
    """Expressions naming an object by its own attributes, each with its matcher."""
    size = SIZE_WORD[obj.size]
    out = [
        (f"the {obj.shape}", lambda o, s=obj.shape: o.shape == s),
        (f"the {obj.colour} {obj.shape}", lambda o, s=obj.shape, c=obj.colour: o.shape == s and o.colour == c),
    ]
    if size:
        out += [
            (f"the {size} {obj.shape}", lambda o, s=obj.shape, z=obj.size: o.shape == s and o.size == z),
            (f"the {obj.phrase}", lambda o, s=obj.shape, c=obj.colour, z=obj.size: (o.shape, o.colour, o.size) == (s, c, z)),
        ]
    return out


# A piece of an assistant's answer: (text, mentioned object, referent object). The two
# indices (into scene.objects) say which object the words name and which object the
# expression they belong to is about: in "the triangle left of the blue square" the
# words "the blue square" mention the square but refer to the triangle. None: no object.
# A short answer about several objects at once ('two' to 'how many squares are there?',
# 'yes' to 'are there any squares?') names them as a tuple of indices, a group; the
# training code supervises groups only when asked to (encode_annotated_chat's groups).
# A 'no' to 'is there a red circle?' is about the objects the question was checked
# against, a NearGroup: those that match it in part (the red ones and the circles), or
# every object when none does; supervised only when asked to (encode_annotated_chat's near).
Segment = tuple[str, "int | tuple[int, ...] | None", "int | tuple[int, ...] | None"]


class NearGroup(tuple):
    """The objects a negative answer was checked against (a tuple of indices)."""


def _group(objs: list[SceneObject], keep) -> tuple[int, ...] | None:
    """The tuple of indices of the objects that keep(obj) selects, or None when none does."""
    idx = tuple(i for i, o in enumerate(objs) if keep(o))
    return idx or None


def _count_answer(objs: list[SceneObject], keep) -> list[Segment]:
    """'how many ...?' answered with the number of objects keep(obj) selects, about them."""
    group = _group(objs, keep)
    return [(NUMBERS[len(group or ())], group, group)]


def _presence_answer(objs: list[SceneObject], keep, near=lambda o: False) -> list[Segment]:
    """'is there ...?' answered 'yes' about the objects keep(obj) selects, or 'no' about a
    NearGroup: the objects near(obj) selects (a partial match), or all of them if none."""
    group = _group(objs, keep)
    if group:
        return [("yes", group, group)]
    checked = NearGroup(_group(objs, near) or range(len(objs)))
    return [("no", checked, checked)]


def _is_there(objs: list[SceneObject], colour: str, shape: str) -> list[Segment]:
    """'is there a red circle?': yes about the red circles, or no about the red objects and the circles."""
    return _presence_answer(objs, lambda o: (o.colour, o.shape) == (colour, shape),
                            near=lambda o: o.colour == colour or o.shape == shape)


def _referring(scene: Scene) -> list[list[tuple[str, int | None, str]]]:
    """For each object (left to right), (expression, anchor index or None, anchor's name):
    the expressions that name it and nothing else.

    Attribute expressions ('the small red circle') come first, then relational ones
    ('the triangle left of the blue square') whose anchor is itself unique.
    """
    objs = scene.objects
    unique_simple: list[list[str]] = []
    for obj in objs:
        names = [t for t, pred in _attribute_candidates(obj) if sum(pred(o) for o in objs) == 1]
        unique_simple.append(names)
    out = []
    for i, obj in enumerate(objs):
        names: list[tuple[str, int | None, str]] = [(n, None, "") for n in unique_simple[i]]
        for anchor, anchor_names in enumerate(unique_simple):
            if anchor == i or not anchor_names:
                continue
            for rel in RELATIONS:
                if _relation(scene, rel, i, anchor) is not True:
                    continue
                same = [j for j, o in enumerate(objs) if o.shape == obj.shape and j != anchor]
                verdicts = [_relation(scene, rel, j, anchor) for j in same]
                if None in verdicts or sum(bool(v) for v in verdicts) != 1:
                    continue
                names.append((f"the {obj.shape} {rel} {anchor_names[0]}", anchor, anchor_names[0]))
        out.append(names)
    return out


def referring_expressions(scene: Scene) -> list[list[str]]:
    """For each object (left to right), the expressions that name it and nothing else.

    Attribute expressions ('the small red circle') come first, then relational ones
    ('the triangle left of the blue square') whose anchor is itself unique.
    """
    return [[name for name, _, _ in names] for names in _referring(scene)]


def _expression_segments(i: int, name: str, anchor: int | None, anchor_name: str) -> list[Segment]:
    """The words of a referring expression of object i: all refer to i; an anchor's
    words mention the anchor."""
    if anchor is None:
        return [(name, i, i)]
    head = name[: len(name) - len(anchor_name)]
    return [(head, i, i), (anchor_name, anchor, i)]


def _list_segments(indices: list[int], scene: Scene) -> list[Segment]:
    """'a red circle, a blue square and a cross' with each 'a ...' mentioning its object."""
    out: list[Segment] = []
    for k, j in enumerate(indices):
        if k:
            out.append((", " if k < len(indices) - 1 else " and ", None, None))
        out.append((f"a {scene.objects[j].phrase}", j, j))
    return out


def text_of(segments: list[Segment]) -> str:
    return "".join(t for t, _, _ in segments)


def describe_segments(scene: Scene) -> list[Segment]:
    """The description, annotated: each 'a <phrase>' mentions its object."""
    return _list_segments(list(range(len(scene.objects))), scene) + [(".", None, None)]


def describe(scene: Scene) -> str:
    """'a red circle, a small blue square and a green triangle.' (left to right)."""
    return text_of(describe_segments(scene))


def questions_and_answer_segments(scene: Scene, rng: np.random.Generator,
                                  short: bool = False) -> list[tuple[str, list[Segment]]]:
    """Unambiguous questions about the scene with their annotated answers (shuffled).

    short: the questions about colour, shape, count, position and yes/no get the short
    answers of short_questions ('red', 'circle', 'three', 'left', 'yes') instead of
    sentences ('the circle is red.'); identifying questions ('which shape is the
    biggest?', 'what is left of the circle?') keep their phrase answers.
    """
    objs = scene.objects
    refs = _referring(scene)
    qa: list[tuple[str, list[Segment]]] = []
    n = len(objs)
    if not short:
        qa.append(("how many shapes are there?",
                   [(f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n != 1 else ''}.", None, None)]))
    for i, obj in enumerate(objs):
        plain = [r for r in refs[i] if obj.colour not in r[0].split()]
        if plain and not short:
            qa.append((f"what colour is {plain[0][0]}?",
                       _expression_segments(i, *plain[0]) + [(f" is {obj.colour}.", None, None)]))
        if refs[i]:
            name = refs[i][int(rng.integers(0, len(refs[i])))]
            qa.append((f"which shape is {name[0]}?",
                       _expression_segments(i, *name) + [(" is ", None, None), (f"the {obj.phrase}", i, i),
                                                         (".", None, None)]))
        for rel in RELATIONS:
            if not refs[i]:
                break
            verdicts = [_relation(scene, rel, j, i) for j in range(n) if j != i]
            if None in verdicts:
                continue
            hits = [j for j in range(n) if j != i and _relation(scene, rel, j, i)]
            ans = _list_segments(hits, scene) + [(".", None, None)] if hits else [("nothing.", None, None)]
            qa.append((f"what is {rel} {refs[i][0][0]}?", ans))
    colours = [o.colour for o in objs]
    for k, obj in enumerate(objs):
        if colours.count(obj.colour) == 1 and not short:
            qa.append((f"what shape is the {obj.colour} one?",
                       [(f"the {obj.colour} one", k, k), (" is ", None, None), (f"a {obj.shape}", k, k),
                        (".", None, None)]))
    by_size = sorted(range(n), key=lambda k: objs[k].diameter, reverse=True)
    if n >= 2 and objs[by_size[0]].diameter >= 1.2 * objs[by_size[1]].diameter:
        k = by_size[0]
        qa.append(("which shape is the biggest?", [(f"the {objs[k].phrase}", k, k), (".", None, None)]))
    if n >= 2 and objs[by_size[-1]].diameter * 1.2 <= objs[by_size[-2]].diameter:
        k = by_size[-1]
        qa.append(("which shape is the smallest?", [(f"the {objs[k].phrase}", k, k), (".", None, None)]))
    if short:
        qa += [(q, a) for _, q, a in short_question_segments(scene, rng)]
    else:
        colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        present = [k for k, o in enumerate(objs) if (o.colour, o.shape) == (colour, shape)]
        if present:
            k = present[0]
            qa.append((f"is there a {colour} {shape}?",
                       [("yes, there is ", None, None), (f"a {objs[k].phrase}", k, k), (".", None, None)]))
        else:
            qa.append((f"is there a {colour} {shape}?", [(f"no, there is no {colour} {shape}.", None, None)]))
    order = rng.permutation(len(qa))
    return [qa[k] for k in order]


def questions_and_answers(scene: Scene, rng: np.random.Generator, short: bool = False) -> list[tuple[str, str]]:
    """Unambiguous questions about the scene with their answers (shuffled)."""
    return [(q, text_of(a)) for q, a in questions_and_answer_segments(scene, rng, short)]


# ----------------------------------------------------------------------------- short answers

QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "count", "position", "yes/no")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Horizontal thirds of the image for 'where is ...?'; centres within this fraction of a
# border between thirds are too close to call and not asked about.
POSITION_MARGIN = 0.04


def _position(scene: Scene, obj: SceneObject) -> str | None:
    """'on the left', 'in the middle' or 'on the right' (thirds of the width); None near a border."""
    x = obj.cx / scene.size[0]
    if min(abs(x - 1 / 3), abs(x - 2 / 3)) < POSITION_MARGIN:
        return None
    return "on the left" if x < 1 / 3 else "in the middle" if x < 2 / 3 else "on the right"


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(0, len(options)))]


def short_question_segments(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, list[Segment]]]:
    """(kind, question, annotated short answer) about colour, shape, count, position and
    yes/no, each answerable from the scene alone: 'what color is the circle?' 'red';
    'what shape is the red one?' 'circle'; 'how many squares are there?' 'two'; 'where
    is the blue square?' 'on the left'; 'is there a green cross?' 'no'. Answers are
    words without a full stop, as VQA answers are. Not shuffled; kinds in QUESTION_KINDS
    order, several questions per kind."""
    objs = scene.objects
    refs = _referring(scene)
    out: list[tuple[str, str, list[Segment]]] = []
    for i, obj in enumerate(objs):  # colour: named without its colour
        plain = [r for r in refs[i] if obj.colour not in r[0].split()]
        if plain:
            name = _pick(rng, plain)
            template = _pick(rng, ["what colour is {}?", "what color is {}?", "which colour is {}?"])
            out.append(("colour", template.format(name[0]), [(obj.colour, i, i)]))
    colours = [o.colour for o in objs]
    for k, obj in enumerate(objs):  # shape: named by its colour alone
        if colours.count(obj.colour) == 1:
            template = _pick(rng, ["what shape is the {} one?", "what shape is the {} object?",
                                   "what is the {} shape?"])
            out.append(("shape", template.format(obj.colour), [(obj.shape, k, k)]))
    everything = _pick(rng, ["how many shapes are there?", "how many objects are there?"])
    out.append(("count", everything, _count_answer(objs, lambda o: True)))
    shape = _pick(rng, list(SHAPES))
    out.append(("count", f"how many {PLURALS[shape]} are there?", _count_answer(objs, lambda o: o.shape == shape)))
    colour = _pick(rng, list(COLOURS))
    out.append(("count", f"how many {colour} shapes are there?", _count_answer(objs, lambda o: o.colour == colour)))
    for i, obj in enumerate(objs):  # position
        where = _position(scene, obj)
        if refs[i] and where is not None:
            out.append(("position", f"where is {refs[i][0][0]}?", [(where, i, i)]))
        if refs[i] and where in ("on the left", "on the right") and rng.random() < 0.5:
            out.append(("position", f"is {refs[i][0][0]} on the left or on the right?", [(where.split()[-1], i, i)]))
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, list(SHAPES))
    if rng.random() < 0.5:  # ask about a shape that is there half the time
        obj = _pick(rng, list(objs))
        colour, shape = obj.colour, obj.shape
    out.append(("yes/no", f"is there a {colour} {shape}?", _is_there(objs, colour, shape)))
    shape = _pick(rng, list(SHAPES))
    out.append(("yes/no", f"are there any {PLURALS[shape]}?", _presence_answer(objs, lambda o: o.shape == shape)))
    for i, obj in enumerate(objs):
        plain = [r for r in refs[i] if obj.colour not in r[0].split()]
        if plain and rng.random() < 0.5:
            asked = obj.colour if rng.random() < 0.5 else _pick(rng, [c for c in COLOURS if c != obj.colour])
            out.append(("yes/no", f"is {plain[0][0]} {asked}?", [("yes" if asked == obj.colour else "no", i, i)]))
    return out


def short_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(kind, question, short answer) triples; see short_question_segments."""
    return [(kind, q, text_of(a)) for kind, q, a in short_question_segments(scene, rng)]


def _answer_pools(scene: Scene, rng: np.random.Generator) -> dict[str, dict[str, list[tuple[str, list[Segment]]]]]:
    """kind -> short answer -> [(question, annotated answer)]: short_question_segments plus
    a count question for every shape and colour, a yes/no question for every object and
    about an absent shape, and 'are there any ...?' for every shape, so the rare answers
    ('in the middle', 'one', 'no') have questions to draw from."""
    pools: dict[str, dict[str, list[tuple[str, list[Segment]]]]] = {}

    def add(kind: str, question: str, segments: list[Segment]) -> None:
        answers = pools.setdefault(kind, {}).setdefault(text_of(segments), [])
        if question not in [q for q, _ in answers]:
            answers.append((question, segments))

    for kind, question, segments in short_question_segments(scene, rng):
        add(kind, question, segments)
    objs = scene.objects
    for shape in SHAPES:
        add("count", f"how many {PLURALS[shape]} are there?", _count_answer(objs, lambda o: o.shape == shape))
        add("yes/no", f"are there any {PLURALS[shape]}?", _presence_answer(objs, lambda o: o.shape == shape))
    for colour in COLOURS:
        add("count", f"how many {colour} shapes are there?", _count_answer(objs, lambda o: o.colour == colour))
    there = {(o.colour, o.shape) for o in objs}
    for colour, shape in sorted(there):
        add("yes/no", f"is there a {colour} {shape}?", _is_there(objs, colour, shape))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in there]
    for k in rng.permutation(len(absent))[:len(there)]:
        colour, shape = absent[int(k)]
        add("yes/no", f"is there a {colour} {shape}?", _is_there(objs, colour, shape))
    return pools


def balanced_short_turns(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, list[Segment]]]:
    """Up to n different (kind, question, annotated short answer), each drawn with
    every kind (QUESTION_KINDS) equally likely and, within a kind, every answer the scene
    allows equally likely: 'in the middle' as often as 'on the left', 'one' as often as
    'zero', 'no' as often as 'yes'. Within a kind, the answers of a scene's own questions
    are already about that even; what chats of these change is how often such questions
    are asked (docs/demo_world_results.md, round 12)."""
    pools = _answer_pools(scene, rng)
    turns: list[tuple[str, str, list[Segment]]] = []
    while len(turns) < n and pools:
        kind = _pick(rng, sorted(pools))
        reply = _pick(rng, sorted(pools[kind]))
        options = pools[kind][reply]
        turns.append((kind, *options.pop(int(rng.integers(0, len(options))))))
        if not options:
            del pools[kind][reply]
        if not pools[kind]:
            del pools[kind]
    return turns


def vcot_probe_turn(scene: Scene, rng: np.random.Generator) -> tuple[str, list[Segment]] | None:
    """Visual chain of thought's probe about one object, as the grounder asks it: a
    question naming the object followed by VCOT_HINT, answered by VCOT_LEAD and the
    question's own expression ('what colour is the circle? first think which object ...'
    -> 'the object most relevant to the question is the circle.'), whose words mention
    and refer to that object. None when no object has an expression."""
    refs = _referring(scene)
    named = [i for i in range(len(refs)) if refs[i]]
    if not named:
        return None
    i = _pick(rng, named)
    name, anchor, anchor_name = _pick(rng, refs[i])
    other = _pick(rng, list(COLOURS))
    question = _pick(rng, [f"what colour is {name}?", f"what color is {name}?", f"where is {name}?",
                           f"is {name} {other}?", f"which shape is {name}?"])
    answer = [(f"{VCOT_LEAD.lower()} ", None, None), *_expression_segments(i, name, anchor, anchor_name),
              (".", None, None)]
    return f"{question} {VCOT_HINT.lower()}", answer


def annotated_conversation(scene: Scene, rng: np.random.Generator, max_turns: int = 3,
                           short: bool = False, vcot_share: float = 0.0,
                           balanced_share: float = 0.0) -> list[tuple[str, list[Segment]]]:
    """A chat of 1-max_turns (user, annotated answer) turns; most open with the description.
    short: questions get short answers (see questions_and_answer_segments). vcot_share:
    the chat's first question is visual chain of thought's probe (vcot_probe_turn) with
    this probability, and each other question is asked after the crop's preamble
    (VCOT_REGION_ALONE) with this probability. balanced_share (with short): the chat is,
    with this probability, 1-max_turns short questions drawn answer-balanced
    (balanced_short_turns) instead."""
    if short and balanced_share > 0 and rng.random() < balanced_share:
        return [(q, a) for _, q, a in balanced_short_turns(scene, rng, int(rng.integers(1, max_turns + 1)))]
    turns: list[tuple[str, list[Segment]]] = []
    qa = questions_and_answer_segments(scene, rng, short)
    if vcot_share > 0:
        qa = [(f"{VCOT_REGION_ALONE.lower()} {q}" if rng.random() < vcot_share else q, a) for q, a in qa]
        probe = vcot_probe_turn(scene, rng) if rng.random() < vcot_share else None
        if probe is not None:
            qa.insert(0, probe)
    n_turns = int(rng.integers(1, max_turns + 1))
    if rng.random() < (0.5 if short else 0.7):
        turns.append((DESCRIBE_PROMPTS[int(rng.integers(0, len(DESCRIBE_PROMPTS)))], describe_segments(scene)))
    for q in qa:
        if len(turns) >= n_turns:
            break
        turns.append(q)
    return turns


def grounding_turn(scene: Scene, rng: np.random.Generator, max_expressions: int = 3) -> tuple[str, list[Segment]]:
    """A description prompt answered by 1-max_expressions referring expressions of
    different objects in random order ('the small red circle, the triangle left of the
    blue square'): the text F-LMM's referring benchmark teacher-forces after its prompt.
    Not a good answer, so it is meant for attention supervision only, never for the
    language-model loss."""
    refs = _referring(scene)
    named = [i for i in rng.permutation(len(refs)) if refs[i]][:int(rng.integers(1, max_expressions + 1))]
    segments: list[Segment] = []
    for k, i in enumerate(named):
        if k:
            segments.append((", ", None, None))
        segments += _expression_segments(int(i), *refs[i][int(rng.integers(0, len(refs[i])))])
    return DESCRIBE_PROMPTS[int(rng.integers(0, len(DESCRIBE_PROMPTS)))], segments


def conversation(scene: Scene, rng: np.random.Generator, max_turns: int = 3) -> list[tuple[str, str]]:
    """A chat of 1-max_turns (user, assistant) turns; most open with the description."""
    return [(q, text_of(a)) for q, a in annotated_conversation(scene, rng, max_turns)]


# ----------------------------------------------------------------------------- refer layout


def _tokens(sentence: str) -> list[str]:
    return sentence.replace(".", " ").replace(",", " ").split()


def write_refer_dataset(out_dir: str | Path, n_images: int, seed: int, split: str, held_out: bool = False,
                        wide: bool = False) -> Path:
    """Write scenes in the RefCOCO layout under out_dir and return it.

    out_dir/instances.json (COCO: images, annotations with RLE segmentation, bbox,
    category_id; categories = the shapes), out_dir/refs(unc).p (pickled list of refs as
    the refer toolkit reads them) and out_dir/images/*.png. Writing a second split into
    the same folder appends to both files, so train and val can live together. wide:
    scenes of the wide world (make_wide_scene).
    """
    from pycocotools import mask as mask_utils

    from flmm_demo.refs_file import read_refs

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    inst_path, refs_path = out / "instances.json", out / "refs(unc).p"
    if inst_path.exists():
        coco = json.loads(inst_path.read_text())
        refs = read_refs(refs_path)
    else:
        coco = {"images": [], "annotations": [], "categories": [
            {"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]}
        refs = []
    next_img = max((im["id"] for im in coco["images"]), default=0) + 1
    next_ann = max((a["id"] for a in coco["annotations"]), default=0) + 1
    next_ref = max((r["ref_id"] for r in refs), default=-1) + 1
    next_sent = max((s["sent_id"] for r in refs for s in r["sentences"]), default=-1) + 1
    for scene in scene_stream(seed, n_images, held_out, wide):
        file_name = f"{split}_{next_img:06d}.png"
        scene.pil().save(out / "images" / file_name)
        w, h = scene.size
        coco["images"].append({"id": next_img, "file_name": file_name, "width": w, "height": h})
        for obj, names in zip(scene.objects, referring_expressions(scene)):
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = obj.box
            cat = SHAPES.index(obj.shape) + 1
            coco["annotations"].append({
                "id": next_ann, "image_id": next_img, "category_id": cat, "segmentation": rle,
                "area": int(obj.mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
            if names:
                sents = []
                for name in names:
                    sents.append({"sent": name, "raw": name, "tokens": _tokens(name), "sent_id": next_sent})
                    next_sent += 1
                refs.append({"ref_id": next_ref, "ann_id": next_ann, "image_id": next_img, "split": split,
                             "sentences": sents, "sent_ids": [s["sent_id"] for s in sents],
                             "category_id": cat, "file_name": file_name})
                next_ref += 1
            next_ann += 1
        next_img += 1
    inst_path.write_text(json.dumps(coco))
    refs_path.write_bytes(pickle.dumps(refs))
    return out
