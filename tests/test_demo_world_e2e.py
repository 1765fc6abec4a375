"""The demo world end to end: a miniature head training run, and the shipped weights' figure.

1. CI-sized: the tiny LMM mode trains a LLaVA in seconds, `train` fits an F-LMM head on it
   for a few steps, alone and with a SAM refiner on a tiny SAM (the loss must fall), and
   the benchmark script runs on it.
2. The shipped checkpoints (checkpoints/demo-shapes/lmm, head and sam_vit_tiny) load and,
   on held-out scenes of a seed used nowhere else, reach the head's cIoU that
   docs/demo_world_results.md reports (U-Net alone and with its SAM refiner), within a
   stated margin.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flmm_demo.demo_world import DEFAULT_LMM_DIR, write_refer_dataset  # noqa: E402
from flmm_demo.backends import load_backend  # noqa: E402
from flmm_demo.grounder import Grounder  # noqa: E402
from flmm_demo.heads import FlmmHead, load_head, load_sam  # noqa: E402
from flmm_demo.heads.sam import build_tiny_sam  # noqa: E402
from flmm_demo.training import train  # noqa: E402
from flmm_demo.training.evaluate import EvalConfig, evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_HEAD = REPO / "checkpoints" / "demo-shapes" / "head"
SHIPPED_SAM = REPO / "checkpoints" / "demo-shapes" / "sam_vit_tiny.safetensors"
RESULTS_DOC = REPO / "docs" / "demo_world_results.md"
# Held-out scenes for the shipped-weights check: not the head's training seed (1), not the
# benchmark's (1000+), not the LMM's (100-105).
CHECK_SEED = 2024
CHECK_SCENES = 20
CHECK_OBJECTS = None  # every sentence of every object: about 420 expressions
# Allowed shortfall from the documented cIoU on this small set. cIoU is dominated by the
# large shapes of a few scenes: 6 scenes of this seed scored 0.565 against 0.749 documented
# over 100, 20 scenes 0.668, 40 scenes 0.696 (seed 3000, 40 scenes: 0.743).
MARGIN = 0.10


def _shipped() -> bool:
    return all((p / "config.json").exists() for p in (REPO / DEFAULT_LMM_DIR, SHIPPED_HEAD)) and SHIPPED_SAM.exists()


def test_miniature_run_trains_a_head_whose_loss_falls_and_the_benchmark_runs(tiny_demo_lmm, tmp_path):
    lmm, _ = tiny_demo_lmm  # the tiny mode of the demo LMM, trained once for the session
    write_refer_dataset(tmp_path / "data", 3, seed=1, split="train")

    config = train.TrainConfig(
        model=str(lmm), data=tmp_path / "data", out=tmp_path / "run", epochs=4, lr=1e-3,
        log_every=100, checkpoint_every=1000, head_dtype="float16",
    )
    result = train.train(config)
    assert result.step == 12 and len(result.losses) == 12
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.05, result.losses

    head = FlmmHead.from_pretrained(result.head_dir)  # stored in float16, computed in float32
    stored = load_file(str(result.head_dir / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    assert not head.config.use_refiner and head.mask_head.conv_seg.weight.dtype == torch.float32
    assert (result.head_dir / "model.safetensors").stat().st_size < 20 * 2**20

    # The same with F-LMM's SAM refiner, on a tiny SAM (untrained here: `train-sam` is
    # tested in test_demo_world_sam.py); the refiner learns from the U-Net's dense prompt.
    from flmm_demo.demo_world.sam import save as save_sam

    sam_file = tmp_path / "sam_vit_tiny.safetensors"
    save_sam(build_tiny_sam(), sam_file)
    refined = train.train(dataclasses.replace(config, out=tmp_path / "run-sam", sam=sam_file, sam_variant="vit_tiny"))
    first, last = sum(refined.losses[:3]) / 3, sum(refined.losses[-3:]) / 3
    assert last < first - 0.05, refined.losses
    head = FlmmHead.from_pretrained(refined.head_dir)
    assert head.config.use_refiner and head.config.sam_variant == "vit_tiny"

    sys.path.insert(0, str(REPO / "benchmarks"))
    import eval_demo_world

    out = tmp_path / "table.json"
    eval_demo_world.main([
        "--model", str(lmm), "--head", str(refined.head_dir), "--sam", str(sam_file),
        "--scenes", "1", "--crowded-scenes", "1",
        "--limit", "2", "--lmm-scenes", "2", "--phrase-scenes", "1", "--outside-scenes", "1",
        "--outside-lmm-scenes", "1", "--json", str(out),
    ])
    table = json.loads(out.read_text())
    assert set(table["outside"]) == {"outside, close to training", "outside, varied"}
    for rows in table["outside"].values():
        assert 0.0 <= rows["U-Net head + SAM refiner (trained)"]["all"]["all"]["ciou"] <= 1.0
    assert {"outside, close to training", "outside, varied"} <= set(table["answers"])
    for rows in table["segmentation"].values():
        assert {"U-Net head (trained)", "U-Net head + SAM refiner (trained)", "training-free",
                "training-free + SAM prompts", "oracle: ground-truth box"} <= set(rows)
        assert all(0.0 <= r["ciou"] <= 1.0 and r["n"] > 0 for r in rows.values())
        assert rows["oracle: ground-truth box"]["ciou"] > 0.5  # a filled box covers most of a shape
    assert set(table["lmm"]) == {"regular (2-5 shapes)", "crowded (6-7 shapes)"}

    # The LMM alone (no head): training-free rows only; a set of 0 scenes is left out.
    eval_demo_world.main([
        "--model", str(lmm), "--head", "", "--sam", "", "--scenes", "1", "--crowded-scenes", "0",
        "--limit", "2", "--lmm-scenes", "1", "--phrase-scenes", "0", "--json", str(out),
    ])
    table = json.loads(out.read_text())
    (rows,) = table["segmentation"].values()
    assert "training-free" in rows and "U-Net head (trained)" not in rows and table["phrases"] is None


def documented_head_ciou(row: str = "U-Net head (trained)") -> float:
    """A head row's cIoU on regular held-out scenes, as docs/demo_world_results.md states it."""
    text = RESULTS_DOC.read_text()
    match = re.search(r"\| regular \(2-5 shapes\) \| " + re.escape(row) + r" \| ([0-9.]+) \|", text)
    assert match, f"no {row!r} row in {RESULTS_DOC}"
    return float(match.group(1))


@pytest.mark.skipif(not _shipped(), reason="no shipped demo-shapes LMM, head and SAM")
def test_shipped_weights_reach_the_documented_ciou(tmp_path):
    for path in (*(REPO / DEFAULT_LMM_DIR).iterdir(), *SHIPPED_HEAD.iterdir(), SHIPPED_SAM):
        assert path.stat().st_size < 20 * 2**20, path
    write_refer_dataset(tmp_path, CHECK_SCENES, seed=CHECK_SEED, split="val")
    backend = load_backend(str(REPO / DEFAULT_LMM_DIR), device="cpu", dtype=torch.float32)
    head = load_head(SHIPPED_HEAD, backend)
    assert head.config.use_refiner and head.config.sam_variant == "vit_tiny"
    grounder = Grounder(backend, head, load_sam(SHIPPED_SAM))
    for refine, row in ((False, "U-Net head (trained)"), (True, "U-Net head + SAM refiner (trained)")):
        config = EvalConfig(model=str(REPO / DEFAULT_LMM_DIR), data=tmp_path, split="val", protocol="every",
                            refine=refine, limit=CHECK_OBJECTS, device="cpu")
        result = evaluate(config, grounder=grounder, mode="head")
        assert result.scores.n >= 40 and result.refined == refine
        documented = documented_head_ciou(row)
        assert result.scores.ciou >= documented - MARGIN, (row, result.scores, documented)


# Scenes drawn here with plain PIL calls, independently of flmm_demo.demo_world.scenes:
# other image sizes, flat or noisy backgrounds, hand-placed shapes, pure RGB colours.
# (width, height, background, [(colour, shape, centre x, centre y, diameter)], {expression: object})
# Every expression's mask must overlap its own shape most; their mean IoU must reach:
DRAWN_MIN_MEAN_IOU = 0.65
DRAWN = [
    (300, 200, "flat", [("red", "circle", 80, 100, 70), ("blue", "square", 220, 90, 80)],
     {"the red circle": 0, "the blue square": 1, "the square": 1}),
    (200, 260, "noise", [("green", "triangle", 100, 70, 90), ("yellow", "circle", 70, 200, 60),
                         ("purple", "square", 150, 190, 55)],
     {"the green triangle": 0, "the yellow circle": 1, "the purple square": 2}),
    (256, 256, "flat", [("cyan", "square", 70, 70, 60), ("red", "triangle", 180, 160, 100)],
     {"the cyan square": 0, "the triangle": 1}),
]
RGB = {"red": (220, 30, 30), "yellow": (240, 210, 20), "green": (30, 170, 60), "cyan": (30, 200, 220),
       "blue": (30, 60, 220), "purple": (150, 40, 190)}


def drawn_scene(width, height, background, shapes):
    """(PIL image, [(H, W) bool mask per shape]) drawn with PIL, later shapes on top."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(width * height)
    base = np.full((height, width, 3), 150.0)
    if background == "noise":
        base += rng.normal(0, 12, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    masks = []
    for colour, shape, cx, cy, d in shapes:
        layer = Image.new("L", (width, height), 0)
        r = d / 2
        for canvas, fill in ((draw, RGB[colour]), (ImageDraw.Draw(layer), 1)):
            if shape == "circle":
                canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif shape == "square":
                canvas.rectangle([cx - 0.43 * d, cy - 0.43 * d, cx + 0.43 * d, cy + 0.43 * d], fill=fill)
            else:
                canvas.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.72 * r), (cx - 0.95 * r, cy + 0.72 * r)], fill=fill)
        mask = np.asarray(layer, dtype=bool)
        masks = [m & ~mask for m in masks] + [mask]
    return image, masks


@pytest.mark.skipif(not _shipped(), reason="no shipped demo-shapes LMM, head and SAM")
@pytest.mark.parametrize("refine", [False, True], ids=["unet", "sam-refiner"])
def test_shipped_weights_ground_expressions_in_scenes_drawn_outside_the_generator(refine):
    backend = load_backend(str(REPO / DEFAULT_LMM_DIR), device="cpu", dtype=torch.float32)
    grounder = Grounder(backend, load_head(SHIPPED_HEAD, backend), load_sam(SHIPPED_SAM))
    ious = []
    for width, height, background, shapes, expressions in DRAWN:
        image, masks = drawn_scene(width, height, background, shapes)
        session = grounder.new_session(image)
        for expression, target in expressions.items():
            mask = session.ground_expression(expression, mode="head", refine=refine).mask
            assert mask.shape == (height, width)
            scores = [(mask & m).sum() / max(1, (mask | m).sum()) for m in masks]
            assert int(np.argmax(scores)) == target, (expression, scores)
            ious.append(scores[target])
    assert np.mean(ious) >= DRAWN_MIN_MEAN_IOU, ious
