"""Referring-segmentation datasets: which expressions name which mask in which image.

Two on-disk layouts are read.

1. The standard refer layout (RefCOCO, RefCOCO+, RefCOCOg), one folder per dataset::

       refcoco/instances.json      COCO annotations: images, annotations (polygons or RLE)
       refcoco/refs(unc).p         pickled list of refs: ref_id, ann_id, image_id, split,
                                   category_id, sentences [{sent, raw, tokens, sent_id}]
       refcoco/refs(google).p      the same refs under another split ("split_by")

   The COCO images live elsewhere (``images=`` e.g. ``coco/train2014``); without it the
   reader looks in ``<data>/images`` and then ``<data>``.

2. A plain PNG-mask layout for your own data: a folder holding ``expressions.json``::

       {"images": [
         {"image": "images/kitchen.jpg", "split": "val",
          "objects": [{"mask": "masks/kitchen_mug.png",
                       "expressions": ["the red mug", "mug left of the kettle"]}]}
       ]}

   or ``expressions.csv`` with the header ``image,mask,split,expression`` and one row per
   expression (rows sharing image and mask form one object, in file order). Paths are
   relative to the folder (images relative to ``images=`` when given). A mask PNG marks
   the object with any non-zero pixel and has the image's size.

Evaluation protocols (flmm.md section 9): ``every`` scores every sentence of every object
(LISA, GLaMM, Sa2VA); ``first`` scores only the first sentence per object (F-LMM's script).
"""
from __future__ import annotations

import csv
import json
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

Protocol = Literal["every", "first"]
PROTOCOLS: tuple[str, ...] = ("every", "first")
PROTOCOL_LABELS = {
    "every": "every sentence of every object (LISA/GLaMM protocol)",
    "first": "first sentence per object (F-LMM protocol)",
}
SPLIT_BY_ORDER = ("unc", "umd", "google")

# A COCO segmentation (list of polygons or an RLE dict) or the path of a mask PNG.
MaskSource = Union[list, dict, Path]


@dataclass(frozen=True)
class ReferObject:
    """One referred object: the sentences that name it and where its mask is stored."""

    ref_id: str
    sentences: tuple[str, ...]
    mask_source: MaskSource

    def expressions(self, protocol: Protocol | None = None) -> tuple[str, ...]:
        """The sentences a protocol scores: all of them ('every', None) or the first ('first')."""
        if protocol == "first":
            return self.sentences[:1]
        if protocol in (None, "every"):
            return self.sentences
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


@dataclass(frozen=True)
class ReferImage:
    """An image and every referred object in it. size: (width, height) in pixels."""

    image_id: str
    path: Path
    size: tuple[int, int]
    objects: tuple[ReferObject, ...]

    def mask(self, obj: ReferObject) -> np.ndarray:
        """(H, W) bool ground-truth mask of one of this image's objects."""
        return decode_mask(obj.mask_source, self.size)


@dataclass(frozen=True)
class ReferSample:
    """One object to segment: its image, the expressions to score and its mask (H, W) bool."""

    image_path: Path
    image_id: str
    ref_id: str
    expressions: tuple[str, ...]
    mask: np.ndarray


def decode_mask(source: MaskSource, size: tuple[int, int]) -> np.ndarray:
    """Decode a COCO polygon list, a COCO RLE (compressed or not) or a mask PNG.

    size: (width, height) of the image. Returns (H, W) bool.
    """
    width, height = size
    if isinstance(source, Path):
        mask = np.asarray(Image.open(source).convert("L")) > 0
        if mask.shape != (height, width):
            raise ValueError(
                f"mask {source} is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height};"
                " save the mask at the image's size"
            )
        return mask
    if isinstance(source, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        rle = coco_mask.merge(coco_mask.frPyObjects(source, height, width))
    elif isinstance(source, dict) and isinstance(source.get("counts"), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(source, height, width)
    elif isinstance(source, dict):  # compressed RLE, counts as str or bytes
        counts = source["counts"]
        rle = {"size": source["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"cannot decode a mask from {type(source).__name__}: expected polygons, RLE or a PNG path")
    with warnings.catch_warnings():  # pycocotools' own NumPy 2 deprecation notice, not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


class ReferDataset:
    """The images of one split, each with its referred objects (masks decoded on demand)."""

    def __init__(self, name: str, split: str, images: list[ReferImage]) -> None:
        self.name = name
        self.split = split
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ReferImage]:
        return iter(self.images)

    def samples(self, protocol: Protocol | None = None) -> Iterator[ReferSample]:
        """One sample per object, masks decoded, expressions chosen by `protocol`."""
        for image in self.images:
            for obj in image.objects:
                yield ReferSample(
                    image_path=image.path,
                    image_id=image.image_id,
                    ref_id=obj.ref_id,
                    expressions=obj.expressions(protocol),
                    mask=image.mask(obj),
                )

    def num_expressions(self, protocol: Protocol | None = None) -> int:
        """How many expressions the protocol scores on this split."""
        return sum(len(obj.expressions(protocol)) for image in self.images for obj in image.objects)


def open_refer(
    data: str | Path,
    split: str,
    images: str | Path | None = None,
    split_by: str | None = None,
) -> ReferDataset:
    """Open one split of a referring dataset in either layout (see the module docstring).

    split_by picks refs(<split_by>).p in the refer layout; by default the first present of
    unc, umd, google.
    """
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"dataset folder {data} does not exist")
    if (data / "instances.json").exists():
        return _open_refer_layout(data, split, images, split_by)
    if (data / "expressions.json").exists() or (data / "expressions.csv").exists():
        return _open_png_layout(data, split, images)
    raise FileNotFoundError(
        f"{data} holds neither instances.json + refs(*).p (refer layout) nor "
        "expressions.json / expressions.csv (PNG-mask layout); see flmm_demo/training/refer.py for both formats"
    )


def _resolve_images_dir(data: Path, images: str | Path | None, first_file: str | None) -> Path:
    """The folder the image file names are relative to."""
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"images folder {folder} does not exist")
        return folder
    for folder in (data / "images", data):
        if first_file is None or (folder / first_file).exists():
            return folder
    raise FileNotFoundError(
        f"image {first_file} is not in {data / 'images'} or {data}; pass the COCO image folder"
        " (e.g. --images coco/train2014)"
    )


def _open_refer_layout(data: Path, split: str, images: str | Path | None, split_by: str | None) -> ReferDataset:
    refs_files = {p.name[len("refs(") : -len(").p")]: p for p in data.glob("refs(*).p")}
    if not refs_files:
        raise FileNotFoundError(f"{data} has instances.json but no refs(<split_by>).p file")
    if split_by is None:
        split_by = next((s for s in SPLIT_BY_ORDER if s in refs_files), sorted(refs_files)[0])
    if split_by not in refs_files:
        raise ValueError(f"no refs({split_by}).p in {data}; available: {sorted(refs_files)}")

    with open(refs_files[split_by], "rb") as f:
        # The released refs files were pickled by Python 2; latin1 reads their byte strings.
        # Pickles can run code: only open refs files from a source you trust.
        refs = pickle.load(f, encoding="latin1")
    available = sorted({str(r["split"]) for r in refs})
    if split not in available:
        raise ValueError(f"split {split!r} is not in refs({split_by}).p; available splits: {available}")

    with open(data / "instances.json") as f:
        coco = json.load(f)
    anns = {a["id"]: a for a in coco["annotations"]}
    image_info = {i["id"]: i for i in coco["images"]}

    by_image: dict[int, list[ReferObject]] = {}
    for ref in refs:
        if ref["split"] != split:
            continue
        ann = anns[ref["ann_id"]]
        sentences = tuple(s["sent"] for s in ref["sentences"])
        obj = ReferObject(
            ref_id=str(ref["ref_id"]),
            sentences=sentences,
            mask_source=ann["segmentation"],
        )
        by_image.setdefault(ref["image_id"], []).append(obj)

    first_file = image_info[next(iter(by_image))]["file_name"] if by_image else None
    folder = _resolve_images_dir(data, images, first_file)
    out = []
    for image_id, objects in by_image.items():
        info = image_info[image_id]
        out.append(
            ReferImage(
                image_id=str(image_id),
                path=folder / info["file_name"],
                size=(int(info["width"]), int(info["height"])),
                objects=tuple(objects),
            )
        )
    return ReferDataset(name=f"{data.name}({split_by})", split=split, images=out)


def _png_records(data: Path) -> list[dict]:
    """Read expressions.json, or expressions.csv converted to the same records."""
    if (data / "expressions.json").exists():
        with open(data / "expressions.json") as f:
            return json.load(f)["images"]
    records: dict[str, dict] = {}
    with open(data / "expressions.csv", newline="") as f:
        for row in csv.DictReader(f):
            record = records.setdefault(row["image"], {"image": row["image"], "split": row["split"], "objects": []})
            objects = record["objects"]
            if not objects or objects[-1]["mask"] != row["mask"]:
                objects.append({"mask": row["mask"], "expressions": []})
            objects[-1]["expressions"].append(row["expression"])
    return list(records.values())


def _open_png_layout(data: Path, split: str, images: str | Path | None) -> ReferDataset:
    records = _png_records(data)
    available = sorted({str(r.get("split", "")) for r in records})
    if split not in available:
        raise ValueError(f"split {split!r} is not in {data}; available splits: {available}")
    chosen = [r for r in records if r.get("split") == split]
    folder = _resolve_images_dir(data, images, chosen[0]["image"] if chosen else None)
    out = []
    for record in chosen:
        path = folder / record["image"]
        with Image.open(path) as im:  # reads the header only
            size = im.size
        for obj in record["objects"]:
            if not obj.get("expressions"):
                raise ValueError(f"{data}: object {obj.get('mask')} of {record['image']} has no expressions; give at least one")
        objects = tuple(
            ReferObject(
                ref_id=f"{record['image']}#{k}",
                sentences=tuple(obj["expressions"]),
                mask_source=data / obj["mask"],
            )
            for k, obj in enumerate(record["objects"])
        )
        out.append(ReferImage(image_id=record["image"], path=path, size=size, objects=objects))
    return ReferDataset(name=data.name, split=split, images=out)
