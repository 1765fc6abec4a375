"""The Gradio app's page: its components and which callback each event runs.

The callbacks (`flmm_demo.ui_callbacks`) return {component name: value}; this module
names the components and maps those names back when it wires them. No model logic and
no drawing lives here.

    demo = build_demo(Grounder.from_preset())
    demo.queue(default_concurrency_limit=2).launch()
"""
from __future__ import annotations

import functools
import inspect
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from flmm_demo.demo_world.examples import example_samples
from flmm_demo.grounder import Grounder
from flmm_demo.ui_callbacks import (
    DEFAULT_ALPHA,
    DEMO_NOTE,
    SHOW_ALL,
    VIEW,
    Callbacks,
    mode_choices,
    model_markdown,
)
from flmm_demo.ui_state import ModelPool, SessionRegistry, UIState

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EXPORT_DIR = Path(tempfile.gettempdir()) / "flmm_demo_exports"
DEFAULT_SESSION_TTL_S = 30 * 60
DEFAULT_MAX_SESSIONS = 32


def example_paths() -> list[str]:
    """The example images: demo-model scenes first, then photos (the Dataset's order)."""
    return [path for path, _ in example_samples(ASSETS_DIR, demo=True)]


class DemoPage:
    """The Blocks layout (`self.c`: component name -> component) wired to a `Callbacks`."""

    def __init__(self, callbacks: Callbacks, grounder: Grounder, session_ttl_s: float):
        self.callbacks = callbacks
        self.c: dict[str, Any] = {}
        with gr.Blocks(title="F-LMM: grounded chat with a frozen LMM") as self.blocks:
            self._layout(grounder, session_ttl_s)
            self._wire()

    def _layout(self, grounder: Grounder, session_ttl_s: float) -> None:
        c, info = self.c, grounder.info
        ttl = None if math.isinf(session_ttl_s) else session_ttl_s
        # Gradio gives each tab its own deep copy of this empty state.
        c["state"] = gr.State(UIState(), time_to_live=ttl, delete_callback=self.callbacks.registry.expire)
        gr.Markdown("## F-LMM: chat with an image, see what each phrase of the answer refers to")
        c["model_note"] = gr.Markdown(DEMO_NOTE if info.is_demo else "", label="Model note", elem_id="model-note")
        with gr.Row():
            with gr.Column(scale=5):
                c["image_in"] = gr.Image(label="Image (drop, paste or click to upload)", type="filepath",
                                         sources=["upload", "clipboard"], height=260, elem_id="image-in")
                with gr.Row(visible=False, elem_id="confirm-row") as c["confirm_row"]:
                    gr.Markdown("A conversation is in progress. Start a new one with this image?")
                    c["confirm_btn"] = gr.Button("Start new conversation", variant="primary", elem_id="confirm-new")
                    c["keep_btn"] = gr.Button("Keep the current one", elem_id="keep-current")
                c["examples"] = gr.Dataset(components=[gr.Image(visible=False, type="filepath"),
                                                       gr.Textbox(visible=False)],
                                           samples=[list(e) for e in example_samples(ASSETS_DIR, info.is_demo)],
                                           type="index", label="Examples", samples_per_page=8, elem_id="examples")
                c["view"] = gr.Image(label="Masks", type="pil", interactive=False, format="png",
                                     buttons=["download", "fullscreen"], elem_id="mask-view")
                c["heat"] = gr.Image(label="Raw attention", type="pil", interactive=False, visible=False,
                                     format="png", elem_id="heat-view")
                with gr.Row():
                    c["alpha"] = gr.Slider(0.0, 1.0, value=DEFAULT_ALPHA, step=0.05, label="Mask opacity",
                                           elem_id="alpha")
                    c["show_heat"] = gr.Checkbox(label="Show raw attention map", value=False, elem_id="show-heat")
            with gr.Column(scale=6):
                c["status"] = gr.Markdown("Upload an image or pick an example to start.", label="Status",
                                          elem_id="status")
                c["sam_status"] = gr.Markdown("", label="SAM status", elem_id="sam-status")
                c["chatbot"] = gr.Chatbot(label="Conversation", height=300, elem_id="chatbot", feedback_options=None)
                with gr.Row():
                    c["question"] = gr.Textbox(placeholder="Ask about the image, e.g. 'Describe the image.'",
                                               label="Question", show_label=False, scale=5, elem_id="question")
                    c["ask_btn"] = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                    c["clear_btn"] = gr.Button("Clear chat", scale=1, elem_id="clear")
                c["vcot"] = gr.Checkbox(label="Visual chain of thought (find the relevant object, crop, ask again)",
                                        value=False, elem_id="vcot")
                c["answer"] = gr.HighlightedText(label="Grounded answer (click a phrase)", interactive=False,
                                                 show_inline_category=False, combine_adjacent=False, elem_id="answer")
                c["answer_text"] = gr.Textbox(label="Answer", visible=False, elem_id="answer-text")
                with gr.Row():
                    c["phrase_pick"] = gr.Radio(choices=[SHOW_ALL], value=SHOW_ALL, label="Mask shown", scale=5,
                                                elem_id="phrase-pick")
                    c["remove_btn"] = gr.Button("Remove typed mask", interactive=False, scale=1, size="sm",
                                                elem_id="remove")
                with gr.Row():
                    c["ground_text"] = gr.Textbox(placeholder="Words of the answer, or any expression ('the red circle')",
                                                  label="Words to ground", show_label=False, scale=5,
                                                  elem_id="ground-text")
                    c["ground_btn"] = gr.Button("Ground", scale=1, elem_id="ground")
                with gr.Column(visible=False) as c["vcot_panel"]:
                    gr.Markdown("### Visual chain of thought")
                    with gr.Row():
                        c["vcot_object"] = gr.Image(label="Relevant object", type="pil", interactive=False,
                                                    format="png")
                        c["vcot_crop"] = gr.Image(label="Crop shown to the model", type="pil", interactive=False,
                                                  format="png")
                    c["vcot_text"] = gr.Markdown(label="Visual chain of thought", elem_id="vcot-text")
                with gr.Row():
                    c["zip_btn"] = gr.DownloadButton("Masks (PNG zip)", interactive=False, elem_id="dl-zip")
                    c["json_btn"] = gr.DownloadButton("Masks (COCO JSON)", interactive=False, elem_id="dl-json")
                    c["png_btn"] = gr.DownloadButton("Overlay (PNG)", interactive=False, elem_id="dl-png")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    c["preset"] = gr.Dropdown(choices=self.callbacks.pool.names, value=self.callbacks.pool.default_name,
                                              label="Model preset", elem_id="preset")
                    c["mode"] = gr.Radio(choices=mode_choices(grounder), value=info.modes[0], label="Grounding mode",
                                         elem_id="mode")
                    c["refine"] = gr.Checkbox(label="SAM refiner", value=info.has_sam, interactive=info.has_sam,
                                              elem_id="refine")
                    c["max_tokens"] = gr.Slider(8, 512, value=128, step=8, label="Max answer length (tokens)",
                                                elem_id="max-tokens")
                    c["model_md"] = gr.Markdown(model_markdown(grounder), label="Model info", elem_id="model-info")
        c["sam_timer"] = gr.Timer(2.0, active=False)

    def _wire(self) -> None:
        c, cb = self.c, self.callbacks
        view_in = ("alpha", "show_heat")
        start_out = ("image_in", "confirm_row", "chatbot", "status", "sam_status", "vcot_panel", "sam_timer",
                     "state", *VIEW)
        private = {"api_visibility": "private"}
        # The API's /set_image leaves the timer out (it has no name to show); a private step starts it.
        self._on([c["image_in"].upload], cb.on_image, ("image_in", "state"),
                 tuple(n for n in start_out if n != "sam_timer"), api_name="set_image", preprocess=False,
                 ignored=("sam_timer",)).then(
            self._bound(cb.on_tick, ("sam_status", "sam_timer")), [c["state"]], [c["sam_status"], c["sam_timer"]],
            show_progress="hidden", **private)
        self._on([c["image_in"].clear], cb.on_image_cleared, ("state",), start_out, **private)
        self._on([c["examples"].click], cb.on_example, ("examples", "state"), start_out, **private)
        self._on([c["confirm_btn"].click], cb.on_confirm, ("state",), start_out, **private)
        self._on([c["keep_btn"].click], cb.on_keep, ("state",), ("image_in", "confirm_row", "status", "state"),
                 **private)

        ask_in = ("question", "state", "max_tokens", "mode", "refine", "vcot", *view_in)
        ask_out = ("question", "chatbot", "status", "vcot_panel", "vcot_object", "vcot_crop", "vcot_text",
                   "answer_text", "state", *VIEW)
        self._on([c["ask_btn"].click], cb.on_ask, ask_in, ask_out, api_name="ask")
        self._on([c["question"].submit], cb.on_ask, ask_in, ask_out, **private)
        self._on([c["clear_btn"].click], cb.on_clear, ("state",), ("chatbot", "status", "vcot_panel", "state", *VIEW),
                 api_name="clear")

        mask_out = ("status", "state", *VIEW)
        self._on([c["answer"].select], cb.on_phrase_click, ("state", *view_in), ("state", *VIEW), **private)
        self._on([c["phrase_pick"].input], cb.on_pick, ("phrase_pick", "state", *view_in), ("state", *VIEW),
                 api_name="show")
        # release: the mouse let go; input: a value typed in the box (Enter) or arrow keys.
        self._on([c["alpha"].release, c["alpha"].input, c["show_heat"].input], cb.on_restyle, ("state", *view_in),
                 ("view", "heat", "png_btn"), trigger_mode="always_last", **private)
        ground_in = ("ground_text", "state", "mode", "refine", *view_in)
        self._on([c["ground_btn"].click], cb.on_ground, ground_in, mask_out, api_name="ground")
        self._on([c["ground_text"].submit], cb.on_ground, ground_in, mask_out, **private)
        self._on([c["remove_btn"].click], cb.on_remove, ("state", *view_in), mask_out, api_name="remove")
        # .input, not .change: a preset switch sets these too, and must not re-ground.
        self._on([c["mode"].input, c["refine"].input], cb.on_settings, ("state", "mode", "refine", *view_in),
                 mask_out, trigger_mode="always_last", **private)
        self._on([c["max_tokens"].release], cb.on_max_tokens, (), ("status",), **private)
        self._on([c["preset"].input], cb.on_preset, ("preset", "state"),
                 ("preset", "mode", "refine", "model_md", "model_note", "chatbot", "status", "sam_status",
                  "sam_timer", "state", *VIEW), **private)
        self._on([c["sam_timer"].tick], cb.on_tick, ("state",), ("sam_status", "sam_timer"), show_progress="hidden",
                 **private)
        self.blocks.unload(cb.on_unload)

    def _on(self, triggers: Sequence[Any], fn: Callable, inputs: Sequence[str], outputs: Sequence[str],
            ignored: Sequence[str] = (), **kwargs: Any) -> Any:
        return gr.on(triggers, self._bound(fn, outputs, ignored), [self.c[n] for n in inputs],
                     [self.c[n] for n in outputs], **kwargs)

    def _bound(self, fn: Callable, outputs: Sequence[str], ignored: Sequence[str] = ()) -> Callable:
        """`fn` returning {component: value} instead of {name: value}; Gradio still sees fn's
        signature (gr.Request, gr.SelectData) and whether it streams. `ignored`: names fn
        may return that this event does not show."""
        allowed = set(outputs)

        def by_component(update: dict[str, Any]) -> dict[Any, Any]:
            update = {k: v for k, v in update.items() if k not in ignored}
            unknown = set(update) - allowed
            if unknown:  # a wiring mistake, not a user error
                raise KeyError(f"{fn.__name__} returned {sorted(unknown)}, which are not among its outputs")
            return {self.c[name]: value for name, value in update.items()}

        registry = self.callbacks.registry

        def tab_state(args: tuple) -> UIState | None:
            return next((a for a in args if isinstance(a, UIState)), None)

        # While an event runs, its tab's state is marked busy, so an idle-TTL expiry that
        # lands meanwhile does not free what the event is still using.
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any):
                state, handed_back = tab_state(args), False
                if state is not None:
                    registry.started(state)
                try:
                    for update in fn(*args, **kwargs):
                        handed_back = handed_back or "state" in update
                        yield by_component(update)
                finally:
                    if state is not None:
                        registry.finished(state, handed_back)
            return stream

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any):
            state, update = tab_state(args), {}
            if state is not None:
                registry.started(state)
            try:
                update = fn(*args, **kwargs)
                return by_component(update)
            finally:
                if state is not None:
                    registry.finished(state, "state" in (update or {}))
        return call


def build_demo(grounder: Grounder, *, loader: Callable[[str], Grounder] = Grounder.from_preset,
               export_dir: Path = EXPORT_DIR, session_ttl_s: float = DEFAULT_SESSION_TTL_S,
               max_sessions: int = DEFAULT_MAX_SESSIONS) -> gr.Blocks:
    """The app's Blocks for an already loaded default model; other presets load on demand.

    session_ttl_s: a tab idle this long loses its session (math.inf: never).
    max_sessions: sessions held at once; newcomers beyond it are asked to come back later.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    callbacks = Callbacks(ModelPool(grounder, loader), SessionRegistry(max_sessions), export_dir, example_paths(),
                          session_ttl_s)
    return DemoPage(callbacks, grounder, session_ttl_s).blocks
