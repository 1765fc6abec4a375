"""The Grounder end to end on a tiny random LLaVA: answer -> phrases -> masks on the image."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_demo.backends.llava import LlavaBackend
from flmm_demo.backends.testing import tiny_llava
from flmm_demo.grounder import Grounder, enlarge_box
from flmm_demo.heads import FlmmHead, FlmmHeadConfig
from flmm_demo.images import ImageError
from flmm_demo.types import Turn


@pytest.fixture(scope="module")
def backend() -> LlavaBackend:
    return LlavaBackend(*tiny_llava())


@pytest.fixture(scope="module")
def head(backend: LlavaBackend) -> FlmmHead:
    torch.manual_seed(0)
    config = FlmmHeadConfig(backend.num_layers, backend.num_heads, backend.hidden_size, use_refiner=False)
    return FlmmHead(config).eval()


def scene(width: int = 96, height: int = 64) -> Image.Image:
    array = np.full((height, width, 3), 235, np.uint8)
    array[8:30, 10:40] = (220, 30, 30)
    return Image.fromarray(array)


ANSWER = "A cat sits on the red mat near a dog."


def test_ground_answer_gives_one_full_size_mask_per_phrase(backend, head):
    session = Grounder(backend, head).new_session(scene())
    grounded = session.ground(ANSWER)
    assert [g.phrase.text for g in grounded] == ["cat", "red mat", "dog"]
    for g in grounded:
        start, end = g.phrase.char_span
        assert ANSWER[start:end] == g.phrase.text
        assert g.mask.shape == (64, 96) and g.mask.dtype == bool
        assert g.heatmap.shape == (64, 96) and 0 <= g.heatmap.min() and g.heatmap.max() <= 1
        if g.mask.any():
            x0, y0, x1, y1 = g.box
            assert g.mask[y0:y1, x0:x1].sum() == g.mask.sum()
        else:
            assert g.box is None


def test_training_free_without_a_head_and_chosen_spans(backend):
    session = Grounder(backend).new_session(scene())
    with pytest.raises(ValueError, match="no trained F-LMM head"):
        session.ground(ANSWER, mode="head")
    (g,) = session.ground(ANSWER, spans=[(2, 5)], mode="training_free")
    assert g.phrase.text == "cat" and g.mask.shape == (64, 96)


def test_huge_image_is_downsized_for_the_model_but_masks_are_full_size(backend, head):
    session = Grounder(backend, head).new_session(scene(3000, 2000))
    assert max(session.model_image.size) <= 2048
    (g,) = session.ground(ANSWER, spans=[(2, 5)])
    assert g.mask.shape == (2000, 3000) and g.heatmap.shape == (2000, 3000)


def test_chat_keeps_history_and_bad_input_keeps_it(backend, head):
    session = Grounder(backend, head).new_session(scene())
    answer = session.chat("What is in the picture?", max_new_tokens=6)
    assert session.history[-1].assistant == answer and len(session.history) == 1
    for bad in ["", "   ", "x" * 20_000]:
        with pytest.raises(ValueError):
            session.chat(bad)
    assert len(session.history) == 1
    # The last answer, with the prompt it was generated from: the same phrases as grounding its text.
    grounded = session.ground()
    assert [g.phrase for g in grounded] == [g.phrase for g in session.ground(answer)]
    assert all(answer[slice(*g.phrase.char_span)] == g.phrase.text and g.mask.shape == (64, 96) for g in grounded)
    session.clear()
    with pytest.raises(ValueError, match="ask a question first"):
        session.ground()


def test_expression_is_grounded_as_one_phrase(backend, head):
    session = Grounder(backend, head).new_session(scene())
    g = session.ground_expression("the red mat")
    assert g.phrase.text == "the red mat" and g.phrase.token_span[0] == 0
    assert g.mask.shape == (64, 96)


def test_no_noun_phrase_gives_no_masks(backend, head):
    session = Grounder(backend, head).new_session(scene())
    assert session.ground("Yes, it is.") == []


def test_bad_images_are_refused_clearly(backend, tmp_path):
    grounder = Grounder(backend)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError):
        grounder.new_session(empty)
    with pytest.raises(ImageError):
        grounder.new_session(b"not an image at all")


def test_head_for_another_lmm_is_refused(backend):
    wrong = FlmmHead(FlmmHeadConfig(24, 16, 2048, use_refiner=False))
    with pytest.raises(ValueError, match=r"384 attention channels.*but the model has 8"):
        Grounder(backend, wrong)


def test_enlarge_box_stays_inside_the_image():
    assert enlarge_box((10, 10, 20, 20), (100, 50)) == (7, 7, 23, 23)
    assert enlarge_box((0, 0, 4, 4), (100, 50), min_side=16) == (0, 0, 16, 16)
    assert enlarge_box(None, (100, 50)) == (0, 0, 100, 50)
    x0, y0, x1, y1 = enlarge_box((90, 40, 100, 50), (100, 50))
    assert x1 <= 100 and y1 <= 50 and x1 - x0 == 16


def test_visual_chain_of_thought_crops_the_grounded_object(demo_grounder):
    """On the demo model an object of the scene is always found and the crop holds its
    mask's box. (Whether it is the object the question names is a property of the model:
    docs/demo_world_results.md measures it.)"""
    from flmm_demo.demo_world import make_scene

    scene_ = make_scene(0)
    session = demo_grounder.new_session(Image.fromarray(scene_.image))
    height, width = scene_.image.shape[:2]
    cot = session.visual_cot("what colour is the square?", max_new_tokens=12)
    assert cot.object is not None and cot.object.box is not None
    assert any(obj.shape in cot.object.phrase.text for obj in scene_.objects)
    assert cot.first_answer and cot.answer
    x0, y0, x1, y1 = cot.crop_box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert cot.crop.size == (x1 - x0, y1 - y0)
    ox0, oy0, ox1, oy1 = cot.object.box  # the crop contains the grounded object
    assert x0 <= ox0 and y0 <= oy0 and ox1 <= x1 and oy1 <= y1
    # The whole-image answer is the turn; the probe and crop questions are not.
    assert [t.user for t in session.history] == ["what colour is the square?"]
    assert session.history[-1].assistant == cot.first_answer
    assert all(g.mask.shape == (height, width) for g in session.ground())


def test_visual_chain_of_thought_on_a_tiny_model(backend, head):
    session = Grounder(backend, head).new_session(scene(128, 96))
    cot = session.visual_cot("What colour is the mat?", max_new_tokens=6)
    x0, y0, x1, y1 = cot.crop_box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 96 and cot.crop.size == (x1 - x0, y1 - y0)
    assert session.history == [Turn("What colour is the mat?", cot.first_answer)]


def test_training_free_expression_has_a_heat_map(backend):
    """The expression is the whole answer: its heat map must not cancel against the answer's mean."""
    session = Grounder(backend).new_session(scene())
    g = session.ground_expression("the red mat", mode="training_free")
    assert g.heatmap.max() == pytest.approx(1.0) and g.mask.any()


def test_a_stream_advanced_from_several_threads_and_closed_early(backend, head):
    """Gradio advances generators on worker threads; an early close must free the model."""
    grounder = Grounder(backend, head)
    session = grounder.new_session(scene())
    stream = session.stream_chat("What is in the picture?", max_new_tokens=8)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pieces = []
        while True:
            piece = pool.submit(next, stream, None).result()
            if piece is None:
                break
            pieces.append(piece)
    assert session.history[-1].assistant == "".join(pieces).strip()
    early = session.stream_chat("Describe the image.", max_new_tokens=8)
    next(early, None)
    early.close()
    assert len(session.history) == 1  # an abandoned answer is not a turn
    answer = session.chat("Describe the image.", max_new_tokens=4)  # the lock was released
    assert session.history[-1] == Turn("Describe the image.", answer)


def test_a_one_pixel_image_is_grounded_at_its_size(backend, head):
    session = Grounder(backend, head).new_session(Image.new("RGB", (1, 1), (200, 30, 30)))
    grounded = session.ground(ANSWER)
    assert grounded and all(g.mask.shape == (1, 1) for g in grounded)


def test_typed_words_are_grounded_at_every_place_in_the_answer_else_as_an_expression(backend, head):
    from flmm_demo.grounder import find_spans
    from flmm_demo.types import Turn

    session = Grounder(backend, head).new_session(scene())
    answer = "A red mat, a dog and another Red  mat; reddish mats."
    session.history.append(Turn("What is here?", answer))
    typed = session.ground_text("red mat")
    assert typed.in_answer
    assert [g.phrase.char_span for g in typed.grounded] == [(2, 9), (29, 37)]
    assert all(g.mask.shape == (64, 96) for g in typed.grounded)
    other = session.ground_text("the blue sky")
    assert not other.in_answer and [g.phrase.text for g in other.grounded] == ["the blue sky"]
    assert find_spans(answer, "red") == [(2, 5), (29, 32)]  # not inside "reddish"
    with pytest.raises(ValueError, match="empty"):
        session.ground_text("  ")
