"""Exact, cheap capture of answer-token attention rows over image tokens.

F-LMM needs, for every answer token, the softmax row of every (layer, head) of the
LLM's self-attention, restricted to the image-token columns. `output_attentions=True`
would materialise L x H x S x S; instead we register an attention implementation
("flmm_capture") that

1. computes the layer output with PyTorch's SDPA (exactly what "sdpa" does), and
2. while a `capture_attention(...)` context is active, recomputes only the rows of the
   current queries (the answer tokens, fed in one teacher-forced pass over the cached
   prompt): softmax(q kᵀ * scale + mask) in float32 over ALL keys, keeping the
   requested image columns.

Only the attention modules listed in the context (the language model's decoder
layers) are recorded; the vision tower never is.

Masks: we also register "flmm_capture" with transformers' AttentionMaskInterface as
the sdpa mask builder, so the mask we receive is exactly the one sdpa gets: None
(causal via SDPA's `is_causal`), a bool mask (True = attend) or an additive float mask.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPLEMENTATION = "flmm_capture"


@dataclass
class _Recorder:
    """What one capture collects: layer index by attention-module id, image key columns.

    query_weights: (P, q) float32 or None. When given, each layer's rows are reduced at
    once to P weighted sums over the queries (e.g. the mean of each phrase's tokens), so
    only (P, L, H, N) is ever kept instead of (q, L, H, N).
    """

    layer_of_module: dict[int, int]
    key_columns: torch.Tensor  # (N,) long, positions of the image tokens in the full sequence
    query_weights: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # (q or P, L, H, N) float32, filled layer by layer
    seen: set[int] = field(default_factory=set)

    def record(self, layer: int, rows: torch.Tensor) -> None:
        """rows: (q, H, N) of one layer."""
        if self.query_weights is not None:
            rows = torch.einsum("pq,qhn->phn", self.query_weights.to(rows.device), rows)
        if self.rows is None:
            self.rows = rows.new_empty((rows.shape[0], len(self.layer_of_module), *rows.shape[1:]))
        self.rows[:, layer] = rows
        self.seen.add(layer)


_ACTIVE: list[_Recorder] = []


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool,
    key_columns: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention rows of `query` over all keys, restricted to `key_columns`.

    query: (B, H, q, d); key: (B, H_kv, k, d), H a multiple of H_kv (GQA);
    attention_mask: None, bool (B|1, 1|H, q, k) with True = attend, or additive float.
    Returns (B, H, q, N) float32 for N = len(key_columns).
    """
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    q_len, k_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, H, q, k)
    if attention_mask is None:
        # Mirror transformers' sdpa path: without a mask, several queries are causal with
        # SDPA's upper-left alignment (keys past q_len are dropped); one query sees all keys.
        if is_causal and q_len > 1:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k_len].float()
    probs = torch.softmax(scores, dim=-1)
    return probs.index_select(-1, key_columns.to(probs.device))


def _capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA output; records this module's answer rows when a capture is active."""
    if _ACTIVE:
        recorder = _ACTIVE[-1]
        layer = recorder.layer_of_module.get(id(module))
        if layer is not None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            rows = attention_rows(query, key, attention_mask, scaling, causal, recorder.key_columns)
            recorder.record(layer, rows[0].transpose(0, 1))  # (q, H, N), batch of one
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _register() -> None:
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


_register()


def decoder_attention_modules(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order.

    Works for Llama-style decoders (`.layers[i].self_attn`), which all our families use.
    """
    layers = getattr(language_model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(language_model).__name__} has no `.layers`; pass the decoder (e.g. model.model.language_model)")
    return [layer.self_attn for layer in layers]


def install_capture(model: PreTrainedModel, text_config_key: str = "text_config") -> None:
    """Make the model's language decoder use the capturing implementation (vision tower untouched).

    Output equals "sdpa" whenever no capture is active.
    """
    model.set_attn_implementation({text_config_key: CAPTURE_IMPLEMENTATION})


@contextlib.contextmanager
def capture_attention(
    attention_modules: Sequence[torch.nn.Module], key_columns: torch.Tensor, query_weights: torch.Tensor | None = None,
) -> Iterator[_Recorder]:
    """Within the block, forward passes record (q, H, N) rows per decoder layer.

    attention_modules[i] is layer i's self-attention; key_columns: (N,) positions of the
    image tokens in the full (cached prompt + new tokens) sequence. query_weights: (P, q),
    keep only these P weighted sums of the q rows (see _Recorder).
    After the block, `stack_rows(recorder)` gives (q or P, L*H, N) float32.
    """
    weights = None if query_weights is None else query_weights.float()
    recorder = _Recorder({id(m): i for i, m in enumerate(attention_modules)}, key_columns.long(), weights)
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.remove(recorder)


def stack_rows(recorder: _Recorder) -> torch.Tensor:
    """(q or P, L*H, N) float32: the recorded rows, channel = layer * H + head."""
    missing = [i for i in range(len(recorder.layer_of_module)) if i not in recorder.seen]
    if missing or recorder.rows is None:
        raise RuntimeError(
            f"no attention rows were captured for decoder layers {missing}; is the language model using "
            f"attn_implementation={CAPTURE_IMPLEMENTATION!r} (see install_capture)?"
        )
    return recorder.rows.flatten(1, 2)
