"""Referring-segmentation evaluation: cIoU and gIoU of a head (or the training-free path).

    python -m flmm_demo eval --model demo-shapes --head runs/shapes/head --data data/shapes --split val --protocol first

Each scored expression is teacher-forced alone with F-LMM's prompt and grounded as one
phrase (all its tokens), exactly as `Session.ground_expression` does for a typed
expression; its mask is compared with the object's ground truth at the image size.
Protocols (flmm.md section 9): `every` sentence of every object (LISA/GLaMM) or the
`first` sentence per object (F-LMM's script). The protocol is printed with the numbers
and written into the JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import HfArgumentParser

from flmm_demo.backends import load_backend
from flmm_demo.backends.dtypes import LMM_DTYPES, lmm_dtype
from flmm_demo.distributed import process_state
from flmm_demo.grounder import Grounder
from flmm_demo.heads import load_head, load_sam
from flmm_demo.presets import resolve_preset
from flmm_demo.training import flag
from flmm_demo.training.metrics import (
    IoUAccumulator,
    SegmentationScores,
    expression_iou,
    format_table,
    intersection_union,
)
from flmm_demo.training.refer import PROTOCOLS, Protocol, ReferImage, ReferObject, open_refer


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run; also the `eval` command's flags. head=None with
    training_free=False uses the preset's head."""

    model: str = flag("preset name, model folder or Hugging Face id")
    data: Path = flag("dataset folder (refer layout or expressions.json)")
    split: str = flag("dataset split to score", "val")
    protocol: Protocol = flag(
        "every: every sentence of every object (LISA/GLaMM); first: first sentence per object (F-LMM)", "first")
    images: Path | None = flag("image folder, e.g. coco/train2014 (default: <data>/images)", None)
    split_by: str | None = flag("refs(<split-by>).p to read: unc, umd or google (default: first present)", None)
    head: Path | None = flag("head folder written by `train` (or an official F-LMM .pth)", None)
    training_free: bool = flag("ground with the attention alone, no trained head", False)
    sam: Path | None = flag("SAM checkpoint for the refiner (default: the preset's, if present)", None)
    refine: bool = flag("refine with SAM (--no-refine: do not use SAM)", True)
    limit: int | None = flag("score only the first N objects", None)
    device: str = flag("torch device (cuda under several processes: each its own GPU)",
                       "cuda" if torch.cuda.is_available() else "cpu")
    lmm_dtype: str = flag("weights of the frozen LMM (auto: bfloat16 on a GPU, float32 on a CPU)", "auto",
                          choices=LMM_DTYPES)

    def __post_init__(self) -> None:
        if self.head is not None and self.training_free:
            raise ValueError("--head and --training-free exclude each other: pass one of them")


@dataclass(frozen=True)
class EvalResult:
    """The scores, what produced them, and every scored expression's IoU."""

    dataset: str
    split: str
    mode: str
    refined: bool
    scores: SegmentationScores
    per_expression: list[dict]

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "mode": self.mode,
            "refined": self.refined,
            **self.scores.as_dict(),
            "per_expression": self.per_expression,
        }


def build_grounder(config: EvalConfig) -> tuple[Grounder, str]:
    """The LMM, the head (or none for the training-free path) and SAM, as the config asks.

    Returns the grounder and its mode ("head" or "training_free").
    """
    resolved = resolve_preset(config.model)
    backend = load_backend(resolved.model_path, device=config.device, dtype=lmm_dtype(config.lmm_dtype, config.device))
    head = None
    if not config.training_free:
        head_path = config.head if config.head is not None else resolved.head_path
        if head_path is None:
            raise ValueError(
                f"{config.model} has no trained head here: pass --head DIR (a folder from `train`) or --training-free"
            )
        head = load_head(head_path, backend, device=config.device)
    sam_path = config.sam if config.sam is not None else resolved.sam_path
    sam = load_sam(sam_path, device=config.device) if (config.refine and sam_path is not None) else None
    return Grounder(backend, head, sam), "training_free" if head is None else "head"


def evaluate(config: EvalConfig, grounder: Grounder | None = None, mode: str | None = None) -> EvalResult:
    """Score every expression the protocol selects on one split.

    Started by `torchrun` / `accelerate launch`, the processes split the images (no padding,
    so every expression is scored exactly once, by one process) and gather the per-expression
    intersections and unions; every process returns the same result, whose cIoU is the sum
    of all intersections over the sum of all unions, as with one process.

    grounder/mode: an already built grounder to use instead of loading what the config
    names, and its mode ("head" or "training_free"; default: "head" when it has a head).
    """
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {config.protocol!r}; use one of {PROTOCOLS}")
    dataset = open_refer(config.data, config.split, config.images, config.split_by)
    state = process_state()
    if grounder is None:
        # Several processes on GPUs: each on its own (cuda:<local rank>).
        device = str(state.device) if config.device == "cuda" else config.device
        grounder, mode = build_grounder(replace(config, device=device))
    mode = mode or ("head" if grounder.head is not None else "training_free")
    refine = config.refine and grounder.sam is not None
    objects = [(image, obj) for image in dataset for obj in image.objects][: config.limit]
    by_image: list[tuple[ReferImage, list[ReferObject]]] = []  # objects come grouped by image
    for image, obj in objects:
        if not by_image or by_image[-1][0] is not image:
            by_image.append((image, []))
        by_image[-1][1].append(obj)
    scored = []
    with state.split_between_processes(by_image) as share:
        progress = tqdm(share, desc=f"eval {dataset.name} {config.split}", unit="image", disable=not state.is_main_process)
        for image, image_objects in progress:
            session = grounder.new_session(image.path)  # one session per image: its prompt is reused
            for obj in image_objects:
                target = image.mask(obj)
                for expression in obj.expressions(config.protocol):
                    grounded = session.ground_expression(expression, mode=mode, refine=refine)
                    inter, union = intersection_union(grounded.mask, target)
                    scored.append({
                        "image_id": image.image_id, "ref_id": obj.ref_id, "expression": expression,
                        "intersection": inter, "union": union, "iou": expression_iou(inter, union),
                    })
    per_expression = gather_object(scored)  # in dataset order: the shares are consecutive
    accumulator = IoUAccumulator(config.protocol)
    for record in per_expression:
        accumulator.add_counts(record["intersection"], record["union"])
    return EvalResult(dataset.name, config.split, mode, refine, accumulator.scores(), per_expression)


def run(config: EvalConfig, json_path: Path | None = None) -> int:
    """Run `eval`: print the table, write the JSON (default: outputs/eval/<dataset>-<split>-<protocol>.json);
    returns the exit status."""
    result = evaluate(config)
    if not process_state().is_main_process:
        return 0  # every process holds the same result; one prints and writes it
    name = f"{result.dataset} {result.split} ({result.mode}{', SAM' if result.refined else ''})"
    print(format_table([(name, result.scores)]))
    path = json_path or Path("outputs/eval") / f"{Path(config.data).name}-{config.split}-{config.protocol}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, **result.as_dict()}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(EvalConfig, prog="python -m flmm_demo eval", description=__doc__.split("\n")[0],
                              formatter_class=argparse.HelpFormatter)
    # The one flag that is not part of the run's configuration.
    parser.add_argument("--json", type=Path,
                        help="where to write the results (default: outputs/eval/<dataset>-<split>-<protocol>.json)")
    try:
        config, rest = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        parser.error(str(error))
    return run(config, rest.json)


if __name__ == "__main__":
    raise SystemExit(main())
