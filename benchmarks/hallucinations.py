"""What the demo LMM's hallucinated description phrases get wrong: the colour or the shape.

Describes held-out scenes ("describe the image.") and sorts every phrase that names a
colour and shape no object has ('a red circle' with no red circle in the scene):

- shape misread: an object of that colour is there, with another shape;
- colour misread: an object of that shape is there, in another colour;
- neither is there.

For the shape misreads it then tabulates the true shape against the named one, and how
the likely misread object is drawn (filled and upright, turned more than 15 degrees, or
outlined) and its size. The likely misread objects are those of the named colour whose
own colour and shape no phrase names (every object of that colour when all are named).
It also gives hallucinated / named phrases per background. Scenes of the wide world by
default: the variation set's answer scenes of `eval_demo_world.py` (seed 1000 + 4010).

    python benchmarks/hallucinations.py                        # the shipped LMM, 96 wide scenes
    python benchmarks/hallucinations.py --model runs/lmm-cue3a --scenes 48
"""
from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from flmm_demo.demo_world import DEFAULT_LMM_DIR, scene_stream  # noqa: E402
from flmm_demo.demo_world import scenes as S  # noqa: E402
from flmm_demo.demo_world.lmm import _NAMED, DESCRIBE, answer, load  # noqa: E402

from eval_demo_world import variation_factors  # noqa: E402  (the variation set's rows, shared)

KINDS = ("right", "shape misread", "colour misread", "neither there")


def look(scene: S.Scene, obj: S.SceneObject) -> str:
    """How an object is drawn, one label from the variation set's 'drawn' and 'rotation'
    rows (eval_demo_world.variation_factors): outlined, else turned more than 15 degrees,
    else filled and upright (or a circle)."""
    rows = variation_factors(scene, obj)
    if rows["drawn"] == "outlined":
        return "outlined"
    return "turned > 15 deg" if rows["rotation"] in ("15-30 deg", "30-60 deg") else "filled, upright (or a circle)"


@dataclass
class Breakdown:
    kinds: collections.Counter = field(default_factory=collections.Counter)
    by_background: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))
    shapes: collections.Counter = field(default_factory=collections.Counter)  # (true, named)
    looks: collections.Counter = field(default_factory=collections.Counter)  # (look, size)

    def add(self, description: str, scene: S.Scene) -> None:
        """Sort the phrases of one description of this scene."""
        there = {(o.colour, o.shape) for o in scene.objects}
        named = [(m.group(2), m.group(3)) for m in _NAMED.finditer(description.lower())]
        for colour, shape in named:
            counts = self.by_background[scene.background]
            counts[1] += 1
            if (colour, shape) in there:
                self.kinds["right"] += 1
                continue
            counts[0] += 1
            same_colour = [o for o in scene.objects if o.colour == colour]
            if not same_colour:
                self.kinds["colour misread" if any(o.shape == shape for o in scene.objects) else "neither there"] += 1
                continue
            self.kinds["shape misread"] += 1
            unnamed = [o for o in same_colour if (o.colour, o.shape) not in named]
            for obj in unnamed or same_colour:
                self.shapes[(obj.shape, shape)] += 1
                self.looks[(look(scene, obj), obj.size)] += 1

    def table(self) -> str:
        named = sum(self.kinds.values())
        wrong = named - self.kinds["right"]
        lines = [f"{named} phrases, {wrong} hallucinated ({wrong / max(1, named):.1%})\n",
                 "| phrase | n | share of the hallucinated |", "|---|---|---|"]
        lines += [f"| {k} | {self.kinds[k]} | {self.kinds[k] / max(1, wrong):.2f} |" for k in KINDS[1:]]
        lines += ["", "| background | hallucinated / named | share |", "|---|---|---|"]
        lines += [f"| {bg} | {w} / {n} | {w / max(1, n):.2f} |" for bg, (w, n) in sorted(self.by_background.items())]
        lines += ["", "| shape misread: true shape | named | times |", "|---|---|---|"]
        lines += [f"| {t} | {n} | {c} |" for (t, n), c in self.shapes.most_common(8)]
        lines += ["", "| shape misread: the object is drawn | size | times |", "|---|---|---|"]
        lines += [f"| {how} | {size} | {c} |" for (how, size), c in self.looks.most_common()]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_LMM_DIR)
    parser.add_argument("--seed", type=int, default=5010, help="scene seed (5010: eval_demo_world's variation answers)")
    parser.add_argument("--scenes", type=int, default=96)
    parser.add_argument("--regular", action="store_true", help="scenes of 2-5 shapes instead of the wide world")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenes = list(scene_stream(args.seed, args.scenes, wide=not args.regular))
    model, processor = load(args.model)
    result = Breakdown()
    for b in range(0, len(scenes), 16):
        chunk = scenes[b:b + 16]
        for scene, description in zip(chunk, answer(model, processor, [s.pil() for s in chunk],
                                                     [DESCRIBE] * len(chunk))):
            result.add(description, scene)
    print(f"Descriptions of {len(scenes)} {'regular' if args.regular else 'wide'} scenes (seed {args.seed}), "
          f"model {args.model}: ", end="")
    print(result.table())
    print(f"\nCommand: `python {' '.join(['benchmarks/hallucinations.py', *(argv if argv is not None else sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
