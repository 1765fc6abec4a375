"""How much of the tiny LMM's image attention lands on the object its words name.

    python benchmarks/attention_on_objects.py                                   # shipped LMM, ~1 min
    python benchmarks/attention_on_objects.py --model runs/lmm-base checkpoints/demo-shapes/lmm

For held-out scenes (--seed, default 1000; the LMM trained on seeds 100-105), two kinds of
text are teacher-forced and, for each token that names an object, the share of a head's
attention over the image tokens that falls on patches mostly covered by that object
(coverage > 0.5) is averaged:

- "expression": each referring expression of each object alone after F-LMM's grounding
  prompt, as the referring benchmark feeds it (words refer to the expression's object);
- "description": the correct description after "describe the image." (each "a <name>"
  mentions its object).

Columns: the supervised mention heads and referent heads (`lmm.MENTION_HEADS`,
`lmm.REFERENT_HEADS`, the heads the attention loss trains) and the mean of all
layer x head maps. Prints a markdown table and the command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flmm_demo.backends.base import DEFAULT_GROUNDING_PROMPT  # noqa: E402
from flmm_demo.demo_world import lmm as L  # noqa: E402
from flmm_demo.demo_world import scenes as S  # noqa: E402


def texts(scene: S.Scene) -> dict[str, list[tuple[str, list[S.Segment], str]]]:
    """Per kind, (prompt, annotated answer, which annotation names the object)."""
    expressions = [(DEFAULT_GROUNDING_PROMPT.lower(), S._expression_segments(i, *name), "referent")
                   for i, names in enumerate(S._referring(scene)) for name in names]
    return {"expression": expressions, "description": [("describe the image.", S.describe_segments(scene), "mention")]}


@torch.no_grad()
def measure(folder: str, seed: int, n_scenes: int) -> dict[str, dict[str, float]]:
    model, processor = L.load(folder)
    model.model.language_model.config._attn_implementation = "eager"
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    pool = L.make_pool(seed, n_scenes, processor, grid)
    shares: dict[str, dict[str, list[float]]] = {}
    all_heads = [(layer, head) for layer in range(model.config.text_config.num_hidden_layers)
                 for head in range(model.config.text_config.num_attention_heads)]
    for k, scene in enumerate(pool.scenes):
        features = L._vision_features(model, pool.pixels[k:k + 1].float())
        on_object = torch.from_numpy(L.coverage(scene, grid)[1:]).flatten(1) > 0.5  # (objects, g*g)
        for kind, items in texts(scene).items():
            for prompt, segments, key in items:
                ids, _, mention, referent = L.encode_annotated_chat(processor, [(prompt, segments)], grid * grid)
                named = torch.tensor(referent if key == "referent" else mention)
                ids_t = torch.tensor([ids])
                _, attentions = L._chat_logits(model, ids_t, torch.ones_like(ids_t), features)
                image = (ids_t[0] == model.config.image_token_id).nonzero().squeeze(1)
                tokens = (named >= 0).nonzero().squeeze(1)
                cover = on_object[named[tokens]]  # (N, g*g)

                def share(layer: int, head: int) -> float:
                    p = attentions[layer][0, head][tokens][:, image]
                    return ((p * cover).sum(-1) / p.sum(-1)).mean().item()

                row = shares.setdefault(kind, {"mention heads": [], "referent heads": [], "all heads": []})
                row["mention heads"].append(np.mean([share(*lh) for lh in L.MENTION_HEADS]))
                row["referent heads"].append(np.mean([share(*lh) for lh in L.REFERENT_HEADS]))
                row["all heads"].append(np.mean([share(*lh) for lh in all_heads]))
    return {kind: {**{name: float(np.mean(v)) for name, v in row.items()}, "n": len(row["all heads"])}
            for kind, row in shares.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["checkpoints/demo-shapes/lmm"], help="tiny LMM folders")
    parser.add_argument("--seed", type=int, default=1000, help="held-out scene seed")
    parser.add_argument("--scenes", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print("| model | text | mention heads | referent heads | all heads | n |\n|---|---|---|---|---|---|")
    for folder in args.model:
        for kind, row in measure(folder, args.seed, args.scenes).items():
            print(f"| {folder} | {kind} | {row['mention heads']:.3f} | {row['referent heads']:.3f} | "
                  f"{row['all heads']:.3f} | {row['n']} |")
    print(f"\nCommand: `python {' '.join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
