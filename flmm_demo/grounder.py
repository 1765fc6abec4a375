"""The Grounder: chat with an image through a frozen LMM and ground what it says.

Like segment-anything's SamPredictor, the expensive per-image work is done once: a
`Session` holds one image (and its SAM embedding, computed in the background), its
conversation, and answers every later question, grounding and crop cheaply. The model
weights live in the `Grounder` and are shared by all sessions.

    grounder = Grounder.from_preset("demo-shapes")
    session = grounder.new_session("scene.png")
    answer = session.chat("Describe the image.")
    for g in session.ground():            # every noun phrase of the last answer
        print(g.phrase.text, g.box, g.score)

The whole flow of one grounding is `Session.ground`: attention of the answer (backend)
-> noun phrases (spaCy) -> one mask per phrase (F-LMM head or training-free).
"""
from __future__ import annotations

import numbers
import queue
import re
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .backends import Backend, load_backend
from .backends.base import check_max_new_tokens
from .devices import LoadOptions
from .geometry import mask_box, resize_map, resize_mask, views_to_image
from .heads import FlmmHead, SamImageEncoderCache, load_head, load_sam
from .heads.training_free import answer_baseline, attention_heatmap, heatmap_to_mask
from .images import fit_for_model, load_image
from .phrases import extract_phrases, phrases_from_spans
from .presets import require_weights
from .prompts import VCOT_HINT, VCOT_LEAD, VCOT_REGION, VCOT_REGION_ALONE
from .types import AnswerAttention, GroundedPhrase, Phrase, Turn

MAX_QUESTION_CHARS = 2000
Mode = Literal["auto", "head", "training_free"]
MODES: tuple[Mode, ...] = ("auto", "head", "training_free")


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model is and can do (shown in the UI and by `doctor`)."""

    name: str
    family: str
    description: str
    is_demo: bool
    has_head: bool
    has_sam: bool

    @property
    def modes(self) -> list[Mode]:
        return ["head", "training_free"] if self.has_head else ["training_free"]


@dataclass(frozen=True)
class VisualCoT:
    """Visual chain of thought: the object the model found relevant, the crop, both answers."""

    first_answer: str
    object: GroundedPhrase | None
    crop_box: tuple[int, int, int, int]
    crop: Image.Image
    answer: str


def check_text(text: str, what: str) -> str:
    """`text` unchanged; ValueError when it holds a lone surrogate (it cannot be encoded)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # half of an emoji's surrogate pair, or a bad paste
        raise ValueError(
            f"The {what} contains a broken character at position {err.start} "
            f"({text[err.start]!r}, half of a character pair); retype or re-paste it."
        ) from None
    return text


@dataclass(frozen=True)
class TextGrounding:
    """Typed words, grounded: every occurrence of them in the last answer, or one expression.

    in_answer: the words occur in the answer, so each occurrence was grounded with the
    attention the model paid while writing it; else they were grounded as a referring
    expression on their own.
    """

    grounded: tuple[GroundedPhrase, ...]
    in_answer: bool


def check_question(question: str, what: str = "question") -> str:
    """The question, stripped; a ValueError a user can act on when it is unusable."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"The {what} is empty: type a {what} about the image.")
    question = check_text(question.strip(), what)
    if not any(unicodedata.category(c)[0] in "LNS" for c in question):  # letters, digits, symbols/emoji
        raise ValueError(f"The {what} is only punctuation: type words.")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(
            f"The {what} is {len(question):,} characters long; the limit is {MAX_QUESTION_CHARS:,}. "
            "Shorten it and ask again."
        )
    return question


class Grounder:
    """A frozen LMM plus what grounds its words: an F-LMM head, SAM, or neither.

    backend: the frozen LMM. head: a trained F-LMM head for this LMM (or None).
    sam: a SAM image-encoder cache used by the refiner and the training-free path (or None).
    """

    def __init__(self, backend: Backend, head: FlmmHead | None = None, sam: SamImageEncoderCache | None = None, *,
                 info: ModelInfo | None = None):
        self.backend = backend
        self.head = head
        self.sam = sam
        self.info = info or ModelInfo(
            name=backend.family, family=backend.family, description="", is_demo=False,
            has_head=head is not None, has_sam=sam is not None,
        )
        if head is not None:
            head.check_compatible(backend)
        # One model, many sessions: model calls are serialised.
        self.lock = threading.RLock()
        self._session: Session | None = None

    @classmethod
    def from_preset(
        cls, name: str | None = None, *, device: str = "auto", dtype: str | None = None,
        quantize: str | None = None, offload: bool = False,
    ) -> "Grounder":
        """Load a named preset (or a local model folder); None -> $FLMM_PRESET or the bundled demo.

        A preset missing any piece (LMM, F-LMM head, SAM) raises MissingWeightsError at once,
        before any network call, naming them all and the `download` command. device / dtype /
        quantize / offload: see flmm_demo.devices.LoadOptions (default: the GPU if any, bf16 there).
        """
        resolved = require_weights(name)
        if resolved.is_demo and dtype is None:
            dtype = "fp32"  # the bundled 1.8M-parameter model gains nothing from bf16, and was trained in fp32
        options = LoadOptions(device=device, dtype=dtype, quantize=quantize, offload=offload)
        kwargs = options.from_pretrained_kwargs()
        backend = load_backend(str(resolved.model_path), **kwargs)
        device = kwargs["device"]
        head = load_head(resolved.head_path, backend, device=device) if resolved.head_path else None
        sam = load_sam(resolved.sam_path, device=device) if resolved.sam_path else None
        info = ModelInfo(
            name=resolved.name, family=backend.family, description=resolved.description,
            is_demo=resolved.is_demo, has_head=head is not None, has_sam=sam is not None,
        )
        return cls(backend, head, sam, info=info)

    # ----------------------------------------------------- SamPredictor-like use
    def new_session(self, image: str | Path | bytes | Image.Image | np.ndarray) -> "Session":
        """Validate and set an image; starts its SAM embedding in the background."""
        return Session(self, image)

    def set_image(self, image: str | Path | bytes | Image.Image | np.ndarray) -> "Session":
        """Start a default session on `image`; chat/ground below then use it."""
        self._session = self.new_session(image)
        return self._session

    def _current(self) -> "Session":
        if self._session is None:
            raise RuntimeError("No image is set: call set_image(image) first.")
        return self._session

    def chat(self, question: str, **kw: Any) -> str:
        return self._current().chat(question, **kw)

    def ground(self, answer: str | None = None, **kw: Any) -> list[GroundedPhrase]:
        return self._current().ground(answer, **kw)

    def ground_expression(self, expression: str, **kw: Any) -> GroundedPhrase:
        return self._current().ground_expression(expression, **kw)

    def visual_cot(self, question: str, **kw: Any) -> VisualCoT:
        return self._current().visual_cot(question, **kw)

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` the model's tokenizer cannot spell (they become its unknown token).

        A mask of such words shows what the model makes of noise, however sure it looks.
        Byte-level tokenizers spell every word, so this is empty for them.
        """
        tokenizer = getattr(self.backend, "tokenizer", None)
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is None:
            return []
        words = re.findall(r"\w+", text)
        return [w for w in words if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]

    # ----------------------------------------------------------- the grounding
    def segment(
        self, attention: AnswerAttention, phrases: Sequence[Phrase], *, mode: Mode = "auto",
        refine: bool = True, sam_embedding: Any = None,
    ) -> list[GroundedPhrase]:
        """One mask per phrase, at the size of the image the backend saw.

        mode: "head" (F-LMM U-Net, then the SAM refiner when `refine` and SAM is there),
        "training_free" (attention heat map -> SAM prompts, or a threshold without SAM),
        "auto" (the head when there is one).
        """
        if mode not in MODES:
            raise ValueError(f"unknown grounding mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "head" and self.head is None:
            raise ValueError(f"{self.info.name} has no trained F-LMM head: use mode='training_free'.")
        use_head = self.head is not None and mode != "training_free"
        width, height = attention.image_size
        # The answer's mean attention is the bias every token shares (sinks, early image tokens).
        baselines = answer_baseline(attention)
        phrase_maps = [attention.phrase_maps(p.token_span) for p in phrases]  # per phrase, per view (L*H, rows, cols)
        head_outputs = None
        if use_head:  # all phrases together, as F-LMM does (they share SAM's dense-prompt padding)
            head_outputs = self.head.predict_phrases(
                phrase_maps, [attention.phrase_hidden(p.token_span) for p in phrases], attention.views,
                (width, height), sam_embedding=sam_embedding if refine else None,
            )
        results = []
        for i, (phrase, maps) in enumerate(zip(phrases, phrase_maps)):
            # A phrase that is the whole answer (a typed expression) is its own mean: the
            # answer baseline would cancel it, so the channel median is the reference then.
            whole = phrase.token_span == (0, len(attention.token_ids))
            heat_views = [attention_heatmap(m, baseline=None if whole else b, num_heads=attention.num_heads)
                          for m, b in zip(maps, baselines)]
            heat = views_to_image([h[None].cpu() for h in heat_views], attention.views, (width, height))[0]
            heat = heat / heat.max().clamp(min=1e-12)
            if head_outputs is not None:
                logits = head_outputs[i].mask_logits.float().cpu()  # the head may run on the GPU
                mask = (logits > 0).numpy()
                score = float(torch.sigmoid(logits[logits > 0]).mean()) if mask.any() else 0.0
            else:
                mask, score = heatmap_to_mask(heat.numpy(), sam=self.sam if refine else None,
                                              sam_embedding=sam_embedding if refine else None)
            results.append(GroundedPhrase(phrase, mask, mask_box(mask), score, heat.numpy().astype(np.float32)))
        return results


class Session:
    """One image and its conversation. Create with `Grounder.new_session(image)`."""

    def __init__(self, grounder: Grounder, image: str | Path | bytes | Image.Image | np.ndarray):
        self.grounder = grounder
        self.image = load_image(image)  # full size, RGB, EXIF applied
        self.model_image, _ = fit_for_model(self.image)
        self.history: list[Turn] = []
        # Per turn of `history`: the index of the first earlier turn its prompt held (the
        # older ones did not fit the model's context). ground() replays the same prompt.
        self._context_starts: list[int] = []
        self._sam_job = grounder.sam.start(self.model_image) if grounder.sam is not None else None

    @property
    def dropped_turns(self) -> int:
        """How many of the oldest turns were left out of the last answer's prompt (0: none)."""
        return self._context_starts[-1] if self._context_starts else 0

    @property
    def context_note(self) -> str | None:
        """A line for the user when older turns no longer fit the model's context, else None."""
        n = self.dropped_turns
        if not n:
            return None
        limit = self.grounder.backend.context_length
        turns = "turn was" if n == 1 else f"{n} turns were"
        return (f"The conversation is longer than the model's {limit:,}-token context: the oldest {turns} "
                "left out of the last answer's prompt (the model no longer sees them).")

    def _window(self, question: str, max_new_tokens: int, **kw: Any) -> tuple[int, int]:
        """(first turn of history that fits, answer budget) for a new question."""
        return self.grounder.backend.fit_context(self.model_image, self.history, question, max_new_tokens, **kw)

    # ------------------------------------------------------------------- chat
    def stream_chat(self, question: str, *, max_new_tokens: int = 256) -> Iterator[str]:
        """Yield the answer's text deltas; the finished turn is added to `history`.

        The model runs in a worker thread that holds the Grounder's lock for the whole
        answer: a caller may advance this generator from different threads (Gradio
        does), and a lock must be released by the thread that took it. Closing the
        generator early stops the generation.
        """
        question = check_question(question)
        check_max_new_tokens(max_new_tokens)
        deltas: queue.Queue = queue.Queue()
        stop = threading.Event()
        window: list[int] = []

        def produce() -> None:
            try:
                with self.grounder.lock:
                    start, budget = self._window(question, max_new_tokens)
                    window.append(start)
                    stream = self.grounder.backend.stream_chat(
                        self.model_image, self.history[start:], question, max_new_tokens=budget
                    )
                    try:
                        for delta in stream:
                            deltas.put(("delta", delta))
                            if stop.is_set():
                                break
                    finally:
                        stream.close()
            except BaseException as error:  # re-raised in the caller's thread
                deltas.put(("error", error))
            else:
                deltas.put(("done", None))

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        pieces: list[str] = []
        try:
            while True:
                kind, value = deltas.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                pieces.append(value)
                yield value
        finally:
            stop.set()
        self.history.append(Turn(question, "".join(pieces).strip()))
        self._context_starts.append(window[0])

    def chat(self, question: str, *, max_new_tokens: int = 256) -> str:
        """Answer a question about the image (multi-turn: earlier turns are in the prompt)."""
        for _ in self.stream_chat(question, max_new_tokens=max_new_tokens):
            pass
        return self.history[-1].assistant

    def clear(self) -> None:
        self.history.clear()
        self._context_starts.clear()

    def _context(self) -> tuple[str, list[Turn]]:
        """The last question and the turns before it that its prompt held."""
        return self.history[-1].user, self.history[self.dropped_turns:-1]

    def close(self) -> None:
        """Release what this session holds: its SAM embedding (also from the shared cache), images, chat.

        The session cannot be used afterwards; a long-running server calls this when a
        user leaves so memory does not grow with every visitor.
        """
        if self._sam_job is not None:
            self._sam_job.cancel()
            release = getattr(self.grounder.sam, "release", None)
            if release is not None:
                release(self._sam_job)
        self._sam_job = None
        self.image = self.model_image = None
        self.history = []

    def sam_status(self) -> str:
        if self._sam_job is None:
            return "off"
        return "ready" if self._sam_job.done() else "encoding"

    def _sam_embedding(self, refine: bool) -> Any:
        return self._sam_job.result() if (refine and self._sam_job is not None) else None

    # -------------------------------------------------------------- grounding
    def ground(
        self, answer: str | None = None, *, spans: Sequence[tuple[int, int]] | None = None,
        mode: Mode = "auto", refine: bool = True,
    ) -> list[GroundedPhrase]:
        """Ground the noun phrases (or the given character spans) of an answer.

        answer=None grounds the last answer of the conversation, with the attention the
        model paid while answering it (same prompt, same history).
        """
        if answer is None:
            if not self.history:
                raise ValueError("There is no answer to ground yet: ask a question first.")
            answer = self.history[-1].assistant
        elif not isinstance(answer, str):
            raise ValueError(f"The answer to ground must be text, got {type(answer).__name__}.")
        else:
            check_text(answer, "answer")
        if mode not in MODES:  # before any work, and even when nothing will be grounded
            raise ValueError(f"unknown grounding mode {mode!r}; choose one of {', '.join(MODES)}")
        question, history = self._context() if self.history else ("", [])
        spans = check_spans(spans, answer) if spans is not None else None
        if not answer.strip() or spans == []:
            return []
        backend = self.grounder.backend
        with self.grounder.lock:
            token_spans = backend.answer_token_spans(self.model_image, history, question, answer, template="chat")
            phrases = (phrases_from_spans(answer, spans, token_spans) if spans is not None
                       else extract_phrases(answer, token_spans))
            if not phrases:
                return []
            attention = backend.attend(self.model_image, history, question, answer, template="chat",
                                       spans=grounding_spans(phrases, len(token_spans)))
            grounded = self.grounder.segment(attention, phrases, mode=mode, refine=refine,
                                             sam_embedding=self._sam_embedding(refine))
        return [self._full_size(g) for g in grounded]

    def ground_expression(self, expression: str, *, mode: Mode = "auto", refine: bool = True) -> GroundedPhrase:
        """Mask of a typed referring expression, teacher-forced as F-LMM evaluates."""
        expression = check_question(expression, "expression")
        backend = self.grounder.backend
        with self.grounder.lock:
            count = len(backend.answer_token_spans(self.model_image, [], "", expression, template="flmm"))
            phrase = Phrase(expression, (0, len(expression)), (0, count))
            attention = backend.attend(self.model_image, [], "", expression, template="flmm",
                                       spans=grounding_spans([phrase], count))
            (grounded,) = self.grounder.segment(attention, [phrase], mode=mode, refine=refine,
                                                sam_embedding=self._sam_embedding(refine))
        return self._full_size(grounded)

    def ground_text(self, text: str, *, mode: Mode = "auto", refine: bool = True) -> TextGrounding:
        """Ground typed words: each place they occur in the last answer, else as an expression.

        Words of the answer keep the attention the model paid while writing them, so "the
        circle" typed after "a square and the circle" grounds that circle, not a new reading.
        """
        text = check_question(text)
        spans = find_spans(self.history[-1].assistant, text) if self.history else []
        if spans:
            return TextGrounding(tuple(self.ground(spans=spans, mode=mode, refine=refine)), in_answer=True)
        return TextGrounding((self.ground_expression(text, mode=mode, refine=refine),), in_answer=False)

    def visual_cot(self, question: str, *, max_new_tokens: int = 256, mode: Mode = "auto",
                   refine: bool = True) -> VisualCoT:
        """Ground the object most relevant to the question, crop it, and ask again (flmm.md 8):
        with the whole image and the crop when the backend takes several images and both
        fit the model's context with max_new_tokens to spare, else with the crop alone.

        The whole-image answer becomes the conversation's turn (so `ground()` grounds it
        with the attention it was generated with); the crop answer is in the result.
        """
        question = check_question(question)
        check_max_new_tokens(max_new_tokens)
        backend = self.grounder.backend
        with self.grounder.lock:
            start, budget = self._window(question, max_new_tokens)
            history = self.history[start:]
            first = backend.chat(self.model_image, history, question, max_new_tokens=budget)
            probe = f"{question} {VCOT_HINT}"
            probe_start, probe_budget = self._window(probe, 32, answer_start=VCOT_LEAD)
            probe_history = self.history[probe_start:]
            lead = backend.chat(self.model_image, probe_history, probe, max_new_tokens=probe_budget,
                                answer_start=VCOT_LEAD).strip()
            token_spans = backend.answer_token_spans(self.model_image, probe_history, probe, lead,
                                                     template="chat", answer_start=VCOT_LEAD) if lead else []
            phrases = extract_phrases(lead, token_spans) if lead else []
            if phrases:  # ground the generated object words together (mean over their tokens)
                span = (phrases[0].token_span[0], phrases[-1].token_span[1])
                obj_phrase = Phrase(lead[phrases[0].char_span[0]:phrases[-1].char_span[1]],
                                    (phrases[0].char_span[0], phrases[-1].char_span[1]), span)
                attention = backend.attend(self.model_image, probe_history, probe, lead, template="chat",
                                           answer_start=VCOT_LEAD, spans=grounding_spans([obj_phrase], len(token_spans)))
                (obj,) = self.grounder.segment(attention, [obj_phrase], mode=mode, refine=refine,
                                               sam_embedding=self._sam_embedding(refine))
                obj = self._full_size(obj)
            else:
                obj = None
            box = enlarge_box(obj.box if obj is not None else None, self.image.size)
            crop = self.image.crop(box)
            crop_for_model, _ = fit_for_model(crop)
            both = None
            if backend.multi_image:  # the whole image and the crop, as F-LMM asks, when both fit
                crop_question = f"{VCOT_REGION} {question}"
                try:
                    both = self._window(crop_question, max_new_tokens, extra_images=[crop_for_model])
                except ValueError:  # two images exceed the model's context: the crop alone
                    both = None
            if both is not None:
                answer = backend.chat(self.model_image, self.history[both[0]:], crop_question,
                                      max_new_tokens=both[1], extra_images=[crop_for_model])
            else:
                crop_question = f"{VCOT_REGION_ALONE} {question}"
                crop_start, crop_budget = backend.fit_context(crop_for_model, self.history, crop_question,
                                                              max_new_tokens)
                answer = backend.chat(crop_for_model, self.history[crop_start:], crop_question,
                                      max_new_tokens=crop_budget)
        # The conversation goes on from the whole-image answer; the probe and the crop
        # question are steps of the chain, not turns the user had.
        self.history.append(Turn(question, first.strip()))
        self._context_starts.append(start)
        return VisualCoT(first.strip(), obj, box, crop, answer.strip())

    def _full_size(self, g: GroundedPhrase) -> GroundedPhrase:
        """Scale a mask from the model image to the full-size image."""
        if self.model_image.size == self.image.size:
            return g
        mask = resize_mask(g.mask, self.image.size)
        return GroundedPhrase(g.phrase, mask, mask_box(mask), g.score, resize_map(g.heatmap, self.image.size))


def check_spans(spans: Any, answer: str) -> list[tuple[int, int]]:
    """Character spans as a list of (start, end) int pairs; a ValueError naming the bad one.

    Each span must be two whole numbers with 0 <= start < end <= len(answer).
    """
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise ValueError(f"spans must be a list of (start, end) pairs, got {type(spans).__name__}")
    checked = []
    for span in spans:
        if (isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in span)):
            raise ValueError(f"each span must be a (start, end) pair of whole numbers, got {span!r}")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(answer):
            raise ValueError(
                f"character span ({start}, {end}) must be non-empty and inside the answer "
                f"(0 <= start < end <= {len(answer)})"
            )
        checked.append((start, end))
    return checked


def find_spans(answer: str, words: str) -> list[tuple[int, int]]:
    """Character spans of every occurrence of `words` in `answer`, whole words only,
    ignoring case and runs of whitespace; [] when they do not occur."""
    words = words.strip()
    if not words:
        return []
    pattern = r"\s+".join(re.escape(w) for w in words.split())
    # Whole words: "red" is not found inside "reddish" (word edges only where the text has one).
    pattern = (r"\b" if re.match(r"\w", words) else "") + pattern + (r"\b" if re.search(r"\w$", words) else "")
    return [(m.start(), m.end()) for m in re.finditer(pattern, answer, flags=re.IGNORECASE)]

def grounding_spans(phrases: Sequence[Phrase], num_tokens: int) -> list[tuple[int, int]]:
    """The answer-token spans grounding reads: each phrase's, then the whole answer (the
    training-free baseline). Attending with only these keeps P maps instead of T."""
    spans = list(dict.fromkeys(p.token_span for p in phrases))
    whole = (0, num_tokens)
    return spans if whole in spans else spans + [whole]


def enlarge_box(box: tuple[int, int, int, int] | None, image_size: tuple[int, int],
                factor: float = 1.5, min_side: int = 16) -> tuple[int, int, int, int]:
    """The box grown by `factor` (at least `min_side` px a side), kept inside the image.

    No box (nothing grounded) -> the whole image.
    """
    width, height = image_size
    if box is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w = min(width, max((x1 - x0) * factor, min_side))
    h = min(height, max((y1 - y0) * factor, min_side))
    nx0 = int(round(min(max(cx - w / 2, 0), width - w)))
    ny0 = int(round(min(max(cy - h / 2, 0), height - h)))
    return nx0, ny0, int(round(nx0 + w)), int(round(ny0 + h))
