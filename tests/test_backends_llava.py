"""Backends for LLaVA-1.5, LLaVA-NeXT and DeepSeek-VL on tiny random models (CPU, offline).

The core promise: attend()'s cheap capture (one teacher-forced pass over the cached
prompt) gives the same attention rows as a full eager forward with output_attentions.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from flmm_demo.backends import backend_class, load_backend
from flmm_demo.backends.capture import attention_rows
from flmm_demo.backends.deepseek_vl import DeepseekVLBackend
from flmm_demo.backends.llava import LlavaBackend, clip_style_box, resize_and_pad_square
from flmm_demo.backends.llava_next import LlavaNextBackend, unpadded_rows_cols
from flmm_demo.backends.testing import tiny_deepseek_vl, tiny_llava, tiny_llava_next
from flmm_demo.heads.unet import crop_to_image
from flmm_demo.types import Turn

FAMILIES = {
    "llava": (tiny_llava, LlavaBackend),
    "llava_next": (tiny_llava_next, LlavaNextBackend),
    "deepseek_vl": (tiny_deepseek_vl, DeepseekVLBackend),
}
QUESTION = "What is in the picture?"
ANSWER = "The cat is on the red mat."


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_family(request):
    """(backend, eager reference copy of its model) for one family."""
    build, cls = FAMILIES[request.param]
    model, processor = build()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return cls(model, processor), reference


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _eager_maps(backend, reference, image, history, question, token_ids, template, answer_start=""):
    """Per view (T, L*H, rows, cols) from a full eager forward with output_attentions=True."""
    prompt = backend.build_prompt(image, history, question, template, answer_start)
    ids = torch.cat([prompt.input_ids, torch.tensor([token_ids])], dim=1)
    extra = {k: v for k, v in prompt.inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = reference(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, output_hidden_states=True, **extra
        )
    start, count = prompt.input_ids.shape[1], len(token_ids)
    attn = torch.stack(out.attentions, dim=1)[0, :, :, start : start + count]  # (L, H, T, S)
    maps = [
        attn[..., view.positions].permute(2, 0, 1, 3).reshape(count, -1, *view.grid) for view in prompt.views
    ]
    hidden = torch.stack(out.hidden_states[1:])[:, 0, start : start + count]
    return maps, hidden


@pytest.mark.parametrize("template", ["chat", "flmm"])
def test_capture_equals_eager_reference(tiny_family, template):
    backend, reference = tiny_family
    image = _noise_image(90, 40)
    history = [Turn("Hello.", "Hi, ask me about the image.")] if template == "chat" else []
    result = backend.attend(image, history, QUESTION, ANSWER, template=template)
    want_maps, want_hidden = _eager_maps(backend, reference, image, history, QUESTION, result.token_ids, template)

    assert len(result.maps) == len(want_maps) == len(result.views)
    for got, want in zip(result.maps, want_maps):
        assert got.shape == want.shape
        assert (got - want).abs().max() / want.abs().max() <= 1e-4
    # Rows are softmax rows over all keys: their image part sums to at most 1.
    total = sum(m.flatten(2).sum(-1) for m in result.maps)
    assert bool((total <= 1 + 1e-5).all()) and bool((total > 0).all())
    assert torch.allclose(result.hidden_states, want_hidden, atol=1e-4)


def test_attend_tokens_spans_and_shapes(tiny_family):
    backend, _ = tiny_family
    result = backend.attend(_noise_image(64, 48), [], QUESTION, ANSWER)
    t = len(result.token_ids)
    assert t == len(result.token_spans) == result.maps[0].shape[0]
    assert result.hidden_states.shape == (backend.num_layers, t, backend.hidden_size)
    assert result.maps[0].shape[1] == backend.num_layers * backend.num_heads
    assert result.image_size == (64, 48)
    pieces = [ANSWER[s:e] for s, e in result.token_spans if e > s]
    assert "".join(pieces) == ANSWER.replace(" ", "")  # spans tile the answer's visible characters in order
    starts = [s for s, _ in result.token_spans]
    assert starts == sorted(starts)
    decoded = [backend.tokenizer.decode([i]).strip() for i in result.token_ids]
    assert [p for p in decoded if p] == pieces
    # The maps can feed a trainable head (no inference-mode tensors).
    head = torch.nn.Conv2d(result.maps[0].shape[1], 1, 1)
    head(result.maps[0]).sum().backward()
    assert head.weight.grad is not None


def test_chat_streams_and_matches_plain_generate(tiny_family):
    backend, _ = tiny_family
    image = _noise_image(80, 60, seed=1)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6)
    answer = backend.chat(image, [], QUESTION, **kwargs)
    deltas = list(backend.stream_chat(image, [], QUESTION, **kwargs))
    assert isinstance(answer, str) and answer
    assert "".join(deltas) == answer

    # Generation from our cached prefill equals transformers' own uncached generate.
    prompt = backend.build_prompt(image, [], QUESTION)
    with torch.no_grad():
        ids = backend.model.generate(**prompt.inputs, do_sample=False, pad_token_id=backend.tokenizer.pad_token_id, **kwargs)
    assert backend.tokenizer.decode(ids[0, prompt.input_ids.shape[1] :], skip_special_tokens=True) == answer

    # The follow-up turn builds on the history.
    follow_up = backend.chat(image, [Turn(QUESTION, answer)], "And then?", max_new_tokens=3)
    assert isinstance(follow_up, str)


def test_attend_after_chat_reuses_prefill_and_generated_tokens(tiny_family):
    backend, _ = tiny_family
    image = _noise_image(70, 50, seed=2)
    calls = []
    vision = backend.model.model.vision_model if backend.family == "deepseek_vl" else backend.model.model.vision_tower
    hook = vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        answer = backend.chat(image, [], QUESTION, max_new_tokens=5, min_new_tokens=5)
        result = backend.attend(image, [], QUESTION, answer)
    finally:
        hook.remove()
    assert len(calls) == 1  # the image went through the vision tower once for both calls
    assert len(result.token_ids) == 5  # exactly the generated tokens


def test_answer_start_is_prompt_and_only_the_continuation_is_answer(tiny_family):
    backend, reference = tiny_family
    image = _noise_image(60, 60, seed=3)
    lead = " The object most relevant to the question is"
    answer = backend.chat(image, [], QUESTION, max_new_tokens=4, min_new_tokens=4, answer_start=lead)
    result = backend.attend(image, [], QUESTION, answer.strip(), answer_start=lead)
    assert len(result.token_ids) == 4  # the generated continuation, not the forced lead
    want, _ = _eager_maps(backend, reference, image, [], QUESTION, result.token_ids, "chat", lead)
    assert (result.maps[0] - want[0]).abs().max() / want[0].abs().max() <= 1e-4


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_attention_rows_match_a_plain_softmax_with_gqa(mask_kind):
    torch.manual_seed(0)
    q_len, k_len, heads, kv_heads, dim = 3, 7, 4, 2, 8
    query = torch.randn(1, heads, q_len, dim)
    key = torch.randn(1, kv_heads, k_len, dim)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)  # cached prefix + causal
    allowed[:, 1] = False  # a padded key
    mask = {"none": None, "bool": allowed[None, None], "additive": torch.zeros(1, 1, q_len, k_len).masked_fill(~allowed, -1e9)}
    columns = torch.tensor([0, 2, 3])
    rows = attention_rows(query, key, mask[mask_kind], 0.5, True, columns)

    scores = (query @ key.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2)) * 0.5
    if mask_kind == "none":  # as sdpa's is_causal: upper-left aligned
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril()
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1)[..., columns]
    assert rows.shape == (1, heads, q_len, 3)
    assert torch.allclose(rows, want, atol=1e-6)


def _unnormalised(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """(3, H, W) normalised pixels -> (H, W, 3) in [0, 1]."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    return (pixels.float() * std + mean).permute(1, 2, 0).numpy()


def _view_canvases(backend, prompt) -> list[np.ndarray]:
    """For each view, the processed pixels its token grid was computed from, (H, W, 3)."""
    pixels = prompt.inputs["pixel_values"][0]
    image_processor = backend.processor.image_processor
    if backend.family != "llava_next":
        return [_unnormalised(pixels, image_processor)]
    tile = backend.model.config.vision_config.image_size
    w, h = prompt.image_size
    best_h, best_w = select_best_resolution((h, w), backend.model.config.image_grid_pinpoints)
    tiles_x = best_w // tile
    stitched = torch.zeros(3, best_h, best_w)
    for k in range((best_h // tile) * tiles_x):
        r, c = divmod(k, tiles_x)
        stitched[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = pixels[1 + k]
    f = tile // backend.model.config.vision_config.patch_size
    (r0, r1), (c0, c1) = unpadded_rows_cols((h, w), (best_h // tile * f, best_w // tile * f))
    cell = tile // f
    kept = stitched[:, r0 * cell : r1 * cell, c0 * cell : c1 * cell]
    return [_unnormalised(pixels[0], image_processor), _unnormalised(kept, image_processor)]


@pytest.mark.parametrize("size", [(96, 64), (64, 96)])
@pytest.mark.parametrize("template", ["chat", "flmm"])
def test_view_boxes_put_a_red_corner_in_the_right_cells(tiny_family, size, template):
    """Each token cell's footprint (from the view box) predicts the colour the processor put in it."""
    backend, _ = tiny_family
    w, h = size
    block = (0, 0, w // 2, h // 2)  # red top-left quarter on blue
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[: block[3], : block[2]] = (255, 0, 0)
    prompt = backend.build_prompt(Image.fromarray(pixels), [], QUESTION, template)
    fill = backend.processor.image_processor.image_mean  # padding colour, if any

    worst, red_cells = 0.0, 0
    for view, canvas in zip(prompt.views, _view_canvases(backend, prompt)):
        rows, cols = view.grid
        ch, cw = canvas.shape[0] // rows, canvas.shape[1] // cols
        x0, y0, x1, y1 = view.box
        cell_w, cell_h = (x1 - x0) / cols, (y1 - y0) / rows
        for i in range(rows):
            for j in range(cols):
                colour = canvas[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw].reshape(-1, 3).mean(0)
                seen = colour[0] - colour[2]  # "redness": red 1, blue -1
                cx0, cy0 = x0 + j * cell_w, y0 + i * cell_h
                red = _overlap((cx0, cy0, cx0 + cell_w, cy0 + cell_h), block) / (cell_w * cell_h)
                inside = _overlap((cx0, cy0, cx0 + cell_w, cy0 + cell_h), (0, 0, w, h)) / (cell_w * cell_h)
                expected = red - (inside - red) + (1 - inside) * (fill[0] - fill[2])
                worst = max(worst, abs(seen - expected))
                red_cells += red > 0.9
    assert red_cells > 0
    assert worst < 0.1, f"a cell's colour disagrees with its box footprint by {worst:.2f}"


def _overlap(a, b) -> float:
    """Area of the intersection of boxes (x0, y0, x1, y1)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def test_llava_pads_to_a_centred_square_so_the_grid_covers_the_whole_image():
    model, processor = tiny_llava()
    backend = LlavaBackend(model, processor)
    chat_view = backend.build_prompt(_noise_image(96, 64), [], QUESTION, "chat").views[0]
    flmm = backend.build_prompt(_noise_image(96, 64), [], QUESTION, "flmm")
    assert flmm.views[0].box == (0.0, -16.0, 96.0, 80.0)  # the padded square, in original pixels
    assert chat_view.box == flmm.views[0].box
    # Without the padding, llava-hf's processor would centre-crop the short side away.
    box, _ = clip_style_box(processor.image_processor, (96, 64))
    assert box == pytest.approx((16.0, 0.0, 80.0, 64.0))
    text = backend.tokenizer.decode(flmm.input_ids[0], skip_special_tokens=True)
    assert text.strip().startswith("USER:") and text.endswith("Please give me a description of the image. ASSISTANT:")
    assert flmm.input_ids[0, 0] == backend.tokenizer.bos_token_id


def test_load_backend_dispatches_on_model_type(tmp_path):
    model, processor = tiny_deepseek_vl()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    backend = load_backend(str(tmp_path))
    assert isinstance(backend, DeepseekVLBackend) and backend.num_layers == 2
    assert backend_class("llava_next") is LlavaNextBackend
    with pytest.raises(ValueError, match="no backend"):
        backend_class("gpt2")


def test_square_input_follows_flmm_processor_so_the_head_crop_matches():
    """F-LMM's LLaVA processor: 500x333 -> 336x223 (int), 56 px padding on top; its head
    then keeps 64-grid rows 10..52. Our placement must give the same crop."""
    square, (ox, oy, sx, sy) = resize_and_pad_square(Image.new("RGB", (500, 333), (255, 0, 0)), 336, (122, 116, 104))
    assert square.size == (336, 336)
    assert square.getpixel((10, 55)) == (122, 116, 104) and square.getpixel((10, 56)) == (255, 0, 0)
    assert square.getpixel((10, 56 + 222)) == (255, 0, 0) and square.getpixel((10, 56 + 223)) == (122, 116, 104)
    box = (ox, oy, ox + 336 * sx, oy + 336 * sy)
    assert box[0] == 0 and box[2] == pytest.approx(500)
    cropped = crop_to_image(torch.zeros(64, 64), box, (500, 333))
    assert cropped.shape == (42, 64)


@pytest.mark.parametrize("family", ["llava", "llava_next", "deepseek_vl"])
def test_chat_can_show_an_extra_image(family):
    """Visual chain of thought asks with the whole image and a crop: both reach the model."""
    builders = {"llava": (LlavaBackend, tiny_llava), "llava_next": (LlavaNextBackend, tiny_llava_next),
                "deepseek_vl": (DeepseekVLBackend, tiny_deepseek_vl)}
    cls, build = builders[family]
    backend = cls(*build())
    image = _noise_image(60, 40)
    crop = image.crop((0, 0, 20, 20))
    one = backend.build_prompt(image, [], QUESTION, "chat")
    two = backend.build_prompt(image, [], QUESTION, "chat", extra_images=[crop])
    count = lambda p: int((p.inputs["input_ids"] == backend.image_token_id).sum())  # noqa: E731
    assert count(two) > count(one) and two.views == []
    assert isinstance(backend.chat(image, [], QUESTION, max_new_tokens=3, extra_images=[crop]), str)
    with pytest.raises(ValueError, match="one image per prompt"):
        backend.build_prompt(image, [], QUESTION, "flmm", extra_images=[crop])
