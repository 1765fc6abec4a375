"""What a user of the app waits for, through the same Session API the app calls.

For one model (default: the bundled demo) and a few example images, times
  - loading the model (once),
  - new_session (image checks, resizing, SAM encoding started),
  - the first streamed token of the answer, the full answer,
  - grounding every phrase of the answer: the app shows the masks when all are done, so
    this is also the time to the first mask on screen.

    python benchmarks/bench_app_latency.py [--preset NAME] [--device cpu] [--repeats 3]

Prints a markdown table (median over repeats) and the command that produced it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flmm_demo.grounder import Grounder  # noqa: E402

IMAGES = ["assets/shapes_2.png", "assets/shapes_8.png", "assets/shapes_24.png"]
QUESTION = "Describe the image."


def time_one(grounder: Grounder, image: str, max_new_tokens: int, mode: str) -> dict[str, float]:
    """Seconds from the start of the question to each milestone, for one image."""
    t0 = time.perf_counter()
    session = grounder.new_session(ROOT / image)
    t_session = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = None
    n_deltas = 0
    for delta in session.stream_chat(QUESTION, max_new_tokens=max_new_tokens):
        if first is None and delta.strip():
            first = time.perf_counter() - t0
        n_deltas += 1
    t_answer = time.perf_counter() - t0
    grounded = session.ground(mode=mode)
    t_mask = time.perf_counter() - t0
    return {
        "session": t_session,
        "first_token": first if first is not None else t_answer,
        "answer": t_answer,
        "first_mask": t_mask,
        "phrases": float(len(grounded)),
        "deltas": float(n_deltas),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="preset name or model folder (default: the bundled demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--mode", default="auto", choices=["auto", "head", "training_free"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    grounder = Grounder.from_preset(args.preset, device=args.device)
    t_load = time.perf_counter() - t0
    time_one(grounder, IMAGES[0], args.max_new_tokens, args.mode)  # warm-up: first-call overheads

    rows = []
    for image in IMAGES:
        runs = [time_one(grounder, image, args.max_new_tokens, args.mode) for _ in range(args.repeats)]
        rows.append((image, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))

    info = grounder.info
    print(f"model: {info.name} ({info.family}), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"model load: {t_load:.2f} s; question: {QUESTION!r}; max_new_tokens {args.max_new_tokens}; "
          f"mode {args.mode}; median of {args.repeats}\n")
    print("| image | new_session s | first token s | full answer s | masks on screen s | phrases |")
    print("|---|---|---|---|---|---|")
    for image, m in rows:
        print(f"| {Path(image).name} | {m['session']:.3f} | {m['first_token']:.3f} | {m['answer']:.3f} | "
              f"{m['first_mask']:.3f} | {m['phrases']:.0f} |")
    print(f"\ncommand: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
