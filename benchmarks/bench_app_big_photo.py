"""How long a huge photo takes in the app's callbacks, next to the Python API doing the same work.

The app keeps display-size pictures (at most 1280 px a side) and full-size masks only
for the exports; this times, on the bundled demo model and a photo of --size pixels:
  - set image: the app's on_image vs grounder.new_session,
  - ask: the app's on_ask (answer, grounding, drawing, writing the downloads) vs
    session.chat + session.ground,
  - pick one phrase: the app's on_pick (redraw, new downloads for that phrase).

    python benchmarks/bench_app_big_photo.py [--size 7000x5000] [--repeats 2]

Prints a markdown table (median over repeats) and the command that produced it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flmm_demo.grounder import Grounder  # noqa: E402
from flmm_demo.ui_callbacks import Callbacks  # noqa: E402
from flmm_demo.ui_state import ModelPool, SessionRegistry, UIState  # noqa: E402

QUESTION = "Describe the image."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="7000x5000", help="WIDTHxHEIGHT of the photo")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_big_photo_"))
    photo = work / "photo.jpg"
    Image.open(ROOT / "assets" / "shapes_2.png").convert("RGB").resize((width, height)).save(photo, quality=90)

    grounder = Grounder.from_preset()
    callbacks = Callbacks(ModelPool(grounder), SessionRegistry(4), work / "exports", [], 1800)
    times: dict[str, list[float]] = {k: [] for k in ("app_set", "api_set", "app_ask", "api_ask", "app_pick")}
    warnings.simplefilter("ignore")  # gr.Warning outside a request
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        session = grounder.new_session(photo)
        times["api_set"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        session.chat(QUESTION, max_new_tokens=128)
        session.ground()
        times["api_ask"].append(time.perf_counter() - t0)
        session.close()

        state = UIState()
        t0 = time.perf_counter()
        callbacks.on_image({"path": str(photo)}, state)
        times["app_set"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        *_, last = callbacks.on_ask(QUESTION, state, 128, "head", True, False, 0.55, False)
        times["app_ask"].append(time.perf_counter() - t0)
        assert state.items, last.get("status")
        t0 = time.perf_counter()
        callbacks.on_pick(state.items[0].label, state, 0.55, False)
        times["app_pick"].append(time.perf_counter() - t0)
        state.release()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nDemo model, a {width}x{height} photo ({width * height / 1e6:.0f} MP), median of {args.repeats}\n")
    print("| step | app callbacks (s) | Python API (s) |")
    print("|---|---|---|")
    print(f"| set image | {med['app_set']:.2f} | {med['api_set']:.2f} |")
    print(f"| ask: answer, ground, draw, write downloads | {med['app_ask']:.2f} | {med['api_ask']:.2f} (chat + ground) |")
    print(f"| pick one phrase | {med['app_pick']:.2f} | - |")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"Command: python benchmarks/bench_app_big_photo.py --size {args.size} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
