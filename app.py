"""Launch the F-LMM Gradio demo: `python app.py [--preset NAME] [--port 7860] [--host 0.0.0.0] [--share]`.

Binds to 127.0.0.1 unless --host is given (--share tunnels to that local port). The default model is the bundled
demo (checkpoints/demo-shapes/) or the preset named by $FLMM_PRESET. Every option is checked before the model
loads; a bad one stops with a message naming the option and what it accepts.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict

# A local demo sends nothing anywhere unless asked to (--share).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from flmm_demo.devices import add_load_arguments, load_options
from flmm_demo.grounder import Grounder
from flmm_demo.phrases import SpacyModelMissing, load_spacy
from flmm_demo.presets import MissingWeightsError
from flmm_demo.ui import ASSETS_DIR, DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL_S, EXPORT_DIR, build_demo

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
MAX_FILE_SIZE_RANGE = (1000, 2 * 1000**3)  # 1 kb .. 2 gb


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number from low to high."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}")
        return value
    return parse


def file_size(text: str) -> int:
    """argparse type: '20mb', '500kb', '1gb' or a number of bytes -> bytes, within MAX_FILE_SIZE_RANGE."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?b?)\s*", text.lower())
    low, high = MAX_FILE_SIZE_RANGE
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"must be a size such as 20mb, 500kb or 1gb (from 1kb to 2gb), got {text!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if not low <= size <= high:
        raise argparse.ArgumentTypeError(f"must be from 1kb to 2gb, got {text!r}")
    return size


def session_ttl(text: str) -> float:
    """argparse type: seconds an idle tab keeps its session, at least 10; 0 keeps it until the tab closes."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0:
        return math.inf
    if not 10 <= value <= 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 10 to 604800 (a week), or 0 to keep sessions until their tab "
            f"closes; got {text!r}")
    return value


def host(text: str) -> str:
    """argparse type: a bind address or host name (no scheme, no port)."""
    if not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]+", text) or "//" in text:
        raise argparse.ArgumentTypeError(f"must be an address such as 127.0.0.1 or 0.0.0.0, got {text!r}")
    return text


def big_buffers_outside_the_heap(threshold: int = 1 << 20) -> None:
    """Have glibc map every buffer of `threshold` bytes or more on its own, so it goes back to
    the OS when freed. By default glibc raises this threshold after the first big free, and a
    server's decoded photos and masks then stay in its heaps: its RSS would stay at its peak
    after every visitor left. No-op where the C library is not glibc."""
    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="F-LMM demo: chat with an image and see each phrase as a mask.")
    parser.add_argument("--preset", default=None,
                        help="model preset, hub id or model folder (default: $FLMM_PRESET or demo-shapes)")
    parser.add_argument("--host", type=host, default=None,
                        help="address to bind (default 127.0.0.1; 0.0.0.0 for the LAN)")
    parser.add_argument("--port", type=int_in(1, 65535), default=7860, help="port, 1 to 65535 (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-file-size", type=file_size, default="20mb",
                        help="largest upload accepted, 1kb to 2gb (default 20mb)")
    parser.add_argument("--concurrency", type=int_in(1, 64), default=2,
                        help="requests the app works on at once, 1 to 64 (default 2)")
    parser.add_argument("--session-ttl", type=session_ttl, default=float(DEFAULT_SESSION_TTL_S),
                        help="seconds an idle tab keeps its image, chat and masks before they are freed, "
                             f"10 to 604800, or 0 for until the tab closes (default {DEFAULT_SESSION_TTL_S})")
    parser.add_argument("--max-sessions", type=int_in(1, 10_000), default=DEFAULT_MAX_SESSIONS,
                        help="sessions held at once; newcomers beyond it are asked to come back later, "
                             f"1 to 10000 (default {DEFAULT_MAX_SESSIONS})")
    add_load_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    big_buffers_outside_the_heap()
    # Presets chosen later in Settings load on the same device, dtype and quantization.
    loader = functools.partial(Grounder.from_preset, **asdict(load_options(args)))
    try:
        grounder = loader(args.preset)
    except (MissingWeightsError, ValueError) as err:
        sys.exit(f"Cannot start the demo: {err}")
    try:  # loaded once per process anyway: now, so the first visitor does not wait for it
        load_spacy()
    except SpacyModelMissing as err:
        print(f"Warning: answers will not be grounded: {err}", file=sys.stderr)
    demo = build_demo(grounder, loader=loader, session_ttl_s=args.session_ttl, max_sessions=args.max_sessions)
    host_name = args.host or "127.0.0.1"  # --share tunnels to the local port; no need to open the LAN
    demo.queue(default_concurrency_limit=args.concurrency, max_size=32).launch(
        server_name=host_name,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        allowed_paths=[str(ASSETS_DIR), str(EXPORT_DIR)],
        show_error=True,
    )


if __name__ == "__main__":
    main()
