"""Loading for real GPUs: device / dtype / quantize / offload options, the capture staying
exact in bf16 and under device_map="auto", and missing weights answered at once in the
Grounder, the CLI and the app."""
from __future__ import annotations

import copy
import importlib.util
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_demo.backends import load_backend
from flmm_demo.backends.llava import LlavaBackend
from flmm_demo.backends.testing import tiny_llava
from flmm_demo.cli import main
from flmm_demo.devices import LoadOptions, pick_device, pick_dtype, quantization_config
from flmm_demo.grounder import Grounder
from flmm_demo.presets import MissingWeightsError

ANSWER = "The cat is on the red mat."


def _image(width=90, height=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _eager_rows(backend, reference, image, token_ids):
    """(T, L*H, rows, cols) of the single view from a full eager forward (output_attentions)."""
    prompt = backend.build_prompt(image, [], "What is in the picture?", "chat")
    ids = torch.cat([prompt.input_ids, torch.tensor([token_ids])], dim=1)
    extra = {k: v for k, v in prompt.inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **extra)
    start, count = prompt.input_ids.shape[1], len(token_ids)
    attn = torch.stack(out.attentions, dim=1)[0, :, :, start : start + count]  # (L, H, T, S)
    (view,) = prompt.views
    return attn[..., view.positions].permute(2, 0, 1, 3).reshape(count, -1, *view.grid).float()


# ------------------------------------------------------------------ options
def test_defaults_follow_the_device():
    assert pick_dtype(None, "cuda") == torch.bfloat16 and pick_dtype(None, "cuda:1") == torch.bfloat16
    assert pick_dtype(None, "cpu") == torch.float32 and pick_dtype(None, "mps") == torch.float16
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else pick_device("auto"))
    with pytest.raises(ValueError, match="--dtype int3: choose bf16, fp16 or fp32"):
        pick_dtype("int3", "cpu")
    with pytest.raises(ValueError, match="choose cuda, mps, cpu or auto"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_only_options_say_what_to_do_without_a_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU is visible.*--device cpu"):
        LoadOptions(device="cuda").from_pretrained_kwargs()
    with pytest.raises(ValueError, match="--quantize 4bit needs a CUDA GPU"):
        LoadOptions(device="cpu", quantize="4bit").from_pretrained_kwargs()
    assert LoadOptions(device="cpu").from_pretrained_kwargs() == {"device": "cpu", "dtype": torch.float32}
    assert LoadOptions(device="cpu", offload=True).from_pretrained_kwargs()["device_map"] == "auto"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_quantize_without_bitsandbytes_says_how_to_get_it():
    with pytest.raises(ValueError, match="needs bitsandbytes: pip install bitsandbytes"):
        quantization_config("8bit", "cuda", torch.bfloat16)


# ------------------------------------------------------------ exact capture
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_bf16_capture_equals_eager_attention_in_bf16():
    model, processor = tiny_llava()
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    backend = LlavaBackend(model, processor)
    image = _image()
    result = backend.attend(image, [], "What is in the picture?", ANSWER)
    (got,) = result.maps
    want = _eager_rows(backend, reference, image, result.token_ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # Eager rounds its bf16 softmax output; the capture keeps the float32 softmax of the
    # same bf16 query and key: they agree to bf16's precision (8 bits of mantissa).
    assert (got - want).abs().max() <= 2 ** -8 * want.abs().max() * 2
    assert torch.allclose(got.sum((-2, -1)), want.sum((-2, -1)), rtol=2e-2)


def test_offload_device_map_auto_keeps_the_capture(tiny_dir):
    plain = load_backend(str(tiny_dir), **LoadOptions(device="cpu").from_pretrained_kwargs())
    spread = load_backend(str(tiny_dir), **LoadOptions(device="cpu", offload=True).from_pretrained_kwargs())
    image = _image(40, 90)
    a = plain.attend(image, [], "What is in the picture?", ANSWER)
    b = spread.attend(image, [], "What is in the picture?", ANSWER)
    assert torch.allclose(a.maps[0], b.maps[0], atol=1e-6)
    assert torch.allclose(a.hidden_states, b.hidden_states, atol=1e-5)


# ------------------------------------------------------- missing weights
@pytest.fixture
def empty_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("FLMM_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: still nothing is fetched on load
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints"


def test_grounder_and_cli_name_every_missing_piece_at_once(empty_checkpoints, capsys, tmp_path):
    started = time.monotonic()
    with pytest.raises(MissingWeightsError) as err:
        Grounder.from_preset("llava-next-mistral-7b")
    assert time.monotonic() - started < 2
    message = str(err.value)
    for piece in ("LMM llava-hf/llava-v1.6-mistral-7b-hf", "F-LMM head", "SAM vit_l",
                  "python -m flmm_demo download llava-next-mistral-7b"):
        assert piece in message
    image = tmp_path / "x.png"
    _image().save(image)
    code = main(["ground", str(image), "--question", "What?", "--out", str(tmp_path / "out"),
                 "--model", "llava-next-mistral-7b"])
    assert code == 2
    err_text = capsys.readouterr().err
    assert "Cannot load the model" in err_text and "python -m flmm_demo download llava-next-mistral-7b" in err_text
    assert "Traceback" not in err_text


def test_app_switch_to_a_missing_preset_says_what_to_do_and_stays(monkeypatch, tmp_path):
    from flmm_demo.ui_callbacks import Callbacks
    from flmm_demo.ui_state import ModelPool, SessionRegistry, UIState

    default = Grounder.from_preset("demo-shapes")
    app = Callbacks(ModelPool(default), SessionRegistry(4), tmp_path / "exports", [], session_ttl_s=1800)
    monkeypatch.setenv("FLMM_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    started = time.monotonic()
    out = app.on_preset("llava-1.5-7b", UIState())
    assert time.monotonic() - started < 2
    assert out["preset"] == "demo-shapes"
    status = out["status"]
    assert status.startswith("Stayed on `demo-shapes`")
    assert "F-LMM head" in status and "SAM vit_l" in status and "python -m flmm_demo download llava-1.5-7b" in status
