"""F-LMM head: U-Net input handling, crops, official checkpoints, SAM refiner and encoder cache."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import ImageEncoderViT

from flmm_demo.heads import (
    FlmmHead,
    FlmmHeadConfig,
    SamImageEmbedding,
    SamImageEncoderCache,
    UNetMaskDecoder,
    crop_to_image,
    load_head,
    load_official_flmm,
)
from flmm_demo.heads.refiner import dense_prompt, mask_logits_to_box
from flmm_demo.heads.unet import crop_window, pad_to_multiple, prepare_attention, upsample_factor
from flmm_demo.types import ImageView

REFERENCE = Path("/work/shared/reference")
KEY_FILES = {
    "deepseek_vl_1_3b": (REFERENCE / "flmm_keys_deepseek_vl_1_3b.json", 24, 16, 2048),
    "llava_1_5_7b": (REFERENCE / "flmm_keys_llava_1_5_7b.json", 32, 32, 4096),
}


def square_pad_view(width: int, height: int, grid: int = 24) -> ImageView:
    """The view of a processor that pads the image to a centred square (DeepSeek-VL, F-LMM's LLaVA)."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    return ImageView("image", (grid, grid), (-left, -top, side - left, side - top))


def sam_embedding_for(width: int, height: int, seed: int = 0) -> SamImageEmbedding:
    """A random 1024-frame SAM embedding for an image of this size (no image encoder needed)."""
    scale = 1024 / max(width, height)
    input_size = (int(height * scale + 0.5), int(width * scale + 0.5))
    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(seed))
    return SamImageEmbedding(features, input_size, (height, width), 1024)


def official_state_dict(key_file: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 tensors with the exact names and shapes of a released F-LMM head."""
    generator = torch.Generator().manual_seed(seed)
    return {
        entry["name"]: torch.randn(entry["shape"], generator=generator).half()
        for entry in json.loads(key_file.read_text())
    }


# ------------------------------------------------------------ U-Net input handling
def test_unet_input_handling_reference_numbers():
    """Documents F-LMM's exact arithmetic, for checking against the reference implementation."""
    # 1. each channel becomes a distribution over patches
    x = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    sums = x.sum((-2, -1), keepdim=True).clamp(min=1e-12)
    assert torch.allclose((x / sums)[0, 0], torch.tensor([[0.25, 0.75], [0.0, 0.0]]))

    # 2. upsample factor max(1, 64 / max(h, w)) and the sizes it gives (floor(side * factor))
    assert upsample_factor(24, 24) == 64 / 24
    assert upsample_factor(100, 80) == 1.0
    cases = {(24, 24): (64, 64), (24, 36): (42, 64), (1, 1): (64, 64), (48, 48): (64, 64), (100, 80): (100, 80)}
    for (h, w), expected in cases.items():
        assert tuple(prepare_attention(torch.rand(1, 2, h, w)).shape[-2:]) == expected, (h, w)

    # the interpolation uses scale_factor (F-LMM's call), not a target size
    attn = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    normalised = attn / attn.sum((-2, -1), keepdim=True)
    expected = F.interpolate(normalised, scale_factor=64 / 24, mode="bilinear")
    assert torch.allclose(prepare_attention(attn), expected, atol=1e-9)
    # a uniform 24x24 map stays uniform at 1/576 per cell
    assert torch.allclose(prepare_attention(torch.ones(1, 1, 24, 24)), torch.full((1, 1, 64, 64), 1 / 576))

    # 3. zero padding at the bottom/right to a multiple of 8
    padded = pad_to_multiple(torch.ones(1, 1, 42, 64), 8)
    assert padded.shape[-2:] == (48, 64)
    assert padded[..., 42:, :].abs().sum() == 0 and padded[..., :42, :].min() == 1

    # 4. crop back to the image: start = int(pad * 64 / side), size = int(image * 64 / side + 0.5)
    assert crop_window(64, 80, 480, 640) == (8, 48)  # 640x480 padded to 640x640
    assert crop_window(64, 83, 333, 500) == (10, 43)  # 500x333: int(10.624), int(42.624 + 0.5)
    assert crop_window(64, 0, 640, 640) == (0, 64)


@pytest.mark.parametrize(
    "width,height,grid,expected",
    [(640, 480, (24, 24), (48, 64)), (480, 640, (24, 24), (64, 48)), (640, 480, (1, 1), (48, 64)),
     (500, 333, (24, 24), (43, 64)), (512, 512, (24, 24), (64, 64))],
)
def test_unet_logits_cropped_to_non_square_images(width, height, grid, expected):
    torch.manual_seed(0)
    unet = UNetMaskDecoder(in_channels=6).eval()
    attn = torch.rand(2, 6, *grid)
    with torch.no_grad():
        logits = unet(attn)
    assert logits.shape == (2, 1, 64, 64) and torch.isfinite(logits).all()
    view = square_pad_view(width, height, grid[0])
    assert crop_to_image(logits, view.box, (width, height)).shape[-2:] == expected


def test_unet_non_square_grid_keeps_its_size():
    unet = UNetMaskDecoder(in_channels=4).eval()
    with torch.no_grad():
        logits = unet(torch.rand(1, 4, 24, 36))
    assert logits.shape == (1, 1, 42, 64)


def test_unet_refuses_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(batch, 8, h, w\)"):
        UNetMaskDecoder(in_channels=8)(torch.rand(1, 6, 24, 24))


def test_crop_refuses_a_view_inside_the_image():
    with pytest.raises(ValueError, match="does not cover the whole"):
        crop_to_image(torch.zeros(64, 64), (10, 0, 640, 480), (640, 480))


# ------------------------------------------------------------ official checkpoints
@pytest.mark.parametrize(
    "lmm,wrapping",
    [("deepseek_vl_1_3b", "plain"), ("deepseek_vl_1_3b", "module_prefix"), ("llava_1_5_7b", "state_dict")],
)
def test_official_checkpoint_loads_every_key(tmp_path, lmm, wrapping):
    key_file, layers, heads, hidden = KEY_FILES[lmm]
    state = official_state_dict(key_file)
    assert len(state) == 193
    saved: object = state
    if wrapping == "state_dict":
        saved = {"state_dict": state}
    elif wrapping == "module_prefix":
        saved = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "head.pth"
    torch.save(saved, path)

    head = load_official_flmm(path, num_layers=layers, num_heads=heads, hidden_size=hidden)

    ours = head.state_dict()
    assert len(ours) == 193
    conv = "mask_head.encoder.0.0.convs.0.conv.weight"
    assert ours[conv].dtype == torch.float32 and torch.equal(ours[conv], state[conv].float())
    assert torch.equal(ours["sam.text_layer_weights"], state["text_layer_weights"].float())
    assert torch.equal(ours["sam.model.mask_decoder.iou_prediction_head.layers.2.bias"],
                       state["sam.model.mask_decoder.iou_prediction_head.layers.2.bias"].float())
    assert head.config.in_channels == layers * heads


def test_official_checkpoint_for_another_lmm_is_refused(tmp_path):
    key_file, *_ = KEY_FILES["deepseek_vl_1_3b"]
    path = tmp_path / "deepseek_head.pth"
    torch.save(official_state_dict(key_file), path)
    with pytest.raises(ValueError) as err:
        load_official_flmm(path, num_layers=32, num_heads=32, hidden_size=4096)
    message = str(err.value)
    assert "384 attention channels (24 layers x 16 heads, hidden 2048: DeepSeek-VL-1.3B-like)" in message
    assert "the model has 1024 (32 x 32, hidden 4096)" in message


def test_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    key_file, layers, heads, hidden = KEY_FILES["deepseek_vl_1_3b"]
    state = official_state_dict(key_file)
    del state["mask_head.conv_seg.bias"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing .*mask_head.conv_seg.bias"):
        load_official_flmm(path, num_layers=layers, num_heads=heads, hidden_size=hidden)


def test_load_head_checks_the_lmm_shape(tmp_path):
    class Lmm:
        num_layers, num_heads, hidden_size = 3, 2, 16

    FlmmHead(FlmmHeadConfig(num_layers=2, num_heads=2, hidden_size=16)).save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="this head expects 4 attention channels .* the model has 6"):
        load_head(tmp_path / "head", Lmm())


# ------------------------------------------------------------ head + refiner
def small_head(seed: int = 0) -> FlmmHead:
    torch.manual_seed(seed)
    return FlmmHead(FlmmHeadConfig(num_layers=2, num_heads=3, hidden_size=16)).eval()


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    head = small_head()
    width, height = 640, 480
    view = square_pad_view(width, height)
    maps = torch.rand(6, 24, 24)
    hidden = torch.randn(2, 3, 16)
    embedding = sam_embedding_for(width, height)

    before = head.predict(maps, hidden, view, (width, height), embedding)
    head.save_pretrained(tmp_path / "head")
    assert (tmp_path / "head" / "model.safetensors").is_file()
    loaded = FlmmHead.from_pretrained(tmp_path / "head")
    after = loaded.predict(maps, hidden, view, (width, height), embedding)

    assert loaded.config == head.config
    assert before.mask_logits.shape == (height, width) and before.unet_logits.shape == (48, 64)
    assert torch.equal(before.mask_logits, after.mask_logits)
    assert torch.equal(before.unet_logits, after.unet_logits)


def test_predict_without_sam_resizes_the_unet_logits():
    head = small_head()
    out = head.predict(torch.rand(6, 24, 24), None, square_pad_view(480, 640), (480, 640))
    assert out.unet_logits.shape == (64, 48)
    expected = F.interpolate(out.unet_logits[None, None], size=(640, 480), mode="bilinear")[0, 0]
    assert torch.equal(out.mask_logits, expected)


def test_predict_accepts_the_views_of_an_answer():
    head = small_head()
    tile = ImageView("tile", (24, 24), (0, 0, 320, 240))
    full = square_pad_view(640, 480)
    maps = [torch.rand(6, 24, 24), torch.rand(6, 24, 24)]
    out = head.predict(maps, None, [tile, full], (640, 480))
    direct = head.predict(maps[1], None, full, (640, 480))
    assert torch.equal(out.mask_logits, direct.mask_logits)


def test_refiner_prompts_follow_flmm():
    # dense prompt: logits resized to the resized image, padded with min(-1, min logit), to 256x256
    logits = torch.full((48, 64), 2.0)
    prompt = dense_prompt(logits, input_size=(768, 1024))
    assert prompt.shape == (1, 1, 256, 256)
    assert torch.allclose(prompt[0, 0, :190], torch.tensor(2.0))
    assert torch.allclose(prompt[0, 0, 194:], torch.tensor(-1.0))
    assert dense_prompt(torch.full((4, 4), -5.0), (512, 1024))[0, 0, -1, -1] == -5.0

    # box: sigmoid(logits) > 0.5 at the original size, [x0, y0, x1 + 1, y1 + 1]
    logits = torch.full((48, 64), -4.0)
    logits[12:24, 16:32] = 4.0
    box = mask_logits_to_box(logits, original_size=(480, 640))
    assert np.allclose(box, [160, 120, 320, 240], atol=10)
    assert np.array_equal(mask_logits_to_box(torch.full((48, 64), -4.0), (480, 640)), [0, 0, 640, 480])


def test_refiner_sparse_tokens_are_box_corners_then_text():
    head = small_head()
    hidden = torch.randn(2, 4, 16)
    seen = {}

    def capture(module, args, kwargs):
        seen["sparse"] = kwargs["sparse_prompt_embeddings"]
        seen["multimask"] = kwargs["multimask_output"]

    handle = head.sam.model.mask_decoder.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        head.predict(torch.rand(6, 24, 24), hidden, square_pad_view(640, 480), (640, 480), sam_embedding_for(640, 480))
        text = head.sam.text_embeddings(hidden)
    handle.remove()
    assert seen["sparse"].shape == (1, 2 + 4, 256)
    assert torch.allclose(seen["sparse"][0, 2:], text)
    assert seen["multimask"] is False
    # the text cue mixes all layers with softmax(text_layer_weights) before the projection
    mixed = (hidden * head.sam.text_layer_weights.softmax(0).view(-1, 1, 1)).sum(0)
    assert torch.allclose(text, head.sam.text_proj(mixed))


def test_refiner_refuses_hidden_states_of_another_depth():
    head = small_head()
    with pytest.raises(ValueError, match="layers=2"):
        head.predict(torch.rand(6, 24, 24), torch.randn(5, 2, 16), square_pad_view(64, 64), (64, 64),
                     sam_embedding_for(64, 64))


# ------------------------------------------------------------ SAM image encoder cache
def tiny_encoder_cache() -> SamImageEncoderCache:
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=16, depth=1, num_heads=2, out_chans=8)
    return SamImageEncoderCache(encoder)


def test_sam_cache_preprocesses_like_sam():
    cache = tiny_encoder_cache()
    mean_colour = np.zeros((480, 640, 3), dtype=np.uint8) + np.array([124, 116, 104], dtype=np.uint8)
    x, input_size, original_size = cache.preprocess(Image.fromarray(mean_colour))
    assert x.shape == (1, 3, 64, 64) and input_size == (48, 64) and original_size == (480, 640)
    assert x[..., :48, :].abs().max() < 0.01  # the SAM mean maps to ~0
    assert torch.equal(x[..., 48:, :], torch.zeros(1, 3, 16, 64))  # zero padding at the bottom


def test_sam_cache_encodes_each_image_once_in_the_background():
    cache = tiny_encoder_cache()
    calls = []
    cache.image_encoder.register_forward_hook(lambda *_: calls.append(threading.current_thread().name))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    other = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8))

    threads = [threading.Thread(target=cache.start, args=(image,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    embedding = cache.get(timeout=30)
    assert embedding.features.shape == (1, 8, 4, 4)
    assert embedding.input_size == (64, 53) and embedding.original_size == (48, 40)
    assert cache.set_image(image) is embedding
    assert len(calls) == 1 and calls[0].startswith("sam-encoder")

    future = cache.start(other)
    assert not torch.equal(future.result(timeout=30).features, embedding.features)
    assert cache.get().original_size == (40, 48)
    assert len(calls) == 2
    cache.close()
