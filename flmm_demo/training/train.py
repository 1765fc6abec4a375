"""Train an F-LMM mask head on a referring-segmentation dataset (flmm.md section 6).

    python -m flmm_demo train --model checkpoints/demo-shapes/lmm --data data/shapes --out runs/shapes

The recipe, image by image (an optimizer step averages a global batch of images, see below):
  1. the expressions of the image's objects are joined with ". " and teacher-forced as the
     answer of F-LMM's prompt (template="flmm") in one pass of the frozen LMM;
  2. each expression's answer tokens give its attention maps (mean over its tokens, one
     channel per layer x head) and, when a SAM refiner is trained, its hidden states;
  3. the U-Net turns the maps into logits on its grid (24x24 tokens -> 64x64), which are
     cropped to the image area of the view; the ground-truth mask is resized (nearest) to
     that crop, as F-LMM does;
  4. with a refiner (--sam), SAM refines the U-Net logits to full-size logits, compared
     with the full-size mask;
  5. loss = BCE + Dice (eps 1), weight 1 each, for the U-Net and (if present) the refiner.
AdamW (lr 1e-4, weight decay 0.01), gradient clipping at 1, 3% linear warm-up then cosine.

Multi-view backends (anyres tiles): only the base view (the first view over the whole
image, as FlmmHead.predict picks it) feeds the U-Net; that is the grid F-LMM's heads see.

The frozen models never change, so their outputs are cached under --cache (default
<out>/cache): one safetensors file per (image, answer) with the phrase maps and hidden
states, and one per image with its SAM embedding. Each object contributes sentence
number (epoch mod its sentence count), so the first few epochs fill the cache and later
epochs read only the cache.

Several processes: `torchrun --nproc_per_node N -m flmm_demo train ...` (or `accelerate
launch --num_processes N -m flmm_demo train ...` on GPUs). An optimizer step takes a global
batch of N x --gradient-accumulation-steps images, consecutive in the epoch's shuffle: each
process takes every N-th of them, accumulates its share's gradients, and DDP averages them
over the processes. So 2 processes and 1 process with --gradient-accumulation-steps 2 see
the same images per step and take the same steps (up to float rounding); the loss logged
is the mean over the whole global batch. Checkpoints (head, optimizer, scheduler, step, RNG
of every process) are written every --checkpoint-every steps under <out>/checkpoints;
--resume continues from the latest with any process count of the same global batch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

from flmm_demo.backends import Backend, load_backend
from flmm_demo.backends.dtypes import DTYPES, LMM_DTYPES, lmm_dtype
from flmm_demo.heads.flmm_head import FlmmHead, FlmmHeadConfig, pick_full_view
from flmm_demo.heads.losses import bce_dice_loss
from flmm_demo.heads.sam import SAM_CHECKPOINT_NAMES, SamImageEmbedding, SamImageEncoderCache, build_sam_model
from flmm_demo.heads.unet import crop_to_image
from flmm_demo.images import load_image
from flmm_demo.phrases import phrases_from_spans
from flmm_demo.presets import resolve_preset
from flmm_demo.training import flag
from flmm_demo.training.refer import ReferDataset, ReferImage, open_refer

SEPARATOR = ". "
CHECKPOINTS_DIR = "checkpoints"
HEAD_DIR = "head"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; also the `train` command's flags."""

    model: str = flag("preset name, model folder or Hugging Face id (stays frozen)")
    data: Path = flag("dataset folder (refer layout or expressions.json)")
    out: Path = flag("run folder: head/, checkpoints/, train_log.jsonl")
    images: Path | None = flag("image folder, e.g. coco/train2014 (default: <data>/images)", None)
    split: str = flag("dataset split to train on", "train")
    split_by: str | None = flag("refs(<split-by>).p to read: unc, umd or google (default: first present)", None)
    cache: Path | None = flag("cache of frozen-model outputs (default: <out>/cache)", None)
    sam: Path | None = flag("original SAM checkpoint: also train F-LMM's SAM refiner", None)
    sam_variant: str = flag("SAM size of --sam", "vit_l", choices=sorted(SAM_CHECKPOINT_NAMES))
    epochs: int = flag("passes over the images", 8)
    gradient_accumulation_steps: int = flag(
        "images per process per optimizer step; global batch = processes x this", 1)
    lr: float = flag("AdamW peak learning rate", 1e-4)
    weight_decay: float = flag("AdamW weight decay", 0.01)
    grad_clip: float = flag("gradient norm clipping", 1.0)
    warmup: float = flag("fraction of the steps spent warming up", 0.03)
    checkpoint_every: int = flag("steps between resumable checkpoints", 500)
    log_every: int = flag("steps between loss lines", 10)
    max_steps: int | None = flag("stop after this many steps (the schedule still spans --epochs)", None)
    resume: bool = flag("continue from the latest checkpoint in --out", False)
    seed: int = flag("seed of the head's initial weights and of the image order", 0)
    mixed_precision: str = flag("for the head", "no", choices=["no", "bf16", "fp16"])
    lmm_dtype: str = flag("weights of the frozen LMM (auto: bfloat16 on a GPU, float32 on a CPU)", "auto",
                          choices=LMM_DTYPES)
    head_dtype: str = flag("precision of the saved head weights (float16: half the file size)", "float32",
                           choices=sorted(DTYPES))

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else self.out / "cache"


@dataclass
class TrainResult:
    """Where the head was saved, how many optimizer steps were done in total, the loss of
    every step this run did (in order, each the mean over the step's global batch), and how
    many frozen-model outputs all processes computed and read from the cache, by kind
    ("lmm", "sam")."""

    head_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    cache_computed: dict[str, int] = field(default_factory=dict)
    cache_read: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------ frozen features


@dataclass
class PhraseFeatures:
    """What the frozen LMM gives the head for the K expressions of one answer.

    maps: (K, L*H, rows, cols) float32, each expression's attention on the base view (the
        first view over the whole image, `pick_full_view`).
    hidden: K tensors (L, n_k, D) float32 (empty when no refiner is trained).
    view_box: (x0, y0, x1, y1) of that view in original pixels; image_size: (W, H).
    """

    maps: torch.Tensor
    hidden: list[torch.Tensor]
    view_box: tuple[float, float, float, float]
    image_size: tuple[int, int]


def training_answer(image: ReferImage, epoch: int) -> tuple[str, list[tuple[int, int]]]:
    """The expressions of the image joined with '. ', and each expression's character span.

    Object k contributes its sentence number (epoch mod its number of sentences).
    """
    parts, spans, cursor = [], [], 0
    for obj in image.objects:
        sentence = obj.sentences[epoch % len(obj.sentences)].strip()
        if parts:
            cursor += len(SEPARATOR)
        parts.append(sentence)
        spans.append((cursor, cursor + len(sentence)))
        cursor += len(sentence)
    return SEPARATOR.join(parts), spans


def compute_phrase_features(
    backend: Backend, image: Image.Image, answer: str, char_spans: list[tuple[int, int]], with_hidden: bool
) -> PhraseFeatures:
    """Teacher-force `answer` with F-LMM's prompt and pool each span's attention (one LMM pass)."""
    attention = backend.attend(image, [], "", answer, template="flmm")
    phrases = phrases_from_spans(answer, char_spans, attention.token_spans)
    maps, view = [], None
    for phrase in phrases:
        grid_map, view = pick_full_view(attention.phrase_maps(phrase.token_span), attention.views, attention.image_size)
        maps.append(grid_map.float())
    # clone(): each phrase's slice would otherwise keep the whole answer's hidden states alive.
    hidden = [attention.phrase_hidden(p.token_span).float().clone() for p in phrases] if with_hidden else []
    return PhraseFeatures(torch.stack(maps), hidden, tuple(view.box), tuple(attention.image_size))


class FeatureCache:
    """Frozen-model outputs on disk, so epochs after the first skip the LMM (and SAM).

    Files are safetensors named by a digest of (model key, image, answer): attention maps
    in float16 (values in [0, 1]), hidden states and SAM embeddings in bfloat16 (LLM hidden
    states can exceed float16's range). They are written to a temporary name and renamed,
    so parallel processes never read half a file.

    Shared by the processes of one run: within an epoch each image is in one process's
    share, so no two processes compute the same file; a file written in one step is read
    only in later steps (by whichever process gets the image then), after the gradient
    all-reduce that ends the step has made every process wait for all of them.
    `computed` and `read` count files by kind ("lmm", "sam").
    """

    def __init__(self, folder: Path, model_key: str, with_hidden: bool) -> None:
        self.folder = folder
        self.model_key = model_key
        self.with_hidden = with_hidden
        self.computed: Counter[str] = Counter()
        self.read: Counter[str] = Counter()
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, kind: str, *parts: str) -> Path:
        digest = hashlib.sha1("\n".join((self.model_key, *parts)).encode()).hexdigest()[:24]
        return self.folder / f"{kind}-{digest}.safetensors"

    def phrase_features(
        self, backend: Backend, image: ReferImage, answer: str, char_spans: list[tuple[int, int]]
    ) -> PhraseFeatures:
        path = self._path("lmm", str(image.path), answer, str(self.with_hidden))
        if path.exists():
            self.read["lmm"] += 1
            tensors, meta = _load(path)
            hidden = [tensors[f"hidden.{k}"].float() for k in range(int(meta["num_phrases"]))] if self.with_hidden else []
            return PhraseFeatures(
                tensors["maps"].float(), hidden, tuple(json.loads(meta["view_box"])), tuple(json.loads(meta["image_size"]))
            )
        features = compute_phrase_features(backend, load_image(image.path), answer, char_spans, self.with_hidden)
        self.computed["lmm"] += 1
        tensors = {"maps": features.maps.half()}
        tensors.update({f"hidden.{k}": h.bfloat16() for k, h in enumerate(features.hidden)})
        meta = {
            "answer": answer,
            "num_phrases": str(len(char_spans)),
            "view_box": json.dumps(list(features.view_box)),
            "image_size": json.dumps(list(features.image_size)),
        }
        _save(path, tensors, meta)
        # Train on the stored precision from the first epoch on, so every epoch sees the same inputs.
        return PhraseFeatures(
            tensors["maps"].float(),
            [tensors[f"hidden.{k}"].float() for k in range(len(features.hidden))],
            features.view_box,
            features.image_size,
        )

    def sam_embedding(self, encoder: SamImageEncoderCache, image: ReferImage) -> SamImageEmbedding:
        path = self._path("sam", str(image.path))
        if path.exists():
            self.read["sam"] += 1
            tensors, meta = _load(path)
            return SamImageEmbedding(
                tensors["features"].float(),
                tuple(json.loads(meta["input_size"])),
                tuple(json.loads(meta["original_size"])),
                int(meta["img_size"]),
            )
        embedding = encoder.encode(load_image(image.path))
        self.computed["sam"] += 1
        meta = {
            "input_size": json.dumps(list(embedding.input_size)),
            "original_size": json.dumps(list(embedding.original_size)),
            "img_size": str(embedding.img_size),
        }
        _save(path, {"features": embedding.features.cpu().bfloat16()}, meta)
        return embedding


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


# ------------------------------------------------------------------ loss and model


class HeadTrainingForward(nn.Module):
    """The head's training forward as one module, so DDP sees every parameter it uses."""

    def __init__(self, head: FlmmHead) -> None:
        super().__init__()
        self.head = head

    def forward(
        self,
        maps: torch.Tensor,
        view_box: tuple[float, float, float, float],
        image_size: tuple[int, int],
        hidden: list[torch.Tensor],
        sam_embedding: SamImageEmbedding | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """maps: (K, L*H, rows, cols) -> (U-Net logits (K, h, w) cropped to the image area,
        refined logits (K, H, W) at the image size or None without a refiner)."""
        logits = self.head.mask_head(maps)[:, 0]
        unet = crop_to_image(logits, view_box, image_size)
        if self.head.sam is None or sam_embedding is None:
            return unet, None
        refined = torch.stack([self.head.sam(unet[k], hidden[k], sam_embedding) for k in range(len(hidden))])
        return unet, refined


def image_loss(
    forward: nn.Module,
    features: PhraseFeatures,
    masks: torch.Tensor,
    sam_embedding: SamImageEmbedding | None,
    device: torch.device,
) -> torch.Tensor:
    """Loss of one image. masks: (K, H, W) bool ground truth at the original size."""
    hidden = [h.to(device) for h in features.hidden]
    unet, refined = forward(features.maps.to(device), features.view_box, features.image_size, hidden, sam_embedding)
    target = F.interpolate(masks[None].float().to(device), size=unet.shape[-2:], mode="nearest")[0]
    loss = bce_dice_loss(unet, target)
    if refined is not None:
        loss = loss + bce_dice_loss(refined, masks.float().to(device))
    return loss


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Steps of linear warm-up: warmup_fraction of the run, at least one."""
    return max(1, round(warmup_fraction * total_steps))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> LambdaLR:
    """Linear warm-up then cosine to 0 (transformers' schedule), started one step in: its
    step 0 has learning rate 0, so the first update would learn nothing. Step k then runs
    at lr * (k + 1) / warmup during the warm-up."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what LambdaLR needs to start past step 0
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(total_steps, warmup_fraction), total_steps,
                                           last_epoch=0)


# ------------------------------------------------------------------ training loop


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS_DIR).glob("step-*"))
    return found[-1] if found else None


def _save_checkpoint(accelerator: Accelerator, out: Path, step: int, epoch: int, global_batch: int) -> None:
    """Write head/optimizer/scheduler/RNG state for `step` and drop older checkpoints."""
    folder = out / CHECKPOINTS_DIR / f"step-{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        state = {"step": step, "epoch": epoch, "global_batch": global_batch}
        (folder / STATE_FILE).write_text(json.dumps(state) + "\n")
        for old in (out / CHECKPOINTS_DIR).glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _epoch_order(n_images: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_images, generator=generator).tolist()


def build_head(config: TrainConfig, lmm: Backend, device: torch.device) -> tuple[FlmmHead, SamImageEncoderCache | None]:
    """A fresh head shaped for `lmm`, with a SAM refiner (and SAM's frozen image encoder)
    when config.sam names a SAM checkpoint."""
    head = FlmmHead(
        FlmmHeadConfig(
            num_layers=lmm.num_layers,
            num_heads=lmm.num_heads,
            hidden_size=lmm.hidden_size,
            sam_variant=config.sam_variant,
            use_refiner=config.sam is not None,
            sam_checkpoint=str(config.sam) if config.sam is not None else None,
        )
    )
    if config.sam is None:
        return head, None
    sam = build_sam_model(config.sam_variant, config.sam)
    # F-LMM starts the refiner from SAM's own prompt encoder and mask decoder.
    head.sam.model.prompt_encoder.load_state_dict(sam.prompt_encoder.state_dict())
    head.sam.model.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
    return head, SamImageEncoderCache(sam.image_encoder.to(device))


def _log(record: dict, path: Path) -> None:
    print(json.dumps(record), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    backend: Backend | None = None,
    on_step: Callable[[int, float, FlmmHead], None] | None = None,
) -> TrainResult:
    """Run the recipe in the module docstring; returns where the head was saved.

    An epoch is one pass over the shuffled images in global batches of processes x
    gradient_accumulation_steps images (a remainder smaller than a global batch waits for
    a later epoch's shuffle).

    backend: an already loaded LMM to use instead of loading config.model (config.model
    still names it in the cache keys).
    on_step: called in every process after every optimizer step with (step, the step's
    loss, the head), e.g. to log or inspect the weights.
    """
    if config.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient-accumulation-steps must be at least 1, got {config.gradient_accumulation_steps}")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device
    dataset: ReferDataset = open_refer(config.data, config.split, config.images, config.split_by)
    world, rank, accumulation = accelerator.num_processes, accelerator.process_index, config.gradient_accumulation_steps
    global_batch = world * accumulation
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{dataset.name} split {config.split!r} has {len(dataset)} images, fewer than one global batch of"
            f" {global_batch} ({world} processes x {accumulation} accumulation steps); lower either"
        )
    total_steps = config.epochs * steps_per_epoch

    if backend is None:
        dtype = lmm_dtype(config.lmm_dtype, device)
        backend = load_backend(resolve_preset(config.model).model_path, device=str(device), dtype=dtype)
    set_seed(config.seed)  # the head starts the same whatever the number of processes
    head, sam_encoder = build_head(config, backend, device)
    forward = HeadTrainingForward(head)
    optimizer = torch.optim.AdamW(
        [p for p in forward.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup)
    forward, optimizer = accelerator.prepare(forward, optimizer)
    # The schedule counts optimizer steps, so it is stepped by hand, not by accelerate
    # (which steps a prepared scheduler once per process).
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if config.resume:
        step = _resume(accelerator, config.out, global_batch)

    model_key = f"{Path(config.model).resolve() if Path(config.model).exists() else config.model}|{backend.grounding_prompt}"
    cache = FeatureCache(config.cache_dir, model_key, with_hidden=sam_encoder is not None)
    last_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    losses: list[float] = []
    micro_losses: list[torch.Tensor] = []
    log_path = config.out / "train_log.jsonl"
    config.out.mkdir(parents=True, exist_ok=True)
    forward.train()
    while step < last_step:
        epoch, offset = divmod(step, steps_per_epoch)
        # Step s takes images s*G .. (s+1)*G - 1 of the shuffle (G = global batch); this
        # process every world-th of them, `accumulation` per step.
        share = _epoch_order(len(dataset), config.seed, epoch)[: steps_per_epoch * global_batch][rank::world]
        for index in share[offset * accumulation :]:
            image = dataset.images[index]
            answer, spans = training_answer(image, epoch)
            with torch.no_grad():
                features = cache.phrase_features(backend, image, answer, spans)
                embedding = cache.sam_embedding(sam_encoder, image) if sam_encoder is not None else None
            masks = torch.from_numpy(np.stack([image.mask(obj) for obj in image.objects]))
            # accumulate(): divides the loss by the accumulation steps, skips DDP's
            # all-reduce and the optimizer step until the last image of this step.
            with accelerator.accumulate(forward):
                with accelerator.autocast():
                    loss = image_loss(forward, features, masks, embedding, device)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(forward.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            losses.append(accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item())
            micro_losses.clear()
            if on_step is not None:
                on_step(step, losses[-1], accelerator.unwrap_model(forward).head)
            if step % config.log_every == 0 and accelerator.is_main_process:
                window = losses[-config.log_every :]
                _log({"step": step, "epoch": epoch, "loss": sum(window) / len(window), "lr": lr}, log_path)
            if step % config.checkpoint_every == 0 or step == last_step:
                _save_checkpoint(accelerator, config.out, step, epoch, global_batch)
            if step >= last_step:
                break

    computed, read = _sum_over_processes(cache.computed), _sum_over_processes(cache.read)
    head_dir = config.out / HEAD_DIR
    if accelerator.is_main_process:
        accelerator.print(f"frozen-model outputs computed: {computed}, read from {cache.folder}: {read}")
        accelerator.unwrap_model(forward).head.save_pretrained(head_dir)
        if config.head_dtype != "float32":
            store_weights_as(head_dir, config.head_dtype)
        accelerator.print(f"saved the head to {head_dir} after {step} steps")
    accelerator.wait_for_everyone()
    return TrainResult(head_dir, step, losses, computed, read)


def _resume(accelerator: Accelerator, out: Path, global_batch: int) -> int:
    """Load the latest checkpoint under `out` into every process; returns its step."""
    checkpoint = _latest_checkpoint(out)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / CHECKPOINTS_DIR}")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved_batch = state.get("global_batch", global_batch)
    if saved_batch != global_batch:
        raise ValueError(
            f"--resume: {checkpoint} was trained with a global batch of {saved_batch} images, this run has"
            f" {global_batch} (processes x --gradient-accumulation-steps); resume with the same global batch,"
            f" e.g. --gradient-accumulation-steps {max(1, saved_batch // accelerator.num_processes)}"
            f" on {accelerator.num_processes} process(es), so the steps and the data order carry on"
        )
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"]


def _sum_over_processes(counts: Counter[str]) -> dict[str, int]:
    """Add up per-process counts (accelerate's gather_object; the same counts with one process)."""
    total: Counter[str] = Counter()
    for process_counts in gather_object([dict(counts)]):
        total.update(process_counts)
    return dict(sorted(total.items()))


def store_weights_as(head_dir: Path, dtype: str) -> None:
    """Rewrite the saved head's floating-point weights in `dtype` ("float16" halves the file;
    FlmmHead.from_pretrained then loads them in that precision)."""
    path = head_dir / "model.safetensors"
    target = DTYPES[dtype]
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(TrainConfig, prog="python -m flmm_demo train", description=__doc__.split("\n")[0],
                              formatter_class=argparse.HelpFormatter)
    (config,) = parser.parse_args_into_dataclasses(argv)
    train(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
