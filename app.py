"""Launch the F-LMM Gradio demo: `python app.py [--preset NAME] [--port 7860] [--host 0.0.0.0] [--share]`.

Binds to 127.0.0.1 unless --host is given (--share tunnels to that local port). The default model is the bundled
demo (checkpoints/demo-shapes/) or the preset named by $FLMM_PRESET.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import asdict

# A local demo sends nothing anywhere unless asked to (--share).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from flmm_demo.devices import add_load_arguments, load_options
from flmm_demo.grounder import Grounder
from flmm_demo.presets import MissingWeightsError
from flmm_demo.ui import ASSETS_DIR, EXPORT_DIR, build_demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="F-LMM demo: chat with an image and see each phrase as a mask.")
    parser.add_argument("--preset", default=None,
                        help="model preset, hub id or model folder (default: $FLMM_PRESET or demo-shapes)")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 for the LAN)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-file-size", default="20mb", help="largest upload accepted (default 20mb)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests the app works on at once")
    add_load_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Presets chosen later in Settings load on the same device, dtype and quantization.
    loader = functools.partial(Grounder.from_preset, **asdict(load_options(args)))
    try:
        grounder = loader(args.preset)
    except (MissingWeightsError, ValueError) as err:
        sys.exit(f"Cannot start the demo: {err}")
    demo = build_demo(grounder, loader=loader)
    host = args.host or "127.0.0.1"  # --share tunnels to the local port; no need to open the LAN
    demo.queue(default_concurrency_limit=args.concurrency, max_size=32).launch(
        server_name=host,
        server_port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        allowed_paths=[str(ASSETS_DIR), str(EXPORT_DIR)],
        show_error=True,
    )


if __name__ == "__main__":
    main()
