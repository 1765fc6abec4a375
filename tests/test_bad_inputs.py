"""A battery of bad inputs: each gets a clear message, and nothing the user had is lost.

Images, text, spans, answer lengths, model folders and checkpoints, on the tiny random
LLaVA (fast) and the bundled demo model (a real tokenizer, head and SAM).
"""
from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_demo.backends.base import ModelFilesError
from flmm_demo.grounder import Grounder
from flmm_demo.heads import FlmmHead, FlmmHeadConfig, load_head, load_sam
from flmm_demo.images import ImageError, load_image
from flmm_demo.refs_file import RefsFileError, read_refs
from flmm_demo.types import Turn

ANSWER = "A cat sits on the red mat near a dog."


def scene(width: int = 96, height: int = 64) -> Image.Image:
    array = np.full((height, width, 3), 235, np.uint8)
    array[8:30, 10:40] = (220, 30, 30)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def grounder(family_backend) -> Grounder:
    backend = family_backend("llava")
    torch.manual_seed(0)
    head = FlmmHead(FlmmHeadConfig(backend.num_layers, backend.num_heads, backend.hidden_size, use_refiner=False))
    return Grounder(backend, head.eval())


@pytest.fixture
def chatted(grounder):
    """A session with one turn: what every bad input below must leave as it was."""
    session = grounder.new_session(scene())
    session.chat("What is in the picture?", max_new_tokens=4)
    return session


# ----------------------------------------------------------------------- text
@pytest.mark.parametrize("question, message", [
    ("What is \ud83d here?", "broken character at position 8"),  # a lone surrogate (half an emoji)
    ("\udfff", "broken character"),
    ("", "is empty"),
    (" \n\t ", "is empty"),
    ("?!...", "only punctuation"),
    ("。！？", "only punctuation"),
    ("\u200b\u200b", "only punctuation"),  # zero-width spaces only
    ("x" * 20_000, "20,000 characters long"),
    (None, "is empty"),
    (42, "is empty"),
    (b"what is it", "is empty"),
])
def test_unusable_questions_are_refused_and_the_chat_is_kept(chatted, question, message):
    before = list(chatted.history)
    with pytest.raises(ValueError, match=message):
        chatted.chat(question)
    with pytest.raises(ValueError, match=message.replace("question", "expression")):
        chatted.ground_expression(question)
    with pytest.raises(ValueError, match=message):
        chatted.visual_cot(question)
    assert chatted.history == before
    answer = before[-1].assistant  # the last answer can still be grounded
    (g,) = chatted.ground(spans=[(0, len(answer))])
    assert g.phrase.text == answer and g.mask.shape == (64, 96)


@pytest.mark.parametrize("question", [
    "ما هذا الشكل الأحمر؟",  # Arabic, right to left
    "שאלה\u202e בכיוון הפוך",  # Hebrew with a right-to-left override
    "这是什么？",
    "🐱?",
    "what is\x00this",  # a NUL byte
    "e\u0301\u0301\u0301 combining accents",
])
def test_unicode_questions_are_answered_and_grounded(grounder, question):
    session = grounder.new_session(scene())
    answer = session.chat(question, max_new_tokens=4)
    assert session.history == [Turn(question.strip(), answer)]
    grounded = session.ground(ANSWER)
    assert [g.phrase.text for g in grounded] == ["cat", "red mat", "dog"]


def test_a_surrogate_in_an_answer_to_ground_is_refused(chatted):
    with pytest.raises(ValueError, match="answer contains a broken character"):
        chatted.ground("a red \udc80 mat")


def test_an_answer_without_noun_phrases_or_words_gives_no_masks(chatted):
    assert chatted.ground("Yes, it is.") == []
    assert chatted.ground("") == [] and chatted.ground("   ") == []
    assert chatted.ground("!!! ...") == []
    with pytest.raises(ValueError, match="must be text"):
        chatted.ground(123)


# ---------------------------------------------------------------------- spans
@pytest.mark.parametrize("spans, message", [
    ([(2.0, 5.0)], "pair of whole numbers"),
    ([(2.5, 5)], "pair of whole numbers"),
    ([("2", "5")], "pair of whole numbers"),
    ([(2,)], "pair of whole numbers"),
    ([(2, 5, 7)], "pair of whole numbers"),
    ([(True, 5)], "pair of whole numbers"),
    ([None], "pair of whole numbers"),
    ([[2, None]], "pair of whole numbers"),
    ((2, 5), "pair of whole numbers"),  # one span not wrapped in a list
    ("2:5", "list of"),
    (7, "list of"),
    ([(5, 2)], r"\(5, 2\) must be non-empty"),  # reversed
    ([(3, 3)], "must be non-empty"),
    ([(-1, 4)], "inside the answer"),
    ([(30, 999)], "0 <= start < end <= 37"),
    ([(1, 2)], "covers only whitespace"),
])
def test_bad_spans_are_explained(chatted, spans, message):
    before = list(chatted.history)
    with pytest.raises(ValueError, match=message):
        chatted.ground(ANSWER, spans=spans)
    assert chatted.history == before


def test_overlapping_numpy_and_list_spans_are_grounded(chatted):
    spans = [(2, 5), [np.int64(18), np.int32(25)], (20, 25)]  # "cat", "red mat", "d mat" (overlap)
    grounded = chatted.ground(ANSWER, spans=spans)
    assert [g.phrase.text for g in grounded] == ["cat", "red mat", "d mat"]
    assert chatted.ground(ANSWER, spans=[]) == []


# -------------------------------------------------------------- answer length
@pytest.mark.parametrize("value", [0, -5, 2.5, "10", True, None])
def test_max_new_tokens_below_one_or_not_whole_is_refused(chatted, value):
    before = list(chatted.history)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number of at least 1"):
        chatted.chat("What is it?", max_new_tokens=value)
    with pytest.raises(ValueError, match="max_new_tokens"):
        chatted.visual_cot("What is it?", max_new_tokens=value)
    with pytest.raises(ValueError, match="max_new_tokens"):
        chatted.grounder.backend.chat(chatted.model_image, [], "What is it?", max_new_tokens=value)
    assert chatted.history == before


def test_unknown_mode_is_refused(chatted):
    with pytest.raises(ValueError, match="unknown grounding mode 'best'"):
        chatted.ground(mode="best")


# --------------------------------------------------------------------- images
def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_odd_but_valid_images_are_grounded_at_their_size(grounder, tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 0, 255)]]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    cmyk = _encoded(scene().convert("CMYK"), "JPEG")
    sixteen = _encoded(Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)), "PNG")
    palette = scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    one_bit = scene().convert("1")
    unicode_path = tmp_path / "画像 ١.png"
    scene().save(unicode_path)
    for source, size in [(gif, (40, 30)), (cmyk, (96, 64)), (sixteen, (40, 30)),
                         (_encoded(palette, "PNG"), (96, 64)), (_encoded(one_bit, "PNG"), (96, 64)),
                         (unicode_path, (96, 64)), (np.full((30, 40), np.nan, np.float32), (40, 30))]:
        session = grounder.new_session(source)
        assert session.image.mode == "RGB" and session.image.size == size
        (g,) = session.ground(ANSWER, spans=[(2, 5)])
        assert g.mask.shape == (size[1], size[0])
    assert np.asarray(grounder.new_session(gif).image)[0, 0].tolist() == [255, 0, 0]  # the first frame


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(_encoded(scene(), "PNG")[:60]), "damaged or truncated"),
    (lambda p: p.write_bytes(b"<html><body>not found</body></html>"), "not an image format"),
    (lambda p: p.mkdir(), "not a file"),
    (lambda p: None, "not found"),
])
def test_bad_image_files_are_refused_clearly(grounder, tmp_path, make, message):
    path = tmp_path / "photo.png"
    make(path)
    with pytest.raises(ImageError, match=message):
        grounder.new_session(path)


def test_a_huge_header_is_refused_before_decoding(tmp_path):
    big = Image.new("L", (10_000, 5_000))
    path = tmp_path / "big.png"
    big.save(path)
    with pytest.raises(ImageError, match="50,000,000 pixels"):
        load_image(path)


@pytest.mark.parametrize("size", [(1, 3000), (3000, 1), (2, 5000)])
def test_thin_strips_are_grounded_with_the_demo_sam(demo_grounder, size):
    """SAM's resize rounded a 1x3000 strip's short side to 0 pixels ("height and width must be > 0")."""
    session = demo_grounder.new_session(Image.new("RGB", size, (220, 30, 30)))
    g = session.ground_expression("the red square")
    assert g.mask.shape == (size[1], size[0])
    session.chat("describe the image.", max_new_tokens=6)
    assert all(g.mask.shape == (size[1], size[0]) for g in session.ground())


# ------------------------------------------------------------- long conversations
def test_history_is_capped_to_the_newest_turns_that_fit(demo_grounder):
    session = demo_grounder.new_session(scene())
    backend = demo_grounder.backend
    question = " ".join(["what colour is the big red circle left of the small blue square?"] * 24)
    turns = 2 + backend.context_length // 300  # a turn is about 330 tokens: the last turns cannot all fit
    for _ in range(turns):
        session.chat(question, max_new_tokens=8)
    assert len(session.history) == turns  # every turn is kept for the user
    assert session.dropped_turns >= 1
    assert f"{backend.context_length:,}-token context" in session.context_note
    kept = session.history[session.dropped_turns:-1]
    prompt = backend.build_prompt(session.model_image, kept, session.history[-1].user)
    assert prompt.input_ids.shape[1] + 8 <= backend.context_length
    # grounding replays the prompt the answer was generated from
    assert all(g.mask.shape == (64, 96) for g in session.ground())
    session.clear()
    assert session.dropped_turns == 0 and session.context_note is None


def test_a_question_longer_than_the_context_is_refused(demo_grounder):
    session = demo_grounder.new_session(scene())
    session.chat("describe the image.", max_new_tokens=4)
    before = list(session.history)
    context = demo_grounder.backend.context_length  # 2,048 for the shipped demo model
    with pytest.raises(ValueError, match=f"the model reads at most {context:,}"):
        session.chat("a?" * 995)  # 1,990 tokens and 576 image tokens: under 2,000 characters
    assert session.history == before and session.context_note is None


# ------------------------------------------------------------ model folders
@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "model weights of .* could not be read"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 20), "damaged or incomplete"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), r"model.safetensors is empty \(0 bytes\)"),
    (lambda d: (d / "model.safetensors").unlink(), "has no model weights"),
    (lambda d: (d / "tokenizer.json").unlink(), r"has no tokenizer \(tokenizer.json"),
    (lambda d: (d / "tokenizer.json").write_text("{garbage"), "tokenizer or image processor .* could not be loaded"),
    (lambda d: (d / "config.json").write_text("{garbage"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text('["a list"]'), "does not hold a model configuration"),
    (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "no backend for model_type 'bert'"),
])
def test_damaged_model_folders_are_named_clearly(tiny_llava_dir, tmp_path, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, folder)
    damage(folder)
    with pytest.raises(ValueError, match=message):
        Grounder.from_preset(str(folder))
    if "tokenizer" in message or "weights" in message or "bytes" in message:
        with pytest.raises(ModelFilesError):
            Grounder.from_preset(str(folder))


def test_empty_folder_and_missing_folder_as_model(tmp_path):
    from flmm_demo.presets import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="has no config.json"):
        Grounder.from_preset(str(tmp_path))
    with pytest.raises(MissingWeightsError, match="does not exist"):
        Grounder.from_preset(str(tmp_path / "nope"))


# ---------------------------------------------------------------- checkpoints
def test_heads_and_sams_that_do_not_fit_or_are_damaged(demo_grounder, family_backend, tmp_path):
    from conftest import DEMO_DIR

    with pytest.raises(ValueError, match=r"expects 16 attention channels .* but the model has 8"):
        load_head(DEMO_DIR / "head", family_backend("llava"))  # the demo head on another LMM
    head = tmp_path / "head"
    shutil.copytree(DEMO_DIR / "head", head)
    weights = head / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(ValueError, match="could not be read as a F-LMM head .* damaged"):
        load_head(head, demo_grounder.backend)
    (head / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_head(head, demo_grounder.backend)
    sam = tmp_path / "sam_vit_tiny.safetensors"
    sam.write_bytes((DEMO_DIR / "sam_vit_tiny.safetensors").read_bytes()[:4000])
    with pytest.raises(ValueError, match="could not be read as a SAM vit_tiny checkpoint"):
        load_sam(sam)
    wrong = tmp_path / "sam_vit_b_01ec64.pth"  # the tiny SAM's file under a ViT-B name
    shutil.copy(DEMO_DIR / "sam_vit_tiny.safetensors", wrong)
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64.pth (could not be read as a SAM vit_b|holds more than tensors)"):
        load_sam(wrong)
    garbage = tmp_path / "frozen_head.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a plain PyTorch state dict") as err:
        load_head(garbage, demo_grounder.backend)
    assert "weights_only=False" not in str(err.value)


@pytest.mark.parametrize("missing, message", [("head", "1 piece.s. missing.*head"),
                                              ("sam_vit_tiny.safetensors", "1 piece.s. missing.*SAM vit_tiny")])
def test_a_preset_missing_its_head_or_sam_says_so(tmp_path, monkeypatch, missing, message):
    from conftest import DEMO_DIR
    from flmm_demo.presets import MissingWeightsError

    shutil.copytree(DEMO_DIR, tmp_path / "demo-shapes")
    target = tmp_path / "demo-shapes" / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    monkeypatch.setenv("FLMM_CHECKPOINTS", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=f"(?s)cannot load: {message}") as err:
        Grounder.from_preset("demo-shapes")
    assert str(target) in str(err.value)


# -------------------------------------------------------------------- pickles
class _RunsCode:
    def __reduce__(self):
        return (open, ("/tmp/flmm-refs-pwned", "w"))


def test_a_refs_pickle_that_asks_for_code_is_not_run(tmp_path):
    hostile = tmp_path / "refs(unc).p"
    hostile.write_bytes(pickle.dumps([{"ref_id": 1, "x": _RunsCode()}]))
    with pytest.raises(RefsFileError, match="asks for .*open.*only lists, dicts, strings and numbers"):
        read_refs(hostile)
    import os

    assert not os.path.exists("/tmp/flmm-refs-pwned")


def test_refs_pickles_of_python_2_and_3_are_read(tmp_path):
    refs = [{"ref_id": 0, "ann_id": 5, "image_id": 1, "split": "val", "category_id": 1, "sent_ids": [0],
             "sentences": [{"sent": "the red mug", "raw": "The red mug", "tokens": ["the", "red", "mug"],
                            "sent_id": 0}]}]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert read_refs(path) == refs
    for bad, message in [(b"", "not a readable refs file"), (b"\x80\x04garbage", "not a readable refs file"),
                         (pickle.dumps({"a": 1}), "does not hold a list of refs"),
                         (pickle.dumps([{"ref_id": 1}]), "a ref lacks")]:
        (tmp_path / "bad.p").write_bytes(bad)
        with pytest.raises(RefsFileError, match=message):
            read_refs(tmp_path / "bad.p")
    json.dumps(read_refs(tmp_path / "refs2.p"))  # plain data only
