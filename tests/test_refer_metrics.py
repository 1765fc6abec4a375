"""The refer readers on tiny datasets written here, and cIoU / gIoU on hand-computed masks."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from flmm_demo.training.metrics import IoUAccumulator, format_table, intersection_union
from flmm_demo.training.refer import decode_mask, open_refer


# ---------------------------------------------------------------- metrics


def test_ciou_and_giou_match_hand_computation():
    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[0:2, 0:1] = True  # 2 px inside a
    big_t = np.zeros((4, 4), bool)
    big_t[:, :] = True  # 16 px
    big_p = np.zeros((4, 4), bool)
    big_p[:, :2] = True  # 8 px

    acc = IoUAccumulator("first")
    assert acc.add(b, a) == pytest.approx(2 / 4)  # I 2, U 4
    assert acc.add(big_p, big_t) == pytest.approx(8 / 16)  # I 8, U 16
    assert acc.add(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0  # empty on empty
    assert acc.add(a, np.zeros((4, 4), bool)) == 0.0  # I 0, U 4

    s = acc.scores()
    assert s.n == 4
    assert (s.intersection, s.union) == (10, 24)
    assert s.ciou == pytest.approx(10 / 24)
    assert s.giou == pytest.approx((0.5 + 0.5 + 1.0 + 0.0) / 4)
    assert s.protocol == "first" and "F-LMM" in s.protocol_label
    table = format_table([("toy", s)])
    assert "41.67" in table and "50.00" in table and "first" in table


def test_masks_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        intersection_union(np.zeros((2, 2)), np.zeros((3, 3)))


# ---------------------------------------------------------------- refer layout


def _write_refer_fixture(root: Path) -> tuple[Path, Path, dict[int, np.ndarray]]:
    """3 images, 4 objects (polygons, compressed and uncompressed RLE), unc splits."""
    data, images = root / "refcoco", root / "train2014"
    data.mkdir()
    images.mkdir()
    sizes = {1: (20, 10), 2: (16, 12), 3: (8, 8)}  # (width, height)
    for image_id, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (image_id * 40, 0, 0)).save(images / f"img{image_id}.png")

    truth: dict[int, np.ndarray] = {}
    m = np.zeros((10, 20), bool)
    m[1:3, 2:5] = True  # the polygon below covers x 2..4, y 1..2
    truth[11] = m
    seg11 = [[2, 1, 5, 1, 5, 3, 2, 3]]
    m = np.zeros((10, 20), bool)
    m[5:9, 10:18] = True
    truth[12] = m
    rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    seg12 = {"size": rle["size"], "counts": rle["counts"].decode()}
    m = np.zeros((12, 16), bool)
    m[0:6, 0:4] = True
    truth[21] = m
    flat = m.flatten(order="F").astype(int)  # column-major runs, starting with zeros
    runs, current, count = [], 0, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    seg21 = {"size": [12, 16], "counts": runs}
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    truth[31] = m
    seg31 = [[2, 2, 6, 2, 6, 6, 2, 6]]

    instances = {
        "images": [{"id": i, "file_name": f"img{i}.png", "width": w, "height": h} for i, (w, h) in sizes.items()],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": seg11},
            {"id": 12, "image_id": 1, "category_id": 2, "segmentation": seg12},
            {"id": 21, "image_id": 2, "category_id": 1, "segmentation": seg21},
            {"id": 31, "image_id": 3, "category_id": 2, "segmentation": seg31},
        ],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "box"}],
    }
    (data / "instances.json").write_text(json.dumps(instances))

    def ref(ref_id, ann_id, image_id, split, sents):
        return {
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": 100 * ref_id + k} for k, s in enumerate(sents)],
        }

    refs = [
        ref(1, 11, 1, "val", ["small red cup", "cup on the left", "the left one"]),
        ref(2, 12, 1, "val", ["big box", "box at the bottom"]),
        ref(3, 21, 2, "val", ["cup in the corner"]),
        ref(4, 31, 3, "train", ["the box", "centre box"]),
    ]
    with open(data / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return data, images, truth


def test_refer_layout_reads_masks_and_protocols(tmp_path):
    data, images, truth = _write_refer_fixture(tmp_path)
    val = open_refer(data, "val", images=images)
    assert val.name == "refcoco(unc)" and len(val) == 2
    samples = {s.ref_id: s for s in val.samples("every")}
    assert set(samples) == {"1", "2", "3"}
    for ref_id, ann_id in (("1", 11), ("2", 12), ("3", 21)):
        np.testing.assert_array_equal(samples[ref_id].mask, truth[ann_id])
    assert samples["1"].image_path == images / "img1.png"
    assert samples["1"].expressions == ("small red cup", "cup on the left", "the left one")

    first = {s.ref_id: s.expressions for s in val.samples("first")}
    assert first == {"1": ("small red cup",), "2": ("big box",), "3": ("cup in the corner",)}
    assert val.num_expressions("every") == 6
    assert val.num_expressions("first") == 3

    train = open_refer(data, "train", images=images)
    (sample,) = list(train.samples())
    np.testing.assert_array_equal(sample.mask, truth[31])


def test_refer_layout_errors_say_what_to_do(tmp_path):
    data, images, _ = _write_refer_fixture(tmp_path)
    with pytest.raises(ValueError, match="available splits"):
        open_refer(data, "testA", images=images)
    with pytest.raises(FileNotFoundError, match="--images"):
        open_refer(data, "val")  # images live outside the dataset folder
    with pytest.raises(ValueError, match="google"):
        open_refer(data, "val", images=images, split_by="google")


# ---------------------------------------------------------------- PNG-mask layout


def _write_png_fixture(root: Path, as_csv: bool) -> dict[str, np.ndarray]:
    (root / "images").mkdir()
    (root / "masks").mkdir()
    Image.new("RGB", (12, 9)).save(root / "images" / "a.png")
    truth = {}
    for k in range(2):
        m = np.zeros((9, 12), np.uint8)
        m[k * 4 : k * 4 + 3, 1 : 6 + k] = 255
        Image.fromarray(m).save(root / "masks" / f"a_{k}.png")
        truth[f"masks/a_{k}.png"] = m > 0
    objects = [
        {"mask": "masks/a_0.png", "expressions": ["top stripe", "upper bar"]},
        {"mask": "masks/a_1.png", "expressions": ["lower stripe"]},
    ]
    if as_csv:
        lines = ["image,mask,split,expression"]
        for obj in objects:
            lines += [f"images/a.png,{obj['mask']},val,{e}" for e in obj["expressions"]]
        (root / "expressions.csv").write_text("\n".join(lines) + "\n")
    else:
        record = {"image": "images/a.png", "split": "val", "objects": objects}
        (root / "expressions.json").write_text(json.dumps({"images": [record]}))
    return truth


@pytest.mark.parametrize("as_csv", [False, True])
def test_png_layout(tmp_path, as_csv):
    truth = _write_png_fixture(tmp_path, as_csv)
    ds = open_refer(tmp_path, "val")
    (image,) = list(ds)
    assert image.size == (12, 9) and image.path == tmp_path / "images" / "a.png"
    assert [o.sentences for o in image.objects] == [("top stripe", "upper bar"), ("lower stripe",)]
    for obj in image.objects:
        np.testing.assert_array_equal(image.mask(obj), truth[str(obj.mask_source.relative_to(tmp_path))])
    assert ds.num_expressions("every") == 3 and ds.num_expressions("first") == 2


def test_png_mask_of_wrong_size_is_rejected(tmp_path):
    Image.new("L", (5, 5)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="image's size"):
        decode_mask(tmp_path / "m.png", (6, 5))
