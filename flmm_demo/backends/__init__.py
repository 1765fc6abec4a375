"""Frozen LMM backends: load one by its checkpoint, then chat / stream_chat / attend.

    backend = load_backend("llava-hf/llava-1.5-7b-hf", device="cuda", dtype=torch.float16)
    answer = backend.chat(image, [], "What is in the image?")
    attention = backend.attend(image, [], "What is in the image?", answer)

`load_backend` reads `model_type` from the checkpoint's config.json and picks the family
class from BACKENDS (name -> "module:Class", imported on first use).
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

from transformers import PretrainedConfig

from flmm_demo.backends.base import Backend, Prompt, ViewTokens

# model_type (config.json) -> "module:Class"; modules are imported only when used.
BACKENDS: dict[str, str] = {
    "llava": "flmm_demo.backends.llava:LlavaBackend",
    "llava_next": "flmm_demo.backends.llava_next:LlavaNextBackend",
    "deepseek_vl": "flmm_demo.backends.deepseek_vl:DeepseekVLBackend",
    "qwen2_vl": "flmm_demo.backends.qwen2_vl:Qwen2VLBackend",
    "qwen2_5_vl": "flmm_demo.backends.qwen2_vl:Qwen25VLBackend",
    "qwen3_vl": "flmm_demo.backends.qwen2_vl:Qwen3VLBackend",
    "idefics3": "flmm_demo.backends.idefics3:Idefics3Backend",
    "smolvlm": "flmm_demo.backends.idefics3:SmolVLMBackend",
}


def backend_class(model_type: str) -> type[Backend]:
    """The Backend subclass registered for a config.json `model_type`."""
    if model_type not in BACKENDS:
        raise ValueError(f"no backend for model_type {model_type!r}; supported: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def model_type_of(path_or_id: str) -> str:
    """`model_type` from a local folder's config.json, or from the cached Hugging Face config."""
    config_file = os.path.join(path_or_id, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
    else:
        config, _ = PretrainedConfig.get_config_dict(path_or_id)
    if "model_type" not in config:
        raise ValueError(f"{path_or_id}: config.json has no model_type; is this a transformers checkpoint?")
    return config["model_type"]


def load_backend(path_or_id: str, **kwargs: Any) -> Backend:
    """Load the right family backend for a checkpoint (kwargs go to from_pretrained: device, dtype)."""
    return backend_class(model_type_of(path_or_id)).from_pretrained(path_or_id, **kwargs)


__all__ = ["BACKENDS", "Backend", "Prompt", "ViewTokens", "backend_class", "load_backend", "model_type_of"]
