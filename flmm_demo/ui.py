"""The Gradio app: upload an image, chat about it, see every phrase of the answer as a mask.

A thin layer over the library: each callback reads the browser's `UIState`, calls a
`Session` (chat, ground, visual chain of thought) and turns the results into component
values with `flmm_demo.render`. No model logic lives here.

    demo = build_demo(Grounder.from_preset())
    demo.queue(default_concurrency_limit=2).launch()
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from PIL import Image

from flmm_demo import render
from flmm_demo.demo_world.examples import example_samples, photo_notice
from flmm_demo.grounder import Grounder, Session, VisualCoT, check_question
from flmm_demo.geometry import resize_mask
from flmm_demo.images import ImageError, fit_for_model, load_image
from flmm_demo.presets import PRESETS
from flmm_demo.types import GroundedPhrase, Turn

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
EXPORT_DIR = Path(tempfile.gettempdir()) / "flmm_demo_exports"
SHOW_ALL = "Show all"
DISPLAY_MAX_SIDE = 2048  # longest side of the pictures sent to the browser
MODE_CHOICES = [("F-LMM head", "head"), ("Training-free (attention + SAM prompts)", "training_free")]
DEMO_NOTE = (
    "**Demo model:** a tiny LMM trained on synthetic coloured-shape scenes; for real photos "
    "switch to a real preset (see README)."
)


@dataclass
class Item:
    """One grounded phrase on display. in_answer: it is a span of the shown answer."""

    label: str
    grounded: GroundedPhrase
    in_answer: bool


@dataclass
class UIState:
    """Everything one browser tab owns. Never shared: Gradio copies it per session."""

    session: Session | None = None
    preset: str | None = None
    answer: str = ""
    items: list[Item] = field(default_factory=list)
    selected: int | None = None  # index into items; None shows every mask
    pending: Image.Image | None = None  # a new image waiting for "start a new conversation?"
    export_id: str | None = None  # this tab's download folder; set on first use (the state is deep-copied per tab)


class ModelPool:
    """Loaded Grounders by preset name, shared by every browser tab (weights load once).

    loader: name -> Grounder (Grounder.from_preset); it may raise MissingWeightsError.
    max_loaded: how many models stay in memory; the least recently used one is dropped.
    """

    def __init__(self, default: Grounder, loader: Callable[[str], Grounder] = Grounder.from_preset,
                 max_loaded: int = 2):
        self.default_name = default.info.name
        self._loader = loader
        self._max = max(1, max_loaded)
        self._models: OrderedDict[str, Grounder] = OrderedDict({self.default_name: default})
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The default model first, then every preset."""
        return [self.default_name] + [n for n in PRESETS if n != self.default_name]

    def get(self, name: str | None) -> Grounder:
        name = name or self.default_name
        with self._lock:
            if name not in self._models:
                self._models[name] = self._loader(name)
                while len(self._models) > self._max:
                    self._models.popitem(last=False)
            self._models.move_to_end(name)
            return self._models[name]


# --------------------------------------------------------------------------- text helpers

def model_markdown(grounder: Grounder) -> str:
    """What the active model is and can do, for the settings panel."""
    info = grounder.info
    modes = ", ".join({"head": "F-LMM head", "training_free": "training-free"}[m] for m in info.modes)
    lines = [
        f"**Active model:** `{info.name}` ({info.family})",
        info.description or "",
        f"Grounding: {modes}. SAM refiner: {'yes' if info.has_sam else 'not configured'}.",
    ]
    if info.is_demo:
        lines.append(DEMO_NOTE)
    return "\n\n".join(line for line in lines if line)


def item_label(index: int, text: str, max_chars: int = 40) -> str:
    """'1. a red circle': unique per item, short enough for a radio button and a legend."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return f"{index + 1}. {text}"


def find_span(answer: str, words: str) -> tuple[int, int] | None:
    """Character span of `words` in `answer` (case- and whitespace-insensitive), or None."""
    words = words.strip()
    if not words:
        return None
    pattern = r"\s+".join(re.escape(w) for w in words.split())
    match = re.search(pattern, answer, flags=re.IGNORECASE)
    return (match.start(), match.end()) if match else None


def highlighted(answer: str, items: list[Item]) -> list[tuple[str, str | None]]:
    """HighlightedText value: the answer cut into plain text and labelled phrases.

    Overlapping spans keep the earlier phrase (the later one stays selectable in the list).
    """
    spans = sorted(((it.grounded.phrase.char_span, it.label) for it in items if it.in_answer),
                   key=lambda s: s[0][0])
    out: list[tuple[str, str | None]] = []
    pos = 0
    for (start, end), label in spans:
        if start < pos:
            continue
        if start > pos:
            out.append((answer[pos:start], None))
        out.append((answer[start:end], label))
        pos = end
    if pos < len(answer):
        out.append((answer[pos:], None))
    return out


def _enlarged(image: Image.Image, min_side: int = 256) -> Image.Image:
    """A small crop scaled up (pixels kept sharp) so the browser shows it at a readable size."""
    longest = max(image.size)
    if longest >= min_side:
        return image
    factor = -(-min_side // longest)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _payload_path(payload: Any) -> str | None:
    """File path from a raw (unpreprocessed) gr.Image payload, or None when cleared."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None) or (payload if isinstance(payload, str) else None)


# ------------------------------------------------------------------------------- the app

class DemoApp:
    """The Blocks layout and its callbacks. Build with `build_demo(grounder)`."""

    def __init__(self, pool: ModelPool, export_dir: Path = EXPORT_DIR):
        self.pool = pool
        self.export_dir = export_dir
        self.export_dir.mkdir(parents=True, exist_ok=True)
        self.blocks = self._layout()

    # ------------------------------------------------------------------------ layout
    def _layout(self) -> gr.Blocks:
        grounder = self.pool.get(None)
        examples = example_samples(ASSETS_DIR, demo=grounder.info.is_demo)  # shapes first, photos captioned
        with gr.Blocks(title="F-LMM: grounded chat with a frozen LMM") as demo:
            self.state = gr.State(UIState(), delete_callback=self._forget)
            gr.Markdown("## F-LMM: chat with an image, see what each phrase of the answer refers to")
            self.model_note = gr.Markdown(DEMO_NOTE if grounder.info.is_demo else "", elem_id="model-note")
            with gr.Row():
                with gr.Column(scale=5):
                    self.image_in = gr.Image(label="Image (drop, paste or click to upload)", type="filepath",
                                             sources=["upload", "clipboard"], height=260, elem_id="image-in")
                    with gr.Row(visible=False, elem_id="confirm-row") as self.confirm_row:
                        gr.Markdown("A conversation is in progress. Start a new one with this image?")
                        self.confirm_btn = gr.Button("Start new conversation", variant="primary", elem_id="confirm-new")
                        self.keep_btn = gr.Button("Keep the current one", elem_id="keep-current")
                    self.examples = gr.Dataset(components=[gr.Image(visible=False, type="filepath"),
                                                           gr.Textbox(visible=False)],
                                               samples=[list(e) for e in examples], type="index", label="Examples",
                                               samples_per_page=8, elem_id="examples")
                    self.example_paths = [path for path, _ in examples]
                    self.view = gr.Image(label="Masks", type="pil", interactive=False, format="png",
                                         buttons=["download", "fullscreen"], elem_id="mask-view")
                    self.heat = gr.Image(label="Raw attention of the selected phrase", type="pil",
                                         interactive=False, visible=False, format="png", elem_id="heat-view")
                    with gr.Row():
                        self.alpha = gr.Slider(0.0, 1.0, value=0.55, step=0.05, label="Mask opacity", elem_id="alpha")
                        self.show_heat = gr.Checkbox(label="Show raw attention map", value=False, elem_id="show-heat")
                with gr.Column(scale=6):
                    self.status = gr.Markdown("Upload an image or pick an example to start.", elem_id="status")
                    self.chatbot = gr.Chatbot(label="Conversation", height=300, elem_id="chatbot",
                                              feedback_options=None)
                    with gr.Row():
                        self.question = gr.Textbox(placeholder="Ask about the image, e.g. 'Describe the image.'",
                                                   show_label=False, scale=5, elem_id="question")
                        self.ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                        self.clear_btn = gr.Button("Clear chat", scale=1, elem_id="clear")
                    self.vcot = gr.Checkbox(label="Visual chain of thought (find the relevant object, crop, ask again)",
                                            value=False, elem_id="vcot")
                    self.answer = gr.HighlightedText(label="Grounded answer (click a phrase)", interactive=False,
                                                     show_inline_category=False, combine_adjacent=False,
                                                     elem_id="answer")
                    self.phrase_pick = gr.Radio(choices=[SHOW_ALL], value=SHOW_ALL, label="Mask shown",
                                                elem_id="phrase-pick")
                    with gr.Row():
                        self.ground_text = gr.Textbox(
                            placeholder="Words of the answer, or any expression ('the red circle')",
                            show_label=False, scale=5, elem_id="ground-text")
                        self.ground_btn = gr.Button("Ground", scale=1, elem_id="ground")
                    with gr.Column(visible=False) as self.vcot_panel:
                        gr.Markdown("### Visual chain of thought")
                        with gr.Row():
                            self.vcot_object = gr.Image(label="Relevant object", type="pil", interactive=False,
                                                        format="png")
                            self.vcot_crop = gr.Image(label="Crop shown to the model", type="pil",
                                                      interactive=False, format="png")
                        self.vcot_text = gr.Markdown(elem_id="vcot-text")
                    with gr.Row():
                        self.zip_btn = gr.DownloadButton("Masks (PNG zip)", interactive=False, elem_id="dl-zip")
                        self.json_btn = gr.DownloadButton("Masks (COCO JSON)", interactive=False, elem_id="dl-json")
                        self.png_btn = gr.DownloadButton("Overlay (PNG)", interactive=False, elem_id="dl-png")
                    with gr.Accordion("Settings", open=False, elem_id="settings"):
                        self.preset = gr.Dropdown(choices=self.pool.names, value=self.pool.default_name,
                                                  label="Model preset", elem_id="preset")
                        self.mode = gr.Radio(choices=self._mode_choices(grounder), value=grounder.info.modes[0],
                                             label="Grounding mode", elem_id="mode")
                        self.refine = gr.Checkbox(label="SAM refiner", value=grounder.info.has_sam,
                                                  interactive=grounder.info.has_sam, elem_id="refine")
                        self.max_tokens = gr.Slider(8, 512, value=128, step=8, label="Max answer length (tokens)")
                        self.model_md = gr.Markdown(model_markdown(grounder), elem_id="model-info")
            self.sam_timer = gr.Timer(2.0, active=False)
            self._wire()
        return demo

    def _forget(self, state: UIState) -> None:
        """A tab closed: delete its download folder."""
        if isinstance(state, UIState) and state.export_id:
            shutil.rmtree(self.export_dir / state.export_id, ignore_errors=True)

    @staticmethod
    def _mode_choices(grounder: Grounder) -> list[tuple[str, str]]:
        return [c for c in MODE_CHOICES if c[1] in grounder.info.modes]

    @property
    def _view_outputs(self) -> list[gr.components.Component]:
        return [self.answer, self.phrase_pick, self.view, self.heat, self.zip_btn, self.json_btn, self.png_btn]

    def _wire(self) -> None:
        s, view_in = self.state, [self.alpha, self.show_heat]
        start_out = [self.image_in, self.confirm_row, self.chatbot, self.status, self.vcot_panel, self.sam_timer,
                     s, *self._view_outputs]
        self.image_in.upload(self.on_image, [self.image_in, s], start_out, api_name="set_image", preprocess=False)
        self.examples.click(self.on_example, [self.examples, s], start_out, api_visibility="private")
        self.confirm_btn.click(self.on_confirm, [s], start_out, api_visibility="private")
        self.keep_btn.click(self.on_keep, [s], [self.image_in, self.confirm_row, self.status, s],
                            api_visibility="private")
        ask_in = [self.question, s, self.max_tokens, self.mode, self.refine, self.vcot, *view_in]
        ask_out = [self.question, self.chatbot, self.status, self.vcot_panel, self.vcot_object, self.vcot_crop,
                   self.vcot_text, s, *self._view_outputs]
        self.ask_btn.click(self.on_ask, ask_in, ask_out, api_name="ask")
        self.question.submit(self.on_ask, ask_in, ask_out, api_visibility="private")
        self.clear_btn.click(self.on_clear, [s], [self.chatbot, self.status, self.vcot_panel, s, *self._view_outputs],
                             api_name="clear")
        self.answer.select(self.on_phrase_click, [s, *view_in], [s, *self._view_outputs], api_visibility="private")
        self.phrase_pick.input(self.on_pick, [self.phrase_pick, s, *view_in], [s, *self._view_outputs],
                               api_name="show")
        self.alpha.release(self.on_restyle, [s, *view_in], [self.view, self.heat, self.png_btn],
                           api_visibility="private")
        self.show_heat.change(self.on_restyle, [s, *view_in], [self.view, self.heat, self.png_btn],
                              api_visibility="private")
        ground_in = [self.ground_text, s, self.mode, self.refine, *view_in]
        self.ground_btn.click(self.on_ground, ground_in, [self.status, s, *self._view_outputs], api_name="ground")
        self.ground_text.submit(self.on_ground, ground_in, [self.status, s, *self._view_outputs],
                                api_visibility="private")
        self.preset.change(self.on_preset, [self.preset, s],
                           [self.preset, self.mode, self.refine, self.model_md, self.model_note, self.chatbot,
                            self.status, self.sam_timer, s, *self._view_outputs], api_visibility="private")
        self.sam_timer.tick(self.on_tick, [s], [self.status, self.sam_timer], api_visibility="private",
                            show_progress="hidden")

    # ------------------------------------------------------------------ rendering
    def _render(self, state: UIState, alpha: float, show_heat: bool) -> dict:
        """Component values for the current answer, selection, masks and downloads."""
        items = state.items
        labels = [it.label for it in items]
        out: dict = {
            self.answer: gr.HighlightedText(value=highlighted(state.answer, items) if state.answer else None,
                                            color_map=dict(zip(labels, render.hex_colors(len(items))))),
            self.phrase_pick: gr.Radio(choices=[SHOW_ALL, *labels],
                                       value=labels[state.selected] if state.selected is not None else SHOW_ALL),
        }
        overlay, heat = self._pictures(state, alpha, show_heat)
        out[self.view] = overlay if overlay is not None else self._plain(state)
        out[self.heat] = gr.Image(value=heat, visible=heat is not None)
        out.update(self._exports(state, overlay))
        return out

    @staticmethod
    def _plain(state: UIState) -> Image.Image | None:
        """The image without masks, at display size."""
        return fit_for_model(state.session.image, DISPLAY_MAX_SIDE)[0] if state.session is not None else None

    def _pictures(self, state: UIState, alpha: float, show_heat: bool) -> tuple[Image.Image | None, Image.Image | None]:
        """(overlay, heat map) images for the selection; (None, None) without masks.

        Huge photos are drawn at most DISPLAY_MAX_SIDE px wide for the browser; the
        downloads keep the full size.
        """
        if state.session is None or not state.items:
            return None, None
        items, colors = state.items, render.palette(len(state.items))
        image, scale = fit_for_model(state.session.image, DISPLAY_MAX_SIDE)
        fit = (lambda m: resize_mask(m, image.size)) if scale != 1.0 else (lambda m: m)
        if state.selected is None:
            shown = render.overlay(image, [fit(it.grounded.mask) for it in items], colors, alpha)
            overlay = render.with_legend(shown, [it.label for it in items], colors)
            heat_of = None
        else:
            i = state.selected
            overlay = render.overlay(image, [fit(items[i].grounded.mask)], [colors[i]], alpha, dim_others=True)
            heat_of = items[i].grounded
        heat = render.heatmap_overlay(image, fit(heat_of.heatmap)) if (show_heat and heat_of is not None) else None
        return overlay, heat

    def _exports(self, state: UIState, overlay: Image.Image | None, masks: bool = True) -> dict:
        """Write the masks on display (the selected one or all) and point the download buttons at them.

        masks=False rewrites only the overlay picture (after an opacity change).
        """
        buttons = (self.zip_btn, self.json_btn, self.png_btn) if masks else (self.png_btn,)
        if state.session is None or not state.items or overlay is None:
            return {b: gr.DownloadButton(value=None, interactive=False) for b in buttons}
        state.export_id = state.export_id or uuid.uuid4().hex
        folder = self.export_dir / state.export_id
        folder.mkdir(parents=True, exist_ok=True)
        png_path = folder / "overlay.png"
        overlay.save(png_path)
        out = {self.png_btn: gr.DownloadButton(value=str(png_path), interactive=True)}
        if masks:
            chosen = state.items if state.selected is None else [state.items[state.selected]]
            grounded = [it.grounded for it in chosen]
            image = state.session.image
            zip_path = render.export_png_zip(image, grounded, folder / "masks.zip")
            json_path = render.export_coco_json(image, grounded, folder / "masks_coco.json")
            out[self.zip_btn] = gr.DownloadButton(value=str(zip_path), interactive=True)
            out[self.json_btn] = gr.DownloadButton(value=str(json_path), interactive=True)
        return out

    @staticmethod
    def _chat_messages(history: list[Turn]) -> list[dict]:
        msgs: list[dict] = []
        for turn in history:
            msgs += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        return msgs

    def _set_grounded(self, state: UIState, answer: str, grounded: list[GroundedPhrase]) -> None:
        state.answer = answer
        state.items = [Item(item_label(i, g.phrase.text), g, True) for i, g in enumerate(grounded)]
        state.selected = None

    def _sam_status(self, state: UIState) -> tuple[str, gr.Timer]:
        sam = state.session.sam_status() if state.session is not None else "off"
        if sam == "encoding":
            return " SAM is encoding the image in the background…", gr.Timer(active=True)
        return "", gr.Timer(active=False)

    # ----------------------------------------------------------------- callbacks
    def on_image(self, payload: Any, state: UIState) -> dict:
        """A new image: validate it; start a new conversation, or ask first if one is going on."""
        path = _payload_path(payload)
        if path is None:  # the user cleared the image box; the conversation stays
            return {self.status: "Image box cleared; the conversation about the last image is kept."}
        try:
            image = load_image(path)
        except ImageError as err:
            # Name the user's file, not the server's temporary copy.
            name = (payload.get("orig_name") if isinstance(payload, dict) else None) or Path(path).name
            message = str(err).replace(str(path), name)
            gr.Warning(f"Could not use that file: {message}")
            return {self.image_in: state.session.image if state.session is not None else None,
                    self.status: f"Upload failed: {message}", self.state: state}
        if state.session is not None and state.session.history:
            state.pending = image
            return {self.confirm_row: gr.Row(visible=True), self.state: state,
                    self.status: "A conversation is in progress: start a new one with this image, or keep the current one?"}
        return self._start(state, image)

    def on_example(self, index: int, state: UIState) -> dict:
        """An example was picked: show it in the image box and treat it like an upload."""
        path = self.example_paths[index]
        return {self.image_in: path, **self.on_image({"path": path}, state)}

    def on_confirm(self, state: UIState) -> dict:
        if state.pending is None:
            return {self.confirm_row: gr.Row(visible=False)}
        image, state.pending = state.pending, None
        return self._start(state, image)

    def on_keep(self, state: UIState) -> tuple:
        state.pending = None
        image = state.session.image if state.session is not None else None
        return image, gr.Row(visible=False), "Kept the current conversation.", state

    def _start(self, state: UIState, image: Image.Image) -> dict:
        try:
            grounder = self.pool.get(state.preset)
            state.session = grounder.new_session(image)
        except (ImageError, ValueError) as err:
            gr.Warning(str(err))
            return {self.status: f"Could not start: {err}", self.state: state}
        state.pending = None
        self._set_grounded(state, "", [])
        sam_text, timer = self._sam_status(state)
        width, height = state.session.image.size
        return {
            self.confirm_row: gr.Row(visible=False),
            self.chatbot: [],
            self.status: f"New conversation about a {width}x{height} image. Ask a question.{sam_text}"
                         + f" {photo_notice(state.session.image, grounder.info.is_demo)}".rstrip(),
            self.vcot_panel: gr.Column(visible=False),
            self.sam_timer: timer,
            self.state: state,
            **self._render(state, 0.55, False),
        }

    def on_ask(self, question: str, state: UIState, max_tokens: float, mode: str, refine: bool,
               vcot: bool, alpha: float, show_heat: bool):
        """Stream the answer, then ground its phrases (or run the visual chain of thought)."""
        session = state.session
        if session is None:
            gr.Warning("Upload an image or pick an example first.")
            yield {self.status: "Upload an image or pick an example first."}
            return
        try:
            question = check_question(question or "")
        except ValueError as err:
            gr.Warning(str(err))
            yield {self.status: str(err)}
            return
        before = self._chat_messages(session.history)
        if vcot:
            yield from self._ask_vcot(question, state, before, int(max_tokens), mode, refine, alpha, show_heat)
            return
        chat = before + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield {self.question: "", self.chatbot: chat, self.status: "Answering…", self.vcot_panel: gr.Column(visible=False)}
        try:
            for delta in session.stream_chat(question, max_new_tokens=int(max_tokens)):
                chat[-1]["content"] += delta
                yield {self.chatbot: chat}
        except Exception as err:  # a model error must not lose the chat or the masks
            gr.Warning(f"The model could not answer: {err}")
            yield {self.question: question, self.chatbot: before, self.status: f"The model could not answer: {err}"}
            return
        answer = session.history[-1].assistant
        chat[-1]["content"] = answer
        yield {self.chatbot: chat, self.status: "Grounding the phrases of the answer…"}
        yield self._ground_answer(state, answer, mode, refine, alpha, show_heat)

    def _ground_answer(self, state: UIState, answer: str, mode: str, refine: bool, alpha: float,
                       show_heat: bool) -> dict:
        try:
            grounded = state.session.ground(mode=mode, refine=refine)
        except Exception as err:
            gr.Warning(f"Grounding failed: {err}")
            return {self.status: f"Answered, but grounding failed: {err}"}
        self._set_grounded(state, answer, grounded)
        n = len(grounded)
        text = f"Grounded {n} phrase{'s' if n != 1 else ''}. Click a phrase to see its mask." if n else \
            "No noun phrases found in the answer; type words to ground below."
        sam_text, _ = self._sam_status(state)
        return {self.status: text + sam_text, self.state: state, **self._render(state, alpha, show_heat)}

    def _ask_vcot(self, question: str, state: UIState, before: list, max_tokens: int, mode: str, refine: bool,
                  alpha: float, show_heat: bool):
        session = state.session
        chat = before + [{"role": "user", "content": question},
                         {"role": "assistant", "content": "(finding the relevant object, then looking closer…)"}]
        yield {self.question: "", self.chatbot: chat, self.status: "Visual chain of thought: answering, grounding the relevant object, cropping, answering again…"}
        try:
            cot: VisualCoT = session.visual_cot(question, max_new_tokens=max_tokens, mode=mode, refine=refine)
        except Exception as err:
            gr.Warning(f"The model could not answer: {err}")
            yield {self.question: question, self.chatbot: before, self.status: f"The model could not answer: {err}"}
            return
        chat[-1]["content"] = cot.first_answer  # the conversation's turn; the crop answer is shown beside
        colour = render.palette(1)
        obj_img = (render.overlay(session.image, [cot.object.mask], colour, alpha) if cot.object is not None
                   else session.image)
        obj_text = f"**{cot.object.phrase.text}**" if cot.object is not None else "nothing grounded (whole image used)"
        x0, y0, x1, y1 = cot.crop_box
        text = (f"**First answer (whole image):** {cot.first_answer}\n\n"
                f"**Relevant object:** {obj_text}; crop box ({x0}, {y0}, {x1}, {y1})\n\n"
                f"**Answer with the crop:** {cot.answer}")
        yield {self.chatbot: chat, self.vcot_panel: gr.Column(visible=True), self.vcot_object: obj_img,
               self.vcot_crop: _enlarged(cot.crop), self.vcot_text: text, self.status: "Grounding the phrases of the answer…"}
        yield self._ground_answer(state, cot.first_answer, mode, refine, alpha, show_heat)

    def on_clear(self, state: UIState) -> dict:
        if state.session is not None:
            state.session.clear()
        self._set_grounded(state, "", [])
        return {self.chatbot: [], self.status: "Chat cleared. Ask a new question about the same image.",
                self.vcot_panel: gr.Column(visible=False), self.state: state, **self._render(state, 0.55, False)}

    def on_phrase_click(self, state: UIState, alpha: float, show_heat: bool, evt: gr.SelectData) -> dict:
        """A click on a phrase of the highlighted answer shows that phrase's mask."""
        value = evt.value if isinstance(evt.value, (list, tuple)) else [evt.value, None]
        label = value[1] if len(value) > 1 else None
        labels = [it.label for it in state.items]
        if label not in labels:
            return {self.state: state}
        state.selected = labels.index(label)
        return {self.state: state, **self._render(state, alpha, show_heat)}

    def on_pick(self, choice: str, state: UIState, alpha: float, show_heat: bool) -> dict:
        labels = [it.label for it in state.items]
        state.selected = labels.index(choice) if choice in labels else None
        return {self.state: state, **self._render(state, alpha, show_heat)}

    def on_restyle(self, state: UIState, alpha: float, show_heat: bool) -> dict:
        """Opacity or heat-map toggle changed: redraw only the pictures."""
        overlay, heat = self._pictures(state, alpha, show_heat)
        out = {self.view: overlay if overlay is not None else self._plain(state),
               self.heat: gr.Image(value=heat, visible=heat is not None)}
        out.update(self._exports(state, overlay, masks=False))
        return out

    def on_ground(self, text: str, state: UIState, mode: str, refine: bool, alpha: float, show_heat: bool) -> dict:
        """Ground typed words: a span of the last answer if they occur in it, else an expression."""
        session = state.session
        if session is None:
            gr.Warning("Upload an image or pick an example first.")
            return {self.status: "Upload an image or pick an example first."}
        text = (text or "").strip()
        if not text:
            gr.Warning("Type some words of the answer or an expression to ground.")
            return {self.status: "Type some words of the answer or an expression to ground."}
        span = find_span(state.answer, text) if state.answer else None
        try:
            if span is not None:
                (grounded,) = session.ground(spans=[span], mode=mode, refine=refine)
                how = "words of the answer"
            else:
                grounded = session.ground_expression(text, mode=mode, refine=refine)
                how = "expression"
        except Exception as err:
            gr.Warning(f"Grounding failed: {err}")
            return {self.status: f"Grounding failed: {err}"}
        label = item_label(len(state.items), grounded.phrase.text)
        state.items.append(Item(label, grounded, in_answer=span is not None))
        state.selected = len(state.items) - 1
        return {self.status: f"Grounded the {how} “{grounded.phrase.text}”.", self.state: state,
                **self._render(state, alpha, show_heat)}

    def on_preset(self, name: str, state: UIState) -> dict:
        """Switch this tab to another model; on missing weights say why and stay."""
        current = state.preset or self.pool.default_name
        if name == current:
            return {self.state: state}
        try:
            grounder = self.pool.get(name)
        except Exception as err:  # missing weights, or a model that fails to load: a message, never a traceback
            gr.Warning(str(err))
            return {self.preset: current, self.status: f"Stayed on `{current}`: {err}"}
        state.preset = name
        out = {
            self.mode: gr.Radio(choices=self._mode_choices(grounder), value=grounder.info.modes[0]),
            self.refine: gr.Checkbox(value=grounder.info.has_sam, interactive=grounder.info.has_sam),
            self.model_md: model_markdown(grounder),
            self.model_note: DEMO_NOTE if grounder.info.is_demo else "",
            self.status: f"Switched to `{name}`.",
            self.state: state,
        }
        if state.session is not None:
            state.session = grounder.new_session(state.session.image)
            self._set_grounded(state, "", [])
            sam_text, timer = self._sam_status(state)
            out.update({self.chatbot: [], self.sam_timer: timer,
                        self.status: f"Switched to `{name}`; the conversation starts over.{sam_text}",
                        **self._render(state, 0.55, False)})
        return out

    def on_tick(self, state: UIState) -> tuple:
        sam_text, timer = self._sam_status(state)
        return (sam_text.strip() or "SAM has encoded the image: refined masks are ready.", timer)


def build_demo(grounder: Grounder, *, loader: Callable[[str], Grounder] = Grounder.from_preset,
               export_dir: Path = EXPORT_DIR) -> gr.Blocks:
    """The app's Blocks for an already loaded default model; other presets load on demand."""
    return DemoApp(ModelPool(grounder, loader), export_dir).blocks
