"""Presets resolve to weights on disk, or fail with one message that says how to get them."""
from __future__ import annotations

import json

import pytest

from flmm_demo.doctor import doctor_report
from flmm_demo.heads.sam import SAM_CHECKPOINT_NAMES
from flmm_demo.presets import PRESETS, MissingWeightsError, default_preset_name, resolve_preset


def _model_folder(folder, model_type="llava"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return folder


def test_preset_in_checkpoints_resolves_with_head_and_sam(ckpt):
    folder = _model_folder(ckpt / "llava-1.5-7b-hf")
    (ckpt / "frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth").write_bytes(b"head")
    (ckpt / "sam_vit_l_0b3195.pth").write_bytes(b"sam")
    model = resolve_preset("llava-1.5-7b")
    assert model.source == "checkpoints" and model.model_path == str(folder)
    assert model.family == "llava" and model.preset is PRESETS["llava-1.5-7b"]
    assert model.require_head().name == "frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth"
    assert model.require_sam() == ckpt / "sam_vit_l_0b3195.pth"
    # The hub id names the same preset.
    assert resolve_preset("llava-hf/llava-1.5-7b-hf").model_path == str(folder)


def test_missing_preset_names_where_it_looked_and_how_to_get_it(ckpt):
    with pytest.raises(MissingWeightsError) as err:
        resolve_preset("qwen2.5-vl-3b")
    message = str(err.value)
    assert str(ckpt / "Qwen2.5-VL-3B-Instruct") in message
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in message
    assert "python -m flmm_demo download qwen2.5-vl-3b" in message
    assert "Hugging Face cache" in message and "no such folder" in message


def test_folder_without_weights_is_not_taken_for_a_model(ckpt):
    (ckpt / "SmolVLM-256M-Instruct").mkdir()
    (ckpt / "SmolVLM-256M-Instruct" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="no weight files"):
        resolve_preset("smolvlm-256m")


def test_hf_cache_is_found_offline(ckpt, tmp_path):
    repo = tmp_path / "hf-cache" / "models--HuggingFaceTB--SmolVLM-256M-Instruct"
    snapshot = _model_folder(repo / "snapshots" / "abc123", "idefics3")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model = resolve_preset("smolvlm-256m")
    # The snapshot folder itself, so from_pretrained never touches the network.
    assert model.source == "hf-cache" and model.model_path == str(snapshot)
    assert model.family == "smolvlm" and "cache" in model.where
    other = _model_folder(tmp_path / "hf-cache" / "models--someone--tiny" / "snapshots" / "f00", "qwen2_vl")
    (other.parent.parent / "refs").mkdir()
    (other.parent.parent / "refs" / "main").write_text("f00")
    model = resolve_preset("someone/tiny")
    assert (model.source, model.model_path, model.family, model.preset) == ("hf-cache", str(other), "qwen2_vl", None)


def test_hub_is_used_only_for_a_hub_id_and_only_when_downloads_are_allowed(ckpt, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    model = resolve_preset("someone/tiny-vlm")
    assert model.source == "hub" and model.where == "will download from hub someone/tiny-vlm"
    # A preset is never fetched on load, online either: the message says to download it.
    with pytest.raises(MissingWeightsError, match="python -m flmm_demo download qwen2-vl-2b"):
        resolve_preset("qwen2-vl-2b")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="python -m flmm_demo download someone/tiny-vlm"):
        resolve_preset("someone/tiny-vlm")


def test_default_preset_and_unknown_names(ckpt, monkeypatch):
    assert default_preset_name() == "demo-shapes"
    with pytest.raises(MissingWeightsError, match="demo-shapes"):
        resolve_preset()  # the bundled model is not in this empty checkpoints dir
    _model_folder(ckpt / "demo-shapes" / "lmm")
    model = resolve_preset()
    assert model.name == "demo-shapes" and model.is_demo and model.head_path is None
    _model_folder(ckpt / "demo-shapes" / "head", "flmm_head")  # FlmmHead.save_pretrained layout
    assert resolve_preset().require_head() == ckpt / "demo-shapes" / "head"
    monkeypatch.setenv("FLMM_PRESET", "llava-next-mistral-7b")
    with pytest.raises(MissingWeightsError, match="llava-hf/llava-v1.6-mistral-7b-hf"):
        resolve_preset()
    monkeypatch.setenv("FLMM_PRESET", "gpt-17")
    with pytest.raises(ValueError, match="FLMM_PRESET.*known presets: demo-shapes"):
        resolve_preset()
    with pytest.raises(MissingWeightsError, match="does not exist"):
        resolve_preset("./no/such/folder")
    with pytest.raises(MissingWeightsError, match="not in the Hugging Face cache"):
        resolve_preset("someone/unknown-model")


def test_a_folder_given_directly(ckpt, tmp_path):
    own = _model_folder(tmp_path / "my-model", "qwen2_vl")
    model = resolve_preset(own)
    assert model.source == "folder" and model.family == "qwen2_vl" and model.preset is None
    with pytest.raises(MissingWeightsError, match="no official F-LMM head|No official F-LMM head"):
        model.require_head()
    assert not model.is_demo and "qwen2_vl" in model.description
    # A preset's own folder keeps the preset's head and family.
    lmm = _model_folder(ckpt / "llava-v1.6-mistral-7b-hf", "llava_next")
    (ckpt / "frozen_llava_next_mistral_7b_unet_sam_l_refcoco_png.pth").write_bytes(b"head")
    model = resolve_preset(lmm)
    assert model.preset is PRESETS["llava-next-mistral-7b"] and model.source == "folder"
    assert model.require_head() == ckpt / "frozen_llava_next_mistral_7b_unet_sam_l_refcoco_png.pth"
    with pytest.raises(MissingWeightsError, match="config.json"):
        resolve_preset(tmp_path)


def test_missing_head_and_sam_say_which_file_goes_where(ckpt):
    _model_folder(ckpt / "deepseek-vl-1.3b-chat", "deepseek_vl")
    model = resolve_preset("deepseek-vl-1.3b")
    with pytest.raises(MissingWeightsError) as err:
        model.require_head()
    assert str(ckpt / "frozen_deepseek_vl_1_3b_chat_unet_sam_l_refcoco_png.pth") in str(err.value)
    assert "drive.google.com" in str(err.value)
    with pytest.raises(MissingWeightsError) as err:
        model.require_sam()
    assert f"curl -L -o {ckpt / 'sam_vit_l_0b3195.pth'} https://dl.fbaipublicfiles.com" in str(err.value)


def test_doctor_lists_every_preset_and_the_environment(ckpt):
    _model_folder(ckpt / "demo-shapes" / "lmm")
    (ckpt / SAM_CHECKPOINT_NAMES["vit_b"]).write_bytes(b"sam")
    report = doctor_report()
    rows = {line.split()[0]: line for line in report.splitlines() if line.split() and line.split()[0] in PRESETS}
    assert set(rows) == set(PRESETS)
    assert "(default)" in rows["demo-shapes"] and "present" in rows["demo-shapes"]
    assert "missing" in rows["llava-1.5-7b"] and str(ckpt / "llava-1.5-7b-hf") in rows["llava-1.5-7b"]
    assert "none released" in rows["qwen2-vl-2b"]
    assert f"SAM vit_b: present: {ckpt / 'sam_vit_b_01ec64.pth'}" in report
    assert "SAM vit_l: missing" in report
    assert "spaCy model: en_core_web_sm" in report and "torch: " in report and "device" in report
