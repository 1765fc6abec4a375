"""A frozen LMM behind three calls: chat, stream_chat and attend.

`Backend` does the family-independent work: it prefills the prompt once and keeps the
KV cache (keyed by prompt ids + pixels, so chat() then attend() on the same prompt
runs the image and the prompt once), generates answers from that cache, and
teacher-forces an answer in one forward pass while `capture.py` records each answer
token's softmax row over the image tokens in every decoder layer.

How a family plugs in (see llava.py for a short example): subclass `Backend` and set

    family: str                   # registry name, e.g. "llava"
    model_class: type             # transformers class used by from_pretrained
    image_token_id (property)     # default: model.config.image_token_id

and implement the two hooks that know the family's prompt and image layout:

    flmm_text(self) -> str
        The prompt text F-LMM's head was trained with (flmm.md section 5), with the
        processor's image placeholder, ending at the assistant prefix.
        `self.grounding_prompt` is the question to put in it.
    image_views(self, inputs, input_size) -> list[ViewTokens]
        Where the image tokens of `inputs` (the processor's output) sit: one ViewTokens
        per grid (base image, anyres tiles...), with its box in pixels of the image that
        was given to the processor (input_size = (width, height)) and the sequence
        positions of its tokens, row-major. Columns that are not image patches (e.g.
        LLaVA-NeXT's image_newline) are simply not listed.

User text is plain text: every string a user (or an answer) puts into a prompt goes
through `as_plain_text` (chat_text does it), so a typed `</s>`, `<image>` or
`<|im_start|>` is encoded as those characters, never as the template's control tokens;
teacher-forced answers are tokenized with special tokens split. A family that
overrides chat_text must mark its strings the same way.

chat/stream_chat/attend also take answer_start: forced text after the assistant
prefix (visual chain of thought), part of the prompt, never of the answer. A backend
serves one call at a time (it owns one KV cache); callers serialise access.

Forward passes run under torch.no_grad (not inference_mode), so attend()'s tensors can
feed a head that is being trained.

Optional hooks, with defaults that suit Llama-style models:

    chat_text(history, question) -> str   # default: processor.apply_chat_template
    prepare_image(image, template) -> (image, placement)
        # what the processor receives and where it lies in the original image:
        # placement (ox, oy, sx, sy) maps its pixel x to ox + sx * x in the original
        # (y likewise); default: unchanged, (0, 0, 1, 1). LLaVA and DeepSeek-VL build
        # F-LMM's resized, padded square here.
    processor_kwargs(template) -> dict     # extra processor arguments
    answer_prefix: str                     # text glued before the answer when tokenizing it
    text_config_key: str                   # sub-config of the language model ("text_config")
    language_model (property)              # decoder with .layers[i].self_attn
    prefill_inputs(prompt) / cached_forward_inputs(prompt, new_ids)
        # model kwargs for the prompt prefill (all but the last prompt token) and for a
        # forward over the cache; override where positions depend on the image (mrope).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import numbers
import pickle
import re
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from safetensors import SafetensorError
from transformers import (
    AutoProcessor,
    DynamicCache,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.cache_utils import DynamicLayer
from transformers.utils.chat_template_utils import mark_control_tokens

from flmm_demo.backends.capture import capture_attention, decoder_attention_modules, install_capture, stack_rows
from flmm_demo.types import AnswerAttention, ImageView, Turn

DEFAULT_GROUNDING_PROMPT = "Please give me a description of the image."
# transformers' private-use markers around a control token typed in user text.
_START, _END = mark_control_tokens("x", re.compile("x")).split("x")
# A marked control token (its text is captured), or a lone marker.
_MARKED = re.compile(f"{_START}(.*?){_END}|[{_START}{_END}]")


@dataclass(frozen=True)
class ViewTokens:
    """One grid of image tokens: its place in the image and in the token sequence.

    box: (x0, y0, x1, y1) pixels of the image the processor received (a family hook
        returns it so); the base class moves it to original-image pixels.
    positions: (rows*cols,) long, sequence positions of the grid's tokens, row-major.
    """

    name: str
    grid: tuple[int, int]
    box: tuple[float, float, float, float]
    positions: torch.Tensor


@dataclass
class Prompt:
    """A tokenized prompt with its image, ready for the model.

    inputs: model kwargs from the processor (input_ids (1, S), attention_mask (1, S),
        pixel_values, ...). views: ViewTokens with boxes in ORIGINAL image pixels.
    """

    inputs: dict[str, torch.Tensor]
    views: list[ViewTokens]
    image_size: tuple[int, int]  # (width, height) of the original image
    key: str  # digest of ids + pixels: same key, same prefill

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


@dataclass
class _Prefix:
    """A prefilled prompt: the KV cache of all prompt tokens but the last one."""

    key: str
    cache: DynamicCache
    length: int  # tokens in the cache
    pristine: DynamicCache | None  # a copy to restore from when the cache cannot be cropped


@dataclass
class _Generation:
    """The last chat answer: its prompt key, text and token ids (end token dropped)."""

    key: str
    text: str
    ids: list[int]


class ModelFilesError(ValueError):
    """A model folder lacks a file or holds a damaged one; the message names it."""


# Without one of these a folder has no tokenizer (the processor cannot be built).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def check_model_folder(path_or_id: str) -> None:
    """For a local folder: ModelFilesError naming what is missing or empty (weights, tokenizer)."""
    folder = Path(path_or_id)
    if not folder.is_dir():
        return  # a hub id: transformers resolves it
    files = {f.name: f for f in folder.iterdir() if f.is_file()}
    weights = [f for name, f in files.items() if name.endswith((".safetensors", ".bin")) and "model" in name]
    if not weights:
        raise ModelFilesError(
            f"{folder} has no model weights (model.safetensors or model-*.safetensors): "
            "the download or copy is incomplete; fetch the model again."
        )
    empty = [f.name for f in weights if f.stat().st_size == 0]
    if empty:
        raise ModelFilesError(f"{folder}/{empty[0]} is empty (0 bytes): download or copy the model again.")
    if not any(name in files for name in TOKENIZER_FILES):
        raise ModelFilesError(
            f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): copy the tokenizer files "
            "that came with the model into it, or download the model again."
        )


@contextmanager
def _counting_tokens() -> Iterator[None]:
    """Silence the tokenizer's "indexing errors" warning while a prompt is only measured
    (a prompt longer than the context is then a question asked, not a run that will fail)."""
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    level = tokenizer_log.level
    tokenizer_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tokenizer_log.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class _StopFlag(StoppingCriteria):
    """Stops generation when the consumer of stream_chat goes away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Backend:
    """A frozen LMM family: chat with an image, and read what the answer looked at."""

    family: ClassVar[str] = ""
    model_class: ClassVar[type[PreTrainedModel] | None] = None
    text_config_key: ClassVar[str] = "text_config"
    answer_prefix: ClassVar[str] = ""
    # Whether chat() can show more than one image in a prompt (visual chain of thought).
    multi_image: ClassVar[bool] = True
    # Whether the processor encodes text marked by `as_plain_text` itself (transformers'
    # sanitize_control_tokens); if not, `encode` puts the typed tokens' ids in afterwards.
    processor_sanitizes: ClassVar[bool] = True
    # Token grids an F-LMM head of this family reads (FlmmHeadConfig.input_grids).
    head_input_grids: ClassVar[int] = 1

    def __init__(self, model: PreTrainedModel, processor: Any, *, grounding_prompt: str | None = None):
        self.model = model.eval()
        self._cache_kwarg = _cache_name(model)  # the KV cache's name in forward/generate and outputs
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.grounding_prompt = grounding_prompt or DEFAULT_GROUNDING_PROMPT
        text_config = model.config.get_text_config()
        self.num_layers: int = text_config.num_hidden_layers
        self.num_heads: int = text_config.num_attention_heads
        self.hidden_size: int = text_config.hidden_size
        install_capture(model, self.text_config_key)
        self._attention_modules = decoder_attention_modules(self.language_model)
        if len(self._attention_modules) != self.num_layers:
            raise ValueError(f"found {len(self._attention_modules)} decoder layers, config says {self.num_layers}")
        self._prefix: _Prefix | None = None
        self._last_generation: _Generation | None = None
        self._control_re = _control_tokens_re(self.tokenizer, getattr(processor, "chat_template", None))
        self._added_ids = _added_special_ids(self.tokenizer)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, path_or_id: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
        device_map: str | dict | None = None, quantization_config: Any = None,
    ) -> "Backend":
        """Load model and processor from a local folder or a (cached) Hugging Face id.

        device_map: "auto" spreads the model over GPU and CPU (accelerate); default: all on
        `device`. quantization_config: e.g. transformers' BitsAndBytesConfig (flmm_demo.devices).
        """
        if cls.model_class is None:
            raise TypeError(f"{cls.__name__} sets no model_class; use a family class or load_backend()")
        check_model_folder(path_or_id)
        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        try:
            model = cls.model_class.from_pretrained(path_or_id, dtype=dtype, device_map=device_map or device, **extra)
        except (SafetensorError, OSError, EOFError, pickle.UnpicklingError) as err:  # not device or dtype errors
            raise ModelFilesError(
                f"The model weights of {path_or_id} could not be read ({_first_line(err)}). The file is damaged "
                "or incomplete (an interrupted download or copy?): download or copy it again."
            ) from err
        try:
            processor = AutoProcessor.from_pretrained(path_or_id)
        except (OSError, ValueError, TypeError, KeyError) as err:  # a bad tokenizer.json is a JSONDecodeError (ValueError)
            raise ModelFilesError(
                f"The tokenizer or image processor of {path_or_id} could not be loaded ({_first_line(err)}). "
                "Download or copy its tokenizer and processor files again."
            ) from err
        return cls(model, processor)

    # ------------------------------------------------------------ family hooks
    @property
    def language_model(self) -> torch.nn.Module:
        """The LLM decoder (its .layers[i].self_attn are captured)."""
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def flmm_text(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement flmm_text()")

    def image_views(self, inputs: dict[str, torch.Tensor], input_size: tuple[int, int]) -> list[ViewTokens]:
        raise NotImplementedError(f"{type(self).__name__} must implement image_views()")

    def chat_text(self, history: list[Turn], question: str, extra_images: int = 0) -> str:
        """The model's own chat template, up to and including the assistant prefix.

        extra_images: placeholders for more images in the last question (after the
        conversation's image, which opens the first one).
        """
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(
                f"the {self.family} processor has no chat_template; load a chat checkpoint or set processor.chat_template"
            )
        mark = self.as_plain_text
        messages: list[dict[str, Any]] = []
        for turn in history:
            messages.append({"role": "user", "content": [{"type": "text", "text": mark(turn.user)}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": mark(turn.assistant)}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": mark(question)}]})
        messages[-1]["content"][:0] = [{"type": "image"}] * extra_images
        messages[0]["content"].insert(0, {"type": "image"})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def as_plain_text(self, text: str) -> str:
        """`text` with the control tokens it spells (`</s>`, `<image>`, `<|im_start|>`...) marked
        as plain text: the prompt's tokenizer then encodes them as the characters they are,
        never as the template's own tokens (transformers' `sanitize_control_tokens`).

        Use it on every string a user (or a model answer) puts into a prompt.
        """
        return mark_control_tokens(text, self._control_re)

    def prepare_image(self, image: Image.Image, template: str) -> tuple[Image.Image, tuple[float, float, float, float]]:
        """(image for the processor, placement (ox, oy, sx, sy): its x is ox + sx * x in the original)."""
        return image, (0.0, 0.0, 1.0, 1.0)

    def processor_kwargs(self, template: str) -> dict[str, Any]:
        return {}

    def prefill_inputs(self, prompt: Prompt) -> dict[str, Any]:
        """Model kwargs that prefill all prompt tokens but the last (whose row starts attend's pass)."""
        inputs = dict(prompt.inputs)
        inputs["input_ids"] = prompt.input_ids[:, :-1]
        inputs["attention_mask"] = prompt.inputs["attention_mask"][:, :-1]
        return inputs

    def cached_forward_inputs(self, prompt: Prompt, new_ids: torch.Tensor) -> dict[str, Any]:
        """Model kwargs to run new_ids (1, n) after the prefilled prompt prefix."""
        total = self._prefix.length + new_ids.shape[1]
        return {"input_ids": new_ids, "attention_mask": torch.ones(1, total, dtype=torch.long, device=new_ids.device)}

    @property
    def context_length(self) -> int | None:
        """Positions the language model is built for (None when its config does not say)."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def prompt_fits(self, image: Image.Image, history: list[Turn], question: str,
                    extra_images: Sequence[Image.Image] = (), max_new_tokens: int = 0) -> bool:
        """Whether this chat prompt plus max_new_tokens fits the language model's context
        (two images of 576 tokens need more than 1,024 positions: the demo model has 2,048)."""
        limit = self.context_length
        if limit is None:
            return True
        with _counting_tokens():
            prompt = self.build_prompt(image, history, question, "chat", "", extra_images)
        return prompt.input_ids.shape[1] + max_new_tokens <= limit

    # ----------------------------------------------------------------- prompts
    def build_prompt(
        self, image: Image.Image, history: list[Turn], question: str, template: str = "chat", answer_start: str = "",
        extra_images: Sequence[Image.Image] = (),
    ) -> Prompt:
        """Tokenize the prompt (chat template or F-LMM's) with the image.

        answer_start: text put after the assistant prefix, for the model to continue
        (visual chain of thought, flmm.md section 8).
        """
        if extra_images and not (template == "chat" and self.multi_image):
            raise ValueError(f"the {self.family} backend takes one image per prompt here")
        if template == "chat":
            text = self.chat_text(history, question, len(extra_images)) if extra_images else self.chat_text(history, question)
        elif template == "flmm":
            text = self.flmm_text()
        else:
            raise ValueError(f"template must be 'chat' or 'flmm', got {template!r}")
        text += answer_start
        image = image.convert("RGB")
        processed, (ox, oy, sx, sy) = self.prepare_image(image, template)
        images = [processed] + [self.prepare_image(extra.convert("RGB"), template)[0] for extra in extra_images]
        inputs = self.encode(images if extra_images else processed, text, template)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        dtype = self.model.dtype
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        if not bool((inputs["input_ids"] == self.image_token_id).any()):
            raise ValueError("the prompt holds no image tokens; does the chat template put the image placeholder in?")
        # With extra images the prompt is for chat only: no attention is read from it.
        views = [] if extra_images else [
            ViewTokens(v.name, v.grid, (ox + sx * v.box[0], oy + sy * v.box[1], ox + sx * v.box[2], oy + sy * v.box[3]),
                       v.positions)
            for v in self.image_views(inputs, processed.size)
        ]
        return Prompt(inputs, views, image.size, _digest(inputs))

    def encode(self, images: Image.Image | list[Image.Image], text: str, template: str) -> dict[str, torch.Tensor]:
        """The processor's tensors for `text` (marked by `as_plain_text`) and its images.

        Marked control tokens are encoded as plain text and never taken for image
        placeholders; the tokenizer's own BOS/EOS go around the whole prompt.
        """
        kwargs = self.processor_kwargs(template)
        # [template text, typed token, template text, ...]; a lone marker is an empty token
        pieces = [piece or "" for piece in _MARKED.split(text)]
        if len(pieces) == 1:
            inputs = self.processor(images=images, text=text, return_tensors="pt", **kwargs)
        elif self.processor_sanitizes:
            inputs = self.processor(images=images, text=text, return_tensors="pt", add_special_tokens=False,
                                    sanitize_control_tokens=True, **kwargs)
            inputs = _grow(inputs, *self._added_ids)
        else:
            inputs = self._encode_with_stand_ins(images, pieces, kwargs)
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def _encode_with_stand_ins(self, images: Any, pieces: list[str], kwargs: dict) -> dict[str, torch.Tensor]:
        """For processors that cannot encode marked text: each typed control token is
        replaced by a control token the template does not use (a stand-in the processor
        leaves alone), and its plain-text ids are put in the stand-in's place afterwards."""
        template_text = "".join(pieces[0::2])
        used = set(self._control_re.findall(template_text)) | {self.processor.image_token if hasattr(self.processor, "image_token") else ""}
        free = [t for t in self.tokenizer.all_special_tokens if t not in used and t not in template_text]
        if not free:
            raise ValueError("the question spells the model's control tokens, and this processor cannot encode them as text")
        stand_in = free[0]
        stand_in_id = self.tokenizer.convert_tokens_to_ids(stand_in)
        text = "".join(piece if i % 2 == 0 else stand_in for i, piece in enumerate(pieces))
        inputs = self.processor(images=images, text=text, return_tensors="pt", **kwargs)
        ids = inputs["input_ids"][0].tolist()
        typed = iter(pieces[1::2])
        pieces_ids: list[list[int]] = []
        for token in ids:
            if token == stand_in_id:
                pieces_ids.append(self.tokenizer(next(typed), add_special_tokens=False,
                                                 split_special_tokens=True)["input_ids"])
            else:
                pieces_ids.append([token])
        out = dict(inputs)
        for name, tensor in inputs.items():
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[1] == len(ids) \
                    and not tensor.is_floating_point():
                row = tensor[0].tolist()
                values = [v for piece, value in zip(pieces_ids, row) for v in
                          (piece if name == "input_ids" else [value] * len(piece))]
                out[name] = torch.tensor([values], dtype=tensor.dtype)
        return out

    # -------------------------------------------------------------- prefill
    def _prefilled(self, prompt: Prompt) -> _Prefix:
        """The KV cache of the prompt minus its last token, computed once per prompt."""
        if self._prefix is not None and self._prefix.key == prompt.key:
            return self._prefix
        self._prefix = None  # free the old cache before building the new one
        with torch.no_grad():
            out = self.model(**self.prefill_inputs(prompt), use_cache=True, logits_to_keep=1)
        cache = out[self._cache_kwarg]
        croppable = all(type(layer) is DynamicLayer for layer in cache.layers)
        self._prefix = _Prefix(prompt.key, cache, prompt.input_ids.shape[1] - 1, None if croppable else copy.deepcopy(cache))
        return self._prefix

    def _rewind(self) -> None:
        """Restore the cache to the prompt prefix after a generation or a teacher-forced pass."""
        prefix = self._prefix
        extra = prefix.cache.get_seq_length() - prefix.length
        if prefix.pristine is not None:
            prefix.cache = copy.deepcopy(prefix.pristine)
        elif extra > 0:
            prefix.cache.crop(-extra)

    # ---------------------------------------------------------------- context
    def fit_context(
        self, image: Image.Image, history: list[Turn], question: str, max_new_tokens: int, *,
        answer_start: str = "", extra_images: Sequence[Image.Image] = (),
    ) -> tuple[int, int]:
        """The newest turns of `history` that fit the model's context with room for the answer.

        Returns (first kept turn, max_new_tokens that fit): the prompt of
        history[first:] plus the answer stays within `context_length` positions; the
        answer's budget is cut only when even the question alone leaves less room.
        Raises ValueError when the image and the question alone do not fit.
        """
        check_max_new_tokens(max_new_tokens)
        limit = self.context_length
        if limit is None:
            return 0, max_new_tokens

        def length(first: int) -> int:
            with _counting_tokens():
                prompt = self.build_prompt(image, history[first:], question, "chat", answer_start, extra_images)
            return prompt.input_ids.shape[1]

        if length(0) + max_new_tokens <= limit:
            return 0, max_new_tokens
        lo, hi = 1, len(history)  # the fewest turns to drop: prompt length falls as turns go
        while lo < hi:
            mid = (lo + hi) // 2
            if length(mid) + max_new_tokens <= limit:
                hi = mid
            else:
                lo = mid + 1
        alone = length(lo)
        if alone + max_new_tokens <= limit:
            return lo, max_new_tokens
        if alone < limit:
            return len(history), limit - alone
        raise ValueError(
            f"The image and the question take {alone:,} tokens, and the model reads at most {limit:,}: "
            "shorten the question."
        )

    # ------------------------------------------------------------------- chat
    def chat(
        self,
        image: Image.Image,
        history: list[Turn],
        question: str,
        *,
        max_new_tokens: int = 256,
        answer_start: str = "",
        extra_images: Sequence[Image.Image] = (),
        **generate_kwargs: Any,
    ) -> str:
        """Answer `question` about `image` after `history` (greedy unless generate_kwargs say otherwise).

        answer_start: the answer's forced beginning; only the continuation is returned.
        extra_images: more images shown with this question (families with multi_image).
        generate_kwargs go to transformers' generate (e.g. min_new_tokens, do_sample).
        """
        pieces = self.stream_chat(
            image, history, question, max_new_tokens=max_new_tokens, answer_start=answer_start,
            extra_images=extra_images, **generate_kwargs,
        )
        return "".join(pieces)

    def stream_chat(
        self,
        image: Image.Image,
        history: list[Turn],
        question: str,
        *,
        max_new_tokens: int = 256,
        answer_start: str = "",
        extra_images: Sequence[Image.Image] = (),
        **generate_kwargs: Any,
    ) -> Iterator[str]:
        """Yield the answer's text deltas as they are generated (same arguments as chat)."""
        check_max_new_tokens(max_new_tokens)
        prompt = self.build_prompt(image, history, question, "chat", answer_start, extra_images)
        self._check_fits(prompt, 1, "the question")
        prefix = self._prefilled(prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _StopFlag()
        result: dict[str, Any] = {}
        generate_kwargs.setdefault("do_sample", False)

        def run() -> None:
            try:
                with torch.no_grad():
                    result["ids"] = self.model.generate(
                        **self.cached_forward_inputs(prompt, prompt.input_ids[:, -1:]) | {"input_ids": prompt.input_ids},
                        **{self._cache_kwarg: prefix.cache},
                        max_new_tokens=max_new_tokens,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([stop]),
                        pad_token_id=self._pad_token_id(),
                        **generate_kwargs,
                    )
            except BaseException as error:  # surfaced in the caller's thread below
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            stop.event.set()
            thread.join()
            self._rewind()
        if "error" in result:
            raise result["error"]
        ids = result["ids"][0, prompt.input_ids.shape[1] :].tolist()
        special = set(self.tokenizer.all_special_ids)
        while ids and ids[-1] in special:  # the end-of-turn token is not part of the answer
            ids.pop()
        self._last_generation = _Generation(prompt.key, "".join(pieces), ids)

    def _check_fits(self, prompt: Prompt, new_tokens: int, what: str) -> None:
        """ValueError when the prompt and `new_tokens` more exceed the model's positions."""
        total = prompt.input_ids.shape[1] + new_tokens
        if self.context_length is not None and total > self.context_length:
            raise ValueError(
                f"The prompt with {what} needs {total:,} tokens, and the model reads at most "
                f"{self.context_length:,}: shorten {what} or start a new conversation."
            )

    def _pad_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ----------------------------------------------------------------- attend
    def attend(
        self,
        image: Image.Image,
        history: list[Turn],
        question: str,
        answer: str,
        *,
        template: str = "chat",
        answer_start: str = "",
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> AnswerAttention:
        """Teacher-force `answer` after the prompt and capture its attention over the image.

        template="chat": the chat template (what chat() used); "flmm": F-LMM's training
        prompt (history and question ignored). answer_start: forced text between the
        assistant prefix and `answer` (as given to chat), part of the prompt, not of the
        answer. One forward pass of T+1 tokens over the cached prompt; the maps equal the
        eager full-sequence attention rows.
        spans: answer-token spans [start, end) to keep, e.g. the phrases to ground and the
        whole answer (see `answer_token_spans`): the maps then hold only the mean row of
        each span (len(spans) instead of T rows, reduced layer by layer during the pass,
        so a long answer costs no more memory than a short one).
        """
        prompt = self.build_prompt(image, history, question, template, answer_start)
        ids, token_spans = self.answer_tokens(prompt, answer)
        self._check_fits(prompt, len(ids), "the text to ground")
        prefix = self._prefilled(prompt)
        device = prompt.input_ids.device
        new_ids = torch.cat([prompt.input_ids[:, -1:], torch.tensor([ids], device=device)], dim=1)  # (1, T+1)
        all_positions = torch.cat([v.positions for v in prompt.views]).to(device)
        columns, inverse = torch.unique(all_positions, sorted=True, return_inverse=True)
        weights = None if spans is None else span_weights(spans, len(ids), first_row=1)
        try:
            with torch.no_grad(), capture_attention(self._attention_modules, columns, weights) as recorder:
                out = self.model(
                    **self.cached_forward_inputs(prompt, new_ids),
                    **{self._cache_kwarg: prefix.cache},
                    use_cache=True,
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
        finally:
            self._rewind()
        rows = stack_rows(recorder)  # (T+1 or P, L*H, N)
        if spans is None:
            rows = rows[1:]  # the last prompt token's row is not an answer token
        maps, start = [], 0
        for view in prompt.views:
            n = view.positions.numel()
            index = inverse[start : start + n]
            first = int(index[0])
            if torch.equal(index, torch.arange(first, first + n, device=index.device)):
                view_rows = rows[:, :, first : first + n]  # a view: no copy of the largest tensor we make
            else:
                view_rows = rows[:, :, index]
            maps.append(view_rows.reshape(rows.shape[0], -1, *view.grid))
            start += n
        # (L, T, D), embedding output excluded; layers split over devices (offload) meet on the first one
        hidden = torch.stack([h[0, 1:].to(rows.device, torch.float32) for h in out.hidden_states[1:]])
        return AnswerAttention(
            answer=answer,
            token_ids=ids,
            token_spans=token_spans,
            maps=maps,
            views=[ImageView(v.name, v.grid, v.box) for v in prompt.views],
            hidden_states=hidden,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            image_size=prompt.image_size,
            map_spans=None if spans is None else [tuple(span) for span in spans],
        )

    def answer_token_spans(
        self, image: Image.Image, history: list[Turn], question: str, answer: str, *,
        template: str = "chat", answer_start: str = "",
    ) -> list[tuple[int, int]]:
        """Character span in `answer` of each answer token, as attend() will tokenize it
        (no forward pass): what the phrases are matched against before attending."""
        prompt = self.build_prompt(image, history, question, template, answer_start)
        return self.answer_tokens(prompt, answer)[1]

    def answer_tokens(self, prompt: Prompt, answer: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `answer` and each token's character span in it.

        Reuses the generated ids when `answer` is what chat() just produced for this
        prompt, so attend() sees exactly the tokens the model emitted.
        """
        if not answer.strip():
            raise ValueError("the answer is empty: nothing to attend with")
        last = self._last_generation
        if last is not None and last.key == prompt.key and last.text.strip() == answer.strip():
            ids = list(last.ids)
        else:
            # Whatever the answer spells, it is text: no control token, no image placeholder.
            ids = self.tokenizer(self.answer_prefix + answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids, token_char_spans(self.tokenizer, ids, answer)


def check_max_new_tokens(max_new_tokens: Any) -> int:
    """`max_new_tokens` if it is a whole number of at least 1; ValueError otherwise."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def span_weights(spans: Sequence[tuple[int, int]], num_tokens: int, first_row: int = 0) -> torch.Tensor:
    """(P, first_row + T) float32: row p averages tokens [start, end) of span p.

    first_row: leading query rows that belong to no span (attend's last prompt token).
    """
    weights = torch.zeros(len(spans), first_row + num_tokens)
    for p, (start, end) in enumerate(spans):
        if not 0 <= start < end <= num_tokens:
            raise ValueError(f"token span {(start, end)} is outside the answer's {num_tokens} tokens")
        weights[p, first_row + start : first_row + end] = 1.0 / (end - start)
    return weights


def token_char_spans(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character span in `text` of each token, by decoding incrementally.

    Works for any tokenizer (SentencePiece spaces, byte-level BPE). Leading/trailing
    whitespace is trimmed from a span; a token that adds no visible text (or whose
    bytes only complete in a later token) gets an empty span at the current position.
    """
    spans: list[tuple[int, int]] = []
    decoded_before = ""
    cursor = 0
    for t in range(len(ids)):
        decoded = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        piece = decoded[len(decoded_before) :]
        stripped = piece.strip()
        if "\ufffd" in stripped or not stripped:
            spans.append((cursor, cursor))
        else:
            start = text.find(stripped, cursor)
            if start < 0:  # the decoded text differs from `text` (normalisation); fall back to length
                start = min(cursor, len(text))
            end = min(start + len(stripped), len(text))
            spans.append((start, end))
            cursor = end
        if "\ufffd" not in decoded:
            decoded_before = decoded
    return spans


def _control_tokens_re(tokenizer: Any, chat_template: str | None) -> re.Pattern:
    """A regex matching the tokenizer's control tokens: its special tokens and the added
    tokens the chat template writes (longest first, so a token wins over its parts)."""
    template = chat_template if isinstance(chat_template, str) else ""
    tokens = {
        t.content for t in tokenizer.added_tokens_decoder.values()
        if t.content.strip() and (t.special or t.content in template)
    }
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)")


def _grow(inputs: Any, before: list[int], after: list[int]) -> dict[str, Any]:
    """Add ids before/after the sequence of a (1, S) encoding; the other per-token tensors
    grow with them (attention mask 1, token types 0)."""
    inputs = dict(inputs)
    if not before and not after:
        return inputs
    length = inputs["input_ids"].shape[1]
    for name, tensor in list(inputs.items()):
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[1] == length \
                and not tensor.is_floating_point():
            fill = 1 if name == "attention_mask" else 0
            head = before if name == "input_ids" else [fill] * len(before)
            tail = after if name == "input_ids" else [fill] * len(after)
            inputs[name] = torch.cat([torch.tensor([head], dtype=tensor.dtype), tensor,
                                      torch.tensor([tail], dtype=tensor.dtype)], dim=1)
    return inputs


def _added_special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text of its own accord (BOS, EOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _cache_name(model: Any) -> str:
    """What this transformers version calls the KV cache, in forward's arguments and its
    output: 'cache' since it renamed 'past_key_values' (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _digest(inputs: dict[str, torch.Tensor]) -> str:
    """Content hash of the model inputs (ids, pixels...): the key of the prefill cache."""
    h = hashlib.sha1()
    for name in sorted(inputs):
        tensor = inputs[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes())
    return h.hexdigest()
