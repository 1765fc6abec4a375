"""`python -m flmm_demo ground` on a folder with a corrupt image, and `doctor`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flmm_demo.backends.testing import tiny_llava
from flmm_demo.cli import main
from flmm_demo.render import rle_to_mask


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_ground_writes_json_masks_and_overlay_and_skips_a_corrupt_file(model_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    array = np.full((40, 60, 3), 200, np.uint8)
    array[5:20, 5:30] = (255, 0, 0)
    Image.fromarray(array).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "out"
    code = main(["ground", str(images / "broken.jpg"), str(images / "good.png"),
                 "--expression", "the red mat", "--out", str(out), "--model", str(model_dir)])
    assert code == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "grounded 1 of 2" in captured.out
    result = json.loads((out / "good" / "result.json").read_text())
    assert result["answer"] == "the red mat" and len(result["phrases"]) == 1
    phrase = result["phrases"][0]
    png = np.asarray(Image.open(out / "good" / phrase["mask_png"])) > 0
    assert png.shape == (40, 60)
    assert np.array_equal(rle_to_mask(phrase["rle"]), png)
    assert Image.open(out / "good" / "overlay.png").size == (60, 40)
    coco = json.loads((out / "good" / "coco.json").read_text())
    assert len(coco["annotations"]) == 1
    assert not (out / "broken").exists()


def test_all_images_bad_is_a_failure(model_dir, tmp_path):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    assert main(["ground", str(bad), "--question", "What is this?", "--out", str(tmp_path / "o"),
                 "--model", str(model_dir)]) == 1


def test_ground_a_folder_without_images_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["ground", str(tmp_path), "--expression", "the cat", "--out", str(tmp_path / "o")]) == 2
    assert f"folder {tmp_path} holds no image file (.png, .jpg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_doctor_lists_presets(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ["demo-shapes", "llava-1.5-7b", "deepseek-vl-1.3b", "qwen2.5-vl-3b", "smolvlm-256m"]:
        assert name in out
