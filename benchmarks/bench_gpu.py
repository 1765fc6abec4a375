"""What real-size models cost on a GPU (random weights from published configs, bf16, CUDA).

For LLaVA-1.5-7B and Qwen2.5-VL-7B, built at full size from their published config values
with random weights (nothing is downloaded; the tokenizer is a small stand-in and the
tokens it cannot decode are suppressed), it measures on one image (640x480):

  answer          chat(): prefill + 256 generated tokens (min = max = 256)
  capture         attend() of that answer, every token's rows (research use)
  grounding       attend(spans=...) as Session.ground calls it (6 phrases + the answer)
  memory          peak torch.cuda.max_memory_allocated above the level before the call,
                  for both captures and for the F-LMM-style baseline: one eager forward of
                  prompt + answer with output_attentions=True
and, for the F-LMM head of LLaVA-1.5-7B (32 x 32 channels, hidden 4096) with a SAM ViT-L
refiner: U-Net + refiner decode per phrase (6 phrases together), and the SAM ViT-L / ViT-H
image encoders on one image (the same random weights as the released architectures).

    python benchmarks/bench_gpu.py            # needs CUDA; about 3 minutes on one H100-class GPU
    python benchmarks/bench_gpu.py --tiny     # CPU smoke run of every step on tiny models

Without CUDA (and without --tiny) it exits at once saying so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

COMMAND = "python benchmarks/bench_gpu.py"
QUESTION = "What is in the picture?"
PHRASES = 6


# ------------------------------------------------------------------ models
def llava_1_5_7b(tiny: bool) -> Any:
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config.json values): CLIP ViT-L/14-336 + Vicuna-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaImageProcessor, LlavaProcessor

    from flmm_demo.backends.llava import LlavaBackend
    from flmm_demo.backends.testing import LLAVA_CHAT_TEMPLATE, tiny_llava, tiny_tokenizer

    if tiny:
        return LlavaBackend(*tiny_llava())
    tokenizer = tiny_tokenizer("<image>")
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = _random_model(LlavaBackend.model_class, config)
    image_processor = LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                                          image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default",
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return LlavaBackend(model, processor)


def qwen2_5_vl_7b(tiny: bool) -> Any:
    """Qwen2.5-VL-7B-Instruct (config.json / preprocessor_config.json values)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from flmm_demo.backends.qwen2_vl import Qwen25VLBackend
    from flmm_demo.backends.testing import QWEN_CHAT_TEMPLATE, qwen_tokens

    tokenizer, ids = qwen_tokens()
    special = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    tokens = {k: v for k, v in ids.items() if k not in special}
    if tiny:
        text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    else:
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
        vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
        image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    config = Qwen2_5_VLConfig(text_config=text | special, vision_config=vision, **tokens)
    model = _random_model(Qwen25VLBackend.model_class, config)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen25VLBackend(model, processor)


DEVICE = "cuda"
DTYPE = torch.bfloat16


def _random_model(cls: type, config: Any) -> Any:
    """Random weights built on the target device in the target dtype (no 28 GB detour through the CPU)."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = cls._from_config(config, dtype=DTYPE)
    return model.eval()


# --------------------------------------------------------------- measuring
def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def peak_mb(fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn's result and the peak CUDA memory it allocated above the level at its start (MB); NaN on CPU."""
    if DEVICE != "cuda":
        return fn(), float("nan")
    sync()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fn()
    sync()
    return out, (torch.cuda.max_memory_allocated() - start) / 2**20


def measure_lmm(name: str, backend: Any, new_tokens: int) -> dict[str, Any]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    vocab = backend.model.config.get_text_config().vocab_size
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if vocab > len(backend.tokenizer):  # random logits: keep the answer decodable by the stand-in tokenizer
        kwargs["suppress_tokens"] = list(range(len(backend.tokenizer), vocab))
    backend.chat(image, [], "Warm up.", **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    answer, t_answer = timed(lambda: backend.chat(image, [], QUESTION, **kwargs))
    (full, t_capture) = timed(lambda: backend.attend(image, [], QUESTION, answer))
    tokens = len(full.token_ids)
    del full
    _, capture_mb = peak_mb(lambda: backend.attend(image, [], QUESTION, answer))
    step = max(tokens // PHRASES, 1)
    spans = [(i * step, min(i * step + 3, tokens)) for i in range(PHRASES) if i * step < tokens] + [(0, tokens)]
    _, t_grounding = timed(lambda: backend.attend(image, [], QUESTION, answer, spans=spans))
    _, grounding_mb = peak_mb(lambda: backend.attend(image, [], QUESTION, answer, spans=spans))

    prompt = backend.build_prompt(image, [], QUESTION)
    ids = torch.cat([prompt.input_ids, torch.tensor([backend._last_generation.ids], device=prompt.input_ids.device)], 1)
    extra = {k: v for k, v in prompt.inputs.items() if k not in ("input_ids", "attention_mask")}
    length = prompt.input_ids.shape[1]
    for key, value in extra.items():  # per-token inputs (Qwen's mm_token_type_ids): the answer is text, 0
        if value.dim() == 2 and value.shape == (1, length):
            extra[key] = torch.cat([value, value.new_zeros(1, ids.shape[1] - length)], 1)
    backend.model.set_attn_implementation("eager")
    try:
        def baseline() -> Any:
            with torch.no_grad():
                return backend.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                                     logits_to_keep=1, **extra)
        _, baseline_mb = peak_mb(baseline)
    finally:
        from flmm_demo.backends.capture import install_capture

        install_capture(backend.model, backend.text_config_key)
    return {
        "model": name, "seq": ids.shape[1], "answer tokens": tokens,
        "answer (s)": t_answer, "capture / answer": t_capture / t_answer, "grounding capture / answer": t_grounding / t_answer,
        "capture peak (MB)": capture_mb, "grounding capture peak (MB)": grounding_mb,
        "output_attentions baseline peak (MB)": baseline_mb,
        "capture / baseline": capture_mb / baseline_mb, "grounding / baseline": grounding_mb / baseline_mb,
    }


def measure_head_and_sam(tiny: bool) -> list[dict[str, Any]]:
    from flmm_demo.heads import FlmmHead, FlmmHeadConfig, SamImageEncoderCache
    from flmm_demo.heads.sam import build_sam_model
    from flmm_demo.types import ImageView

    layers, heads, hidden = (2, 4, 32) if tiny else (32, 32, 4096)
    variant = "vit_tiny" if tiny else "vit_l"
    torch.manual_seed(0)
    head = FlmmHead(FlmmHeadConfig(num_layers=layers, num_heads=heads, hidden_size=hidden, sam_variant=variant))
    head = head.to(DEVICE).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    rows = []
    encoders = ["vit_tiny"] if tiny else ["vit_l", "vit_h"]
    embedding = None
    for kind in encoders:
        encoder = SamImageEncoderCache(build_sam_model(kind, None).image_encoder.to(DEVICE))
        encoder.encode(image)  # warm-up
        out, seconds = timed(lambda: encoder.encode(image))
        rows.append({"step": f"SAM {kind} image encoding", "seconds": seconds})
        if kind == variant:
            embedding = out
        encoder.close()
        del encoder
    grid = (24, 24)
    side = 640
    view = ImageView("image", grid, (0.0, -80.0, float(side), float(side - 80)))  # LLaVA's padded square
    maps = [torch.rand(layers * heads, *grid, device=DEVICE).softmax(0) for _ in range(PHRASES)]
    hidden_states = [torch.randn(layers, 3, hidden, device=DEVICE) for _ in range(PHRASES)]

    def decode() -> Any:
        with torch.no_grad():
            return head.predict_phrases(maps, hidden_states, view, (640, 480), sam_embedding=embedding)

    decode()
    _, seconds = timed(decode)
    rows.append({"step": f"F-LMM head + SAM {variant} refiner, per phrase ({PHRASES} together)", "seconds": seconds / PHRASES})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global DEVICE, DTYPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of every step on tiny models (float32)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--skip", nargs="*", default=[], choices=["llava", "qwen", "head"], help="parts to leave out")
    args = parser.parse_args(argv)
    if args.tiny:
        DEVICE, DTYPE = "cpu", torch.float32
        new_tokens = min(args.new_tokens, 16)
    elif not torch.cuda.is_available():
        print("bench_gpu.py measures on a CUDA GPU and none is visible to torch "
              f"{torch.__version__}; run it on a GPU machine, or `{COMMAND} --tiny` for a CPU smoke run.",
              file=sys.stderr)
        return 2
    else:
        new_tokens = args.new_tokens
    where = "CPU smoke run, tiny models, float32" if args.tiny else f"{torch.cuda.get_device_name(0)}, bf16"
    print(f"Reproduce: `{COMMAND}{' --tiny' if args.tiny else ''}` ({where}; random weights)\n")
    lmm_rows = []
    if "llava" not in args.skip:
        lmm_rows.append(measure_lmm("LLaVA-1.5-7B" if not args.tiny else "tiny llava", llava_1_5_7b(args.tiny), new_tokens))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if "qwen" not in args.skip:
        lmm_rows.append(measure_lmm("Qwen2.5-VL-7B" if not args.tiny else "tiny qwen2.5-vl", qwen2_5_vl_7b(args.tiny),
                                    new_tokens))
    if lmm_rows:
        print(table(lmm_rows) + "\n")
    if "head" not in args.skip:
        print(table(measure_head_and_sam(args.tiny)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
