"""Does the app give memory back when its visitors leave?

Starts `python app.py` with a short --session-ttl, then drives N sessions through its
API with gradio_client, each on a 12-megapixel photo-sized image: set the image, ask,
ground typed words, then leave (the client stops calling; only the TTL frees it). The
app's resident memory (RSS) is sampled all along.

    python benchmarks/bench_app_memory.py [--sessions 8] [--parallel 2] [--ttl 30] [--megapixels 12]

Prints a markdown table: RSS after start-up (after one warm-up session has come and
gone, so imports and lazy model buffers are counted as start-up), at the peak, and once
every session's TTL has passed, and the command that produced it. Goal: the last figure
within 10% of the first.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "assets" / "shapes_2.png"  # a red cross, a purple circle and a yellow square


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_image(megapixels: float, folder: Path) -> Path:
    """The demo scene scaled up to about `megapixels`, saved as a JPEG (a phone photo's size)."""
    scene = Image.open(SCENE).convert("RGB")
    scale = (megapixels * 1e6 / (scene.width * scene.height)) ** 0.5
    size = (round(scene.width * scale), round(scene.height * scale))
    path = folder / f"scene_{size[0]}x{size[1]}.jpg"
    scene.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return path


class RssSampler:
    """Samples a process's RSS every `period` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, period: float = 0.2):
        self.process = psutil.Process(pid)
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.now()
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def one_session(url: str, image: Path) -> str:
    """Set an image, ask, ground typed words, then leave; returns the answer."""
    client = Client(url, verbose=False, download_files=False)  # the files are not what is measured
    client.predict(handle_file(str(image)), api_name="/set_image")
    out = client.predict("Describe the image.", 128, "head", True, False, 0.55, False, api_name="/ask")
    client.predict("the red cross", "head", True, 0.55, False, api_name="/ground")
    answer = next((v for v in out if isinstance(v, str) and v and v != "Describe the image."), "")
    client.close()
    return answer


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"app.py exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"app.py did not answer on {url} within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2, help="sessions driven at once")
    parser.add_argument("--ttl", type=float, default=30.0, help="the app's --session-ttl, seconds")
    parser.add_argument("--megapixels", type=float, default=12.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_app_memory_"))
    image = big_image(args.megapixels, work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--session-ttl", str(args.ttl),
                                 "--concurrency", str(args.parallel), "--max-sessions", str(args.sessions + 1)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(url, proc, log)
        sampler = RssSampler(proc.pid)
        at_boot = sampler.now()
        one_session(url, image)  # warm-up: lazy buffers, first-call caches, the upload route
        time.sleep(args.ttl + 5)
        baseline = sampler.now()
        sampler.peak = baseline
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            answers = list(pool.map(lambda _: one_session(url, image), range(args.sessions)))
        driven_s = time.perf_counter() - t0
        at_end = sampler.now()
        time.sleep(args.ttl + 5)  # every session expires; Gradio checks each second
        after = sampler.now()
        peak = sampler.peak
        sampler.stop()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    mb = 1024 ** 2
    width, height = Image.open(image).size
    print(f"\n{args.sessions} sessions ({args.parallel} at once) on a {width}x{height} image "
          f"({width * height / 1e6:.1f} MP), --session-ttl {args.ttl:g} s; driven in {driven_s:.0f} s; "
          f"answers non-empty: {sum(bool(a) for a in answers)}/{len(answers)}\n")
    print("| app RSS | MiB |")
    print("|---|---|")
    print(f"| right after start-up | {at_boot / mb:.0f} |")
    print(f"| after start-up and one warm-up session expired (baseline) | {baseline / mb:.0f} |")
    print(f"| peak while the sessions ran | {peak / mb:.0f} |")
    print(f"| when the last session left | {at_end / mb:.0f} |")
    print(f"| after the TTL passed | {after / mb:.0f} ({(after - at_boot) / at_boot:+.1%} vs start-up, "
          f"{(after - baseline) / baseline:+.1%} vs baseline) |")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"Command: python benchmarks/bench_app_memory.py --sessions {args.sessions} --parallel {args.parallel} "
          f"--ttl {args.ttl:g} --megapixels {args.megapixels:g}")


if __name__ == "__main__":
    main()
