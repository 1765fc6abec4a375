"""Does the demo LMM's vision tower hold each object's shape and colour? A linear probe.

Each object of a scene becomes one vector: the tower's patch features (the layer LLaVA
reads) averaged with the object's share of each patch as weights. A linear classifier of
shape, and one of colour, is fitted on the objects of some scenes and tested on the
objects of others, with the accuracy per row of the variation set's factors
(`eval_demo_world.variation_factors`: outline, rotation bin, size, background, shape count). Where the probe reads a shape well and the LMM still names the
wrong one, the language side is what fails; where the probe cannot read it either, the
information is not in the tower, and no language round can bring it back.

    python benchmarks/tower_probe.py                  # the shipped LMM, wide scenes (about 2 min)
    python benchmarks/tower_probe.py --regular        # scenes of 2-5 upright, filled shapes
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flmm_demo.demo_world import DEFAULT_LMM_DIR, scene_stream  # noqa: E402
from flmm_demo.demo_world import scenes as S  # noqa: E402
from flmm_demo.demo_world.lmm import _vision_features, coverage, load  # noqa: E402

from eval_demo_world import variation_factors  # noqa: E402  (the variation set's rows, shared)

FACTORS = ("drawn", "rotation", "target size", "background", "shapes in the scene")


@torch.no_grad()
def object_features(model, processor, scenes: list[S.Scene], batch_size: int = 32):
    """(N, D) coverage-weighted mean tower feature of every visible object, (N,) its shape
    index, (N,) its colour index, and its factors."""
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    feats, shapes, colours, rows = [], [], [], []
    for b in range(0, len(scenes), batch_size):
        chunk = scenes[b:b + batch_size]
        pixels = torch.cat([processor.image_processor(s.pil(), return_tensors="pt").pixel_values for s in chunk])
        for scene, patches in zip(chunk, _vision_features(model, pixels.float())):
            covers = torch.from_numpy(coverage(scene, grid)[1:]).flatten(1)  # (objects, g*g)
            for obj, cover in zip(scene.objects, covers):
                if cover.sum() <= 0:
                    continue
                feats.append((cover[:, None] * patches).sum(0) / cover.sum())
                shapes.append(S.SHAPES.index(obj.shape))
                colours.append(list(S.COLOURS).index(obj.colour))
                rows.append(variation_factors(scene, obj))
    return torch.stack(feats), torch.tensor(shapes), torch.tensor(colours), rows


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 1500) -> torch.nn.Linear:
    """A linear classifier fitted full-batch (inputs already standardised)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], n_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


def probe_accuracy(train: list[S.Scene], test: list[S.Scene], model, processor, steps: int = 1500):
    """{'shape' | 'colour': {'all': acc, factor: {value: (acc, n)}}} of linear probes
    fitted on the objects of `train` and tested on those of `test`."""
    x_train, shape_train, colour_train, _ = object_features(model, processor, train)
    x_test, shape_test, colour_test, rows = object_features(model, processor, test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out = {}
    for name, y_train, y_test, n in (("shape", shape_train, shape_test, len(S.SHAPES)),
                                     ("colour", colour_train, colour_test, len(S.COLOURS))):
        probe = fit_linear(x_train, y_train, n, steps)
        with torch.no_grad():
            right = (probe(x_test).argmax(1) == y_test).numpy()
        result: dict = {"all": float(right.mean()), "n": len(right)}
        for factor in FACTORS:
            groups = collections.defaultdict(list)
            for row, ok in zip(rows, right):
                groups[row[factor]].append(ok)
            result[factor] = {value: (float(np.mean(oks)), len(oks)) for value, oks in sorted(groups.items())}
        out[name] = result
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_LMM_DIR)
    parser.add_argument("--regular", action="store_true", help="scenes of 2-5 shapes instead of the wide world")
    parser.add_argument("--train-scenes", type=int, default=1200)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7000, help="train scenes from this seed, test from seed + 1000")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wide = not args.regular
    train = list(scene_stream(args.seed, args.train_scenes, wide=wide))
    test = list(scene_stream(args.seed + 1000, args.test_scenes, wide=wide))
    model, processor = load(args.model)
    result = probe_accuracy(train, test, model, processor)
    print(f"Linear probes of the tower's object features, model {args.model}, {'wide' if wide else 'regular'} "
          f"scenes ({args.train_scenes} to fit, {args.test_scenes} to test, {result['shape']['n']} test objects)\n")
    print("| factor | value | shape accuracy | colour accuracy | n |\n|---|---|---|---|---|")
    print(f"| all | | {result['shape']['all']:.2f} | {result['colour']['all']:.2f} | {result['shape']['n']} |")
    for factor in FACTORS:
        for value, (acc, n) in result["shape"][factor].items():
            print(f"| {factor} | {value} | {acc:.2f} | {result['colour'][factor][value][0]:.2f} | {n} |")
    print(f"\nChance: shape {1 / len(S.SHAPES):.2f}, colour {1 / len(S.COLOURS):.2f}. "
          f"Command: `python {' '.join(['benchmarks/tower_probe.py', *(argv if argv is not None else sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
