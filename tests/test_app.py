"""The app's callbacks without a browser: each event is fired as Gradio fires it (same
inputs, same outputs) on a page model that keeps what each component shows."""
from __future__ import annotations

import copy
import io
import zipfile
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from flmm_demo.grounder import Grounder
from flmm_demo.ui import build_demo
from flmm_demo.ui_state import DISPLAY_MAX_SIDE

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "assets" / "shapes_2.png"


class Page:
    """What one browser tab shows: component -> value, updated by firing the app's events."""

    def __init__(self, demo: gr.Blocks):
        self.demo = demo
        self.values: dict[Any, Any] = {}
        for block in demo.blocks.values():
            if isinstance(block, gr.State):
                self.values[block] = copy.deepcopy(block.value)
            elif isinstance(block, gr.components.Component):
                self.values[block] = block.value  # what the page shows before any event

    def component(self, elem_id: str) -> Any:
        return next(b for b in self.demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)

    def fire(self, fn_name: str, inputs: dict[str, Any] | None = None, request: Any = None) -> None:
        """Run the event whose callback is `fn_name`; `inputs` (by elem_id) override what the page shows."""
        inputs = inputs or {}
        dep = next(d for d in self.demo.fns.values() if d.name == fn_name)
        if dep.inputs is None or not dep.outputs:  # demo.unload: no inputs, no outputs
            dep.fn(request)
            return
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

    @property
    def state(self) -> gr.State:
        return next(b for b in self.values if isinstance(b, gr.State))

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


def test_clearing_the_image_box_ends_the_session_and_the_next_question_says_so(tmp_path):
    sam = SamStandIn()
    page = Page(build_demo(stub_grounder(sam), export_dir=tmp_path))
    page.fire("on_image", {"image-in": {"path": str(SCENE)}})
    session = page.values[page.state].session
    page.fire("on_image_cleared")
    assert page.shown("status").startswith("Image removed")
    assert page.values[page.state].session is None and session.image is None
    page.fire("on_ask", {"question": "Describe the image."})
    assert page.shown("status") == "The image was removed: upload an image or pick an example to ask about it."


def test_an_idle_tab_is_released_with_its_sam_embedding_and_told_why(tmp_path):
    released = []
    sam = SamStandIn()
    sam.release = released.append
    page = Page(build_demo(stub_grounder(sam), export_dir=tmp_path, session_ttl_s=60))
    tab = SimpleNamespace(session_hash="tab-1")
    page.fire("on_image", {"image-in": {"path": str(SCENE)}}, request=tab)
    state = page.values[page.state]
    page.state.delete_callback(state)  # what Gradio does when the state's time-to-live has passed
    assert released == sam.jobs and state.session is None
    page.values[page.state] = copy.deepcopy(page.state.value)  # Gradio's fresh state for the same tab
    page.fire("on_ask", {"question": "Describe the image."}, request=tab)
    assert page.shown("status") == ("This tab was idle for more than 1 min, so its image and chat were released "
                                    "to free memory: upload the image again.")


def test_sessions_beyond_the_limit_are_asked_to_come_back_and_a_closed_tab_makes_room(tmp_path):
    demo = build_demo(stub_grounder(SamStandIn()), export_dir=tmp_path, max_sessions=1, session_ttl_s=600)
    first, second = Page(demo), Page(demo)
    first.fire("on_image", {"image-in": {"path": str(SCENE)}}, request=SimpleNamespace(session_hash="a"))
    second.fire("on_image", {"image-in": {"path": str(SCENE)}}, request=SimpleNamespace(session_hash="b"))
    assert second.shown("status") == ("The demo is busy: it holds 1 conversation at once, its limit. Try again in "
                                      "a few minutes (idle ones are released after 10 min).")
    assert second.values[second.state].session is None
    first.fire("on_unload", request=SimpleNamespace(session_hash="a"))  # the first tab closed
    assert first.values[first.state].session is None
    second.fire("on_image", {"image-in": {"path": str(SCENE)}}, request=SimpleNamespace(session_hash="b"))
    assert second.shown("status").startswith("New conversation")


# ------------------------------------------------- masks on a real (tiny, random) LMM

ANSWER = "A red mat and a dog, and another red mat."


@pytest.fixture(scope="module")
def tiny_grounder() -> Grounder:
    """A tiny random LLaVA with an F-LMM head that always answers ANSWER (the masks are real)."""
    import torch

    from flmm_demo.backends.llava import LlavaBackend
    from flmm_demo.backends.testing import tiny_llava
    from flmm_demo.heads import FlmmHead, FlmmHeadConfig

    backend = LlavaBackend(*tiny_llava())

    def fixed_answer(image, history, question, **kwargs):
        yield from (ANSWER[:10], ANSWER[10:])

    backend.stream_chat = fixed_answer
    torch.manual_seed(0)
    config = FlmmHeadConfig(backend.num_layers, backend.num_heads, backend.hidden_size, use_refiner=False)
    return Grounder(backend, FlmmHead(config).eval())


def _asked(grounder: Grounder, tmp_path: Path, image: Path = SCENE) -> Page:
    page = Page(build_demo(grounder, export_dir=tmp_path))
    page.fire("on_image", {"image-in": {"path": str(image)}})
    page.fire("on_ask", {"question": "What is here?", "max-tokens": 16, "mode": "head", "refine": False,
                         "vcot": False, "alpha": 0.55, "show-heat": False})
    assert page.shown("status").startswith("Grounded"), page.shown("status")
    return page


def _path(value: Any) -> str:
    """File path of a component value Gradio has postprocessed (a FileData dict) or not."""
    return value["path"] if isinstance(value, dict) else getattr(value, "path", value)


def _segments(page: Page) -> list[tuple[str, str | None]]:
    """The highlighted answer as (text, label) pieces."""
    value = page.values[page.component("answer")].value
    return [(d["token"], d["class_or_confidence"]) if isinstance(d, dict) else tuple(d) for d in value]


def test_typed_words_are_highlighted_everywhere_they_occur_and_can_be_removed(tiny_grounder, tmp_path):
    page = _asked(tiny_grounder, tmp_path)
    state = page.values[page.state]
    n = len(state.items)
    page.fire("on_ground", {"ground-text": "red mat", "mode": "head", "refine": False})
    assert page.shown("status") == "Grounded the words of the answer “red mat” (2 places)."
    typed = state.items[n:]
    assert [it.shown.phrase.char_span for it in typed] == [(2, 9), (33, 40)]
    # Both places of "red mat" are coloured (inside a longer answer phrase, or as the typed label).
    coloured = "".join(text for text, label in _segments(page) if label)
    assert coloured.count("red mat") == 2

    page.fire("on_pick", {"phrase-pick": typed[0].label, "alpha": 0.55, "show-heat": False})
    page.fire("on_remove", {"alpha": 0.55, "show-heat": False})
    assert page.shown("status") == f"Removed “{typed[0].label}”."
    assert [it.label for it in state.items] == [it.label for it in state.items[:n]] + [typed[1].label]
    page.fire("on_pick", {"phrase-pick": state.items[0].label, "alpha": 0.55, "show-heat": False})
    page.fire("on_remove", {"alpha": 0.55, "show-heat": False})
    assert page.shown("status").startswith("Pick a typed grounding")


def test_changing_the_grounding_mode_grounds_the_masks_on_display_again(tiny_grounder, tmp_path):
    page = _asked(tiny_grounder, tmp_path)
    state = page.values[page.state]
    page.fire("on_ground", {"ground-text": "a blue sky", "mode": "head", "refine": False})
    before = [(it.label, it.shown.mask.copy()) for it in state.items]
    page.fire("on_settings", {"mode": "training_free", "refine": False, "alpha": 0.55, "show-heat": False})
    assert page.shown("status").startswith(f"Grounded the {len(before)} masks on display again")
    assert [it.label for it in state.items] == [label for label, _ in before]
    expected = tiny_grounder.new_session(SCENE)
    expected.history = list(state.session.history)
    want = expected.ground_expression("a blue sky", mode="training_free", refine=False)
    assert (state.items[-1].full().mask == want.mask).all()
    page.fire("on_max_tokens")
    assert page.shown("status") == "The answer length applies to the next answer."


def test_show_all_with_the_raw_attention_shows_every_phrase_map(tiny_grounder, tmp_path):
    page = _asked(tiny_grounder, tmp_path)
    page.fire("on_restyle", {"alpha": 0.55, "show-heat": True})
    heat = page.values[page.component("heat-view")]
    assert heat.visible and heat.value is not None
    n = len(page.values[page.state].items)
    width, _ = Image.open(_path(heat.value)).size
    scene = Image.open(SCENE)
    tile = round(scene.width * min(1.0, 320 / max(scene.size)))
    columns = min(n, 3)
    assert n >= 1 and width == columns * tile + (columns - 1) * 4  # one tile per phrase, side by side


def test_a_big_photo_is_shown_at_display_size_and_exported_at_full_size(tiny_grounder, tmp_path):
    big = tmp_path / "big.png"
    Image.open(SCENE).convert("RGB").resize((3000, 2000)).save(big)
    page = _asked(tiny_grounder, tmp_path / "exports", big)
    view = page.shown("mask-view")
    assert max(view.size) == DISPLAY_MAX_SIDE
    state = page.values[page.state]
    assert all(it.shown.mask.shape == (853, 1280) for it in state.items)
    zip_path = _path(page.values[page.component("dl-zip")].value)
    with zipfile.ZipFile(zip_path) as zf:
        masks = [n for n in zf.namelist() if n[:2].isdigit()]
        assert len(masks) == len(state.items)
        for name, item in zip(masks, state.items):
            png = np.asarray(Image.open(io.BytesIO(zf.read(name))))
            assert png.shape == (2000, 3000)
            assert ((png == 255) == item.full().mask).all()


def test_a_tab_expiring_while_its_answer_is_written_keeps_its_session_until_the_event_ends(tiny_grounder, tmp_path):
    page = Page(build_demo(tiny_grounder, export_dir=tmp_path, session_ttl_s=60))
    page.fire("on_image", {"image-in": {"path": str(SCENE)}}, request=SimpleNamespace(session_hash="t"))
    state = page.values[page.state]
    dep = next(d for d in page.demo.fns.values() if d.name == "on_ask")
    events = dep.fn("What is here?", state, 16, "head", False, False, 0.55, False)
    next(events)  # "Answering…": the event is running
    page.state.delete_callback(state)  # the idle TTL passes now
    assert state.session is not None  # still in use
    *_, last = events
    assert any(k.elem_id == "status" and v.startswith("Grounded") for k, v in last.items())
    assert state.session is not None and not state.expired  # handed back to Gradio, which keeps it

    registry = page.state.delete_callback.__self__
    registry.started(state)
    page.state.delete_callback(state)
    registry.finished(state, handed_back=False)  # an event that did not return the state
    assert state.session is None


def test_scores_are_shown_and_words_the_model_cannot_spell_are_flagged(tmp_path):
    grounder = Grounder.from_preset("demo-shapes")  # its tokenizer has an unknown token
    page = Page(build_demo(grounder, export_dir=tmp_path))
    page.fire("on_image", {"image-in": {"path": str(SCENE)}})
    page.fire("on_ground", {"ground-text": "the red cross", "mode": "head", "refine": True})
    assert page.shown("status") == "Grounded the expression “the red cross”."
    page.fire("on_ground", {"ground-text": "the blorp zizzle", "mode": "head", "refine": True})
    assert page.shown("status") == ("Grounded the expression “the blorp zizzle”. Low confidence for 2. the blorp "
                                    "zizzle (the model does not know 'blorp', 'zizzle'): treat this mask as a guess.")
    choices = [display for display, _ in page.values[page.component("phrase-pick")].choices]
    state = page.values[page.state]
    assert choices[1:] == [f"{it.label} · score {it.shown.score:.2f}" + (" · low confidence" if i else "")
                           for i, it in enumerate(state.items)]


def test_an_answer_for_a_replaced_image_is_dropped_not_shown_over_the_new_conversation(tiny_grounder, tmp_path):
    page = Page(build_demo(tiny_grounder, export_dir=tmp_path))
    page.fire("on_image", {"image-in": {"path": str(SCENE)}})
    dep = next(d for d in page.demo.fns.values() if d.name == "on_ask")
    events = dep.fn("What is here?", page.values[page.state], 16, "head", False, False, 0.55, False)
    next(events)  # "Answering…"
    other = ROOT / "assets" / "shapes_8.png"
    page.fire("on_image", {"image-in": {"path": str(other)}})  # a new image while the answer is written
    assert page.shown("status").startswith("New conversation")
    assert list(events) == []  # the old answer and its masks are not shown
    assert page.values[page.state].items == [] and page.values[page.state].session.history == []


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0"], "argument --concurrency: must be a whole number from 1 to 64, got '0'"),
    (["--concurrency", "-1"], "argument --concurrency: must be a whole number from 1 to 64, got '-1'"),
    (["--max-file-size", "bogus"], "argument --max-file-size: must be a size such as 20mb, 500kb or 1gb"),
    (["--max-file-size", "0kb"], "argument --max-file-size: must be from 1kb to 2gb, got '0kb'"),
    (["--port", "70000"], "argument --port: must be a whole number from 1 to 65535, got '70000'"),
    (["--session-ttl", "5"], "argument --session-ttl: must be a number of seconds from 10 to 604800"),
    (["--max-sessions", "0"], "argument --max-sessions: must be a whole number from 1 to 10000, got '0'"),
    (["--host", "http://0.0.0.0"], "argument --host: must be an address such as 127.0.0.1 or 0.0.0.0"),
])
def test_every_server_option_is_checked_at_start_up(argv, message, capsys):
    import app

    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_good_server_options_are_parsed_into_values():
    import math

    import app

    args = app.parse_args(["--max-file-size", "5MB", "--session-ttl", "0", "--concurrency", "4", "--port", "8080"])
    assert (args.max_file_size, args.session_ttl, args.concurrency, args.port) == (5_000_000, math.inf, 4, 8080)
    assert app.parse_args([]).max_file_size == 20_000_000


def test_a_long_chat_says_in_the_status_when_older_turns_no_longer_fit(demo_grounder, tmp_path):
    page = Page(build_demo(demo_grounder, export_dir=tmp_path))
    page.fire("on_image", {"image-in": {"path": str(SCENE)}})
    question = " ".join(["what colour is the big red circle left of the small blue square?"] * 24)
    context = demo_grounder.backend.context_length  # the shipped demo model: 2,048 positions
    turns = 2 + context // 300  # a turn is about 330 tokens: the last turns cannot all fit
    statuses = []
    for _ in range(turns):
        page.fire("on_ask", {"question": question, "max-tokens": 8, "mode": "head", "refine": False,
                             "vcot": False, "alpha": 0.55, "show-heat": False})
        statuses.append(page.shown("status"))
    assert "token context" not in statuses[0]
    assert "oldest" in statuses[-1] and f"{context:,}-token context" in statuses[-1], statuses[-1]
    assert len(page.values[page.state].session.history) == turns  # the user's chat is all kept


def test_the_ask_endpoint_returns_the_answer_text_through_the_api(tiny_grounder, tmp_path):
    """An API client receives only the last update of /ask: it must still hold the answer."""
    from gradio_client import Client, handle_file

    demo = build_demo(tiny_grounder, export_dir=tmp_path)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        client.predict(handle_file(str(SCENE)), api_name="/set_image")
        result = client.predict("What is here?", 16, "head", False, False, 0.55, False, api_name="/ask")
        outputs = dict(zip(["question", "conversation", "status", "relevant_object", "crop", "vcot_text", "answer"],
                           result))
        assert outputs["answer"] == ANSWER
        assert outputs["conversation"][-1]["content"][0]["text"] == ANSWER
        assert outputs["status"].startswith("Grounded")
    finally:
        demo.close()
