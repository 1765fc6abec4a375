"""Qwen2-VL, Qwen2.5-VL and Idefics3/SmolVLM backends on tiny random models (CPU, offline).

Each model is built from a small config with a byte-level tokenizer, so no weights are
downloaded. The checks: attend() equals the eager full-sequence attention, each image
token's view cell covers the part of the image the token was made from, and chat agrees
with a plain generate on the full prompt.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_demo.backends import load_backend
from flmm_demo.backends.idefics3 import Idefics3Backend, SmolVLMBackend
from flmm_demo.backends.qwen2_vl import Qwen3VLBackend, Qwen25VLBackend, Qwen2VLBackend
from flmm_demo.backends.testing import tiny_qwen2_vl, tiny_qwen3_vl
from flmm_demo.backends.testing import tiny_idefics3 as tiny_idefics3_parts
from flmm_demo.types import AnswerAttention, Turn

HISTORY = [Turn("Hi there.", "Hello!")]
QUESTION = "What is in the picture?"
ANSWER = "A red square at the bottom right."


def gradient_image(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom: a pixel's colour says where it is."""
    x = np.linspace(0, 1, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 1, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 0.5)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def tiny_qwen(version: str, seed: int = 0) -> Qwen2VLBackend:
    """The tiny Qwen2-VL ("qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") of backends.testing, as a backend."""
    backend_class = Qwen2VLBackend if version == "qwen2_vl" else Qwen25VLBackend
    return backend_class(*tiny_qwen2_vl(version, seed))


def tiny_idefics3(do_image_splitting: bool = True, smolvlm: bool = False, seed: int = 0) -> Idefics3Backend:
    """The tiny Idefics3 (or, smolvlm=True, SmolVLM2) of backends.testing, as a backend."""
    backend_class = SmolVLMBackend if smolvlm else Idefics3Backend
    return backend_class(*tiny_idefics3_parts(do_image_splitting, smolvlm, seed))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm"])
def backend(request):
    if request.param == "qwen3_vl":
        return Qwen3VLBackend(*tiny_qwen3_vl())
    if request.param in ("idefics3", "smolvlm"):
        return tiny_idefics3(smolvlm=request.param == "smolvlm")
    return tiny_qwen(request.param)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return gradient_image(180, 100)  # wider than tall: more tile columns than rows


def eager_reference(backend, image, answer_ids: list[int]):
    """Full-sequence eager forward of prompt + answer: (attentions, hidden_states, prompt)."""
    prompt = backend.build_prompt(image, HISTORY, QUESTION, "chat")
    reference = copy.deepcopy(backend.model)
    reference.set_attn_implementation("eager")
    inputs = dict(prompt.inputs)
    answer = torch.tensor([answer_ids])
    inputs["input_ids"] = torch.cat([prompt.input_ids, answer], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    with torch.no_grad():
        out = reference(**inputs, output_attentions=True, output_hidden_states=True)
    return out.attentions, out.hidden_states, prompt


def test_attend_equals_eager_attention(backend, image):
    att = backend.attend(image, HISTORY, QUESTION, ANSWER)
    assert isinstance(att, AnswerAttention)
    T = len(att.token_ids)
    attentions, hidden, prompt = eager_reference(backend, image, att.token_ids)
    S = prompt.input_ids.shape[1]
    L, H = backend.num_layers, backend.num_heads
    # (T, L*H, S+T): rows of the answer tokens, channel = layer * H + head
    rows = torch.stack([a[0, :, S : S + T] for a in attentions], 0).permute(2, 0, 1, 3).reshape(T, L * H, -1)
    for view, view_map, tokens in zip(att.views, att.maps, prompt.views):
        expected = rows[:, :, tokens.positions].reshape(T, L * H, *view.grid)
        assert view_map.shape == expected.shape
        error = (view_map - expected).abs().max() / expected.abs().max()
        assert error < 1e-4, f"{view.name}: relative error {error:.2e}"
    expected_hidden = torch.stack(hidden[1:])[:, 0, S : S + T]
    assert att.hidden_states.shape == (L, T, backend.hidden_size)
    assert torch.allclose(att.hidden_states, expected_hidden, rtol=1e-4, atol=1e-5)
    # The answer text is what was teacher-forced, and every answer token has a span in it.
    assert att.answer == ANSWER and len(att.token_spans) == T and att.image_size == image.size


def test_views_cover_image_and_every_image_token(backend, image):
    prompt = backend.build_prompt(image, [], QUESTION)
    n_image_tokens = int((prompt.input_ids == backend.image_token_id).sum())
    assert sum(v.grid[0] * v.grid[1] for v in prompt.views) == n_image_tokens
    positions = torch.cat([v.positions for v in prompt.views])
    assert positions.unique().numel() == n_image_tokens  # each image token in exactly one view
    W, H = image.size
    if isinstance(backend, Qwen2VLBackend):
        (_, gh, gw), merge = prompt.inputs["image_grid_thw"][0].tolist(), 2
        assert [v.grid for v in prompt.views] == [(gh // merge, gw // merge)]
        assert prompt.views[0].box == (0, 0, W, H)
        return
    info = backend.processor.image_processor(images=[image], return_row_col_info=True)
    rows, cols = info["rows"][0][0], info["cols"][0][0]
    assert (rows, cols) == (2, 3)  # 180x100 -> 168x94 -> 3x2 tiles of 56 px
    tiles, global_view = prompt.views[:-1], prompt.views[-1]
    assert len(tiles) == rows * cols and global_view.name == "global" and global_view.box == (0, 0, W, H)
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (t.box for t in tiles)) == pytest.approx(W * H)
    bottom_right = tiles[-1]
    assert bottom_right.name == f"tile {rows},{cols}"
    assert bottom_right.box == pytest.approx((W * (cols - 1) / cols, H * (rows - 1) / rows, W, H))


def token_colours(backend, prompt) -> list[torch.Tensor]:
    """Per view (rows, cols, 3): mean RGB in [0, 1] of the pixels each image token was made from."""
    ip = backend.processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    pixels = prompt.inputs["pixel_values"].float()
    if isinstance(backend, Qwen2VLBackend):
        # rows of pixel_values: merged token by merged token (row-major), m*m patches each,
        # every patch flattened as (channel, time, py, px)
        (rows, cols), = [v.grid for v in prompt.views]
        patches = pixels.view(rows * cols, 4, 3, -1).mean((1, 3)) * std + mean
        return [patches.view(rows, cols, 3)]
    out = []
    for frame, view in zip(pixels[0], prompt.views):  # one processed image per view, same order
        rgb = frame * std[:, None, None] + mean[:, None, None]
        r, c = view.grid
        out.append(rgb.view(3, r, rgb.shape[1] // r, c, rgb.shape[2] // c).mean((2, 4)).permute(1, 2, 0))
    return out


def expected_colours(image: Image.Image, view) -> torch.Tensor:
    """(rows, cols, 3): mean RGB of the original image over each grid cell of the view's box."""
    rgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
    x0, y0, x1, y1 = view.box
    r, c = view.grid
    out = torch.empty(r, c, 3)
    for i in range(r):
        for j in range(c):
            ys = slice(round(y0 + i * (y1 - y0) / r), round(y0 + (i + 1) * (y1 - y0) / r))
            xs = slice(round(x0 + j * (x1 - x0) / c), round(x0 + (j + 1) * (x1 - x0) / c))
            out[i, j] = rgb[ys, xs].mean((0, 1))
    return out


@pytest.mark.parametrize("size", [(180, 100), (90, 170)])
def test_each_token_lands_where_its_pixels_are(backend, size):
    """On a colour-coded image, each token's view cell has the colour of the pixels it saw."""
    image = gradient_image(*size)
    prompt = backend.build_prompt(image, [], QUESTION)
    for view, seen in zip(prompt.views, token_colours(backend, prompt)):
        expected = expected_colours(image, view)
        assert (seen - expected).abs().max() < 0.03, view.name
        if view.grid[0] > 1 and view.grid[1] > 1:  # a flipped or transposed grid would be far off
            assert (seen.flip(0, 1) - expected).abs().max() > 0.1


def test_idefics3_without_splitting_has_one_global_view(image):
    backend = tiny_idefics3(do_image_splitting=False)
    att = backend.attend(image, [], QUESTION, ANSWER)
    assert [v.name for v in att.views] == ["global"]
    assert att.views[0].box == (0, 0, *image.size) and att.views[0].grid == (2, 2)
    assert att.maps[0].shape == (len(att.token_ids), backend.num_layers * backend.num_heads, 2, 2)


def plain_generate(backend, image: Image.Image, history: list[Turn], max_new_tokens: int) -> str:
    """Greedy answer from a generate over the whole prompt, no cache given: the model computes its own positions."""
    prompt = backend.build_prompt(image, history, QUESTION, "chat")
    with torch.no_grad():
        ids = backend.model.generate(
            **prompt.inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=backend.tokenizer.pad_token_id
        )
    return backend.tokenizer.decode(ids[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)


def test_chat_matches_plain_generate_and_stream(backend, image):
    other = gradient_image(60, 150)  # another grid: other M-RoPE offsets
    expected = {"wide": plain_generate(backend, image, HISTORY, 8), "tall": plain_generate(backend, other, [], 8)}
    # Alternate the images: the cached path must never reuse the other prompt's positions.
    assert backend.chat(image, HISTORY, QUESTION, max_new_tokens=8) == expected["wide"]
    assert backend.chat(other, [], QUESTION, max_new_tokens=8) == expected["tall"]
    streamed = list(backend.stream_chat(image, HISTORY, QUESTION, max_new_tokens=8))
    assert "".join(streamed) == expected["wide"]
    assert backend.chat(other, [], QUESTION, max_new_tokens=8) == expected["tall"]


def test_load_backend_round_trip(backend, image, tmp_path):
    backend.model.save_pretrained(tmp_path)
    backend.processor.save_pretrained(tmp_path)
    loaded = load_backend(str(tmp_path))
    assert type(loaded) is type(backend)
    assert loaded.chat(image, [], QUESTION, max_new_tokens=4) == backend.chat(image, [], QUESTION, max_new_tokens=4)


def test_chat_shows_the_crop_with_the_whole_image(backend, image):
    """Multi-image chat (the visual chain of thought's second question): both images' tokens are in the prompt."""
    crop = image.crop((0, 0, 90, 60))
    one = backend.build_prompt(image, [], QUESTION)
    crop_only = backend.build_prompt(crop, [], QUESTION)
    both = backend.build_prompt(image, [], QUESTION, extra_images=[crop])
    count = lambda prompt: int((prompt.input_ids == backend.image_token_id).sum())  # noqa: E731
    assert count(both) == count(one) + count(crop_only)
    assert both.views == []  # a chat-only prompt: no attention is read from it
    answer = backend.chat(image, [], QUESTION, max_new_tokens=4, extra_images=[crop])
    assert isinstance(answer, str)


def test_qwen3_vl_grounds_training_free_and_asks_the_crop_with_the_image():
    from flmm_demo.grounder import Grounder

    backend = Qwen3VLBackend(*tiny_qwen3_vl())
    grounder = Grounder(backend)  # no released head: training-free, no SAM: a threshold
    assert grounder.info.modes == ["training_free"]
    session = grounder.new_session(gradient_image(180, 100))
    grounded = session.ground(ANSWER)
    assert [g.phrase.text for g in grounded] == ["red square", "bottom right"]
    for g in grounded:
        assert g.mask.shape == (100, 180) and g.mask.any() and g.heatmap.shape == (100, 180)
    shown = []
    chat = backend.chat

    def recording_chat(image, history, question, **kwargs):
        shown.append([image.size] + [extra.size for extra in kwargs.get("extra_images", ())])
        return chat(image, history, question, **kwargs)

    backend.chat = recording_chat
    cot = session.visual_cot(QUESTION, max_new_tokens=4)
    # whole-image answer, the "most relevant object" probe, then the whole image and the crop together
    assert len(shown) == 3 and shown[-1] == [(180, 100), cot.crop.size]
    assert session.history[-1].user == QUESTION
