"""The SAM image encoder, with its embedding cached per image.

Encoding an image with ViT-L takes 70-80 s on two CPU threads; every later prompt on the
same image is cheap (a decode is under 0.1 s). `SamImageEncoderCache` computes the
embedding once per image and can do it in a background thread (`start`) while the LMM is
still writing its answer; `get` waits for it.

Besides the released models (vit_b, vit_l, vit_h: segment-anything's registry), 'vit_tiny'
is the demo world's own SAM (TINY_SAM sizes, trained by `python -m flmm_demo.demo_world
train-sam`), which encodes an image in a few hundredths of a second.
"""
from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

# Original SAM checkpoints (https://github.com/facebookresearch/segment-anything#model-checkpoints).
# "vit_tiny" is no released model: it is the small SAM the demo world trains itself
# (flmm_demo/demo_world/sam.py), stored as safetensors under that name.
SAM_CHECKPOINT_NAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_tiny": "sam_vit_tiny.safetensors",
}
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_IMAGE_SIZE = 1024
PROMPT_DIM = 256
LOW_RES_MASK_SIZE = 256


@dataclass(frozen=True)
class SamGeometry:
    """The sizes a SAM's prompt encoder and mask decoder are built with.

    img_size: side of the square the image encoder sees; patch_size: its patch side, so
    the embedding grid is img_size / patch_size and the decoder's low-res masks are 4x
    that. prompt_dim: width of prompts, image embedding and decoder; decoder_mlp_dim and
    decoder_heads: of the decoder's two-way transformer.
    """

    img_size: int = SAM_IMAGE_SIZE
    patch_size: int = 16
    prompt_dim: int = PROMPT_DIM
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        return 4 * self.grid


RELEASED_SAM = SamGeometry()  # every released SAM (b, l, h) shares these sizes
# The demo world's SAM: 256 px input, 8 px patches (a 32x32 embedding, 128x128 masks for
# images of at most 320 px) and a decoder half as wide, so it trains on a CPU.
TINY_SAM = SamGeometry(img_size=256, patch_size=8, prompt_dim=128, decoder_mlp_dim=512, decoder_heads=4)
TINY_SAM_ENCODER = {"embed_dim": 128, "depth": 4, "num_heads": 4, "window_size": 8, "global_attn_indexes": (1, 3)}


def sam_geometry(variant: str) -> SamGeometry:
    """The prompt encoder / mask decoder sizes of a SAM variant."""
    if variant not in SAM_CHECKPOINT_NAMES:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_CHECKPOINT_NAMES)}")
    return TINY_SAM if variant == "vit_tiny" else RELEASED_SAM


@dataclass(frozen=True)
class SamImageEmbedding:
    """An encoded image.

    features: (1, C, g, g) image embedding ((1, 256, 64, 64) for the released SAM models).
    input_size: (h, w) of the image after resizing its longest side to img_size, before padding.
    original_size: (H, W) of the original image.
    img_size: side of the square the encoder sees (1024 for the released SAM models).
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    img_size: int


class SamPromptModel(nn.Module):
    """SAM's prompt encoder and mask decoder; by default at the sizes of every released SAM (b, l, h)."""

    def __init__(self, geometry: SamGeometry = RELEASED_SAM) -> None:
        super().__init__()
        self.geometry = geometry
        self.prompt_encoder, self.mask_decoder = build_prompt_modules(geometry)

    @classmethod
    def from_sam(cls, sam: Sam, geometry: SamGeometry = RELEASED_SAM) -> SamPromptModel:
        """The original (not F-LMM-trained) prompt encoder and decoder of a SAM model."""
        model = cls(geometry)
        model.prompt_encoder.load_state_dict(sam.prompt_encoder.state_dict())
        model.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
        return model.eval()


def build_prompt_modules(geometry: SamGeometry) -> tuple[PromptEncoder, MaskDecoder]:
    """segment-anything's PromptEncoder and MaskDecoder at the given sizes (untrained)."""
    dim = geometry.prompt_dim
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(geometry.grid, geometry.grid),
        input_image_size=(geometry.img_size, geometry.img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=geometry.decoder_mlp_dim,
                                      num_heads=geometry.decoder_heads),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_tiny_sam() -> Sam:
    """An untrained SAM of TINY_SAM's sizes, built from segment-anything's own modules
    (ViT image encoder with windowed and global attention, prompt encoder, mask decoder)."""
    geometry = TINY_SAM
    image_encoder = ImageEncoderViT(
        img_size=geometry.img_size,
        patch_size=geometry.patch_size,
        out_chans=geometry.prompt_dim,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        **TINY_SAM_ENCODER,
    )
    prompt_encoder, mask_decoder = build_prompt_modules(geometry)
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))


def decode_prompts(
    model: SamPromptModel,
    embedding: SamImageEmbedding,
    *,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    dense_logits: torch.Tensor | None = None,
    text_tokens: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, float]:
    """Decode one mask from prompts given in original-image pixels.

    points: (N, 2) xy; point_labels: (N,) 1 = foreground, 0 = background; box: (4,)
    x0, y0, x1, y1; dense_logits: (1, 1, 256, 256) mask prompt; text_tokens: (n, 256)
    extra sparse tokens placed after the point/box tokens (F-LMM's language cue).
    (256 is the released models' low-res mask side; a smaller SAM's is model.geometry.low_res_size.)
    Returns ((H, W) logits at the original size, predicted IoU); with multimask_output the
    candidate with the highest predicted IoU.
    """
    param = next(model.mask_decoder.parameters())
    resize = ResizeLongestSide(embedding.img_size)
    point_prompt = None
    if points is not None:
        coords = resize.apply_coords(np.asarray(points, dtype=np.float64), embedding.original_size)
        labels = np.ones(len(coords)) if point_labels is None else np.asarray(point_labels)
        point_prompt = (
            torch.as_tensor(coords, dtype=param.dtype, device=param.device)[None],
            torch.as_tensor(labels, dtype=torch.int, device=param.device)[None],
        )
    box_prompt = None
    if box is not None:
        scaled = resize.apply_boxes(np.asarray(box, dtype=np.float64).reshape(1, 4), embedding.original_size)
        box_prompt = torch.as_tensor(scaled, dtype=param.dtype, device=param.device)
    if dense_logits is not None:
        dense_logits = dense_logits.to(device=param.device, dtype=param.dtype)
    sparse, dense = model.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=dense_logits)
    if text_tokens is not None:
        sparse = torch.cat([sparse.to(dense), text_tokens[None].to(dense)], dim=1)
    low_res, iou = model.mask_decoder(
        image_embeddings=embedding.features.to(device=param.device, dtype=param.dtype),
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse.to(dense),
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )
    best = int(iou[0].argmax())
    logits = postprocess_masks(low_res[:, best : best + 1], embedding)
    return logits[0, 0], float(iou[0, best].detach())


def postprocess_masks(low_res: torch.Tensor, embedding: SamImageEmbedding) -> torch.Tensor:
    """(B, 1, m, m) decoder logits (m = 256 for the released models) -> (B, 1, H, W): to img_size, drop the padding, to the original size."""
    x = F.interpolate(low_res.float(), size=(embedding.img_size, embedding.img_size), mode="bilinear")
    h, w = embedding.input_size
    return F.interpolate(x[..., :h, :w], size=embedding.original_size, mode="bilinear")


def build_sam_model(variant: str, checkpoint: str | Path | None) -> Sam:
    """Build a full SAM model: 'vit_b', 'vit_l' or 'vit_h' from segment-anything's registry
    (checkpoint: an original .pth), or 'vit_tiny' (checkpoint: the demo world's safetensors)."""
    sam_geometry(variant)  # rejects unknown variants
    if checkpoint is not None and not Path(checkpoint).is_file():
        where = ("train it with `python -m flmm_demo.demo_world train-sam` (see docs/demo_world_results.md)"
                 if variant == "vit_tiny" else
                 f"download {SAM_CHECKPOINT_NAMES[variant]} from "
                 "https://github.com/facebookresearch/segment-anything#model-checkpoints into checkpoints/")
        raise FileNotFoundError(f"SAM checkpoint {checkpoint} not found; {where}")
    if variant != "vit_tiny":
        # segment-anything's builder would torch.load the file itself, which runs any code
        # pickled in it unless torch defaults to weights_only (an environment can undo that).
        state = read_sam_state_dict(checkpoint) if checkpoint is not None else None
        sam = sam_model_registry[variant](checkpoint=None)
        if state is not None:
            _load_into(sam, state, checkpoint, variant)
        return sam.eval()
    sam = build_tiny_sam()
    if checkpoint is not None:
        state = {k: v.float() for k, v in load_file(str(checkpoint)).items()}
        _load_into(sam, state, checkpoint, variant)
    return sam.eval()


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an original SAM .pth, read with weights_only=True: a file holding anything
    but tensors (a pickle that could run code) is refused, whatever the environment says."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors, so it is not loaded (it could run code). Use the checkpoint "
            "released at https://github.com/facebookresearch/segment-anything#model-checkpoints, or re-save "
            "its state dict with torch.save(dict(state_dict), ...) in a trusted environment."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a SAM state dict (found {type(state).__name__} of other objects)")
    return state


def _load_into(sam: Sam, state: dict[str, torch.Tensor], checkpoint: str | Path, variant: str) -> None:
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint} is not a {variant} SAM checkpoint of these sizes: {err}") from err


def image_to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of a PIL image or an array (grey or RGBA arrays are converted)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}; convert with (x * 255).astype(np.uint8)")
    return np.ascontiguousarray(array[..., :3])


def image_key(image: Image.Image | np.ndarray) -> str:
    """A content hash of the image, used as the cache key."""
    array = image_to_array(image)
    digest = hashlib.sha1(array.tobytes())
    digest.update(str(array.shape).encode())
    return digest.hexdigest()


class SamImageEncoderCache:
    """Encodes images with SAM's image encoder and keeps the last few embeddings.

    Thread-safe: `start` schedules an encoding on one worker thread and returns at once;
    `get` (or `set_image`) returns the embedding, waiting for a running encoding if needed.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = SAM_PIXEL_STD,
        max_images: int = 4,
        prompt_model: SamPromptModel | None = None,
    ) -> None:
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.prompt_model = prompt_model
        self.img_size = image_encoder.img_size
        self.pixel_mean = torch.tensor(pixel_mean).view(3, 1, 1)
        self.pixel_std = torch.tensor(pixel_std).view(3, 1, 1)
        self.max_images = max_images
        self._resize = ResizeLongestSide(self.img_size)
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Future[SamImageEmbedding]] = OrderedDict()
        self._last_key: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-encoder")

    @classmethod
    def from_checkpoint(
        cls, variant: str, checkpoint: str | Path, device: str | torch.device = "cpu"
    ) -> SamImageEncoderCache:
        """Load SAM from a checkpoint (e.g. checkpoints/sam_vit_l_0b3195.pth).

        Keeps the image encoder and, as `prompt_model`, SAM's own prompt encoder and mask
        decoder (used by the training-free path; F-LMM's refiner brings its own).
        """
        sam = build_sam_model(variant, checkpoint)
        prompt_model = SamPromptModel.from_sam(sam, sam_geometry(variant))
        return cls(sam.image_encoder.to(device), prompt_model=prompt_model.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.image_encoder.parameters()).device

    def preprocess(self, image: Image.Image | np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Image -> ((1, 3, img_size, img_size) normalised and zero-padded, input_size, original_size).

        Longest side resized to img_size with segment-anything's own resize, SAM mean/std
        normalisation, zero padding at the bottom/right.
        """
        array = image_to_array(image)
        resized = self._resize.apply_image(array)
        x = torch.as_tensor(resized).permute(2, 0, 1).float()
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return x[None], (h, w), (array.shape[0], array.shape[1])

    @torch.no_grad()
    def encode(self, image: Image.Image | np.ndarray) -> SamImageEmbedding:
        """Encode one image now, without the cache."""
        x, input_size, original_size = self.preprocess(image)
        param = next(self.image_encoder.parameters())
        features = self.image_encoder(x.to(device=param.device, dtype=param.dtype))
        return SamImageEmbedding(features.float(), input_size, original_size, self.img_size)

    def start(self, image: Image.Image | np.ndarray) -> Future[SamImageEmbedding]:
        """Begin encoding `image` in the background and return at once.

        The returned future's result() is the embedding; starting an image that is cached
        or already running returns the same future.
        """
        return self._submit(image)

    def set_image(self, image: Image.Image | np.ndarray) -> SamImageEmbedding:
        """Embedding of `image`, computed once and cached."""
        return self._submit(image).result()

    def get(self, image: Image.Image | np.ndarray | None = None, timeout: float | None = None) -> SamImageEmbedding:
        """Embedding of `image` (default: the image last passed to start/set_image), waiting if needed."""
        if image is not None:
            return self._submit(image).result(timeout)
        with self._lock:
            if self._last_key is None:
                raise RuntimeError("no image was given to the SAM encoder yet; call start(image) or set_image(image)")
            job = self._jobs[self._last_key]
        return job.result(timeout)

    def release(self, job: Future[SamImageEmbedding]) -> None:
        """Drop `job`'s embedding from the cache (its session is gone); other holders of the
        same future keep their embedding."""
        with self._lock:
            for key, cached in list(self._jobs.items()):
                if cached is job:
                    del self._jobs[key]
                    if self._last_key == key:
                        self._last_key = None

    def close(self) -> None:
        """Stop the worker thread (pending encodings finish first)."""
        self._executor.shutdown(wait=True)

    def _submit(self, image: Image.Image | np.ndarray) -> Future[SamImageEmbedding]:
        key = image_key(image)
        with self._lock:
            self._last_key = key
            job = self._jobs.get(key)
            if job is not None and not (job.done() and job.exception() is not None):
                self._jobs.move_to_end(key)
                return job
            job = self._executor.submit(self.encode, image)
            self._jobs[key] = job
            while len(self._jobs) > self.max_images:
                self._jobs.popitem(last=False)
            return job
