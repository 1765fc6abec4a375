"""The app's callbacks: one method per user action, from a tab's `UIState` to what the page shows.

Each method takes the values of its input components and returns (or, while it
streams, yields) {component name: new value}; `flmm_demo.ui` names the components and
wires these methods to their events. The library does the work (`Session`), `ui_state`
draws it; nothing here knows a model.

Two rules keep messages honest:
- the status line belongs to what the user did: background work (SAM encoding) writes
  only its own indicator, so an error stays until the user acts again;
- a long event checks that its session is still the tab's before it writes: a result
  of an image or model the user has since replaced is dropped, not shown over the new one.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from flmm_demo import render
from flmm_demo.demo_world.examples import photo_notice
from flmm_demo.grounder import Grounder, Mode, Session, VisualCoT, check_question
from flmm_demo.geometry import resize_mask
from flmm_demo.images import ImageError, load_image
from flmm_demo.types import Turn
from flmm_demo.ui_state import Item, ModelPool, SessionRegistry, UIState, highlighted, pictures, write_exports

SHOW_ALL = "Show all"
DEFAULT_ALPHA = 0.55
MODE_CHOICES: list[tuple[str, Mode]] = [("F-LMM head", "head"),
                                        ("Training-free (attention + SAM prompts)", "training_free")]
DEMO_NOTE = (
    "**Demo model:** a tiny LMM trained on synthetic coloured-shape scenes; for real photos "
    "switch to a real preset (see README)."
)
# The components every change of masks or selection redraws.
VIEW = ("answer", "phrase_pick", "view", "heat", "zip_btn", "json_btn", "png_btn", "remove_btn")
Update = dict[str, Any]


def model_markdown(grounder: Grounder) -> str:
    """What the active model is and can do, for the settings panel."""
    info = grounder.info
    modes = ", ".join(label for label, mode in MODE_CHOICES if mode in info.modes)
    lines = [
        f"**Active model:** `{info.name}` ({info.family})",
        info.description or "",
        f"Grounding: {modes}. SAM refiner: {'yes' if info.has_sam else 'not configured'}.",
    ]
    if info.is_demo:
        lines.append(DEMO_NOTE)
    return "\n\n".join(line for line in lines if line)


def mode_choices(grounder: Grounder) -> list[tuple[str, Mode]]:
    return [c for c in MODE_CHOICES if c[1] in grounder.info.modes]


def payload_path(payload: Any) -> str | None:
    """File path from a raw (unpreprocessed) gr.Image payload, or None when cleared."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None) or (payload if isinstance(payload, str) else None)


def chat_messages(history: list[Turn]) -> list[dict]:
    msgs: list[dict] = []
    for turn in history:
        msgs += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    return msgs


def enlarged(image: Image.Image, min_side: int = 256) -> Image.Image:
    """A small crop scaled up (pixels kept sharp) so the browser shows it at a readable size."""
    longest = max(image.size)
    if longest >= min_side:
        return image
    factor = -(-min_side // longest)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def confidence_note(items: list[Item]) -> str:
    """' Low confidence: ...' naming the unsure masks and why; '' when every mask looks sure."""
    unsure = []
    for it in items:
        if it.unknown:
            unsure.append(f"{it.label} (the model does not know {', '.join(repr(w) for w in it.unknown)})")
        elif it.unsure:
            unsure.append(f"{it.label} (score {it.shown.score:.2f})")
    if not unsure:
        return ""
    return f" Low confidence for {'; '.join(unsure)}: treat {'this mask' if len(unsure) == 1 else 'these masks'} as a guess."


class Callbacks:
    """The app's event handlers; all tabs share one instance, each tab has its own `UIState`.

    pool: the loaded models. registry: live sessions (soft limit, release). export_root:
    where each tab's download folder goes. examples: paths of the example images.
    session_ttl_s: how long an idle tab keeps its session (said in messages).
    """

    def __init__(self, pool: ModelPool, registry: SessionRegistry, export_root: Path, examples: list[str],
                 session_ttl_s: float):
        self.pool = pool
        self.registry = registry
        self.export_root = export_root
        self.examples = examples
        self.session_ttl_s = session_ttl_s

    # ------------------------------------------------------------------ images
    def on_image(self, payload: Any, state: UIState, request: gr.Request | None = None) -> Update:
        """A new image: validate it; start a new conversation, or ask first if one is going on."""
        path = payload_path(payload)
        if path is None:
            return self.on_image_cleared(state)
        try:
            image = load_image(path)
        except ImageError as err:
            # Name the user's file, not the server's temporary copy.
            name = (payload.get("orig_name") if isinstance(payload, dict) else None) or Path(path).name
            message = str(err).replace(str(path), name)
            gr.Warning(f"Could not use that file: {message}")
            return {"image_in": state.display, "status": f"Upload failed: {message}", "state": state}
        if state.session is not None and state.session.history:
            state.pending = image
            return {"confirm_row": gr.Row(visible=True), "state": state,
                    "status": "A conversation is in progress: start a new one with this image, or keep the current one?"}
        return self._start(state, image, request)

    def on_image_cleared(self, state: UIState) -> Update:
        """The image box's X: the image goes, and with it the session (questions now get a message)."""
        had = state.session is not None
        state.release()
        state.image_removed = had
        return {"status": "Image removed. Upload an image or pick an example to ask about it."
                          + (" The conversation above was about the removed image." if had else ""),
                "confirm_row": gr.Row(visible=False), "vcot_panel": gr.Column(visible=False),
                "state": state, **self._sam(state), **self._view(state, DEFAULT_ALPHA, False)}

    def on_example(self, index: int, state: UIState, request: gr.Request | None = None) -> Update:
        """An example was picked: show it in the image box and treat it like an upload."""
        path = self.examples[index]
        return {"image_in": path, **self.on_image({"path": path}, state, request)}

    def on_confirm(self, state: UIState, request: gr.Request | None = None) -> Update:
        if state.pending is None:
            return {"confirm_row": gr.Row(visible=False)}
        return self._start(state, state.pending, request)

    def on_keep(self, state: UIState) -> Update:
        state.pending = None
        return {"image_in": state.display, "confirm_row": gr.Row(visible=False),
                "status": "Kept the current conversation.", "state": state}

    def _start(self, state: UIState, image: Any, request: gr.Request | None) -> Update:
        key = getattr(request, "session_hash", None) or state.key or f"local-{id(state)}"
        if not self.registry.admit(key, state):
            n = self.registry.max_sessions
            message = (f"The demo is busy: it holds {n} conversation{'s' if n != 1 else ''} at once, its limit. "
                       f"Try again in a few minutes (idle ones are released after {self._ttl_text()}).")
            gr.Warning(message)
            return {"status": message, "state": state}
        try:
            session = self.pool.get(state.preset).new_session(image)
        except (ImageError, ValueError) as err:
            gr.Warning(str(err))
            return {"status": f"Could not start: {err}", "state": state}
        state.start(session)
        width, height = session.image.size
        return {
            "confirm_row": gr.Row(visible=False),
            "chatbot": [],
            "status": f"New conversation about a {width}x{height} image. Ask a question."
                      + f" {photo_notice(session.image, session.grounder.info.is_demo)}".rstrip(),
            "vcot_panel": gr.Column(visible=False),
            "state": state,
            **self._sam(state),
            **self._view(state, DEFAULT_ALPHA, False),
        }

    # --------------------------------------------------------------- questions
    def on_ask(self, question: str, state: UIState, max_tokens: float, mode: Mode, refine: bool, vcot: bool,
               alpha: float, show_heat: bool, request: gr.Request | None = None) -> Iterator[Update]:
        """Stream the answer, then ground its phrases (or run the visual chain of thought)."""
        session = state.session
        if session is None:
            message = self._no_session(state, request)
            gr.Warning(message)
            yield {"status": message}
            return
        try:
            question = check_question(question or "")
        except ValueError as err:
            gr.Warning(str(err))
            yield {"status": str(err)}
            return
        before = chat_messages(session.history)
        if vcot:
            yield from self._ask_vcot(question, state, session, before, int(max_tokens), mode, refine, alpha,
                                      show_heat)
            return
        chat = before + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield {"question": "", "chatbot": chat, "status": "Answering…", "vcot_panel": gr.Column(visible=False)}
        try:
            for delta in session.stream_chat(question, max_new_tokens=int(max_tokens)):
                if state.session is not session:
                    return  # the image or model changed meanwhile: the page shows the new session
                chat[-1]["content"] += delta
                yield {"chatbot": chat}
        except Exception as err:  # a model error must not lose the chat or the masks
            if state.session is session:
                gr.Warning(f"The model could not answer: {err}")
                yield {"question": question, "chatbot": before, "status": f"The model could not answer: {err}"}
            return
        if state.session is not session:
            return
        answer = session.history[-1].assistant
        chat[-1]["content"] = answer
        shown = {"chatbot": chat, "answer_text": answer}
        yield shown | {"status": "Grounding the phrases of the answer…"}
        # The last update repeats the answer: an API client (/ask) receives only that one.
        final = self._ground_answer(state, session, answer, mode, refine, alpha, show_heat)
        yield shown | final if final else final

    def _ground_answer(self, state: UIState, session: Session, answer: str, mode: Mode, refine: bool,
                       alpha: float, show_heat: bool) -> Update:
        try:
            grounded = session.ground(mode=mode, refine=refine)
        except Exception as err:
            if state.session is not session:
                return {}
            gr.Warning(f"Grounding failed: {err}")
            return {"status": f"Answered, but grounding failed: {err}"}
        if state.session is not session:
            return {}
        state.set_answer(answer, grounded)
        n = len(grounded)
        text = (f"Grounded {n} phrase{'s' if n != 1 else ''}. Click a phrase to see its mask."
                if n else "No noun phrases found in the answer; type words to ground below.")
        if session.context_note:
            text += " " + session.context_note
        return {"status": text + confidence_note(state.items), "state": state, **self._view(state, alpha, show_heat)}

    def _ask_vcot(self, question: str, state: UIState, session: Session, before: list, max_tokens: int,
                  mode: Mode, refine: bool, alpha: float, show_heat: bool) -> Iterator[Update]:
        chat = before + [{"role": "user", "content": question},
                         {"role": "assistant", "content": "(finding the relevant object, then looking closer…)"}]
        yield {"question": "", "chatbot": chat,
               "status": "Visual chain of thought: answering, grounding the relevant object, cropping, answering again…"}
        try:
            cot: VisualCoT = session.visual_cot(question, max_new_tokens=max_tokens, mode=mode, refine=refine)
        except Exception as err:
            if state.session is session:
                gr.Warning(f"The model could not answer: {err}")
                yield {"question": question, "chatbot": before, "status": f"The model could not answer: {err}"}
            return
        if state.session is not session:
            return
        chat[-1]["content"] = cot.first_answer  # the conversation's turn; the crop answer is shown beside
        display = state.display
        if cot.object is not None:
            shown_mask = resize_mask(cot.object.mask, display.size)
            obj_img = render.overlay(display, [shown_mask], [render.contrasting_color(display, shown_mask)], alpha)
            obj_text = f"**{cot.object.phrase.text}**"
        else:
            obj_img, obj_text = display, "nothing grounded (whole image used)"
        x0, y0, x1, y1 = cot.crop_box
        text = (f"**First answer (whole image):** {cot.first_answer}\n\n"
                f"**Relevant object:** {obj_text}; crop box ({x0}, {y0}, {x1}, {y1})\n\n"
                f"**Answer with the crop:** {cot.answer}")
        shown = {"chatbot": chat, "vcot_panel": gr.Column(visible=True), "vcot_object": obj_img,
                 "vcot_crop": enlarged(cot.crop), "vcot_text": text, "answer_text": cot.first_answer}
        yield shown | {"status": "Grounding the phrases of the answer…"}
        final = self._ground_answer(state, session, cot.first_answer, mode, refine, alpha, show_heat)
        yield shown | final if final else final

    def on_clear(self, state: UIState) -> Update:
        if state.session is not None:
            state.session.clear()
        state.set_answer("", [])
        return {"chatbot": [], "status": "Chat cleared. Ask a new question about the same image.",
                "vcot_panel": gr.Column(visible=False), "state": state, **self._view(state, DEFAULT_ALPHA, False)}

    # ------------------------------------------------------------ the masks
    def on_phrase_click(self, state: UIState, alpha: float, show_heat: bool, evt: gr.SelectData) -> Update:
        """A click on a phrase of the highlighted answer shows that phrase's mask."""
        value = evt.value if isinstance(evt.value, (list, tuple)) else [evt.value, None]
        label = value[1] if len(value) > 1 else None
        labels = [it.label for it in state.items]
        if label not in labels:
            return {"state": state}
        state.selected = labels.index(label)
        return {"state": state, **self._view(state, alpha, show_heat)}

    def on_pick(self, choice: str, state: UIState, alpha: float, show_heat: bool) -> Update:
        labels = [it.label for it in state.items]
        state.selected = labels.index(choice) if choice in labels else None
        return {"state": state, **self._view(state, alpha, show_heat)}

    def on_restyle(self, state: UIState, alpha: float, show_heat: bool) -> Update:
        """Opacity or raw-attention toggle changed: redraw only the pictures."""
        view = self._view(state, alpha, show_heat, masks=False)
        return {k: view[k] for k in ("view", "heat", "png_btn")}

    def on_ground(self, text: str, state: UIState, mode: Mode, refine: bool, alpha: float, show_heat: bool,
                  request: gr.Request | None = None) -> Update:
        """Ground typed words: every place they occur in the answer, else as an expression."""
        session = state.session
        if session is None:
            message = self._no_session(state, request)
            gr.Warning(message)
            return {"status": message}
        if not (text or "").strip():
            gr.Warning("Type some words of the answer or an expression to ground.")
            return {"status": "Type some words of the answer or an expression to ground."}
        try:
            result = session.ground_text(text, mode=mode, refine=refine)
            unknown = tuple(session.grounder.unknown_words(text))
        except Exception as err:
            if state.session is not session:
                return {}
            gr.Warning(f"Grounding failed: {err}")
            return {"status": f"Grounding failed: {err}"}
        if state.session is not session:
            return {}
        added = [state.add(g, in_answer=result.in_answer, typed=True, unknown=unknown) for g in result.grounded]
        state.selected = len(state.items) - 1 if len(added) == 1 else None
        words = added[0].shown.phrase.text
        if result.in_answer:
            times = f" ({len(added)} places)" if len(added) > 1 else ""
            how = f"Grounded the words of the answer “{words}”{times}."
        else:
            how = f"Grounded the expression “{words}”."
        return {"status": how + confidence_note(added), "state": state, **self._view(state, alpha, show_heat)}

    def on_remove(self, state: UIState, alpha: float, show_heat: bool) -> Update:
        """Remove the typed grounding on display from the list."""
        if state.selected is None or not state.items[state.selected].typed:
            return {"status": "Pick a typed grounding under “Mask shown” to remove it; the answer's own "
                              "phrases stay while the answer is shown."}
        item = state.items.pop(state.selected)
        state.selected = None
        return {"status": f"Removed “{item.label}”.", "state": state, **self._view(state, alpha, show_heat)}

    def on_settings(self, state: UIState, mode: Mode, refine: bool, alpha: float, show_heat: bool) -> Update:
        """Grounding mode or SAM refiner changed: ground what is on display again with them."""
        session = state.session
        if session is None or not state.items:
            return {"status": "New grounding settings: they apply to the next grounding."}
        try:
            answer_items = [it for it in state.items if it.in_answer]
            spans = [it.shown.phrase.char_span for it in answer_items]
            again = dict(zip((id(it) for it in answer_items),
                             session.ground(spans=spans, mode=mode, refine=refine) if spans else []))
            for it in state.items:
                if not it.in_answer:
                    again[id(it)] = session.ground_expression(it.shown.phrase.text, mode=mode, refine=refine)
        except Exception as err:
            if state.session is not session:
                return {}
            gr.Warning(f"Grounding failed: {err}")
            return {"status": f"Grounding with the new settings failed ({err}); the masks shown are the old ones."}
        if state.session is not session:
            return {}
        old, selected, made = state.items, state.selected, state.labels_made
        state.items = []
        for it in old:  # same labels, same order: only the masks change
            state.add(again[id(it)], in_answer=it.in_answer, typed=it.typed, unknown=it.unknown).label = it.label
        state.selected, state.labels_made = selected, made
        return {"status": f"Grounded the {len(old)} mask{'s' if len(old) != 1 else ''} on display again with "
                          f"the new settings." + confidence_note(state.items),
                "state": state, **self._view(state, alpha, show_heat)}

    def on_max_tokens(self) -> Update:
        return {"status": "The answer length applies to the next answer."}

    # ------------------------------------------------------------- models
    def on_preset(self, name: str, state: UIState) -> Update:
        """Switch this tab to another model; on missing weights say why and stay."""
        current = state.preset or self.pool.default_name
        if name == current:
            return {"state": state}
        try:
            grounder = self.pool.get(name)
        except Exception as err:  # missing weights, or a model that fails to load: a message, never a traceback
            gr.Warning(str(err))
            return {"preset": current, "status": f"Stayed on `{current}`: {err}"}
        state.preset = name
        out = {
            "mode": gr.Radio(choices=mode_choices(grounder), value=grounder.info.modes[0]),
            "refine": gr.Checkbox(value=grounder.info.has_sam, interactive=grounder.info.has_sam),
            "model_md": model_markdown(grounder),
            "model_note": DEMO_NOTE if grounder.info.is_demo else "",
            "status": f"Switched to `{name}`.",
            "state": state,
        }
        if state.session is not None:
            state.start(grounder.new_session(state.session.image))
            out.update({"chatbot": [], "status": f"Switched to `{name}`; the conversation starts over.",
                        **self._sam(state), **self._view(state, DEFAULT_ALPHA, False)})
        return out

    def on_tick(self, state: UIState) -> Update:
        """The SAM timer: updates only SAM's own indicator, never the status line."""
        return self._sam(state)

    def on_unload(self, request: gr.Request) -> None:
        """The tab closed: free its session now rather than when Gradio drops its state."""
        self.registry.release(request.session_hash)

    # ------------------------------------------------------------ drawing
    def _view(self, state: UIState, alpha: float, show_heat: bool, masks: bool = True) -> Update:
        """What the answer, the mask list, the pictures and the downloads show."""
        items = state.items
        overlay, heat = pictures(state, alpha, show_heat)
        selected = state.selected
        out: Update = {
            "answer": gr.HighlightedText(value=highlighted(state.answer, items) if state.answer else None,
                                         color_map={it.label: render.hex_color(it.colour) for it in items}),
            "phrase_pick": gr.Radio(choices=[SHOW_ALL, *(it.choice() for it in items)],
                                    value=items[selected].label if selected is not None else SHOW_ALL),
            "view": overlay if overlay is not None else state.display,
            "heat": gr.Image(value=heat, visible=heat is not None),
            "remove_btn": gr.Button(interactive=selected is not None and items[selected].typed),
        }
        buttons = ("zip_btn", "json_btn", "png_btn") if masks else ("png_btn",)
        if overlay is None:
            out.update({b: gr.DownloadButton(value=None, interactive=False) for b in buttons})
            return out
        files = write_exports(state, overlay, self.export_root, masks=masks)
        names = {"zip_btn": "zip", "json_btn": "json", "png_btn": "png"}
        out.update({b: gr.DownloadButton(value=str(files[names[b]]), interactive=True) for b in buttons})
        return out

    def _sam(self, state: UIState) -> Update:
        """SAM's indicator and its timer (ticking while the image is being encoded)."""
        status = state.session.sam_status() if state.session is not None else "off"
        text = {"encoding": "SAM is encoding the image in the background…",
                "ready": "SAM has encoded the image: refined masks are ready."}.get(status, "")
        return {"sam_status": text, "sam_timer": gr.Timer(active=status == "encoding")}

    def _no_session(self, state: UIState, request: gr.Request | None) -> str:
        if state.image_removed:
            return "The image was removed: upload an image or pick an example to ask about it."
        if self.registry.was_expired(getattr(request, "session_hash", None)):
            return (f"This tab was idle for more than {self._ttl_text()}, so its image and chat were released "
                    "to free memory: upload the image again.")
        return "Upload an image or pick an example first."

    def _ttl_text(self) -> str:
        minutes = self.session_ttl_s / 60
        if math.isinf(minutes):
            return "never"
        return f"{minutes:g} min" if minutes >= 1 else f"{self.session_ttl_s:g} s"
