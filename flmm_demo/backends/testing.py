"""Tiny random LMMs and offline processors, for tests and benchmarks (no downloads).

Each builder returns (model, processor) for one family, built from configs with a
few-hundred-token BPE tokenizer trained on the spot (SentencePiece-style spaces, BOS
prepended), so chat templates, offsets and decoding behave like the real ones.

    model, processor = tiny_llava()
    backend = LlavaBackend(model, processor)

Other families (qwen2_vl, idefics3) can reuse `tiny_tokenizer`.
"""
from __future__ import annotations

import string
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

_CORPUS = [
    "a cat sits on the red mat near a dog and a small bird",
    "the quick brown fox jumps over the lazy dog in the green park",
    "what is in the picture? there is a man riding a horse on the beach.",
    "USER: ASSISTANT: User: Assistant: [INST] [/INST] Please give me a description of the image.",
    "Describe the image. Where is the cat? The cat is in the top left corner of the image.",
]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %}{{ ' ' + c['text'] + '</s>' }}{% endfor %}"
    "{% endif %}{% endfor %}"
)
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ 'You are a helpful assistant.\n\n' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image_placeholder>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{{ '\n\n' }}"
    "{% else %}{{ 'Assistant:' }}{% for c in message['content'] if c['type'] == 'text' %}{{ ' ' + c['text'] }}"
    "{% endfor %}{{ '</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@lru_cache(maxsize=4)
def _trained_bpe(image_token: str, vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", image_token],
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok.to_str()


def tiny_tokenizer(image_token: str = "<image>", vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A small Llama-like fast tokenizer: BOS added, `image_token` special, offsets available."""
    tok = Tokenizer.from_str(_trained_bpe(image_token, vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": image_token},
    )


def _llama(vocab: int, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )


def _clip(image_size: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch
    )


def tiny_llava(seed: int = 0, image_size: int = 48, patch: int = 8) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5-shaped: CLIP (CLS dropped, (image_size/patch)^2 tokens) + Llama with GQA."""
    tokenizer = tiny_tokenizer("<image>")
    config = LlavaConfig(
        vision_config=_clip(image_size, patch),
        text_config=LlamaConfig(**_llama(len(tokenizer))),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_pad=False
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_llava_next(seed: int = 0, tile: int = 32, patch: int = 8) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """LLaVA-NeXT-shaped: anyres tiles of `tile` px ((tile/patch)^2 tokens each) + Mistral with GQA."""
    tokenizer = tiny_tokenizer("<image>")
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    config = LlavaNextConfig(
        vision_config=_clip(tile, patch),
        text_config=MistralConfig(**_llama(len(tokenizer)), sliding_window=None),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        vision_feature_select_strategy="default",
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_deepseek_vl(seed: int = 0, image_size: int = 32, patch: int = 8) -> tuple[DeepseekVLForConditionalGeneration, DeepseekVLProcessor]:
    """DeepSeek-VL-shaped: SigLIP grid ((image_size/patch)^2 tokens) + Llama (MHA, like the 1.3B)."""
    tokenizer = tiny_tokenizer("<image_placeholder>")
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch
    )
    config = DeepseekVLConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_llama(len(tokenizer), kv_heads=4)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
    )
    torch.manual_seed(seed)
    model = DeepseekVLForConditionalGeneration(config).eval()
    image_processor = DeepseekVLImageProcessor(size={"height": image_size, "width": image_size})
    processor = DeepseekVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch) ** 2,
        chat_template=DEEPSEEK_CHAT_TEMPLATE,
    )
    return model, processor


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
]


def byte_tokenizer(specials: list[str], eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per byte) plus special tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, additional_special_tokens=specials)


def qwen_tokens() -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """The byte tokenizer with Qwen's chat and vision special tokens, and the config ids they take."""
    tokenizer = byte_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(QWEN_SPECIALS)))
    config_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return tokenizer, config_ids | {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }


def tiny_qwen3_vl(seed: int = 0, max_tokens: int = 20):
    """Qwen3-VL-shaped: 16 px patches merged 2x2 (32 px per LLM token, as the released
    2B/4B/8B), DeepStack features into the first decoder layers, Qwen3 decoder (q/k norms,
    GQA) with interleaved M-RoPE; at most `max_tokens` image tokens per image."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = qwen_tokens()
    special = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    tokens = {k: v for k, v in ids.items() if k not in special}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                         "rope_theta": 5000000.0},
    ) | special
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Qwen3-VL's published preprocessing: patch 16, merge 2, mean = std = 0.5.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        min_pixels=32 * 32 * 4, max_pixels=32 * 32 * max_tokens,
    )
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor
