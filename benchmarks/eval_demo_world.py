"""The demo world's measured table: the tiny LMM's answers and how well its words are grounded.

    python benchmarks/eval_demo_world.py                       # ~10 min on a busy 2-core CPU
    python benchmarks/eval_demo_world.py --scenes 100 --crowded-scenes 40 --phrase-scenes 100   # tighter
    python benchmarks/eval_demo_world.py --scenes 0 --crowded-scenes 0 --phrase-scenes 0 --lmm-scenes 0   # variation set only

The ~10 min were measured before the variation set (part 4) was added; it adds its own
time (--variation-scenes 0 --variation-lmm-scenes 0 skip it).

Everything is measured on scenes generated here from --seed (default 1000), a seed the
shipped LMM (scenes of seeds 100-105) and head (seed 1) never saw:

1. LMM answers (exact match): the description and one random question per scene
   (`flmm_demo.demo_world.lmm.evaluate`), on regular scenes (2-5 shapes) and crowded
   scenes (6-7 shapes, more than any training scene).
2. Referring segmentation, every sentence of every object (LISA/GLaMM protocol), through
   `flmm_demo.training.evaluate.evaluate` exactly as `python -m flmm_demo eval` runs it, for the
   trained U-Net head alone and with its SAM refiner (the demo world's small SAM, trained
   by `train-sam`), and for the training-free path alone (the heat map thresholded) and
   with SAM prompts; and
   references from the ground truth: the object's box filled in ("oracle box"), and the
   mask pooled to the LMM's patch grid and back, thresholded at 0.5 ("grid ceiling": the
   best a mask drawn in whole patches can do; "bilinear" upsamples the pooled coverage
   before the threshold). For the head and the training-free path the table also gives
   the share of expressions whose mask has IoU > 0.5 with the object (the right shape).
3. Phrase grounding of generated descriptions: the app's path (`Session.chat` then
   `Session.ground`, chat template, spaCy noun phrases); each phrase is scored against
   the object(s) of the scene whose name it is ("small red circle"); phrases that name
   no object of the scene (a wrong word) are counted, not scored.
4. The variation set: scenes of the wide world (`make_wide_scene`: any rotation, sizes
   tiny to large, white/black/tinted/gradient/noisy/textured backgrounds, outlined
   shapes, JPEG, aspect ratios up to 2:1, 1-7 shapes) from seed + 4000, which no
   training step uses. Referring segmentation of every expression of every object
   (each teacher-forced alone with F-LMM's prompt, `Session.ground_expression`), in rows
   per factor: how far the target looks turned, background, target size, shapes in the
   scene, filled or outlined. And the LMM on them and on regular scenes: exact
   descriptions, the share of described phrases naming a colour and shape that is not in
   the scene, and short questions (one per kind: colour, shape, count, position, yes/no;
   exact match after lower-casing and dropping punctuation).
5. Scenes drawn outside the generator (`benchmarks/outside_scenes.py`, OpenCV, its own
   layout, colours and geometry; never used for training), close to the training
   conditions and varied as issue 15 describes (--outside-scenes, --outside-lmm-scenes):
   the same segmentation rows per factor and the same answer measures as the variation set.

Prints markdown tables (n on every row), the command, and the time each part took;
--json also writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flmm_demo.backends import load_backend  # noqa: E402
from flmm_demo.demo_world import describe, scene_stream, write_refer_dataset  # noqa: E402
from flmm_demo.demo_world.lmm import evaluate as evaluate_lmm  # noqa: E402
from flmm_demo.demo_world.lmm import evaluate_answers, load  # noqa: E402
from flmm_demo.demo_world.scenes import Scene, SceneObject, referring_expressions  # noqa: E402
from flmm_demo.geometry import mask_box  # noqa: E402
from flmm_demo.grounder import Grounder  # noqa: E402
from flmm_demo.heads import load_head, load_sam  # noqa: E402
from flmm_demo.training.evaluate import EvalConfig, evaluate  # noqa: E402
from flmm_demo.training.metrics import IoUAccumulator, SegmentationScores  # noqa: E402
from flmm_demo.training.refer import ReferImage, ReferObject, open_refer  # noqa: E402
from outside_scenes import outside_scenes  # noqa: E402  (benchmarks/, the script's folder)

DEFAULT_MODEL = "checkpoints/demo-shapes/lmm"
DEFAULT_HEAD = "checkpoints/demo-shapes/head"
DEFAULT_SAM = "checkpoints/demo-shapes/sam_vit_tiny.safetensors"
DESCRIBE = "describe the image."
PROTOCOL = "every"
# (name, split, held_out, seed offset): regular scenes like training, crowded ones with more shapes.
SETS = (("regular (2-5 shapes)", "val", False, 0), ("crowded (6-7 shapes)", "testB", True, 1))
# (grounding mode, with SAM) and their row labels.
LABELS = {
    ("head", False): "U-Net head (trained)",
    ("head", True): "U-Net head + SAM refiner (trained)",
    ("training_free", False): "training-free",
    ("training_free", True): "training-free + SAM prompts",
}


# ------------------------------------------------------------------ references from ground truth


def oracle_box_mask(target: np.ndarray) -> np.ndarray:
    """(H, W) bool: the ground truth's bounding box, filled."""
    out = np.zeros_like(target, dtype=bool)
    box = mask_box(target)
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        out[y0:y1, x0:x1] = True
    return out


def grid_ceiling_mask(target: np.ndarray, grid: int, bilinear: bool = False) -> np.ndarray:
    """(H, W) bool: the mask as the LMM's patch grid can draw it.

    The image is padded to a centred square (as the LLaVA processor and F-LMM's LLaVA
    head see it), the mask's coverage of each of the grid x grid patches is computed,
    brought back to the image (nearest: whole patches; bilinear: smoothed) and
    thresholded at 0.5.
    """
    height, width = target.shape
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    square = np.zeros((side, side), np.float32)
    square[top:top + height, left:left + width] = target
    coverage = Image.fromarray(square).resize((grid, grid), Image.BOX)
    back = coverage.resize((side, side), Image.BILINEAR if bilinear else Image.NEAREST)
    return np.asarray(back)[top:top + height, left:left + width] >= 0.5


def reference_scores(objects: list[tuple[ReferImage, ReferObject]], grid: int) -> dict[str, SegmentationScores]:
    """cIoU/gIoU of the ground-truth references over (image, object) pairs, every
    expression of an object counted once, as for the models."""
    makers = {
        "oracle: ground-truth box": oracle_box_mask,
        f"ceiling: {grid}x{grid} grid, whole patches": lambda t: grid_ceiling_mask(t, grid),
        f"ceiling: {grid}x{grid} grid, bilinear": lambda t: grid_ceiling_mask(t, grid, bilinear=True),
    }
    accumulators = {name: IoUAccumulator(PROTOCOL) for name in makers}
    for image, obj in objects:
        target = image.mask(obj)
        for name, make in makers.items():
            pred = make(target)
            for _ in obj.expressions(PROTOCOL):  # same weight per object as the model rows
                accumulators[name].add(pred, target)
    return {name: acc.scores() for name, acc in accumulators.items()}


def miou_by_object_count(per_expression: list[dict], data_dir: Path) -> dict[int, float]:
    """Mean IoU of an evaluation's expressions per number of shapes in their scene."""
    counts: dict[str, int] = defaultdict(int)
    for ann in json.loads((data_dir / "instances.json").read_text())["annotations"]:
        counts[str(ann["image_id"])] += 1
    by_count: dict[int, list[float]] = defaultdict(list)
    for record in per_expression:
        by_count[counts[str(record["image_id"])]].append(record["iou"])
    return {k: float(np.mean(v)) for k, v in sorted(by_count.items())}


# ------------------------------------------------------------------ phrase grounding


def phrase_grounding(grounder: Grounder, scenes: list[Scene], modes: tuple[tuple[str, bool], ...]) -> dict:
    """Describe each scene (greedy), ground the answer's noun phrases, score each phrase.

    A phrase is scored against the union of the scene's objects whose name equals its
    text (two identical shapes are both 'the' small red circle). Returns, per row label, the
    cIoU/gIoU over the scored phrases, plus how many descriptions were exact and how many
    phrases named no object of the scene. modes: (grounding mode, with SAM) pairs.
    """
    accumulators = {mode: IoUAccumulator("phrases") for mode in modes}
    exact = unmatched = total = 0
    for scene in scenes:
        session = grounder.new_session(scene.pil())
        answer = session.chat(DESCRIBE, max_new_tokens=64)
        exact += answer == describe(scene)
        by_name: dict[str, np.ndarray] = {}
        for obj in scene.objects:
            by_name[obj.phrase] = by_name.get(obj.phrase, np.zeros_like(obj.mask)) | obj.mask
        for mode in modes:
            for grounded in session.ground(mode=mode[0], refine=mode[1]):
                target = by_name.get(grounded.phrase.text.lower().strip())
                if mode == modes[0]:
                    total += 1
                    unmatched += target is None
                if target is not None:
                    accumulators[mode].add(grounded.mask, target)
    scores = {LABELS[mode]: acc.scores() if acc.n else None for mode, acc in accumulators.items()}
    return {"scores": scores, "descriptions": len(scenes), "exact_descriptions": exact,
            "phrases": total, "unmatched_phrases": unmatched}


# ------------------------------------------------------------------ the variation set

VARIATION_OFFSET = 4000  # variation scenes: seed + 4000 (segmentation), seed + 4010 (answers)
OUTSIDE_OFFSET = 5000  # outside scenes: seed + 5000 (segmentation), seed + 5500 (answers)
# The scenes drawn outside the generator (benchmarks/outside_scenes.py): (name, varied).
OUTSIDE_SETS = (("outside, close to training", False), ("outside, varied", True))
FACTORS = ("rotation", "background", "target size", "shapes in the scene", "drawn")


def variation_factors(scene: Scene, obj: SceneObject) -> dict[str, str]:
    """The row of each factor an expression of `obj` falls in."""
    if obj.shape == "circle":
        rotation = "circle"
    else:
        degrees = obj.rotation_degrees
        rotation = "0-15 deg" if degrees < 15 else "15-30 deg" if degrees < 30 else "30-60 deg"
    n = len(scene.objects)
    return {"rotation": rotation, "background": scene.background, "target size": obj.size,
            "shapes in the scene": "1-2" if n <= 2 else "3-4" if n <= 4 else "5-7",
            "drawn": "filled" if obj.filled else "outlined"}


def variation_masks(grounder: Grounder, scenes: list[Scene], modes: tuple[tuple[str, bool], ...]):
    """The mask of every expression of every object of the scenes, in each mode: yields
    (scene, object index, its rows {"all": "all", factor: value}, (mode, refine), mask)."""
    for scene in scenes:
        session = grounder.new_session(scene.pil())
        for index, (obj, expressions) in enumerate(zip(scene.objects, referring_expressions(scene))):
            rows = {"all": "all", **variation_factors(scene, obj)}
            for expression in expressions:
                for mode, refine in modes:
                    yield scene, index, rows, (mode, refine), session.ground_expression(
                        expression, mode=mode, refine=refine).mask


def variation_segmentation(grounder: Grounder, scenes: list[Scene],
                           modes: tuple[tuple[str, bool], ...]) -> dict[str, dict[str, dict[str, SegmentationScores]]]:
    """Per row label: {"all": {"all": scores}, factor: {value: scores}} over every
    expression of every object of the scenes."""
    accumulators: dict = {LABELS[m]: defaultdict(lambda: defaultdict(lambda: IoUAccumulator(PROTOCOL))) for m in modes}
    for scene, index, rows, mode, mask in variation_masks(grounder, scenes, modes):
        for factor, value in rows.items():
            accumulators[LABELS[mode]][factor][value].add(mask, scene.objects[index].mask)
    return {label: {factor: {value: acc.scores() for value, acc in sorted(values.items())}
                    for factor, values in factors.items()} for label, factors in accumulators.items()}


# ------------------------------------------------------------------ the run


def build_grounder(model: str, head: str | None, sam: str | None) -> Grounder:
    """The LMM, its head (float32 even when the weights are stored in float16: CPUs run
    float32 convolutions several times faster) and SAM (None: no SAM rows)."""
    backend = load_backend(model, device="cpu", dtype=torch.float32)
    return Grounder(backend, load_head(head, backend) if head else None, load_sam(sam) if sam else None)


def attention_grid(grounder: Grounder) -> int:
    """Patches a side of the LMM's (square) image grid."""
    vision = grounder.backend.model.config.vision_config
    return vision.image_size // vision.patch_size


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    results: dict = {"command": shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "seed": args.seed}

    start = time.time()
    results["lmm"] = {}
    for name, _, held_out, offset in SETS if args.lmm_scenes else ():
        n = args.lmm_scenes if not held_out else max(1, args.lmm_scenes // 2)
        results["lmm"][name] = evaluate_lmm(args.model, seed=args.seed + 10 + offset, n=n, held_out=held_out)
    timings["LMM answers"] = time.time() - start

    start = time.time()
    model, processor = load(args.model)
    results["answers"] = {}
    for name, wide, offset, n in (("regular (2-5 shapes)", False, 10, args.lmm_scenes),
                                  ("variation (1-7 shapes)", True, VARIATION_OFFSET + 10, args.variation_lmm_scenes)):
        if n:
            scenes = list(scene_stream(args.seed + offset, n, wide=wide))
            results["answers"][name] = evaluate_answers(model, processor, scenes, seed=args.seed + offset)
    answer_seed = args.seed + OUTSIDE_OFFSET + 500
    for name, varied in OUTSIDE_SETS if args.outside_lmm_scenes else ():
        scenes = outside_scenes(answer_seed, args.outside_lmm_scenes, varied)
        results["answers"][name] = evaluate_answers(model, processor, scenes, seed=answer_seed)
    del model
    timings["short answers and hallucinations"] = time.time() - start

    grounder = build_grounder(args.model, args.head, args.sam)
    grid = attention_grid(grounder)
    work = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="demo-world-eval-"))
    results["segmentation"], results["by_count"], results["right_object"] = {}, {}, {}
    refines = (False, True) if args.sam else (False,)
    modes = tuple((mode, refine) for mode in (("head", "training_free") if args.head else ("training_free",))
                  for refine in refines)
    for name, split, held_out, offset in SETS:
        n_scenes = args.scenes if not held_out else args.crowded_scenes
        if n_scenes == 0:
            continue
        data_dir = work / f"seed{args.seed + offset}-{split}-{n_scenes}"
        if data_dir.exists():  # write_refer_dataset appends: start clean
            shutil.rmtree(data_dir)
        write_refer_dataset(data_dir, n_scenes, args.seed + offset, split, held_out=held_out)
        dataset = open_refer(data_dir, split)
        rows: dict[str, SegmentationScores] = {}
        for mode, refine in modes:
            label = LABELS[mode, refine]
            start = time.time()
            config = EvalConfig(model=args.model, data=data_dir, split=split, protocol=PROTOCOL, refine=refine,
                                limit=args.limit, device="cpu")
            result = evaluate(config, grounder=grounder, mode=mode)
            rows[label] = result.scores
            # The share of expressions whose mask lands on the right shape (IoU > 0.5).
            ious = [e["iou"] for e in result.per_expression]
            results["right_object"].setdefault(name, {})[label] = sum(i > 0.5 for i in ious) / max(1, len(ious))
            timings[f"{name}: {label}"] = time.time() - start
            if mode == "head":
                results["by_count"].setdefault(name, {})[label] = miou_by_object_count(result.per_expression, data_dir)
        objects = [(image, obj) for image in dataset for obj in image.objects][: args.limit]
        rows.update(reference_scores(objects, grid))
        results["segmentation"][name] = rows

    start = time.time()
    scenes = list(scene_stream(args.seed + 20, args.phrase_scenes))
    results["phrases"] = phrase_grounding(grounder, scenes, modes) if scenes else None
    timings["phrase grounding"] = time.time() - start

    start = time.time()
    scenes = list(scene_stream(args.seed + VARIATION_OFFSET, args.variation_scenes, wide=True))
    results["variation"] = variation_segmentation(grounder, scenes, modes) if scenes else None
    results["variation_scenes"] = len(scenes)
    timings["variation set"] = time.time() - start

    start = time.time()
    results["outside"] = {}
    for name, varied in OUTSIDE_SETS if args.outside_scenes else ():
        scenes = outside_scenes(args.seed + OUTSIDE_OFFSET, args.outside_scenes, varied)
        results["outside"][name] = variation_segmentation(grounder, scenes, modes)
    results["outside_scenes"] = args.outside_scenes
    timings["outside scenes"] = time.time() - start
    results["timings_s"] = timings
    if args.data_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict) -> str:
    """The tables of a run, in markdown."""
    lines = ["### Tiny LMM: exact-match answers", "",
             "| scenes | description | question | question after the description | n |", "|---|---|---|---|---|"]
    for name, r in results["lmm"].items():
        lines.append(f"| {name} | {r['description']:.2f} | {r['qa']:.2f} | {r['multi_turn_qa']:.2f} | {r['n']} |")
    lines += ["", "### Referring segmentation (every sentence of every object)", "",
              "| scenes | method | cIoU | gIoU | IoU > 0.5 | n expressions |", "|---|---|---|---|---|---|"]
    for name, rows in results["segmentation"].items():
        for label, s in rows.items():
            right = results["right_object"].get(name, {}).get(label)
            hit = "-" if right is None else f"{right:.2f}"
            lines.append(f"| {name} | {label} | {s.ciou:.3f} | {s.giou:.3f} | {hit} | {s.n} |")
    if results["by_count"]:
        lines += ["", "Trained head, gIoU (mean IoU) by number of shapes in the scene:", ""]
    for name, rows in results["by_count"].items():
        for label, by_count in rows.items():
            lines.append(f"- {name}, {label}: " + ", ".join(f"{k} shapes {v:.3f}" for k, v in by_count.items()))
    if results.get("answers"):
        kinds = ("colour", "shape", "count", "position", "yes/no")
        lines += ["", "### Tiny LMM: descriptions and short questions", "",
                  "| scenes | exact description | hallucinated phrases | question (all kinds) | "
                  + " | ".join(kinds) + " | n scenes |", "|---|---|---|---|" + "---|" * len(kinds) + "---|"]
        for name, r in results["answers"].items():
            per_kind = " | ".join(f"{r['question_' + k]:.2f}" for k in kinds)
            lines.append(f"| {name} | {r['description']:.2f} | {r['hallucinated_phrases']:.3f} "
                         f"({r['named_phrases']} phrases) | {r['question']:.2f} | {per_kind} | {r['n']} |")
    p = results["phrases"]
    if p is not None:  # None: no scenes were described
        lines += ["", "### Grounding the noun phrases of generated descriptions (regular scenes)", "",
                  f"{p['descriptions']} scenes described ({p['exact_descriptions']} exactly right); "
                  f"{p['phrases']} noun phrases, {p['unmatched_phrases']} naming no object of the scene (not scored).",
                  "", "| method | cIoU | mean IoU | n phrases |", "|---|---|---|---|"]
        for label, s in p["scores"].items():
            lines.append(f"| {label} | {s.ciou:.3f} | {s.giou:.3f} | {s.n} |" if s else f"| {label} | - | - | 0 |")
    if results.get("variation"):
        lines += factor_table(f"Variation set: referring segmentation, cIoU ({results['variation_scenes']} scenes "
                              "of the wide world)", results["variation"])
    for name, v in results.get("outside", {}).items():
        lines += factor_table(f"Scenes drawn outside the generator, {name.split(', ', 1)[1]}: referring "
                              f"segmentation, cIoU ({results['outside_scenes']} scenes)", v)
    lines += ["", "Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings_s"].items()),
              "", f"Command: `python {results['command']}`"]
    return "\n".join(lines)


def factor_table(title: str, v: dict) -> list[str]:
    """Markdown lines of one set's cIoU per factor and value, a column per method."""
    labels = list(v)
    lines = ["", f"### {title}", "", "| factor | value | " + " | ".join(labels) + " | n expressions |",
             "|---|---|" + "---|" * len(labels) + "---|"]
    first = v[labels[0]]
    for factor in ("all",) + FACTORS:
        for value in first.get(factor, {}):
            cells = " | ".join(f"{v[label][factor][value].ciou:.3f}" for label in labels)
            lines.append(f"| {factor} | {value} | {cells} | {first[factor][value].n} |")
    return lines


def _jsonable(value):
    if isinstance(value, SegmentationScores):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the tiny LMM folder")
    parser.add_argument("--head", default=DEFAULT_HEAD, help="its F-LMM head folder ('' for training-free only)")
    parser.add_argument("--sam", default=DEFAULT_SAM, help="its SAM checkpoint ('' for no SAM rows)")
    parser.add_argument("--seed", type=int, default=1000, help="held-out scenes: seed, seed+1 (crowded), +10.. (LMM)")
    parser.add_argument("--scenes", type=int, default=20, help="regular held-out scenes for segmentation")
    parser.add_argument("--crowded-scenes", type=int, default=8, help="crowded held-out scenes (6-7 shapes)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N objects of each set")
    parser.add_argument("--lmm-scenes", type=int, default=64, help="scenes for the LMM's answer accuracy")
    parser.add_argument("--phrase-scenes", type=int, default=30, help="scenes described and grounded")
    parser.add_argument("--variation-scenes", type=int, default=30,
                        help="scenes of the wide world for the variation set's segmentation rows")
    parser.add_argument("--variation-lmm-scenes", type=int, default=64,
                        help="scenes of the wide world for the LMM's descriptions and short questions")
    parser.add_argument("--outside-scenes", type=int, default=0,
                        help="scenes drawn outside the generator (benchmarks/outside_scenes.py), close to training "
                             "and varied, for segmentation rows per factor")
    parser.add_argument("--outside-lmm-scenes", type=int, default=0,
                        help="scenes drawn outside the generator, close and varied, for descriptions and short questions")
    parser.add_argument("--data-dir", help="keep the generated held-out datasets here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    results = run(args)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
