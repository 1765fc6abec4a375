"""SAM checkpoints are read as tensors only, and a session's embedding can be released."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_demo.heads import sam as sam_module
from flmm_demo.heads.sam import SamImageEncoderCache, build_sam_model, build_tiny_sam


class _RunsCode:
    """Unpickling this creates a file: the stand-in for code hidden in a .pth."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_sam_pickle_with_code_is_refused_even_when_torch_is_told_to_trust_pickles(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    with pytest.raises(ValueError, match="holds more than tensors, so it is not loaded"):
        build_sam_model("vit_b", path)
    assert not marker.exists()

    # What segment-anything's own loader (a plain torch.load) would have done here:
    torch.load(path)
    assert marker.exists()


def test_a_sam_state_dict_is_loaded_into_the_model(tmp_path, monkeypatch):
    # A tiny SAM stands in for vit_b so the test builds nothing large: same code path.
    monkeypatch.setitem(sam_module.sam_model_registry, "vit_b", lambda checkpoint=None: build_tiny_sam())
    torch.manual_seed(0)
    source = build_tiny_sam()
    path = tmp_path / "sam.pth"
    torch.save(source.state_dict(), path)
    loaded = build_sam_model("vit_b", path)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)

    torch.save({"not_a_sam_weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="is not a vit_b SAM checkpoint"):
        build_sam_model("vit_b", path)


def test_released_embedding_leaves_the_cache():
    cache = SamImageEncoderCache(build_tiny_sam().image_encoder)
    image = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
    job = cache.start(image)
    job.result()
    assert cache.start(image) is job  # cached
    cache.release(job)
    again = cache.start(image)
    assert again is not job and again.result().features.shape == job.result().features.shape
    cache.close()
