"""F-LMM head: U-Net input handling, crops, official checkpoints, SAM refiner and encoder cache."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

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
from flmm_demo.heads.checkpoint import RENAMES
from flmm_demo.heads.refiner import dense_prompt, mask_logits_to_box
from flmm_demo.heads.unet import crop_window, pad_to_multiple, prepare_attention, upsample_factor
from flmm_demo.types import ImageView

REFERENCE = Path("/work/shared/reference")
KEY_FILES = {
    "deepseek_vl_1_3b": (REFERENCE / "flmm_keys_deepseek_vl_1_3b.json", 24, 16, 2048),
    "llava_1_5_7b": (REFERENCE / "flmm_keys_llava_1_5_7b.json", 32, 32, 4096),
}


def square_pad_view(width: int, height: int, grid: int = 24) -> ImageView:
    """The view of a grid over the image padded to a centred square in original pixels.

    (F-LMM's own processors resize first and pad in their 384 / 336 frame: see view_of.)
    """
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
    torch.testing.assert_close(after.mask_logits, before.mask_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.unet_logits, before.unet_logits, atol=1e-5, rtol=1e-5)


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


def test_sam_cache_input_equals_sam_preprocess():
    """F-LMM's SAMWrapper.encode_image: RGB array -> ResizeLongestSide.apply_image -> Sam.preprocess."""
    cache = tiny_encoder_cache()
    sam = Sam(cache.image_encoder, prompt_encoder=None, mask_decoder=None)
    array = np.random.default_rng(2).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    resized = torch.as_tensor(ResizeLongestSide(64).apply_image(array)).permute(2, 0, 1).contiguous()[None]
    expected = sam.preprocess(resized)
    x, input_size, original_size = cache.preprocess(Image.fromarray(array))
    assert input_size == tuple(resized.shape[-2:]) == (47, 64) and original_size == (37, 50)
    assert torch.allclose(x, expected, atol=1e-6)


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


# ------------------------------------------------------------ F-LMM, re-derived
# An independent re-implementation of F-LMM's head forward, written from its code
# (flmm/models/mask_head/mask_decoder.py UNetHead, mmseg's UNet / BasicConvBlock /
# InterpConv / UpConvBlock, flmm/models/mask_head/mask_refiner.py SAMWrapper, and
# FrozenDeepseekVLSAM.ground / FrozenLlavaSAM._forward) with plain torch ops on the
# official parameter names. FlmmHead must reproduce it: U-Net logits and text
# embeddings to 2e-5, refined SAM logits to 2e-4.
def ref_conv_module(x: torch.Tensor, state: dict, name: str, padding: int) -> torch.Tensor:
    """mmcv ConvModule(norm_cfg=GroupNorm(1 group)): conv without bias -> gn -> ReLU."""
    x = F.conv2d(x, state[f"{name}.conv.weight"], None, padding=padding)
    x = F.group_norm(x, 1, state[f"{name}.gn.weight"], state[f"{name}.gn.bias"], eps=1e-5)
    return F.relu(x)


def ref_basic_block(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """mmseg BasicConvBlock with num_convs=2, 3x3 convs, dilation 1."""
    for j in range(2):
        x = ref_conv_module(x, state, f"{name}.convs.{j}", padding=1)
    return x


def ref_unet_head(x: torch.Tensor, state: dict) -> torch.Tensor:
    """F-LMM UNetHead.forward (normalize_input=True, upsample_input=64) -> (B, 1, h', w')."""
    state = {k.removeprefix("mask_head."): v for k, v in state.items() if k.startswith("mask_head.")}
    h, w = x.shape[-2:]
    x = x / x.sum((-2, -1), keepdim=True).clamp(min=1e-12)
    x = F.interpolate(x.float(), scale_factor=max(1.0, 64 / max(h, w)), mode="bilinear").to(x)
    h, w = x.shape[-2:]
    padded = x.new_zeros(*x.shape[:2], math.ceil(h / 8) * 8, math.ceil(w / 8) * 8)
    padded[..., :h, :w] = x
    # mmseg UNet(num_stages=4, strides 1, downsamples True): MaxPool before stages 1-3
    enc_outs, y = [], padded
    for i in range(4):
        if i > 0:
            y = F.max_pool2d(y, kernel_size=2)
        y = ref_basic_block(y, state, f"encoder.{i}.{0 if i == 0 else 1}")
        enc_outs.append(y)
    for i in reversed(range(3)):
        # InterpConv: F-LMM's patched Upsample (size = int(2 * side), float32), then 1x1 ConvModule
        size = [int(t * 2.0) for t in y.shape[-2:]]
        up = F.interpolate(y.float(), size, None, "bilinear", False).to(y)
        up = ref_conv_module(up, state, f"decoder.{i}.upsample.interp_upsample.1", padding=0)
        y = ref_basic_block(torch.cat([enc_outs[i], up], dim=1), state, f"decoder.{i}.conv_block")
    return F.conv2d(y[..., :h, :w], state["conv_seg.weight"], state["conv_seg.bias"])


def ref_processor_meta(width: int, height: int, side: int) -> dict:
    """F-LMM's processors (DeepSeek VLMImageProcessor: side 384; CustomLlavaImageProcessor: 336):
    longest side -> side with int() on the other, then centred padding (pad // 2 before)."""
    longest = max(width, height)
    rh, rw = max(int(height / longest * side), 14), max(int(width / longest * side), 14)
    return dict(padding=dict(before_height=(side - rh) // 2, before_width=(side - rw) // 2),
                image_shape=dict(height=rh, width=rw), padded_shape=dict(height=side, width=side))


def ref_crop(pred_masks: torch.Tensor, meta: dict) -> torch.Tensor:
    """The crop of FrozenDeepseekVLSAM.ground / FrozenLlavaSAM._forward on (N, 64, 64) logits."""
    mh, mw = pred_masks.shape[-2:]
    ph, pw = meta["padded_shape"]["height"], meta["padded_shape"]["width"]
    top = int(meta["padding"]["before_height"] * mh / ph)
    left = int(meta["padding"]["before_width"] * mw / pw)
    h = int(meta["image_shape"]["height"] * mh / ph + 0.5)
    w = int(meta["image_shape"]["width"] * mw / pw + 0.5)
    return pred_masks[:, top:top + h, left:left + w]


def view_of(meta: dict, width: int, height: int) -> ImageView:
    """The view box, in original pixels, of the processor frame described by `meta`."""
    sx, sy = meta["image_shape"]["width"] / width, meta["image_shape"]["height"] / height
    side = meta["padded_shape"]["height"]
    bw, bh = meta["padding"]["before_width"], meta["padding"]["before_height"]
    return ImageView("image", (24, 24), (-bw / sx, -bh / sy, (side - bw) / sx, (side - bh) / sy))


def ref_text_embeds(hidden_all: torch.Tensor, spans: list[tuple[int, int]], state: dict) -> list[torch.Tensor]:
    """hidden_all: (L, S, D) = hidden_states[-L:] -> per phrase (n, 256), as in F-LMM."""
    weights = torch.softmax(state["text_layer_weights"], dim=0)
    mixed = (hidden_all * weights.view(-1, 1, 1)).sum(0)
    return [F.linear(mixed[a:b], state["text_proj.weight"], state["text_proj.bias"]) for a, b in spans]


def ref_sam_modules(state: dict) -> tuple[PromptEncoder, MaskDecoder]:
    """segment-anything's prompt encoder / mask decoder (sam_vit_l sizes) with the official tensors."""
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                   mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    for module, prefix in ((prompt_encoder, "sam.model.prompt_encoder."), (mask_decoder, "sam.model.mask_decoder.")):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return prompt_encoder.eval(), mask_decoder.eval()


def ref_sam_wrapper(state: dict, features: torch.Tensor, original_size: tuple[int, int],
                    pred_masks: torch.Tensor, text_embeds: list[torch.Tensor]) -> torch.Tensor:
    """SAMWrapper.forward after encode_image: (N, h, w) cropped logits -> (N, H, W) SAM logits."""
    prompt_encoder, mask_decoder = ref_sam_modules(state)
    oh, ow = original_size
    scale = 1024 / max(oh, ow)
    input_size = (int(oh * scale + 0.5), int(ow * scale + 0.5))  # ResizeLongestSide.get_preprocess_shape
    # generate_prompt_masks: one pad value for the whole batch of phrases
    pad_value = min(-1.0, pred_masks.min().item())
    masks = F.interpolate(pred_masks[:, None].float(), size=input_size, mode="bilinear")
    masks = F.pad(masks, (0, 1024 - masks.shape[-1], 0, 1024 - masks.shape[-2]), value=pad_value)
    prompt_masks = F.interpolate(masks, size=(256, 256), mode="bilinear")
    binary = F.interpolate(pred_masks[None].float().sigmoid(), size=original_size, mode="bilinear")[0] > 0.5
    out = []
    for prompt_mask, mask, text_embed in zip(prompt_masks, binary, text_embeds):
        if mask.sum() > 0:
            ys, xs = np.where(mask.numpy())
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # mask2box
        else:
            box = np.array([0.0, 0.0, ow, oh])
        box = box.reshape(2, 2).astype(float) * [input_size[1] / ow, input_size[0] / oh]  # apply_boxes
        sparse, dense = prompt_encoder(points=None, boxes=torch.as_tensor(box, dtype=torch.float32).view(1, 1, 4),
                                       masks=prompt_mask.view(1, 1, 256, 256))
        sparse = torch.cat([sparse, text_embed[None]], dim=1)
        low_res, _ = mask_decoder(image_embeddings=features, image_pe=prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        # Sam.postprocess_masks
        x = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
        x = x[..., :input_size[0], :input_size[1]]
        out.append(F.interpolate(x, original_size, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def official_head(tmp_path_factory):
    """A random head saved under F-LMM's parameter names and loaded back like a released .pth.

    The U-Net output is made steep (conv_seg x 20) so phrases reach different minimum
    logits, which makes F-LMM's batch-wide dense-prompt fill observable.
    """
    torch.manual_seed(0)
    head = FlmmHead(FlmmHeadConfig(num_layers=6, num_heads=4, hidden_size=96))
    inverse = {ours: theirs for theirs, ours in RENAMES.items()}
    state = {inverse.get(k, k): v.detach().clone() for k, v in head.state_dict().items()}
    state["mask_head.conv_seg.weight"] *= 20
    state["mask_head.conv_seg.bias"] = torch.tensor([-2.0])
    path = tmp_path_factory.mktemp("flmm") / "head.pth"
    torch.save(state, path)
    return load_official_flmm(path, num_layers=6, num_heads=4, hidden_size=96), state


@pytest.mark.parametrize(
    "width,height,side,refine",
    # square 24x24 grid; DeepSeek-VL frame (384) for 640x480 and for a size whose crop needs
    # exact rounding; LLaVA-1.5 frame (336). SAM runs on two of them to keep the test fast.
    [(512, 512, 384, True), (640, 480, 384, True), (200, 376, 384, False), (500, 333, 336, False)],
)
def test_head_matches_an_independent_flmm_reimplementation(official_head, width, height, side, refine):
    head, state = official_head
    generator = torch.Generator().manual_seed(width + height)
    maps = torch.rand(2, 24, 24, 24, generator=generator)
    maps[1] = maps[1] ** 8  # a peaky second phrase
    hidden_all = torch.randn(6, 11, 96, generator=generator)  # (L, S, D), embedding output excluded
    spans = [(2, 5), (7, 8)]
    features = torch.randn(1, 256, 64, 64, generator=generator)
    meta = ref_processor_meta(width, height, side)
    embedding = None
    if refine:
        input_size = sam_embedding_for(width, height).input_size
        embedding = SamImageEmbedding(features, input_size, (height, width), 1024)

    with torch.no_grad():
        ref_full = ref_unet_head(maps, state)[:, 0]
        ref_unet = ref_crop(ref_full, meta)
        ref_text = ref_text_embeds(hidden_all, spans, state)
        full = head.mask_head(maps)[:, 0]
        text = [head.sam.text_embeddings(hidden_all[:, a:b]) for a, b in spans]
        outs = head.predict_phrases(list(maps), [hidden_all[:, a:b] for a, b in spans],
                                    view_of(meta, width, height), (width, height), embedding)

    assert (full - ref_full).abs().max() <= 2e-5
    for ours, theirs in zip(text, ref_text):
        assert (ours - theirs).abs().max() <= 2e-5
    for out, theirs in zip(outs, ref_unet):
        assert out.unet_logits.shape == theirs.shape
        assert (out.unet_logits - theirs).abs().max() <= 2e-5
        assert out.mask_logits.shape == (height, width)
    if refine:
        with torch.no_grad():
            ref_sam = ref_sam_wrapper(state, features, (height, width), ref_unet, ref_text)
        for out, theirs in zip(outs, ref_sam):
            assert (out.mask_logits - theirs).abs().max() <= 2e-4


def test_crop_follows_flmm_processor_frame_despite_float_error():
    """200x376 into DeepSeek-VL's 384 frame (204 px wide, 90 px padding on the left): F-LMM
    crops columns 15..48. The view box in original pixels starts at x0 = -90 / (204 / 200),
    spans 384 / (204 / 200), and -x0 * 64 / span is 14.999999999999998 in floats."""
    meta = ref_processor_meta(200, 376, 384)
    assert meta["padding"]["before_width"] == 90 and meta["image_shape"]["width"] == 102 * 2
    logits = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    ours = crop_to_image(logits, view_of(meta, 200, 376).box, (200, 376))
    assert torch.equal(ours, ref_crop(logits, meta))
    assert ours.shape[-2:] == (64, 34) and ours[0, 0, 0] == 15


def test_predict_phrases_shares_the_dense_prompt_fill(official_head):
    head, _ = official_head
    width, height = 640, 480  # 768 of 1024 rows hold the image: the rest is filled
    maps = torch.rand(2, 24, 24, 24, generator=torch.Generator().manual_seed(3))
    maps[1] = maps[1] ** 8
    hidden = [torch.randn(6, 2, 96), torch.randn(6, 1, 96)]
    view = view_of(ref_processor_meta(width, height, 384), width, height)
    embedding = sam_embedding_for(width, height, seed=1)
    fills = []

    def capture(module, args, kwargs):
        fills.append(float(kwargs["masks"][0, 0, -1, -1]))

    handle = head.sam.model.prompt_encoder.register_forward_pre_hook(capture, with_kwargs=True)
    together = head.predict_phrases(list(maps), hidden, view, (width, height), embedding)
    minima = [float(out.unet_logits.min()) for out in together]
    higher = int(np.argmax(minima))
    alone = head.predict(maps[higher], hidden[higher], view, (width, height), embedding)
    handle.remove()

    assert min(minima) < -1 and minima[0] != minima[1]
    # F-LMM: every phrase of the batch is filled with min(-1, min over all phrases)
    assert fills[:2] == pytest.approx([min(minima)] * 2, abs=1e-5)
    # one phrase at a time: with its own minimum
    assert fills[2] == pytest.approx(min(-1.0, minima[higher]), abs=1e-5)
    assert torch.allclose(together[higher].unet_logits, alone.unet_logits, atol=1e-5)


def test_a_head_stored_in_half_precision_loads_as_float32(tmp_path):
    head = FlmmHead(FlmmHeadConfig(2, 4, 32, use_refiner=False))
    head.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    loaded = FlmmHead.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
