"""`train` and `eval` end to end on a tiny random LLaVA and a one-scene demo-world dataset.

The U-Net is full size (64x64 input), so every step costs seconds on a CPU: the runs are
a handful of steps on one image with two objects.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

from flmm_demo.backends import load_backend
from flmm_demo.backends.testing import tiny_llava
from flmm_demo.demo_world.scenes import write_refer_dataset
from flmm_demo.heads import FlmmHead, FlmmHeadConfig, SamImageEmbedding
from flmm_demo.heads.losses import bce_dice_loss
from flmm_demo.images import load_image
from flmm_demo.training import evaluate, train
from flmm_demo.training.refer import open_refer

SCENE_WITH_TWO_OBJECTS = 3  # demo-world seed: a circle and a triangle, 6 expressions each


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A saved tiny LLaVA (lmm/) and a refer-layout dataset (data/) with one train and one val image."""
    root = tmp_path_factory.mktemp("world")
    model, processor = tiny_llava()
    model.save_pretrained(root / "lmm")
    processor.save_pretrained(root / "lmm")
    write_refer_dataset(root / "data", 1, SCENE_WITH_TWO_OBJECTS, "train")
    write_refer_dataset(root / "data", 1, SCENE_WITH_TWO_OBJECTS, "val")
    return root


def _train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(world / "lmm"), "--data", str(world / "data"), "--out", str(out),
        "--epochs", "2", "--lr", "1e-3", "--log-every", "1", "--checkpoint-every", "1", *extra,
    ]


def _config(argv: list[str]) -> train.TrainConfig:
    """The TrainConfig that `python -m flmm_demo train ARGV` runs."""
    (config,) = HfArgumentParser(train.TrainConfig).parse_args_into_dataclasses(argv)
    return config


@pytest.fixture(scope="module")
def trained(world) -> tuple[Path, train.TrainResult, train.TrainResult]:
    """One step, stop; then --resume to the end of the 2-step schedule."""
    out = world / "run"
    config = _config(_train_args(world, out, "--max-steps", "1"))
    first = train.train(config)
    config = _config(_train_args(world, out, "--resume"))
    resumed = train.train(config)
    return out, first, resumed


def test_training_lowers_the_loss_and_saves_a_loadable_head(trained, world):
    out, first, resumed = trained
    losses = first.losses + resumed.losses
    assert len(losses) == 2
    assert losses[-1] < losses[0] - 0.05, losses
    head = FlmmHead.from_pretrained(out / "head")
    assert head.config.num_layers == 2 and head.config.num_heads == 4 and head.sam is None
    # Every (image, answer) the LMM saw is cached: 2 epochs -> 2 sentence variants.
    assert len(list((out / "cache").glob("lmm-*.safetensors"))) == 2


def test_resume_continues_the_step_count(trained):
    out, first, resumed = trained
    assert first.step == 1 and resumed.step == 2 and len(resumed.losses) == 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert log[-1]["lr"] == pytest.approx(0.0)  # the cosine schedule ended where planned
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def test_resume_without_checkpoint_says_so(world, tmp_path):
    config = _config(_train_args(world, tmp_path / "empty", "--resume"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train(config)


def test_eval_with_the_trained_head(trained, world, tmp_path, capsys):
    out, _, _ = trained
    json_path = tmp_path / "scores.json"
    status = evaluate.main([
        "--model", str(world / "lmm"), "--head", str(out / "head"), "--data", str(world / "data"),
        "--split", "val", "--protocol", "first", "--json", str(json_path),
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "cIoU" in printed and "F-LMM protocol" in printed
    result = json.loads(json_path.read_text())
    assert result["protocol"] == "first" and result["mode"] == "head" and result["n"] == 2
    assert 0.0 <= result["ciou"] <= 1.0 and 0.0 <= result["giou"] <= 1.0
    assert len(result["per_expression"]) == 2


def test_eval_training_free_every_sentence(world, tmp_path):
    config = evaluate.EvalConfig(
        model=str(world / "lmm"), data=world / "data", split="val", protocol="every", training_free=True,
        refine=False, limit=1, device="cpu",
    )
    result = evaluate.evaluate(config)
    assert result.mode == "training_free" and result.scores.protocol == "every"
    assert result.scores.n == 6  # every sentence of the first object
    assert 0.0 <= result.scores.ciou <= 1.0 and 0.0 <= result.scores.giou <= 1.0


def test_bce_dice_loss_is_small_for_a_confident_right_answer():
    target = torch.zeros(1, 8, 8)
    target[0, 2:6, 2:6] = 1
    right = bce_dice_loss(target * 20 - 10, target)
    wrong = bce_dice_loss(10 - target * 20, target)
    assert right.item() < 0.01 and wrong.item() > 1.5


def test_refiner_trains_on_fresh_lmm_features(world):
    """The SAM refiner's training path: real LMM features, a stand-in SAM image embedding."""
    backend = load_backend(str(world / "lmm"))
    (image,) = list(open_refer(world / "data", "train"))
    answer, spans = train.training_answer(image, epoch=0)
    assert answer == ". ".join(obj.sentences[0] for obj in image.objects)
    features = train.compute_phrase_features(backend, load_image(image.path), answer, spans, with_hidden=True)
    assert features.maps.shape[:2] == (2, 8) and [h.shape[0] for h in features.hidden] == [2, 2]

    head = FlmmHead(FlmmHeadConfig(num_layers=2, num_heads=4, hidden_size=32, use_refiner=True))
    width, height = image.size
    scale = 1024 / max(width, height)
    embedding = SamImageEmbedding(
        torch.randn(1, 256, 64, 64), (round(height * scale), round(width * scale)), (height, width), 1024
    )
    masks = torch.from_numpy(np.stack([image.mask(obj) for obj in image.objects]))
    loss = train.image_loss(train.HeadTrainingForward(head), features, masks, embedding, torch.device("cpu"))
    loss.backward()
    assert loss.item() > 0
    assert head.sam.text_proj.weight.grad.abs().sum() > 0
    assert head.mask_head.conv_seg.weight.grad.abs().sum() > 0


def _old_schedule(step: int, total_steps: int, warmup: int) -> float:
    """The hand-written schedule train.py had before transformers' (kept here as the reference)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))


@pytest.mark.parametrize("total_steps", [2, 33, 1000])
def test_cosine_schedule_is_the_old_curve(total_steps):
    """The warm-up is the old one; after it the cosine runs one step ahead of the old one
    (so the last step's rate is 0 where the old one was nearly 0)."""
    warmup = train.warmup_steps(total_steps, 0.03)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train.cosine_schedule(optimizer, total_steps, 0.03)
    curve = []
    for _ in range(total_steps):
        curve.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    old = [_old_schedule(step, total_steps, warmup) for step in range(total_steps + 1)]
    assert curve[:warmup] == pytest.approx(old[:warmup], abs=1e-9)
    assert curve[warmup:] == pytest.approx(old[warmup + 1 :], abs=1e-9)
    assert max(abs(a - b) for a, b in zip(curve, old)) <= math.pi / 2 / (total_steps - warmup) + 1e-9
