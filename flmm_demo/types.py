"""Small result types shared by every stage of the pipeline.

The flow: image + conversation -> backend (answer, attention over image tokens,
hidden states) -> phrases -> mask head -> masks. Each arrow hands one of these over.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation."""

    user: str
    assistant: str


@dataclass(frozen=True)
class ImageView:
    """One grid of image tokens and the part of the original image it covers.

    grid: (rows, cols) of the token grid after any patch merging.
    box: (x0, y0, x1, y1) in pixels of the original image that the grid spans; it may
        reach outside the image where the processor padded (e.g. pad-to-square).
    """

    name: str
    grid: tuple[int, int]
    box: tuple[float, float, float, float]


@dataclass
class AnswerAttention:
    """What the frozen LMM looked at while it produced an answer.

    maps[v]: (T, L*H, rows, cols) float32 for view v; softmax attention of each answer
        token (as query) restricted to that view's image-token columns. Channel order is
        layer * num_heads + head. When `map_spans` is set, maps[v] is (P, L*H, rows, cols):
        only the mean over each of those P token spans was kept (Backend.attend(spans=...)).
    hidden_states: (L, T, D) float32, output of every decoder layer for the answer
        tokens (the embedding output excluded; the last one after the final norm, as
        transformers returns it and as F-LMM's text cue uses it).
    token_spans[t]: character span (start, end) of answer token t in `answer`.
    """

    answer: str
    token_ids: list[int]
    token_spans: list[tuple[int, int]]
    maps: list[torch.Tensor]
    views: list[ImageView]
    hidden_states: torch.Tensor
    num_layers: int
    num_heads: int
    image_size: tuple[int, int]  # (width, height) of the original image
    map_spans: list[tuple[int, int]] | None = None  # the token spans maps[v] holds, None: every token

    def phrase_maps(self, token_span: tuple[int, int]) -> list[torch.Tensor]:
        """Per view (L*H, rows, cols): the mean over the phrase's tokens, channel by channel."""
        start, end = token_span
        if not 0 <= start < end <= len(self.token_ids):
            raise ValueError(f"token span {token_span} is outside the answer's {len(self.token_ids)} tokens")
        if self.map_spans is not None:
            if tuple(token_span) not in self.map_spans:
                raise ValueError(
                    f"this attention kept only the means of token spans {self.map_spans}; "
                    f"attend with spans=... including {tuple(token_span)} (or spans=None for every token)"
                )
            return [m[self.map_spans.index(tuple(token_span))] for m in self.maps]
        return [m[start:end].mean(0) for m in self.maps]

    def phrase_hidden(self, token_span: tuple[int, int]) -> torch.Tensor:
        """(L, n_tokens, D) hidden states of the phrase tokens."""
        start, end = token_span
        return self.hidden_states[:, start:end]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase of an answer: its text, character span and answer-token span [start, end)."""

    text: str
    char_span: tuple[int, int]
    token_span: tuple[int, int]


@dataclass(frozen=True)
class GroundedPhrase:
    """A phrase and where it is in the image.

    mask: (H, W) bool at the original image size. box: (x0, y0, x1, y1) pixels, x1/y1
    exclusive, or None for an empty mask. heatmap: (H, W) float32 in [0, 1], the raw
    attention of the phrase on the image, for display.
    """

    phrase: Phrase
    mask: np.ndarray
    box: tuple[int, int, int, int] | None
    score: float
    heatmap: np.ndarray = field(repr=False)
