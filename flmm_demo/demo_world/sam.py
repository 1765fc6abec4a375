"""The demo world's own SAM: segment-anything's architecture at a small size, trained here.

No released SAM checkpoint can be downloaded where this project is built, so F-LMM's
refiner (and the training-free path's SAM prompts) would have no image encoder to work
with. This module trains one on the generated scenes, the way SAM itself is trained:
promptable segmentation of every object, with a box (jittered), a coarse mask (the kind
of blurry mask a U-Net on a 24x24 attention grid gives) plus a box, or a few points
(three candidate masks, the best one counts). Loss: BCE + Dice on the mask, MSE on the
predicted IoU.

    python -m flmm_demo.demo_world train-sam --out runs/sam-tiny --seed 11 --minutes 25
    python -m flmm_demo.demo_world train-sam --init runs/sam-tiny/sam_vit_tiny.safetensors \
        --out runs/sam-tiny2 --seed 12 --minutes 20 --lr 2e-4

writes runs/sam-tiny/sam_vit_tiny.safetensors (float16, about 5 MB), loaded with
`build_sam_model("vit_tiny", path)` or `flmm_demo.heads.load_sam(path)`; then train the
F-LMM head with `python -m flmm_demo train ... --sam runs/sam-tiny/sam_vit_tiny.safetensors
--sam-variant vit_tiny`. Sizes: flmm_demo.heads.sam.TINY_SAM (256 px input, 8 px patches,
4-layer ViT of width 128, a decoder of width 128).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything.modeling import Sam

from flmm_demo.demo_world import scenes as S
from flmm_demo.demo_world.schedule import BudgetSchedule
from flmm_demo.geometry import mask_box
from flmm_demo.heads.sam import (
    SAM_CHECKPOINT_NAMES,
    TINY_SAM,
    SamImageEncoderCache,
    SamPromptModel,
    build_sam_model,
    build_tiny_sam,
    decode_prompts,
)
from flmm_demo.heads.losses import bce_dice_per_mask
from flmm_demo.training.metrics import intersection_union

WEIGHTS_NAME = SAM_CHECKPOINT_NAMES["vit_tiny"]
PROMPT_KINDS = ("box", "mask", "points")  # "mask" is a coarse mask plus its box
PROMPT_SHARES = (0.35, 0.35, 0.30)
ATTENTION_GRID = 24  # the tiny LMM's patch grid, which the coarse mask prompts imitate


@dataclass
class Example:
    """One training image in the encoder's frame: (3, S, S) normalised pixels and (K, S, S) masks."""

    pixels: torch.Tensor
    masks: torch.Tensor


def to_encoder_frame(scene: S.Scene, encoder: SamImageEncoderCache) -> Example:
    """The scene resized (longest side to img_size), normalised and padded, as SamImageEncoderCache
    does at inference; its object masks resized the same way (nearest) and padded with 0."""
    pixels, (h, w), _ = encoder.preprocess(scene.image)
    masks = torch.from_numpy(np.stack([o.mask for o in scene.objects])).float()[None]
    masks = F.interpolate(masks, size=(h, w), mode="nearest")[0]
    size = encoder.img_size
    return Example(pixels[0], F.pad(masks, (0, size - w, 0, size - h)))


def jitter_box(box: torch.Tensor, rng: np.random.Generator, size: int, scale: float = 0.1) -> torch.Tensor:
    """Move each side by a normal offset of `scale` x the box side (at most 20 px), as SAM's training does."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    noise = rng.normal(0, scale, size=4) * np.array([w, h, w, h])
    out = box + torch.from_numpy(np.clip(noise, -20, 20)).float()
    return out.clamp(0, size)


def coarse_mask_logits(mask: torch.Tensor, rng: np.random.Generator, low_res: int) -> torch.Tensor:
    """(S, S) mask -> (1, 1, low_res, low_res) blurry logits: the mask pooled to the LMM's
    24x24 grid, shifted by up to a cell, upsampled, scaled to logits and noised."""
    pooled = F.adaptive_avg_pool2d(mask[None, None], ATTENTION_GRID)
    shift = rng.integers(-1, 2, size=2)
    pooled = torch.roll(pooled, shifts=(int(shift[0]), int(shift[1])), dims=(-2, -1)) if rng.random() < 0.3 else pooled
    up = F.interpolate(pooled, size=(low_res, low_res), mode="bilinear", align_corners=False)
    logits = (up - 0.5) * float(rng.uniform(4, 12))
    return logits + torch.randn_like(logits) * float(rng.uniform(0, 1.5))


def sample_points(mask: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1-3 foreground points inside the mask and, half the time, one background point: ((N, 2) xy, (N,) labels)."""
    fg = torch.nonzero(mask, as_tuple=False)
    pick = fg[torch.from_numpy(rng.integers(0, len(fg), size=int(rng.integers(1, 4))))]
    coords, labels = [pick.flip(-1).float() + 0.5], [torch.ones(len(pick))]
    bg = torch.nonzero(mask == 0, as_tuple=False)
    if rng.random() < 0.5 and len(bg):
        coords.append(bg[int(rng.integers(0, len(bg)))].flip(-1).float()[None] + 0.5)
        labels.append(torch.zeros(1))
    return torch.cat(coords), torch.cat(labels)


def prompt_loss(sam: Sam, features: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Loss of one object under one random prompt. features: (1, C, g, g); mask: (S, S)."""
    kind = PROMPT_KINDS[int(rng.choice(len(PROMPT_KINDS), p=PROMPT_SHARES))]
    size = mask.shape[-1]
    box = None
    if kind != "points":
        box = jitter_box(torch.tensor(mask_box(mask.numpy() > 0)).float(), rng, size)[None]
    points = None
    if kind == "points":
        coords, labels = sample_points(mask, rng)
        points = (coords[None], labels[None].int())
    dense = coarse_mask_logits(mask, rng, TINY_SAM.low_res_size) if kind == "mask" else None
    sparse, dense_embedding = sam.prompt_encoder(points=points, boxes=box, masks=dense)
    multimask = kind == "points"  # one point is ambiguous: SAM predicts 3 masks, the best one counts
    low_res, iou_pred = sam.mask_decoder(
        image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense_embedding, multimask_output=multimask,
    )
    logits = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)[0]
    losses = bce_dice_per_mask(logits, mask.expand_as(logits))
    iou = torch.tensor([_iou(candidate > 0, mask) for candidate in logits.detach()])
    return losses.min() + F.mse_loss(iou_pred[0], iou.to(iou_pred))


def _iou(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    inter, union = intersection_union(pred, target)
    return inter / max(1, union)


def train(out_dir: str | Path, seed: int = 11, minutes: float = 25.0, batch_size: int = 8, lr: float = 4e-4,
          max_objects: int = 4, max_steps: int | None = None, eval_scenes: int = 60,
          init: str | Path | None = None, wide: bool = False) -> dict:
    """Train a tiny SAM from scratch (or continue the one saved at `init`) for `minutes` of
    wall clock (or max_steps) on scenes of seed `seed` (2-5 shapes; wide: the wide world's
    1-7 shapes, see scenes.make_wide_scene, also for the held-out scenes), save it to
    out_dir/sam_vit_tiny.safetensors, evaluate it on held-out scenes of seed + 1000 and
    return the figures (also written to out_dir/train_log.jsonl) with "losses", the loss
    of every step."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sam = (build_sam_model("vit_tiny", init) if init else build_tiny_sam()).train()
    encoder = SamImageEncoderCache(sam.image_encoder)  # for its preprocessing only
    sam.image_encoder.requires_grad_(True).train()  # the cache froze it; here it learns
    optimizer = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.01)
    schedule = BudgetSchedule(optimizer, warmup_share=0.03)
    scenes = S.scene_stream(seed, 10**7, wide=wide)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    t0, step, window, losses_seen = time.time(), 0, [], []
    budget = minutes * 60
    while True:
        progress = (step / max_steps) if max_steps else (time.time() - t0) / budget
        if progress >= 1:
            break
        schedule.set(step, progress)
        examples = [to_encoder_frame(next(scenes), encoder) for _ in range(batch_size)]
        features = sam.image_encoder(torch.stack([e.pixels for e in examples]))
        losses = []
        for b, example in enumerate(examples):
            chosen = rng.permutation(len(example.masks))[:max_objects]
            losses += [prompt_loss(sam, features[b : b + 1], example.masks[k], rng) for k in chosen]
        loss = torch.stack(losses).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        window.append(loss.item())
        losses_seen.append(window[-1])
        if step % 25 == 0:
            record = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "loss": sum(window) / len(window)}
            window = []
            print(json.dumps(record), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    sam.eval()
    save(sam, out / WEIGHTS_NAME)
    stats = {"steps": step, "minutes": round((time.time() - t0) / 60, 2)}
    stats.update(evaluate(sam, seed=seed + 1000, n=eval_scenes, wide=wide))
    print(json.dumps(stats), flush=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(stats) + "\n")
    return {**stats, "losses": losses_seen}


def save(sam: Sam, path: str | Path) -> None:
    """The whole model's weights in float16 (pixel mean/std are not weights)."""
    tensors = {k: v.detach().half().contiguous() for k, v in sam.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "variant": "vit_tiny"})


@torch.no_grad()
def evaluate(sam: Sam, seed: int, n: int = 60, wide: bool = False) -> dict[str, float]:
    """Mean IoU per object at the original image size on n held-out scenes of `seed` (of
    the wide world when `wide`), for
    the exact box, a coarse (24x24-pooled) mask plus its box, and one centre-most point
    (best of the three candidates by predicted IoU)."""
    encoder = SamImageEncoderCache(sam.image_encoder)
    prompts = SamPromptModel.from_sam(sam, TINY_SAM)
    rng = np.random.default_rng(seed)
    ious: dict[str, list[float]] = {"box": [], "mask": [], "point": []}
    for scene in S.scene_stream(seed, n, wide=wide):
        embedding = encoder.encode(scene.image)
        frame = to_encoder_frame(scene, encoder)
        for obj, mask in zip(scene.objects, frame.masks):
            box = np.array(obj.box, dtype=np.float64)
            coarse = coarse_mask_logits(mask, rng, TINY_SAM.low_res_size)
            ys, xs = np.nonzero(obj.mask)
            centre = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
            for kind, kwargs in (
                ("box", {"box": box}),
                ("mask", {"box": box, "dense_logits": coarse}),
                ("point", {"points": np.array([[xs[centre] + 0.5, ys[centre] + 0.5]]), "multimask_output": True}),
            ):
                logits, _ = decode_prompts(prompts, embedding, **kwargs)
                ious[kind].append(_iou(logits > 0, obj.mask))
    return {f"iou_{k}": round(float(np.mean(v)), 4) for k, v in ious.items()}
