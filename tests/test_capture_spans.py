"""Grounding keeps only the span means it needs (attend(spans=...)), and that changes nothing:
head outputs within 2e-5 of the per-token float32 path, SAM logits within 2e-4, same masks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flmm_demo.backends.base import span_weights
from flmm_demo.backends.llava import LlavaBackend
from flmm_demo.backends.testing import tiny_llava
from flmm_demo.grounder import Grounder, grounding_spans
from flmm_demo.phrases import extract_phrases
from flmm_demo.presets import checkpoints_dir


@pytest.fixture(scope="module")
def demo():
    if not (checkpoints_dir() / "demo-shapes" / "lmm" / "config.json").is_file():
        pytest.skip("bundled demo weights are not in checkpoints/")
    return Grounder.from_preset("demo-shapes", device="cpu")


def test_span_means_equal_the_mean_of_per_token_maps():
    from PIL import Image

    backend = LlavaBackend(*tiny_llava())
    image = Image.new("RGB", (70, 50), (90, 140, 30))
    answer = "The cat is on the red mat."
    full = backend.attend(image, [], "What is here?", answer)
    t = len(full.token_ids)
    spans = [(1, 3), (4, t), (0, t)]
    kept = backend.attend(image, [], "What is here?", answer, spans=spans)
    assert kept.maps[0].shape == (3, *full.maps[0].shape[1:]) and kept.map_spans == spans
    for span in spans:
        torch.testing.assert_close(kept.phrase_maps(span)[0], full.phrase_maps(span)[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(kept.hidden_states, full.hidden_states)
    with pytest.raises(ValueError, match=r"kept only the means of token spans.*\(2, 5\)"):
        kept.phrase_maps((2, 5))
    with pytest.raises(ValueError, match="outside the answer"):
        span_weights([(0, t + 1)], t)


@pytest.mark.parametrize("scene", ["shapes_2.png", "shapes_24.png"])
def test_grounding_on_span_means_matches_the_per_token_path(demo, scene):
    session = demo.new_session(Path(__file__).resolve().parent.parent / "assets" / scene)
    answer = session.chat("Describe the image.", max_new_tokens=40)
    backend = demo.backend
    full = backend.attend(session.model_image, [], "Describe the image.", answer, template="chat")
    phrases = extract_phrases(answer, full.token_spans)
    assert phrases
    kept = backend.attend(session.model_image, [], "Describe the image.", answer, template="chat",
                          spans=grounding_spans(phrases, len(full.token_ids)))
    assert sum(m.numel() for m in kept.maps) * 2 <= sum(m.numel() for m in full.maps)
    embedding = session._sam_embedding(True)
    for refine, tolerance in ((False, 2e-5), (True, 2e-4)):
        for mode in ("head", "training_free"):
            a = demo.segment(full, phrases, mode=mode, refine=refine, sam_embedding=embedding if refine else None)
            b = demo.segment(kept, phrases, mode=mode, refine=refine, sam_embedding=embedding if refine else None)
            for x, y in zip(a, b):
                assert (x.mask == y.mask).all(), (mode, refine, x.phrase.text)
                assert abs(x.score - y.score) <= tolerance
                assert abs(x.heatmap - y.heatmap).max() <= 1e-5
    head_full = demo.head.predict_phrases([full.phrase_maps(p.token_span) for p in phrases],
                                          [full.phrase_hidden(p.token_span) for p in phrases],
                                          full.views, full.image_size, sam_embedding=embedding)
    head_kept = demo.head.predict_phrases([kept.phrase_maps(p.token_span) for p in phrases],
                                          [kept.phrase_hidden(p.token_span) for p in phrases],
                                          kept.views, kept.image_size, sam_embedding=embedding)
    for x, y in zip(head_full, head_kept):
        assert (x.unet_logits - y.unet_logits).abs().max() <= 2e-5
        assert (x.mask_logits - y.mask_logits).abs().max() <= 2e-4
