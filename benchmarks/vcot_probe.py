"""How often visual chain of thought grounds the object the question names (demo model).

For held-out scenes of the demo world (seeds 200-215 by default) with a shape that occurs
once, asks "what colour is the <shape>?" through `Session.visual_cot` and counts the
probes whose grounded object phrase names that shape. Prints one markdown row.

    python benchmarks/vcot_probe.py                              # the shipped weights
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--scenes", type=int, default=16)
    args = parser.parse_args(argv)
    grounder = Grounder.from_preset("demo-shapes")
    hits = asked = 0
    for seed in range(args.seed, args.seed + args.scenes):
        scene = make_scene(seed)
        once = [shape for shape, n in collections.Counter(o.shape for o in scene.objects).items() if n == 1]
        if not once:
            continue
        session = grounder.new_session(scene.pil())
        cot = session.visual_cot(f"what colour is the {once[0]}?", max_new_tokens=8, mode="training_free",
                                 refine=False)
        asked += 1
        hits += cot.object is not None and once[0] in cot.object.phrase.text
    print("| probe grounds the shape the question names | n |\n|---|---|")
    print(f"| {hits / max(asked, 1):.2f} ({hits} of {asked}) | {asked} |")


if __name__ == "__main__":
    main()
