"""Commands of the demo world.

    python -m flmm_demo.demo_world rebuild [--dry-run]     # the shipped weights, every step (about 14 h)
    python -m flmm_demo.demo_world train-lmm --out runs/lmm-base --seed 0 --minutes 50 --vision-share 0.4 --low-res-share 0.6
    python -m flmm_demo.demo_world train-lmm --init runs/lmm-base --out runs/lmm-ground --minutes 25 --ground-share 0.5 --chat-lr 5e-4
    python -m flmm_demo.demo_world train-sam --out runs/sam-tiny --seed 11 --minutes 25
    python -m flmm_demo.demo_world eval-lmm --model checkpoints/demo-shapes/lmm [--held-out]
    python -m flmm_demo.demo_world write-refer --out data/demo-shapes --train 2000 --val 200
    python -m flmm_demo.demo_world show --seed 3 --out scene.png

The steps of `rebuild` are in flmm_demo/demo_world/recipe.py.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flmm_demo.demo_world import DEFAULT_LMM_DIR  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flmm_demo.demo_world")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-lmm", help="train the tiny LLaVA on generated scenes (from scratch, or --init a saved one)")
    p.add_argument("--out", default=DEFAULT_LMM_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the whole run")
    p.add_argument("--scenes", type=int, default=3000, help="size of the pool of training scenes")
    p.add_argument("--vision-share", type=float, default=0.3,
                   help="fraction of the budget spent pre-training the vision tower on patch labels "
                        "(1, with --init --tune-vision: only the tower is tuned, no chat stage)")
    p.add_argument("--low-res-share", type=float, default=0.0,
                   help="fraction of the vision pre-training done on images of 2/3 the size (cheaper steps)")
    p.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the loss that teaches a few heads to attend to the named object (0: off)")
    p.add_argument("--ground-share", type=float, default=0.0,
                   help="share of chats that are referring expressions after a description prompt, "
                        "seen by the attention loss only")
    p.add_argument("--ground-turns", type=int, default=1,
                   help="turns (description prompt, 1-3 expressions) in each grounding chat")
    p.add_argument("--init", help="continue from this saved model (no vision stage: the whole budget is chat)")
    p.add_argument("--chat-lr", type=float, default=1e-3, help="peak learning rate of the chat stage")
    p.add_argument("--rope-theta", type=float, help="a new RoPE base for the language model (default: keep it)")
    p.add_argument("--context", type=int,
                   help="a new context length in tokens (rotary positions: no weights change; default: keep it)")
    p.add_argument("--wide-share", type=float, default=0.0,
                   help="share of the scene pool from the wide world (any rotation, sizes, backgrounds, "
                        "outlines, JPEG, 1-7 shapes)")
    p.add_argument("--short-qa", action="store_true",
                   help="questions about colour, shape, count, position and yes/no get short answers ('red', 'three')")
    p.add_argument("--vcot-share", type=float, default=0.0,
                   help="share of chats that open with visual chain of thought's probe ('... the object most "
                        "relevant to the question is the circle.') and of questions after its crop preamble")
    p.add_argument("--balanced-share", type=float, default=0.0,
                   help="with --short-qa, share of chats of short questions drawn answer-balanced")
    p.add_argument("--answer-only", action="store_true",
                   help="train only the last layer's MLP and the output layer: every attention map stays")
    p.add_argument("--cue-attention", action="store_true",
                   help="the attention loss also supervises each answer's last prompt token, toward the "
                        "object of the answer's first word (the token that predicts a one-word answer)")
    p.add_argument("--cue-groups", action="store_true",
                   help="short answers about several objects (counts, 'is there a ...?') are supervised toward "
                        "those objects' mean coverage (with --cue-attention, so is the token before them)")
    p.add_argument("--cue-near", action="store_true",
                   help="with --cue-groups, a 'no' to 'is there a red circle?' is supervised toward the objects "
                        "it was checked against (the red ones and the circles; every object when none matches)")
    p.add_argument("--tune-vision", action="store_true",
                   help="with --init: first tune the vision tower on patch labels for --vision-share of the budget")
    p.add_argument("--probe-share", type=float, default=0.0,
                   help="with --tune-vision: share of the vision stage that trains only the fresh patch heads "
                        "on the frozen tower (a linear probe) before the tower is tuned")
    p.add_argument("--vision-lr", type=float, default=2e-3, help="peak learning rate of the vision stage")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="in the vision stage, also this weight x the loss of linear heads reading each object's "
                        "shape, colour and size from its mean feature (0: per-patch labels only)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true", help="CI-sized model and a few steps (< 2 min)")

    p = sub.add_parser("train-sam", help="train the demo world's small SAM from scratch (promptable segmentation)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget")
    p.add_argument("--max-steps", type=int, help="stop after this many steps instead (CI)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--eval-scenes", type=int, default=60, help="held-out scenes scored at the end")
    p.add_argument("--init", help="continue from this saved sam_vit_tiny.safetensors")
    p.add_argument("--wide", action="store_true",
                   help="scenes of the wide world (any rotation, sizes, backgrounds, outlines, JPEG, 1-7 shapes)")

    p = sub.add_parser("rebuild", help="remake the shipped LMM and head from the seeds (recipe.py), then install them")
    p.add_argument("--dry-run", action="store_true", help="print the steps and stop")
    p.add_argument("--no-install", action="store_true", help="leave checkpoints/ as it is")

    p = sub.add_parser("eval-lmm", help="exact-match accuracy on held-out scenes")
    p.add_argument("--model", default=DEFAULT_LMM_DIR)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--held-out", action="store_true", help="crowded scenes of 6-7 shapes")

    p = sub.add_parser("write-refer", help="write scenes in the RefCOCO layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--held-out", type=int, default=0, help="also a 'testB'-like split of 6-7 shapes")
    p.add_argument("--wide-train", type=int, default=0,
                   help="also this many scenes of the wide world (seed + 3) in the train split")

    p = sub.add_parser("show", help="save one scene and print its text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="scene.png")

    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train-lmm":
        from flmm_demo.demo_world.lmm import LmmTrainConfig, train

        try:
            config = LmmTrainConfig(
                args.out, seed=args.seed, minutes=args.minutes, tiny=args.tiny, n_scenes=args.scenes,
                vision_share=args.vision_share, low_res_share=args.low_res_share, vision_lr=args.vision_lr,
                tune_vision=args.tune_vision, probe_share=args.probe_share, attention_weight=args.attention_weight,
                ground_share=args.ground_share,
                ground_turns=args.ground_turns, init=args.init, chat_lr=args.chat_lr, rope_theta=args.rope_theta,
                context=args.context,
                wide_share=args.wide_share, short_qa=args.short_qa, vcot_share=args.vcot_share,
                balanced_share=args.balanced_share, answer_only=args.answer_only,
                cue_attention=args.cue_attention, cue_groups=args.cue_groups, cue_near=args.cue_near,
                object_weight=args.object_weight, threads=args.threads)
        except ValueError as e:  # flags that do not go together
            parser.error(str(e))
        train(config)
    elif args.command == "train-sam":
        from flmm_demo.demo_world.sam import train as train_sam

        train_sam(args.out, seed=args.seed, minutes=args.minutes, max_steps=args.max_steps,
                  batch_size=args.batch_size, lr=args.lr, eval_scenes=args.eval_scenes, init=args.init,
                  wide=args.wide)
    elif args.command == "rebuild":
        rebuild(dry_run=args.dry_run, install_weights=not args.no_install)
    elif args.command == "eval-lmm":
        from flmm_demo.demo_world.lmm import evaluate

        print(json.dumps(evaluate(args.model, seed=args.seed, n=args.n, held_out=args.held_out)))
    elif args.command == "write-refer":
        from flmm_demo.demo_world.scenes import write_refer_dataset

        write_refer_dataset(args.out, args.train, args.seed, "train")
        if args.wide_train:
            write_refer_dataset(args.out, args.wide_train, args.seed + 3, "train", wide=True)
        write_refer_dataset(args.out, args.val, args.seed + 1, "val")
        if args.held_out:
            write_refer_dataset(args.out, args.held_out, args.seed + 2, "testB", held_out=True)
        print(f"wrote {args.out}")
    elif args.command == "show":
        import numpy as np

        from flmm_demo.demo_world.scenes import describe, make_scene, questions_and_answers, referring_expressions

        scene = make_scene(args.seed)
        scene.pil().save(args.out)
        print(describe(scene))
        for names in referring_expressions(scene):
            print("  refs:", "; ".join(names))
        for q, a in questions_and_answers(scene, np.random.default_rng(args.seed))[:6]:
            print(f"  Q: {q}  A: {a}")


def rebuild(dry_run: bool = False, install_weights: bool = True, root: str = ".") -> None:
    """Run the recipe's steps in order in `root` (the repository), each as its own process;
    a step whose output is already there is skipped, so an interrupted rebuild resumes
    where it stopped."""
    import subprocess
    import sys
    from pathlib import Path

    from flmm_demo.demo_world import recipe

    base = Path(root)
    for k, step in enumerate(recipe.STEPS, start=1):
        skip = recipe.done(step, base)
        print(f"[{k}/{len(recipe.STEPS)}] {step.why} ({'done, skipped' if skip else 'to run'})\n    {step.command()}",
              flush=True)
        if not (dry_run or skip):
            subprocess.run([sys.executable, "-m", step.module, *step.args], cwd=base, check=True)
    if install_weights and not dry_run:
        for f in recipe.install(base):
            print(f"installed {f}")


if __name__ == "__main__":
    main()
