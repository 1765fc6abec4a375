"""Which short answers the demo LMM gets wrong, and what it says instead.

Asks every count, position and yes/no question of `scenes.short_questions` (not one per
kind, as `eval_demo_world.py` does) on held-out scenes, and prints two markdown tables:
exact match per question template and true answer, and the most common (true answer ->
reply) pairs among the wrong ones. Where the goal's exact match is lost shows up here.
A third table asks whether the model knows an object's position before it answers: the
probability of "in" ("in the middle" rather than "on the left/right") as the first word
of the answer to "where is ...?", by the true answer. A model that sees the position
gives "in" a high probability for the middle objects only; one that guesses gives every
object the same.

    python benchmarks/answer_confusions.py                          # the shipped LMM, 60 regular scenes
    python benchmarks/answer_confusions.py --model runs/lmm-wide5 --wide --scenes 60
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flmm_demo.demo_world import DEFAULT_LMM_DIR, scene_stream  # noqa: E402
from flmm_demo.demo_world import scenes as S  # noqa: E402
from flmm_demo.demo_world.lmm import first_word_probability, load, short_replies  # noqa: E402

KINDS = ("count", "position", "yes/no")


def template(question: str) -> str:
    """The question with its object words dropped: 'how many circles are there?' -> 'how many'."""
    words = question.split()
    return " ".join(words[:3] if words[0] == "are" else words[:2])


def _asked(scenes: list) -> list[tuple[int, str, str, str]]:
    """(scene index, kind, question, true answer) of every question of KINDS."""
    rng = np.random.default_rng(0)
    return [(k, kind, q, a) for k, scene in enumerate(scenes)
            for kind, q, a in S.short_questions(scene, rng) if kind in KINDS]


def tally(model, processor, scenes: list):
    """Ask every question of KINDS on these scenes. Returns (exact match per (kind,
    template, true answer), Counter of wrong (template, true answer, reply), questions asked)."""
    asked = _asked(scenes)
    right: dict[tuple[str, str, str], list[bool]] = collections.defaultdict(list)
    confusions: collections.Counter = collections.Counter()
    for (_, kind, q, a), (reply, ok) in zip(asked, short_replies(model, processor, scenes, asked)):
        right[(kind, template(q), a)].append(ok)
        if not ok:
            confusions[(template(q), a, reply)] += 1
    return dict(right), confusions, len(asked)


def middle_odds(model, processor, scenes: list) -> dict[str, list[float]]:
    """True answer of each 'where is ...?' question -> P('in') as the answer's first word."""
    where = [(k, q, a) for k, _, q, a in _asked(scenes) if q.startswith("where is ")]
    odds = first_word_probability(model, processor, [scenes[k].pil() for k, _, _ in where],
                                  [q for _, q, _ in where], "in")
    out: dict[str, list[float]] = collections.defaultdict(list)
    for (_, _, a), p in zip(where, odds):
        out[a].append(p)
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_LMM_DIR)
    parser.add_argument("--seed", type=int, default=1010, help="scene seed (1010: eval_demo_world's answer scenes)")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--wide", action="store_true", help="scenes of the wide world")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    scenes = list(scene_stream(args.seed, args.scenes, wide=args.wide))
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    right, confusions, n_asked = tally(model, processor, scenes)
    print(f"{n_asked} questions on {len(scenes)} {'wide' if args.wide else 'regular'} scenes "
          f"(seed {args.seed}), model {args.model}\n")
    print("| kind | question | true answer | exact | n |\n|---|---|---|---|---|")
    for (kind, t, a), oks in sorted(right.items()):
        print(f"| {kind} | {t} ... | {a} | {np.mean(oks):.2f} | {len(oks)} |")
    print("\n| question | true answer | reply | times |\n|---|---|---|---|")
    for (t, a, reply), n in confusions.most_common(12):
        print(f"| {t} ... | {a} | {reply} | {n} |")
    print("\n| where is ...? true answer | mean P('in') as the first word | n |\n|---|---|---|")
    for a, odds in sorted(middle_odds(model, processor, scenes).items()):
        print(f"| {a} | {np.mean(odds):.2f} | {len(odds)} |")
    print(f"\nCommand: `python {' '.join(['benchmarks/answer_confusions.py', *(argv if argv is not None else sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
