"""Every preset's real preprocessing, checked without weights.

Each family gets its image processor built from the published preprocessor_config.json
values (written out below) and a tiny LMM whose vision tower has the real image size and
patch size, so prompts hold as many image tokens, in the same grids, as the released
models'. A bright marker is drawn at known places on images of 1:1, 4:3, 16:9, 9:16, a
very thin and a tiny size; for every view, the token whose pixels changed most must be
one the view geometry (view.box + grid) puts the marker in, and the cell the geometry
says is most covered must have changed too. The token a cell belongs to is read from the
processor's own pixel_values, which is what the LMM's attention maps are indexed by.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    DeepseekVLConfig,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from flmm_demo.backends.deepseek_vl import DeepseekVLBackend
from flmm_demo.backends.idefics3 import SmolVLMBackend
from flmm_demo.backends.llava import LlavaBackend
from flmm_demo.backends.llava_next import LlavaNextBackend, unpadded_rows_cols
from flmm_demo.backends.qwen2_vl import Qwen3VLBackend, Qwen25VLBackend
from flmm_demo.backends.testing import (
    DEEPSEEK_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    MISTRAL_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    byte_tokenizer,
    qwen_tokens,
    tiny_llava_next,
    tiny_qwen3_vl,
    tiny_tokenizer,
)
from flmm_demo.heads import FlmmHead, FlmmHeadConfig
from flmm_demo.heads.flmm_head import base_and_tiles
from flmm_demo.heads.unet import crop_window

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
SIZES = {"1:1": (300, 300), "4:3": (640, 480), "16:9": (640, 360), "9:16": (360, 640), "thin": (1000, 20), "tiny": (8, 8)}
QUESTION = "What is in the picture?"


def _llama(vocab: int, cls=LlamaConfig):
    return cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=8192)


def llava_1_5():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 -> 24x24 tokens."""
    tok = tiny_tokenizer("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=_llama(len(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    ip = LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                             resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE)
    return LlavaBackend(LlavaBackend.model_class(config), processor)


PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next():
    """llava-hf/llava-v1.6-mistral-7b-hf: 336 px tiles of 24x24, anyres pinpoints up to 672x672 / 1008x336."""
    tok = tiny_tokenizer("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    config = LlavaNextConfig(vision_config=vision, text_config=_llama(len(tok), MistralConfig),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                                   vision_feature_select_strategy="default", chat_template=MISTRAL_CHAT_TEMPLATE)
    return LlavaNextBackend(LlavaNextBackend.model_class(config), processor)


def deepseek_vl():
    """deepseek-community/deepseek-vl-1.3b-chat: SigLIP at 384, patch 16 -> 24x24 tokens."""
    tok = tiny_tokenizer("<image_placeholder>")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=384, patch_size=16)
    config = DeepseekVLConfig(vision_config=vision, text_config=_llama(len(tok)),
                              image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    ip = DeepseekVLImageProcessor(size={"height": 384, "width": 384}, image_mean=HALF, image_std=HALF, min_size=14)
    processor = DeepseekVLProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=576,
                                    chat_template=DEEPSEEK_CHAT_TEMPLATE)
    return DeepseekVLBackend(DeepseekVLBackend.model_class(config), processor)


def qwen2_5_vl():
    """Qwen/Qwen2.5-VL-*-Instruct (and Qwen2-VL, same preprocessing): patch 14, 2x2 merge."""
    tok, ids = qwen_tokens()
    special = {k: ids.pop(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                        "rope_theta": 1e6}) | special
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])
    ip = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                  temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen25VLBackend(Qwen25VLBackend.model_class(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)),
                           processor)


def qwen3_vl():
    """Qwen/Qwen3-VL-*-Instruct: patch 16, 2x2 merge, 65536..16777216 pixels, mean = std = 0.5."""
    model, small = tiny_qwen3_vl()
    ip = Qwen2VLImageProcessorPil(min_pixels=65536, max_pixels=16777216, patch_size=16, merge_size=2,
                                  temporal_patch_size=2, image_mean=HALF, image_std=HALF)
    processor = Qwen3VLProcessor(image_processor=ip, tokenizer=small.tokenizer, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen3VLBackend(model, processor)


SMOL_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def smolvlm():
    """HuggingFaceTB/SmolVLM-256M-Instruct: longest edge 2048, 512 px tiles, patch 16, pixel shuffle 4 -> 8x8 per tile."""
    markers = ["<fake_token_around_image>", "<image>", "<global-img>"]
    markers += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", *markers],
                         eos="<end_of_utterance>", pad="<|endoftext|>")
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                   do_image_splitting=True, image_mean=HALF, image_std=HALF)
    processor = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=64, chat_template=SMOL_TEMPLATE)
    config = SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=512, patch_size=16),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=4,
    )
    return SmolVLMBackend(SmolVLMBackend.model_class(config), processor)


FAMILIES = {"llava-1.5": llava_1_5, "llava-next": llava_next, "deepseek-vl": deepseek_vl,
            "qwen2.5-vl": qwen2_5_vl, "qwen3-vl": qwen3_vl, "smolvlm": smolvlm}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


# ------------------------------------------------------- token -> pixels
def _brightness(pixels: torch.Tensor, ip) -> torch.Tensor:
    """(3, H, W) normalised -> (H, W) mean of the unnormalised channels."""
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    return (pixels.float() * std + mean).mean(0)


def _cells(plane: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    rows, cols = grid
    return plane.reshape(rows, plane.shape[0] // rows, cols, plane.shape[1] // cols).mean((1, 3))


def token_brightness(backend, prompt) -> list[torch.Tensor]:
    """Per view (rows, cols): brightness of the processed pixels each image token was made from."""
    ip = backend.processor.image_processor
    pixels = prompt.inputs["pixel_values"]
    if backend.family in ("qwen2_5_vl", "qwen3_vl"):
        (view,) = prompt.views
        mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
        per_token = pixels.float().view(view.grid[0] * view.grid[1], 4, 3, -1).mean((1, 3)) * std + mean
        return [per_token.mean(-1).view(view.grid)]
    if backend.family == "smolvlm":
        return [_cells(_brightness(frame, ip), view.grid) for frame, view in zip(pixels[0], prompt.views)]
    if backend.family != "llava_next":
        return [_cells(_brightness(pixels[0], ip), prompt.views[0].grid)]
    config = backend.model.config
    tile, f = config.vision_config.image_size, config.vision_config.image_size // config.vision_config.patch_size
    w, h = prompt.image_size
    best_h, best_w = select_best_resolution((h, w), config.image_grid_pinpoints)
    stitched = torch.zeros(3, best_h, best_w)
    for k in range((best_h // tile) * (best_w // tile)):
        r, c = divmod(k, best_w // tile)
        stitched[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = pixels[0, 1 + k]
    (r0, r1), (c0, c1) = unpadded_rows_cols((h, w), (best_h // tile * f, best_w // tile * f))
    cell = tile // f
    kept = stitched[:, r0 * cell : r1 * cell, c0 * cell : c1 * cell]
    return [_cells(_brightness(pixels[0, 0], ip), prompt.views[0].grid), _cells(_brightness(kept, ip), prompt.views[1].grid)]


def coverage(view, marker: tuple[float, float, float, float]) -> torch.Tensor:
    """(rows, cols): share of each cell's footprint (from view.box) the marker covers."""
    x0, y0, x1, y1 = view.box
    rows, cols = view.grid
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    xs = torch.arange(cols) * cw + x0
    ys = torch.arange(rows) * ch + y0
    ox = (torch.minimum(xs + cw, torch.tensor(marker[2])) - torch.maximum(xs, torch.tensor(marker[0]))).clamp(min=0)
    oy = (torch.minimum(ys + ch, torch.tensor(marker[3])) - torch.maximum(ys, torch.tensor(marker[1]))).clamp(min=0)
    return oy[:, None] * ox[None, :] / (cw * ch)


def centre_distance(view, marker) -> torch.Tensor:
    """(rows, cols): distance from each cell's centre to the marker's centre, in cells."""
    x0, y0, x1, y1 = view.box
    rows, cols = view.grid
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    mx, my = (marker[0] + marker[2]) / 2, (marker[1] + marker[3]) / 2
    xs = (x0 + (torch.arange(cols) + 0.5) * cw - mx) / cw
    ys = (y0 + (torch.arange(rows) + 0.5) * ch - my) / ch
    return (ys[:, None] ** 2 + xs[None, :] ** 2).sqrt()


def _marker(size, views, at):
    """A marker box about 1.5 cells of the coarsest view wide (at most 40% of the image), centred at `at`."""
    w, h = size
    mw = min(max(1.5 * (v.box[2] - v.box[0]) / v.grid[1] for v in views), 0.4 * w)
    mh = min(max(1.5 * (v.box[3] - v.box[1]) / v.grid[0] for v in views), 0.4 * h)
    mw, mh = max(mw, 1.0), max(mh, 1.0)
    cx, cy = at[0] * w, at[1] * h
    x0, y0 = round(min(max(cx - mw / 2, 0), w - mw)), round(min(max(cy - mh / 2, 0), h - mh))
    return (x0, y0, x0 + max(round(mw), 1), y0 + max(round(mh), 1))


@pytest.mark.parametrize("shape", sorted(SIZES))
def test_a_marker_lands_in_the_cell_the_view_geometry_maps_it_to(family, shape):
    name, backend = family
    size = SIZES[shape]
    blank = Image.new("RGB", size, (0, 0, 0))
    base = backend.build_prompt(blank, [], QUESTION)
    before = token_brightness(backend, base)
    for at in ((0.25, 0.3), (0.7, 0.75)):
        marker = _marker(size, base.views, at)
        image = blank.copy()
        image.paste((255, 255, 255), marker)
        prompt = backend.build_prompt(image, [], QUESTION)
        assert [v.grid for v in prompt.views] == [v.grid for v in base.views]
        newlines = prompt.views[1].grid[0] if backend.family == "llava_next" else 0  # image_newline, one per row
        assert sum(v.positions.numel() for v in prompt.views) + newlines == int((prompt.input_ids == backend.image_token_id).sum())
        checked = 0
        for view, after, was in zip(prompt.views, token_brightness(backend, prompt), before):
            change = after - was
            covered = coverage(view, marker)
            if covered.max() == 0:  # a tile the marker misses (SmolVLM): only resampling blur reaches it
                continue
            checked += 1
            brightest = divmod(int(change.argmax()), view.grid[1])
            # the most covered cell, the one nearest the marker's centre among equals
            most_covered = divmod(int((covered - 1e-3 * centre_distance(view, marker)).argmax()), view.grid[1])
            where = f"{name} {shape} {view.name} marker {marker}"
            assert covered[brightest] > 0, f"{where}: the token that changed most, {brightest}, is not under the marker"
            assert change[most_covered] >= 0.5 * change.max(), f"{where}: cell {most_covered} hardly changed"
        assert checked, f"{name} {shape}: no view covers the marker {marker}"


# ------------------------------------------------------------ head crops
def flmm_square_crop(size, side: int, min_short: int = 1):
    """F-LMM's rule (flmm.md section 2) from its processor's square: (top, rows, left, cols) on the 64 grid."""
    w, h = size
    long = max(w, h)
    rw = side if w == long else max(int(w * side / long), min_short)
    rh = side if h == long else max(int(h * side / long), min_short)
    top, left = (side - rh) // 2, (side - rw) // 2
    return int(top * 64 / side), int(rh * 64 / side + 0.5), int(left * 64 / side), int(rw * 64 / side + 0.5)


@pytest.mark.parametrize("name,side,min_short", [("llava-1.5", 336, 1), ("deepseek-vl", 384, 14)])
@pytest.mark.parametrize("shape", sorted(SIZES))
def test_head_crop_equals_flmms_rule(name, side, min_short, shape):
    backend = FAMILIES[name]()
    size = SIZES[shape]
    (view,) = backend.build_prompt(Image.new("RGB", size), [], "", "flmm").views
    x0, y0, x1, y1 = view.box
    top, rows = crop_window(64, -y0, size[1], y1 - y0)
    left, cols = crop_window(64, -x0, size[0], x1 - x0)
    assert (top, rows, left, cols) == flmm_square_crop(size, side, min_short)


def test_llava_next_head_reads_base_and_tiles_as_flmm_does():
    """F-LMM's LLaVA-NeXT heads (frozen_llava_next.py): 2*L*H channels, the base grid resized
    bilinearly to the unpadded tile grid, then the tile grid read from its rows with the
    newline column dropped; the tile grid is taken for the whole image."""
    backend = LlavaNextBackend(*tiny_llava_next())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    answer = "The cat is on the red mat."
    attention = backend.attend(image, [], QUESTION, answer)
    prompt = backend.build_prompt(image, [], QUESTION)
    maps = attention.phrase_maps((1, 4))
    # Independently: every image token in prompt order, base first, then rows of (cols + 1) with the newline last.
    positions = (prompt.input_ids[0] == backend.image_token_id).nonzero().flatten()
    f = backend.model.config.vision_config.image_size // backend.model.config.vision_config.patch_size
    rows, cols = attention.views[1].grid
    assert positions.numel() == f * f + rows * (cols + 1)
    full = backend.attend(image, [], QUESTION, answer)  # per-token rows via the public API
    token_means = [m[1:4].mean(0) for m in full.maps]
    coarse = token_means[0]
    resized = F.interpolate(coarse[None], size=(rows, cols), mode="bilinear")[0]
    expected = torch.cat([resized, token_means[1]], 0)
    grid, grid_view = base_and_tiles(maps, attention.views, attention.image_size)
    torch.testing.assert_close(grid, expected)
    assert grid.shape[0] == 2 * backend.num_layers * backend.num_heads
    assert grid_view.box == (0.0, 0.0, 90.0, 40.0)

    config = FlmmHeadConfig(num_layers=backend.num_layers, num_heads=backend.num_heads,
                            hidden_size=backend.hidden_size, input_grids=2, use_refiner=False)
    torch.manual_seed(0)
    head = FlmmHead(config).eval()
    out = head.predict(maps, None, attention.views, attention.image_size)
    with torch.no_grad():
        want = head.mask_head(expected[None])[0, 0]
    torch.testing.assert_close(out.unet_logits, want)  # the whole grid: nothing cropped
    from flmm_demo.heads.checkpoint import check_fits

    with pytest.raises(ValueError, match=r"this head expects 8 attention channels .* but the model has 16 \(2 x 4 x 2 grids"):
        check_fits({"mask_head.encoder.0.0.convs.0.conv.weight": torch.zeros(64, 8, 3, 3)}, config)
