"""Where do the demo model's masks go when they miss: onto the background or onto another shape?

For every expression of every object of the variation set's scenes (the scenes of
`eval_demo_world.py --variation-scenes`, seed + 4000), the mask of each grounding mode is
split three ways: its IoU with the named object, the share of its area on the background
(no shape there) and the share on the other shapes. Rows follow the variation set's
factors (`eval_demo_world.variation_factors`; the masks come from `variation_masks`, as the
variation set's own scores do). A miss onto another shape is a grounding
error (the attention picked the wrong object); a miss onto the background is a mask that
spreads past its object (the attention, or the head reading it, leaks off the shape).
An outlined shape's mask is its outline, so a filled mask on it counts its inside as background.

    python benchmarks/mask_errors.py                  # shipped LMM and head, 30 scenes (about 2 min)
    python benchmarks/mask_errors.py --head ''        # the training-free path only
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flmm_demo.demo_world import DEFAULT_LMM_DIR, scene_stream  # noqa: E402
from flmm_demo.demo_world.scenes import Scene  # noqa: E402

from eval_demo_world import (DEFAULT_HEAD, FACTORS, LABELS, VARIATION_OFFSET, build_grounder,  # noqa: E402
                             variation_masks)


def mask_split(mask: np.ndarray, scene: Scene, index: int) -> tuple[float, float, float]:
    """(IoU with object `index`, share of the mask's area on no object, share on the other
    objects). An empty mask has IoU 0 and no area to share."""
    mask = mask.astype(bool)
    target = scene.objects[index].mask
    others = np.zeros_like(target)
    for k, obj in enumerate(scene.objects):
        if k != index:
            others |= obj.mask
    others &= ~target  # a pixel of the target that another shape also covers counts as the target's
    area = int(mask.sum())
    iou = float((mask & target).sum()) / max(1, int((mask | target).sum()))
    if area == 0:
        return iou, 0.0, 0.0
    return iou, float((mask & ~target & ~others).sum()) / area, float((mask & others).sum()) / area


def measure(grounder, scenes: list[Scene], modes: tuple[tuple[str, bool], ...]) -> dict:
    """{row label: {factor: {value: (N, 3) array of mask_split per expression}}}, factor
    "all" included."""
    rows: dict = {LABELS[m]: defaultdict(lambda: defaultdict(list)) for m in modes}
    for scene, index, factors, mode, mask in variation_masks(grounder, scenes, modes):
        split = mask_split(mask, scene, index)
        for factor, value in factors.items():
            rows[LABELS[mode]][factor][value].append(split)
    return {label: {factor: {value: np.array(splits) for value, splits in sorted(values.items())}
                    for factor, values in factors.items()} for label, factors in rows.items()}


def table(results: dict) -> str:
    lines = ["| factor | value | method | mean IoU | mask on background | mask on other shapes | n |",
             "|---|---|---|---|---|---|---|"]
    for factor in ("all", *FACTORS):
        values = next(iter(results.values())).get(factor, {})
        for value in values:
            for label, factors in results.items():
                splits = factors[factor][value]
                iou, background, other = splits.mean(0)
                lines.append(f"| {factor} | {value} | {label} | {iou:.2f} | {background:.2f} | {other:.2f} | "
                             f"{len(splits)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_LMM_DIR)
    parser.add_argument("--head", default=DEFAULT_HEAD, help="F-LMM head folder ('' for training-free only)")
    parser.add_argument("--sam", default="", help="SAM checkpoint: also the head's refined masks")
    parser.add_argument("--seed", type=int, default=1000, help="eval_demo_world's seed (scenes from seed + 4000)")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ((("head", False),) if args.head else ()) + ((("head", True),) if args.head and args.sam else ())
    modes += (("training_free", False),)
    grounder = build_grounder(args.model, args.head or None, args.sam or None)
    scenes = list(scene_stream(args.seed + VARIATION_OFFSET, args.scenes, wide=True))
    results = measure(grounder, scenes, modes)
    print(f"Masks on {len(scenes)} variation scenes (seed {args.seed + VARIATION_OFFSET}), model {args.model}, "
          f"head {args.head or 'none'}:\n")
    print(table(results))
    print(f"\nCommand: `python {' '.join(['benchmarks/mask_errors.py', *(argv if argv is not None else sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
