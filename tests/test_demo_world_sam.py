"""The demo world's own small SAM ('vit_tiny'): built from segment-anything's modules,
trained by `train-sam`, loaded like any SAM, and used by F-LMM's refiner."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flmm_demo.demo_world import make_scene
from flmm_demo.demo_world.sam import WEIGHTS_NAME, coarse_mask_logits, to_encoder_frame
from flmm_demo.demo_world.sam import train as train_sam
from flmm_demo.heads import FlmmHead, FlmmHeadConfig, load_sam, sam_variant_of
from flmm_demo.heads.sam import (
    TINY_SAM,
    SamImageEmbedding,
    SamImageEncoderCache,
    build_sam_model,
    build_tiny_sam,
    decode_prompts,
)
from flmm_demo.types import ImageView


@pytest.fixture(scope="module")
def trained_sam(tmp_path_factory):
    """A tiny SAM after a few CPU steps (about 15 s), and what train-sam returned."""
    out = tmp_path_factory.mktemp("sam")
    torch.manual_seed(0)
    stats = train_sam(out, seed=3, max_steps=30, batch_size=2, eval_scenes=2)
    return out / WEIGHTS_NAME, stats


def test_train_sam_lowers_the_loss_and_writes_a_small_float16_file(trained_sam):
    path, stats = trained_sam
    losses = stats["losses"]
    assert stats["steps"] == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert all(0.0 <= stats[k] <= 1.0 for k in ("iou_box", "iou_mask", "iou_point"))
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert path.stat().st_size < 8 * 2**20
    assert sam_variant_of(path) == "vit_tiny"


def test_trained_sam_loads_like_any_sam_and_decodes_masks_at_the_image_size(trained_sam):
    path, _ = trained_sam
    sam = load_sam(path)  # variant from the file name
    scene = make_scene(5)
    embedding = sam.encode(scene.image)
    assert embedding.features.shape == (1, TINY_SAM.prompt_dim, TINY_SAM.grid, TINY_SAM.grid)
    assert embedding.img_size == 256 and embedding.original_size == scene.image.shape[:2]
    logits, score = decode_prompts(sam.prompt_model, embedding, box=np.array(scene.objects[0].box, float))
    assert logits.shape == scene.image.shape[:2] and np.isfinite(score)
    # Loading keeps the trained weights (float16 in the file, float32 in the model).
    stored = load_file(str(path))
    weight = sam.image_encoder.state_dict()["patch_embed.proj.weight"]
    assert torch.equal(weight, stored["image_encoder.patch_embed.proj.weight"].float())


def test_a_checkpoint_of_other_sizes_is_refused_with_a_clear_message(tmp_path):
    state = build_tiny_sam().state_dict()
    state["image_encoder.pos_embed"] = torch.zeros(1, 16, 16, 128)  # a 128 px / 8 px encoder
    bad = tmp_path / WEIGHTS_NAME
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(ValueError, match="not a vit_tiny SAM"):
        build_sam_model("vit_tiny", bad)
    with pytest.raises(FileNotFoundError, match="train-sam"):
        build_sam_model("vit_tiny", tmp_path / "missing.safetensors")


def test_encoder_frame_and_coarse_prompt_follow_the_encoders_own_preprocessing():
    sam = build_tiny_sam()
    encoder = SamImageEncoderCache(sam.image_encoder)
    scene = make_scene(8)  # images are 160-320 px: resized so the longest side is 256
    example = to_encoder_frame(scene, encoder)
    height, width = scene.image.shape[:2]
    scale = 256 / max(height, width)
    assert example.pixels.shape == (3, 256, 256) and example.masks.shape == (len(scene.objects), 256, 256)
    for obj, mask in zip(scene.objects, example.masks):
        assert abs(mask.sum().item() - obj.mask.sum() * scale**2) < 0.1 * obj.mask.sum() * scale**2
    logits = coarse_mask_logits(example.masks[0], np.random.default_rng(0), TINY_SAM.low_res_size)
    assert logits.shape == (1, 1, 128, 128)
    inside = torch.nn.functional.interpolate(example.masks[0][None, None], size=128)[0, 0] > 0
    assert logits[0, 0][inside].mean() > 0 > logits[0, 0][~inside].mean()


def test_head_with_a_tiny_sam_refiner_refines_and_round_trips(tmp_path):
    torch.manual_seed(0)
    head = FlmmHead(FlmmHeadConfig(num_layers=2, num_heads=2, hidden_size=32, sam_variant="vit_tiny")).eval()
    sam = SamImageEncoderCache(build_tiny_sam().image_encoder)
    scene = make_scene(2)
    height, width = scene.image.shape[:2]
    embedding = sam.encode(scene.image)
    maps = torch.rand(4, 24, 24)
    hidden = torch.randn(2, 3, 32)
    side = max(width, height)
    view_box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    view = ImageView("base", (24, 24), view_box)
    out = head.predict(maps, hidden, view, (width, height), embedding)
    assert out.mask_logits.shape == (height, width)
    plain = head.predict(maps, hidden, view, (width, height), None)  # no SAM: the U-Net bilinearly
    assert not torch.allclose(out.mask_logits, plain.mask_logits)

    head.save_pretrained(tmp_path / "head")
    again = FlmmHead.from_pretrained(tmp_path / "head")
    assert again.config.sam_variant == "vit_tiny" and again.sam.model.geometry == TINY_SAM
    torch.testing.assert_close(again.predict(maps, hidden, view, (width, height), embedding).mask_logits, out.mask_logits,
                               atol=1e-5, rtol=1e-5)

    # A refiner trained with the tiny SAM cannot use a released SAM's embedding.
    big = SamImageEmbedding(torch.zeros(1, 256, 64, 64), embedding.input_size, embedding.original_size, 1024)
    with pytest.raises(ValueError, match="load the SAM the head was trained with"):
        head.predict(maps, hidden, view, (width, height), big)
