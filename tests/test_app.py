"""The app's callbacks without a browser: each event is fired as Gradio fires it (same
inputs, same outputs) on a page model that keeps what each component shows."""
from __future__ import annotations

import copy
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from flmm_demo.grounder import Grounder
from flmm_demo.ui import build_demo

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "assets" / "shapes_2.png"


class Page:
    """What one browser tab shows: component -> value, updated by firing the app's events."""

    def __init__(self, demo: gr.Blocks):
        self.demo = demo
        self.values: dict[Any, Any] = {}
        for block in demo.blocks.values():
            if isinstance(block, gr.State):
                value = block.value
                self.values[block] = value() if callable(value) else copy.deepcopy(value)

    def component(self, elem_id: str) -> Any:
        return next(b for b in self.demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)

    def fire(self, fn_name: str, inputs: dict[str, Any] | None = None, request: Any = None) -> None:
        """Run the event whose callback is `fn_name`; `inputs` (by elem_id) override what the page shows."""
        inputs = inputs or {}
        dep = next(d for d in self.demo.fns.values() if d.name == fn_name)
        args = [inputs[c.elem_id] if c.elem_id in inputs else self.values.get(c) for c in dep.inputs]
        if request is not None:
            args.append(request)
        result = dep.fn(*args)
        for out in (result if dep.types_generator else [result]):
            if isinstance(out, dict):
                self.values.update(out)
            else:
                outs = out if isinstance(out, (tuple, list)) and len(dep.outputs) > 1 else [out]
                self.values.update(zip(dep.outputs, outs))

    def shown(self, elem_id: str) -> Any:
        value = self.values.get(self.component(elem_id))
        return getattr(value, "value", value) if isinstance(value, gr.components.Component) else value


class SamStandIn:
    """A SAM whose encodings finish only when the test says so."""

    def __init__(self):
        self.jobs: list[Future] = []

    def start(self, image) -> Future:
        job: Future = Future()
        self.jobs.append(job)
        return job

    def release(self, job: Future) -> None:
        pass

    def finish(self) -> None:
        for job in self.jobs:
            if not job.done():
                job.set_result(None)


def stub_grounder(sam: Any = None) -> Grounder:
    """A Grounder that can open sessions (load the image, start SAM) but has no model behind it."""
    return Grounder(SimpleNamespace(family="stub"), sam=sam)


def test_sam_finishing_after_an_upload_error_leaves_the_error_shown(tmp_path):
    sam = SamStandIn()
    page = Page(build_demo(stub_grounder(sam), export_dir=tmp_path))
    page.fire("on_image", {"image-in": {"path": str(SCENE), "orig_name": SCENE.name}})
    assert page.shown("status").startswith("New conversation")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    page.fire("on_image", {"image-in": {"path": str(bad), "orig_name": "broken.png"}})
    assert page.shown("status").startswith("Upload failed: broken.png")

    sam.finish()  # SAM finishes after the error was shown; the timer ticks
    page.fire("on_tick")
    assert page.shown("status").startswith("Upload failed: broken.png")
