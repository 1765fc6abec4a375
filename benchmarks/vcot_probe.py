"""How often visual chain of thought grounds the object the question names (demo model).

For held-out scenes of the demo world (seeds 200-215 by default) with a shape that occurs
once, asks "what colour is the <shape>?" through `Session.visual_cot` and counts the
probes whose grounded object phrase names that shape, the whole-image answers and the
crop answers that are the shape's colour, and the crops whose box holds the shape's
centre. Prints one markdown row.

    python benchmarks/vcot_probe.py                              # the shipped weights
    python benchmarks/vcot_probe.py --seed 5200 --scenes 30 --wide  # on held-out wide scenes
    FLMM_CHECKPOINTS=/elsewhere python benchmarks/vcot_probe.py  # other demo-shapes weights
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from flmm_demo import Grounder  # noqa: E402
from flmm_demo.demo_world import make_scene  # noqa: E402
from flmm_demo.demo_world.lmm import normalise_answer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--wide", action="store_true", help="scenes of the wide world (make_scene(seed, wide=True))")
    args = parser.parse_args(argv)
    grounder = Grounder.from_preset("demo-shapes")
    counts = collections.Counter()
    for seed in range(args.seed, args.seed + args.scenes):
        scene = make_scene(seed, wide=args.wide)
        once = [shape for shape, n in collections.Counter(o.shape for o in scene.objects).items() if n == 1]
        if not once:
            continue
        target = next(o for o in scene.objects if o.shape == once[0])
        session = grounder.new_session(scene.pil())
        cot = session.visual_cot(f"what colour is the {once[0]}?", max_new_tokens=8, mode="training_free",
                                 refine=False)
        left, top, right, bottom = cot.crop_box
        counts["asked"] += 1
        counts["probe"] += cot.object is not None and once[0] in cot.object.phrase.text
        counts["crop holds it"] += left <= target.cx < right and top <= target.cy < bottom
        counts["whole-image answer"] += normalise_answer(cot.first_answer) == target.colour
        counts["crop answer"] += normalise_answer(cot.answer) == target.colour
    n = max(counts["asked"], 1)
    keys = ("probe", "crop holds it", "whole-image answer", "crop answer")
    print("| probe grounds the shape the question names | crop holds the shape | whole-image answer right "
          "| crop answer right | n |\n|---|---|---|---|---|")
    print("| " + " | ".join(f"{counts[k] / n:.2f} ({counts[k]})" for k in keys) + f" | {counts['asked']} |")


if __name__ == "__main__":
    main()
