"""`python -m flmm_demo ground` on a folder with a corrupt image, and `doctor`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flmm_demo.cli import main
from flmm_demo.render import rle_to_mask


@pytest.fixture(scope="module")
def model_dir(tiny_llava_dir):
    return tiny_llava_dir


def red_square(path, size=(60, 40)):
    array = np.full((size[1], size[0], 3), 200, np.uint8)
    array[5:20, 5:30] = (255, 0, 0)
    Image.fromarray(array).save(path, format="PNG")
    return path


def ground(model_dir, out, *images, extra=()):
    return main(["ground", *map(str, images), "--expression", "the red mat", "--out", str(out),
                 "--model", str(model_dir), *extra])


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


def test_an_image_named_dot_dot_png_stays_inside_out(model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    hostile = [red_square(images / name) for name in ["..png", "...png", ".png"]]
    out = tmp_path / "a" / "out"
    assert ground(model_dir, out, *hostile) == 0
    outside = [p for p in tmp_path.rglob("result.json") if out not in p.parents]
    assert outside == []
    folders = sorted(p.parent.name for p in out.rglob("result.json"))
    assert len(folders) == 3 and all(p.parent.parent == out for p in out.rglob("result.json"))
    assert folders == ["image", "image-2", "png"]


def test_same_stem_from_two_folders_gets_two_result_folders(model_dir, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    first = red_square(tmp_path / "x" / "photo.png")
    second = red_square(tmp_path / "y" / "photo.jpg", size=(30, 20))
    out = tmp_path / "out"
    assert ground(model_dir, out, first, second) == 0
    a, b = (json.loads((out / name / "result.json").read_text()) for name in ["photo", "photo-2"])
    assert (a["image"], a["size"]) == (str(first), [60, 40])
    assert (b["image"], b["size"]) == (str(second), [30, 20])
    assert "photo-2" in capsys.readouterr().out


def test_results_already_in_out_are_never_overwritten(model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "scene").mkdir(parents=True)
    (out / "scene" / "result.json").write_text("earlier results")
    assert ground(model_dir, out, red_square(tmp_path / "scene.png")) == 0
    assert (out / "scene" / "result.json").read_text() == "earlier results"
    assert json.loads((out / "scene-2" / "result.json").read_text())["answer"] == "the red mat"


def test_an_empty_folder_as_out_and_an_empty_folder_among_the_images(model_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert ground(model_dir, out, red_square(tmp_path / "ok.png")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ok"]
    folder = tmp_path / "no_images"
    folder.mkdir()
    assert ground(model_dir, out, folder, red_square(tmp_path / "ok.png")) == 2
    assert "holds no image file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["ok"]


@pytest.mark.parametrize("bad_out", ["file", ""])
def test_out_that_cannot_be_a_folder_is_refused_before_loading(model_dir, tmp_path, capsys, bad_out):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    out = str(target) if bad_out == "file" else ""
    assert ground(model_dir, out, red_square(tmp_path / "a.png")) == 2
    err = capsys.readouterr().err
    assert ("is a file, not a folder" in err) if bad_out == "file" else ("--out is empty" in err)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_max_new_tokens_must_be_a_positive_whole_number(model_dir, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["ground", str(red_square(tmp_path / "a.png")), "--question", "What is this?",
              "--out", str(tmp_path / "o"), "--model", str(model_dir), "--max-new-tokens", value])
    assert exit_info.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_model_folder_and_a_punctuation_question_are_clear_errors(tmp_path, capsys):
    image = red_square(tmp_path / "a.png")
    assert main(["ground", str(image), "--question", "What?", "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "no-such-model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["ground", str(image), "--question", "?!", "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "no-such-model")]) == 2
    assert "only punctuation" in capsys.readouterr().err


def test_an_empty_expression_and_a_file_as_model_are_clear_errors(model_dir, tmp_path, capsys):
    image = red_square(tmp_path / "a.png")
    assert main(["ground", str(image), "--expression", "", "--out", str(tmp_path / "o"),
                 "--model", str(model_dir)]) == 2
    assert "The expression is empty" in capsys.readouterr().err
    assert main(["ground", str(image), "--question", "What is it?", "--out", str(tmp_path / "o"),
                 "--model", str(model_dir / "config.json")]) == 2
    assert "is a file; give the model folder" in capsys.readouterr().err
    assert not (tmp_path / "o" / "a").exists()
