"""How much does attention capture cost on top of answering? (CPU, random weights)

For (a) the tiny test model and (b) a LLaVA-1.5-shaped random model of ~0.35B
parameters (CLIP ViT-B/14 at 336 px -> 24x24 image tokens, 16-layer Llama), it times

  answer   chat(): prefill the prompt + generate 48 tokens greedily (min = max = 48)
  capture  attend() on the same prompt and answer: one teacher-forced pass of 49 tokens
           over the cached prompt, recording every answer row over the image tokens

  grounding  attend(spans=...) as Session.ground calls it: the same pass, keeping only the
           mean row of each phrase (PHRASES spans of 3 tokens here) and of the whole answer

and compares the captures' peak extra memory with the F-LMM-style baseline: one full
forward of prompt + answer with attn_implementation="eager" and output_attentions=True.
Memory = peak RSS above the RSS at the call's start, sampled every millisecond by a thread
(/proc/self/statm), with glibc forced to mmap allocations over 64 KiB
(MALLOC_MMAP_THRESHOLD_, set by re-executing) so freed tensors leave RSS at once.
The machine is shared: timings are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

COMMAND = "HF_HUB_OFFLINE=1 python benchmarks/bench_capture.py"

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be set before the process starts
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402
from transformers import LlavaImageProcessor, LlavaProcessor  # noqa: E402

from flmm_demo.backends.llava import LlavaBackend  # noqa: E402
from flmm_demo.backends.testing import LLAVA_CHAT_TEMPLATE, tiny_llava, tiny_tokenizer  # noqa: E402

NEW_TOKENS = 48
PHRASES = 6  # noun phrases of a typical described scene
QUESTION = "What is in the picture?"


def llava_shaped(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Random LLaVA-1.5-shaped model, ~0.35B parameters, 576 image tokens."""
    tokenizer = tiny_tokenizer("<image>")
    vision = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=336, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> "PeakRSS":
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def measure(name: str, model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> dict[str, float | str]:
    backend = LlavaBackend(model, processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    kwargs: dict = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    vocab = model.config.text_config.vocab_size
    if vocab > len(processor.tokenizer):  # keep random generations decodable by the small tokenizer
        kwargs["suppress_tokens"] = list(range(len(processor.tokenizer), vocab))
    backend.chat(image, [], "Warm up.", **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # first-call overheads

    start = time.perf_counter()
    answer = backend.chat(image, [], QUESTION, **kwargs)
    t_answer = time.perf_counter() - start
    with PeakRSS() as capture_mem:
        start = time.perf_counter()
        attention = backend.attend(image, [], QUESTION, answer)
        t_capture = time.perf_counter() - start
    result_mb = (sum(m.numel() for m in attention.maps) + attention.hidden_states.numel()) * 4 / 2**20
    tokens = len(attention.token_ids)
    del attention
    step = tokens // PHRASES
    spans = [(i * step, i * step + 3) for i in range(PHRASES)] + [(0, tokens)]
    with PeakRSS() as grounding_mem:
        attention = backend.attend(image, [], QUESTION, answer, spans=spans)
    grounding_result_mb = (sum(m.numel() for m in attention.maps) + attention.hidden_states.numel()) * 4 / 2**20
    del attention

    prompt = backend.build_prompt(image, [], QUESTION)
    ids = torch.cat([prompt.input_ids, torch.tensor([backend._last_generation.ids])], dim=1)
    model.set_attn_implementation("eager")
    with torch.inference_mode(), PeakRSS() as baseline_mem:
        start = time.perf_counter()
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=prompt.inputs["pixel_values"],
            output_attentions=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        t_baseline = time.perf_counter() - start
    del out
    return {
        "model": name,
        "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
        "seq": ids.shape[1],
        "answer tokens": tokens,
        "answer (s)": t_answer,
        "answer + capture (s)": t_answer + t_capture,
        "ratio": (t_answer + t_capture) / t_answer,
        "baseline forward (s)": t_baseline,
        "capture peak extra (MB)": capture_mem.extra_mb,
        "of which result (MB)": result_mb,
        "baseline peak extra (MB)": baseline_mem.extra_mb,
        "capture / baseline memory": capture_mem.extra_mb / baseline_mem.extra_mb,
        "grounding capture peak extra (MB)": grounding_mem.extra_mb,
        "of which its result (MB)": grounding_result_mb,
        "grounding capture / baseline memory": grounding_mem.extra_mb / baseline_mem.extra_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Reproduce: `{COMMAND}` (threads={args.threads}, CPU; shared machine, timings are noisy)\n")
    rows = [measure("tiny (test model)", *tiny_llava())]
    if not args.skip_large:
        rows.append(measure("LLaVA-shaped random", *llava_shaped()))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
