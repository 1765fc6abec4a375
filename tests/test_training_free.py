"""Training-free grounding on synthetic attention with a known object and a causal-attention bias."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flmm_demo.heads import (
    SamImageEmbedding,
    answer_baseline,
    attention_heatmap,
    heatmap_to_mask,
    heatmap_to_prompts,
    threshold_mask,
)
from flmm_demo.heads.sam import SamPromptModel
from flmm_demo.types import AnswerAttention, ImageView

GRID = 24
LAYERS, HEADS = 4, 8
OBJECT = (8, 16, 12, 20)  # rows 8-15, cols 12-19 of the token grid
PHRASE = (3, 5)  # answer tokens of the phrase


def synthetic_answer(seed: int = 0, tokens: int = 8, grounding_heads=(5, 9, 14, 22), object_share: float = 0.4):
    """(tokens, L*H, 24, 24) attention of an answer and the (24, 24) object it names.

    Every map mixes what real LMMs show whatever the word: two attention sinks (45%), a
    decay toward the first image tokens (30%) and noise (25%). A few grounding heads put
    `object_share` of their mass on the object while the phrase is produced and on other
    places for the other words. Each head sends 20-50% of its attention to the image.
    """
    g = torch.Generator().manual_seed(seed)
    early = torch.exp(-torch.arange(GRID * GRID, dtype=torch.float32) / 60).view(GRID, GRID)
    sink = torch.zeros(GRID, GRID)
    sink[0, 0] = sink[3, 17] = 0.5
    r0, r1, c0, c1 = OBJECT
    target = torch.zeros(GRID, GRID, dtype=torch.bool)
    target[r0:r1, c0:c1] = True
    maps = torch.zeros(tokens, LAYERS * HEADS, GRID, GRID)
    for t in range(tokens):
        for c in range(LAYERS * HEADS):
            noise = torch.rand(GRID, GRID, generator=g)
            m = 0.45 * sink + 0.3 * early / early.sum() + 0.25 * noise / noise.sum()
            if c in grounding_heads:
                if PHRASE[0] <= t < PHRASE[1]:
                    place = target.float()
                else:
                    place = torch.zeros(GRID, GRID)
                    r, col = torch.randint(0, GRID - 6, (2,), generator=g).tolist()
                    place[r : r + 6, col : col + 6] = 1
                m = (1 - object_share) * m + object_share * place / place.sum()
            maps[t, c] = m * (0.2 + 0.3 * torch.rand(1, generator=g).item())
    return maps, target


def answer_attention(maps: torch.Tensor) -> AnswerAttention:
    tokens = maps.shape[0]
    return AnswerAttention(
        answer="x" * tokens, token_ids=list(range(tokens)), token_spans=[(i, i + 1) for i in range(tokens)],
        maps=[maps], views=[ImageView("image", (GRID, GRID), (0, 0, 240, 240))],
        hidden_states=torch.zeros(LAYERS, tokens, 8), num_layers=LAYERS, num_heads=HEADS, image_size=(240, 240),
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_corrected_heatmap_finds_the_object_that_raw_attention_misses(seed):
    maps, target = synthetic_answer(seed)
    attention = answer_attention(maps)
    phrase = attention.phrase_maps(PHRASE)[0]
    baseline = answer_baseline(attention)[0]

    raw = phrase.mean(0)
    raw_peak = divmod(int(raw.argmax()), GRID)
    assert not target[raw_peak]  # uncorrected, the sinks / first tokens win
    assert iou(threshold_mask(raw / raw.max()), target.numpy()) < 0.1

    for heat in (attention_heatmap(phrase, baseline=baseline, num_heads=HEADS),
                 attention_heatmap(phrase, num_heads=HEADS)):  # explicit baseline, channel-median fallback
        assert heat.shape == (GRID, GRID) and heat.min() >= 0 and heat.max() == 1
        assert target[divmod(int(heat.argmax()), GRID)]
        assert iou(threshold_mask(heat), target.numpy()) > 0.8
        assert iou(threshold_mask(heat, method="relative", relative=0.4), target.numpy()) > 0.7


def test_weak_grounding_heads_still_found_with_the_answer_baseline():
    maps, target = synthetic_answer(seed=2, grounding_heads=(3, 30), object_share=0.25)
    attention = answer_attention(maps)
    heat = attention_heatmap(attention.phrase_maps(PHRASE)[0], baseline=answer_baseline(attention)[0])
    assert iou(threshold_mask(heat), target.numpy()) > 0.7


def test_prompts_at_image_size_sit_on_the_object():
    maps, target = synthetic_answer(seed=0)
    attention = answer_attention(maps)
    heat = attention_heatmap(attention.phrase_maps(PHRASE)[0], baseline=answer_baseline(attention)[0])
    image_heat = F.interpolate(heat[None, None], size=(240, 320), mode="bilinear")[0, 0]  # a 320x240 image
    prompts = heatmap_to_prompts(image_heat, num_points=2)
    object_box = np.array([12 * 320 / 24, 8 * 10, 20 * 320 / 24, 16 * 10])  # x0, y0, x1, y1 in pixels
    assert prompts.box is not None and np.abs(prompts.box - object_box).max() < 15
    assert len(prompts.points) == 2 and (prompts.labels == 1).all()
    for x, y in prompts.points:
        assert object_box[0] <= x <= object_box[2] and object_box[1] <= y <= object_box[3]

    mask, score = heatmap_to_mask(image_heat)
    pixel_target = F.interpolate(target[None, None].float(), size=(240, 320))[0, 0].bool().numpy()
    assert mask.shape == (240, 320) and iou(mask, pixel_target) > 0.75 and 0 < score <= 1


def test_threshold_keeps_the_largest_blob_and_handles_empty_maps():
    heat = np.zeros((50, 60), dtype=np.float32)
    heat[5:25, 5:25] = 1.0  # 400 px
    heat[35:40, 40:45] = 0.9  # 25 px
    mask = threshold_mask(heat)
    assert mask.sum() == 400 and mask[10, 10] and not mask[37, 42]
    assert threshold_mask(heat, components=0).sum() == 425
    assert not threshold_mask(np.zeros((8, 8))).any()
    assert heatmap_to_prompts(np.zeros((8, 8))).box is None
    with pytest.raises(ValueError, match="unknown threshold method"):
        threshold_mask(heat, method="mean")


def test_one_token_grid_and_bad_shapes():
    assert attention_heatmap(torch.rand(6, 1, 1)).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="layers\\*heads, rows, cols"):
        attention_heatmap(torch.rand(24, 24))
    with pytest.raises(ValueError, match="not a multiple of 5 heads"):
        attention_heatmap(torch.rand(6, 4, 4), num_heads=5)


def test_heatmap_to_mask_uses_sam_prompts_when_sam_is_there():
    torch.manual_seed(0)
    sam = SimpleNamespace(prompt_model=SamPromptModel().eval())
    embedding = SamImageEmbedding(torch.randn(1, 256, 64, 64), (768, 1024), (240, 320), 1024)
    heat = np.zeros((240, 320), dtype=np.float32)
    heat[80:160, 120:200] = 1.0
    mask, score = heatmap_to_mask(heat, sam=sam, sam_embedding=embedding)
    assert mask.shape == (240, 320) and mask.dtype == bool and 0.0 <= score <= 1.0
    with pytest.raises(ValueError, match="resize the heat map first"):
        heatmap_to_mask(heat[:100], sam=sam, sam_embedding=embedding)
