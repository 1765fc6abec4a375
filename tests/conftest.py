"""Test environment and the fixtures several test files share.

Everything runs on the CPU without the Hugging Face hub: the models are the tiny random
ones of `flmm_demo.backends.testing` or the bundled demo, loaded from folders. (The
offline switches are not set here: tests of the download messages set them per test.)
Expensive objects (the tiny backends of every family, the demo model, a saved tiny
LLaVA folder) are built once per test session.
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the Rust tokenizers
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from flmm_demo.backends import testing  # noqa: E402
from flmm_demo.backends.base import Backend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "checkpoints" / "demo-shapes"

# family -> (builder of (model, processor), Backend class "module:Class")
FAMILY_BUILDERS: dict[str, Callable[[], tuple]] = {
    "llava": testing.tiny_llava,
    "llava_next": testing.tiny_llava_next,
    "deepseek_vl": testing.tiny_deepseek_vl,
    "qwen2_vl": lambda: testing.tiny_qwen2_vl("qwen2_vl"),
    "qwen2_5_vl": lambda: testing.tiny_qwen2_vl("qwen2_5_vl"),
    "idefics3": lambda: testing.tiny_idefics3(),
    "smolvlm": lambda: testing.tiny_idefics3(smolvlm=True),
    "qwen3_vl": testing.tiny_qwen3_vl,
}


@pytest.fixture
def ckpt(tmp_path, monkeypatch) -> Path:
    """An empty checkpoints/ folder and Hugging Face cache, downloads off, no preset chosen."""
    monkeypatch.setenv("FLMM_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FLMM_PRESET", raising=False)
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints"


@pytest.fixture(scope="session")
def family_backend() -> Callable[[str], Backend]:
    """family name -> its tiny random Backend, built once per session (do not mutate it)."""
    from flmm_demo.backends import backend_class

    cache: dict[str, Backend] = {}

    def get(family: str) -> Backend:
        if family not in cache:
            model, processor = FAMILY_BUILDERS[family]()
            cache[family] = backend_class(family)(model, processor)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def demo_grounder():
    """The bundled demo model (tiny LLaVA, its F-LMM head and its SAM), loaded once."""
    from flmm_demo.grounder import Grounder

    if not (DEMO_DIR / "lmm" / "model.safetensors").is_file():
        pytest.skip("the bundled demo weights are not in checkpoints/demo-shapes")
    return Grounder.from_preset("demo-shapes")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA saved as a model folder (config.json, weights, tokenizer, processor)."""
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = testing.tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_demo_lmm(tmp_path_factory) -> tuple[Path, dict]:
    """The demo world's LLaVA in its tiny mode, trained once for the session (read only):
    (its folder, the losses train returned)."""
    import torch

    from flmm_demo.demo_world.lmm import LmmTrainConfig, train

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-demo-lmm") / "lmm"
    stats = train(LmmTrainConfig(path, seed=0, tiny=True), log=lambda _: None)
    return path, stats
