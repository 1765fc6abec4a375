"""Named models and where their weights live (`python -m flmm_demo doctor` reports them).

A preset names a frozen LMM (Hugging Face id), the folder under checkpoints/ it may be
copied to, the official F-LMM head trained for it (if one was released) and the SAM
checkpoint its refiner uses. `resolve_preset` finds the weights without downloading:

1. a folder given directly (any path with a config.json);
2. checkpoints/<local_dir>/ (checkpoints/ can be moved with FLMM_CHECKPOINTS);
3. the Hugging Face cache, read offline;
4. for a hub id that is not a preset, the id itself, for transformers to download on
   first use — only when downloads are allowed, i.e. neither HF_HUB_OFFLINE nor
   TRANSFORMERS_OFFLINE is set to a true value.

A preset is never fetched on load: a preset whose LMM is not on this machine raises
MissingWeightsError at once (online or offline), naming every missing piece, where it
looked, and the one command that fetches them (`python -m flmm_demo download NAME`,
flmm_demo/download.py). F-LMM heads and SAM checkpoints are single files directly in
checkpoints/ (the bundled demo model keeps its LMM and head in checkpoints/demo-shapes/
lmm/ and head/). A missing head or SAM is not an error at resolve time (the training-free
path still works); `missing_pieces` lists them and `require_weights` (used by
`Grounder.from_preset`) refuses a preset that lacks any of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from flmm_demo.backends import model_type_of
from flmm_demo.heads.sam import SAM_CHECKPOINT_NAMES

DEFAULT_PRESET = "demo-shapes"

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# The demo world's own small SAM (flmm_demo/demo_world/sam.py), shipped in the repository.
DEMO_SAM = f"demo-shapes/{SAM_CHECKPOINT_NAMES['vit_tiny']}"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf")
_TRUE = {"1", "on", "yes", "true"}


class MissingWeightsError(FileNotFoundError):
    """Weights a preset needs are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class MissingPiece:
    """One weight file or folder a preset needs and this machine lacks.

    what: "LMM", "F-LMM head" or "SAM vit_l" (...). where: where it was looked for.
    """

    what: str
    where: str


@dataclass(frozen=True)
class Preset:
    """One supported model.

    family: the backend that drives it ("llava", "llava_next", "deepseek_vl",
        "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm").
    hub_id: Hugging Face id of the LMM, None for a model that only exists locally.
    local_dir: folder under checkpoints/ holding a copy of the LMM.
    flmm_head: path under checkpoints/ of the F-LMM head for this LMM: an official .pth
        file, or a folder written by FlmmHead.save_pretrained; None where none was
        released (the training-free path is used).
    flmm_head_drive_id: Google Drive id of that file in F-LMM's release.
    sam: SAM checkpoint file name under checkpoints/ for the refiner, None for no SAM.
    how_to_get: instructions that replace the generated download command, if any.
    """

    name: str
    family: str
    hub_id: str | None
    local_dir: str
    description: str
    flmm_head: str | None = None
    flmm_head_drive_id: str | None = None
    sam: str | None = SAM_CHECKPOINT_NAMES["vit_l"]
    how_to_get: str | None = None

    @property
    def flmm_head_url(self) -> str | None:
        """Where the official head is published, None if there is none."""
        if self.flmm_head_drive_id is None:
            return None
        return f"https://drive.google.com/file/d/{self.flmm_head_drive_id}/view"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="demo-shapes",
            family="llava",
            hub_id=None,
            local_dir="demo-shapes/lmm",
            description="Bundled tiny LLaVA trained on synthetic coloured shapes, with its F-LMM head "
            "and a small SAM of its own; runs on a CPU.",
            flmm_head="demo-shapes/head",
            sam=DEMO_SAM,
            how_to_get=(
                "It ships with the repository in checkpoints/demo-shapes/ (lmm/, head/ and "
                "sam_vit_tiny.safetensors): restore it from git (`git checkout -- checkpoints/demo-shapes`), "
                "or rebuild it with `python -m flmm_demo.demo_world rebuild` as the README describes."
            ),
        ),
        Preset(
            name="deepseek-vl-1.3b",
            family="deepseek_vl",
            hub_id="deepseek-community/deepseek-vl-1.3b-chat",
            local_dir="deepseek-vl-1.3b-chat",
            description="DeepSeek-VL 1.3B chat with F-LMM's official head (24 layers x 16 heads).",
            flmm_head="frozen_deepseek_vl_1_3b_chat_unet_sam_l_refcoco_png.pth",
            flmm_head_drive_id="1UXcjJrrpTm1bNphvPNjvol9gUfvzNbjA",
        ),
        Preset(
            name="llava-1.5-7b",
            family="llava",
            hub_id="llava-hf/llava-1.5-7b-hf",
            local_dir="llava-1.5-7b-hf",
            description="LLaVA-1.5 7B (Vicuna) with F-LMM's official head (32 layers x 32 heads).",
            flmm_head="frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth",
            flmm_head_drive_id="1opjFe15B5L5JJ78gE_FsXvDnwSlwSHhh",
        ),
        Preset(
            name="llava-next-vicuna-7b",
            family="llava_next",
            hub_id="llava-hf/llava-v1.6-vicuna-7b-hf",
            local_dir="llava-v1.6-vicuna-7b-hf",
            description="LLaVA-NeXT (1.6) Vicuna 7B with F-LMM's official head.",
            flmm_head="frozen_llava_next_vicuna_7b_unet_sam_l_refcoco_png.pth",
            flmm_head_drive_id="1N-olLqhZdPEySt8Asu2cvLJBaL1VHTqa",
        ),
        Preset(
            name="llava-next-mistral-7b",
            family="llava_next",
            hub_id="llava-hf/llava-v1.6-mistral-7b-hf",
            local_dir="llava-v1.6-mistral-7b-hf",
            description="LLaVA-NeXT (1.6) Mistral 7B with F-LMM's official head.",
            flmm_head="frozen_llava_next_mistral_7b_unet_sam_l_refcoco_png.pth",
            flmm_head_drive_id="13rHaEZ62Q-VX5iKhOQnlm4yH1TMOBalH",
        ),
        Preset(
            name="qwen2.5-vl-3b",
            family="qwen2_5_vl",
            hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
            local_dir="Qwen2.5-VL-3B-Instruct",
            description="Qwen2.5-VL 3B Instruct; no F-LMM head released, training-free grounding.",
        ),
        *(
            Preset(
                name=f"qwen3-vl-{size.lower()}",
                family="qwen3_vl",
                hub_id=f"Qwen/Qwen3-VL-{size}-Instruct",
                local_dir=f"Qwen3-VL-{size}-Instruct",
                description=f"Qwen3-VL {size} Instruct; no F-LMM head released, training-free grounding.",
            )
            for size in ("2B", "4B", "8B")
        ),
        Preset(
            name="qwen2-vl-2b",
            family="qwen2_vl",
            hub_id="Qwen/Qwen2-VL-2B-Instruct",
            local_dir="Qwen2-VL-2B-Instruct",
            description="Qwen2-VL 2B Instruct; no F-LMM head released, training-free grounding.",
        ),
        Preset(
            name="smolvlm-256m",
            family="smolvlm",
            hub_id="HuggingFaceTB/SmolVLM-256M-Instruct",
            local_dir="SmolVLM-256M-Instruct",
            description="SmolVLM 256M Instruct, small enough for a CPU; training-free grounding.",
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights are on this machine.

    model_path: what to hand to `from_pretrained`: a local folder (for "hf-cache" the
        cached snapshot folder, so loading needs no network), or the hub id when source
        is "hub" (transformers downloads it).
    source: "folder" (given directly), "checkpoints", "hf-cache" or "hub".
    head_path / sam_path: the F-LMM head and SAM checkpoint files, None when absent
        (or not used by this preset).
    """

    name: str
    preset: Preset | None
    family: str | None
    model_path: str
    source: str
    head_path: Path | None
    sam_path: Path | None

    @property
    def where(self) -> str:
        """One line for logs and the UI: where the LMM comes from."""
        if self.source == "hub":
            return f"will download from hub {self.model_path}"
        if self.source == "hf-cache":
            return f"Hugging Face cache: {self.model_path}"
        return self.model_path

    @property
    def description(self) -> str:
        """The preset's one-line description, or what the folder / hub id is."""
        if self.preset is not None:
            return self.preset.description
        return f"{self.family or 'unknown'} model from {self.where}"

    @property
    def is_demo(self) -> bool:
        """True for the bundled toy model (synthetic shapes, not real photos)."""
        return self.preset is not None and self.preset.name == DEFAULT_PRESET

    def require_head(self) -> Path:
        """The F-LMM head file; MissingWeightsError if this preset has none or it is absent."""
        if self.head_path is not None:
            return self.head_path
        preset = self.preset
        if preset is None or preset.flmm_head is None:
            raise MissingWeightsError(
                f"No official F-LMM head exists for {self.name!r}; use the training-free "
                "grounding, or train a head for it."
            )
        raise MissingWeightsError(_head_message(preset))

    def require_sam(self) -> Path:
        """The SAM checkpoint file; MissingWeightsError with the download command if absent."""
        if self.sam_path is not None:
            return self.sam_path
        sam = self.preset.sam if self.preset is not None else None
        if sam is None:
            raise MissingWeightsError(f"{self.name!r} does not use a SAM refiner.")
        raise MissingWeightsError(_sam_message(sam))


def checkpoints_dir() -> Path:
    """checkpoints/ of this repository, or the folder named by FLMM_CHECKPOINTS."""
    override = os.environ.get("FLMM_CHECKPOINTS")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "checkpoints"


def default_preset_name() -> str:
    """FLMM_PRESET if set, else the bundled demo model."""
    return os.environ.get("FLMM_PRESET") or DEFAULT_PRESET


def downloads_allowed() -> bool:
    """True unless HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return not any(flag in _TRUE for flag in flags)


def sam_checkpoint(name: str = SAM_CHECKPOINT_NAMES["vit_l"]) -> Path | None:
    """Path of a SAM checkpoint in checkpoints/ (file name or "vit_b"/"vit_l"/"vit_h"), None if absent."""
    path = checkpoints_dir() / SAM_CHECKPOINT_NAMES.get(name, name)
    return path if path.is_file() else None


def download_command(name: str) -> str:
    """The one command that fetches every missing piece of a preset."""
    return f"python -m flmm_demo download {name}"


def missing_pieces(preset: Preset | str) -> list[MissingPiece]:
    """Every weight `preset` needs that is not on this machine (LMM, F-LMM head, SAM).

    Looks only at local files (checkpoints/ and the Hugging Face cache): no network call.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    ckpt = checkpoints_dir()
    missing = []
    local = ckpt / preset.local_dir
    if not _complete(local) and (preset.hub_id is None or _cached_snapshot(preset.hub_id) is None):
        where = f"{local}/ ({_why_not(local)})"
        if preset.hub_id is not None:
            where += f" and the Hugging Face cache {_hf_cache_dir()} (no complete snapshot)"
        missing.append(MissingPiece(f"LMM {preset.hub_id or preset.local_dir}", where))
    if preset.flmm_head is not None and not head_present(ckpt / preset.flmm_head):
        missing.append(MissingPiece("F-LMM head", str(ckpt / preset.flmm_head)))
    if preset.sam is not None and sam_checkpoint(preset.sam) is None:
        kind = next((k for k, f in SAM_CHECKPOINT_NAMES.items() if f == Path(preset.sam).name), "")
        missing.append(MissingPiece(f"SAM {kind}", str(ckpt / preset.sam)))
    return missing


def missing_message(preset: Preset, missing: list[MissingPiece]) -> str:
    """One message for all the missing pieces: what, where it looked, the command that fetches them."""
    lines = [f"Preset {preset.name!r} cannot load: {len(missing)} piece(s) missing."]
    lines += [f"  - {piece.what}: looked in {piece.where}" for piece in missing]
    if preset.how_to_get:
        lines.append(preset.how_to_get)
        return "\n".join(lines)
    lines += ["Fetch them with:", f"  {download_command(preset.name)}"]
    if not downloads_allowed():
        lines.append(
            "(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set: run it where there is internet, with those "
            "unset, and copy checkpoints/ and the Hugging Face cache over.)"
        )
    return "\n".join(lines)


def require_weights(name_or_path: str | Path | None = None) -> ResolvedModel:
    """`resolve_preset`, then, for a preset, MissingWeightsError naming every missing piece."""
    resolved = resolve_preset(name_or_path)
    if resolved.preset is not None:
        missing = missing_pieces(resolved.preset)
        if missing:
            raise MissingWeightsError(missing_message(resolved.preset, missing))
    return resolved


def resolve_preset(name_or_path: str | Path | None = None) -> ResolvedModel:
    """Find the weights of a preset, a hub id or a local model folder, never downloading.

    name_or_path: a preset name, a Hugging Face id, a folder with a config.json, or None
        for `default_preset_name()`. Raises MissingWeightsError (what, where looked, how to
        get it) or ValueError for a name that is none of these.
    """
    if name_or_path is None:
        name_or_path = default_preset_name()
    text = str(name_or_path)
    folder = Path(text).expanduser()
    if text not in PRESETS and folder.is_dir():
        return _resolve_folder(folder)
    preset = PRESETS.get(text) or next((p for p in PRESETS.values() if p.hub_id == text), None)
    if preset is not None:
        return _resolve(preset)
    if _looks_like_hub_id(text):
        return _resolve_hub_id(text)
    if os.sep in text or text.startswith((".", "~")):
        raise MissingWeightsError(
            f"model folder {folder} does not exist; give the folder that holds config.json"
        )
    hint = " (from FLMM_PRESET)" if text == os.environ.get("FLMM_PRESET") else ""
    raise ValueError(
        f"{text!r}{hint} is not a preset, a Hugging Face id or a model folder; "
        f"known presets: {', '.join(PRESETS)}"
    )


def _resolve(preset: Preset) -> ResolvedModel:
    local = checkpoints_dir() / preset.local_dir
    if _complete(local):
        return _resolved(preset, str(local), "checkpoints")
    if preset.hub_id is not None:
        snapshot = _cached_snapshot(preset.hub_id)
        if snapshot is not None:
            return _resolved(preset, str(snapshot), "hf-cache")
    raise MissingWeightsError(missing_message(preset, missing_pieces(preset)))


def _resolved(preset: Preset, model_path: str, source: str) -> ResolvedModel:
    head = checkpoints_dir() / preset.flmm_head if preset.flmm_head else None
    return ResolvedModel(
        name=preset.name,
        preset=preset,
        family=preset.family,
        model_path=model_path,
        source=source,
        head_path=head if head is not None and head_present(head) else None,
        sam_path=sam_checkpoint(preset.sam) if preset.sam else None,
    )


def _resolve_folder(folder: Path) -> ResolvedModel:
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"{folder} has no config.json, so it is not a model folder; give the folder that "
            "`save_pretrained` / `hf download --local-dir` wrote"
        )
    ckpt = checkpoints_dir().resolve()
    for preset in PRESETS.values():
        if (ckpt / preset.local_dir).resolve() == folder.resolve():
            return _resolved(preset, str(folder), "folder")
    return ResolvedModel(
        name=str(folder),
        preset=None,
        family=_model_type(folder),
        model_path=str(folder),
        source="folder",
        head_path=None,
        sam_path=sam_checkpoint(),
    )


def _resolve_hub_id(hub_id: str) -> ResolvedModel:
    snapshot = _cached_snapshot(hub_id)
    if snapshot is None and not downloads_allowed():
        local = checkpoints_dir() / hub_id.split("/")[-1]
        raise MissingWeightsError(
            f"{hub_id} is not in the Hugging Face cache {_hf_cache_dir()} and downloads are off "
            f"(HF_HUB_OFFLINE is set). On a machine with internet run:\n"
            f"  {download_command(hub_id)}\n(it fills the Hugging Face cache), or "
            f"`hf download {hub_id} --local-dir {local}` and pass {local} as the model."
        )
    return ResolvedModel(
        name=hub_id,
        preset=None,
        family=_model_type(snapshot) if snapshot else None,
        model_path=str(snapshot) if snapshot else hub_id,
        source="hf-cache" if snapshot else "hub",
        head_path=None,
        sam_path=sam_checkpoint(),
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~", "/"))


def head_present(path: Path) -> bool:
    """An official head file, or a save_pretrained folder (config.json + weights)."""
    return path.is_file() or _complete(path)


def _has_weights(folder: Path) -> bool:
    """Weight files, and every shard a *.index.json lists (an interrupted download is incomplete)."""
    return _shards_missing(folder) == [] and any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir())


def _shards_missing(folder: Path) -> list[str]:
    import json

    missing = []
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return [index.name]
        missing += sorted(s for s in shards if not (folder / s).is_file())
    return missing


def _complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and _has_weights(folder)


def _why_not(folder: Path) -> str:
    if not folder.is_dir():
        return "no such folder"
    if not (folder / "config.json").is_file():
        return "no config.json"
    if _shards_missing(folder):
        return f"incomplete: {', '.join(_shards_missing(folder)[:3])} missing"
    if not _has_weights(folder):
        return "no weight files"
    return "ok"


def _hf_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")
    return Path(home).expanduser() / "hub"


def _cached_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot folder of `hub_id` if it has a config and weights (no network)."""
    config = try_to_load_from_cache(hub_id, "config.json", cache_dir=_hf_cache_dir())
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    return snapshot if _has_weights(snapshot) else None


def _model_type(folder: Path) -> str | None:
    """The folder's config.json `model_type`, or None where it cannot be read (shown, never needed here)."""
    try:
        return model_type_of(str(folder))
    except (OSError, ValueError):
        return None


def _head_message(preset: Preset) -> str:
    path = checkpoints_dir() / preset.flmm_head
    if preset.how_to_get:
        return f"The F-LMM head of {preset.name!r} is missing: {path}\n{preset.how_to_get}"
    return (
        f"The F-LMM head of {preset.name!r} is missing: {path}\n"
        f"Download {preset.flmm_head} from {preset.flmm_head_url} (F-LMM's release) and put it "
        f"there, e.g. `pip install gdown && gdown {preset.flmm_head_drive_id} -O {path}`."
    )


def _sam_message(sam: str) -> str:
    path = checkpoints_dir() / sam
    if sam == DEMO_SAM:
        return (
            f"The demo model's SAM is missing: {path}\n"
            "It ships with the repository: restore it with `git checkout -- checkpoints/demo-shapes`, "
            "or train it with `python -m flmm_demo.demo_world train-sam` (see docs/demo_world_results.md)."
        )
    return (
        f"The SAM checkpoint is missing: {path}\n"
        f"Download it with `curl -L -o {path} {SAM_URL}{sam}` "
        f"(or `python -c \"import urllib.request as u; u.urlretrieve('{SAM_URL}{sam}', '{path}')\"`)."
    )
