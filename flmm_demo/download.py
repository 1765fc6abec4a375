"""Fetch the weights a preset needs: its LMM, its F-LMM head and its SAM checkpoint.

    python -m flmm_demo download llava-1.5-7b      # what that preset lacks
    python -m flmm_demo download --all-missing     # every preset's missing pieces
    python -m flmm_demo download Qwen/Qwen3-VL-2B-Instruct   # any hub id, into the HF cache

- The LMM comes through huggingface_hub's `snapshot_download` into the Hugging Face
  cache (HF_HOME / HF_HUB_CACHE honoured; its own progress bars; an interrupted download
  resumes), only the files a transformers model needs (LMM_FILES). With HF_HUB_OFFLINE
  set the cache is read and nothing is fetched.
- SAM checkpoints come from segment-anything's download URL (SAM_URL, or $FLMM_SAM_URL).
  The hex suffix of the official file names (sam_vit_l_0b3195.pth) is the start of the
  file's MD5 digest (not SHA-256: that is what the published files hash to), and the file
  is installed only when it matches, the way torch.hub checks a hash prefix.
- F-LMM heads come from Google Drive's direct-download URL (or $FLMM_HEAD_URL, a
  template with {id} and {name}); the file is installed only if it loads as that
  preset's head. When Drive refuses a direct download, the exact link and target path
  are printed instead.

Every file is streamed into `<target>.part` with a tqdm bar and an HTTP Range request
resumes a .part left by an interrupted run; the target appears only when the file is
complete and verified, so a failure never leaves a half-installed file in its place.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from flmm_demo import presets
from flmm_demo.heads.sam import SAM_CHECKPOINT_NAMES
from flmm_demo.presets import SAM_URL, Preset

SAM_URL_ENV = "FLMM_SAM_URL"
HEAD_URL_ENV = "FLMM_HEAD_URL"
DRIVE_DOWNLOAD_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
# What from_pretrained reads: configs, safetensors weights (and their index), tokenizer
# and processor files, chat templates. Not: .bin / .pth duplicates, ONNX, GGUF, READMEs.
LMM_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
# (decoder layers, attention heads, hidden size, token grids read) of the LMM each released
# head was trained on; LLaVA-NeXT heads read the base and the tile grids (FlmmHeadConfig).
HEAD_LMM_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "deepseek-vl-1.3b": (24, 16, 2048, 1),
    "llava-1.5-7b": (32, 32, 4096, 1),
    "llava-next-vicuna-7b": (32, 32, 4096, 2),
    "llava-next-mistral-7b": (32, 32, 4096, 2),
}
CHUNK = 1 << 20
# The released SAMs segment-anything publishes (the demo world's vit_tiny ships in the repository).
OFFICIAL_SAM = {kind: SAM_CHECKPOINT_NAMES[kind] for kind in ("vit_b", "vit_l", "vit_h")}


class DownloadError(RuntimeError):
    """A download failed; the message says why and what to do. Nothing was installed."""


# ------------------------------------------------------------------ one file over HTTP
def fetch_file(
    url: str,
    target: Path,
    *,
    md5_prefix: str | None = None,
    timeout: float = 30.0,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Stream `url` into `target`, resuming `target.part` with an HTTP Range request.

    md5_prefix: hex digits the file's MD5 digest must start with. verify: called on the
    finished .part; it raises (ValueError, OSError...) when the file is not what was
    wanted. timeout: seconds without data before the download counts as stalled.
    On a checksum or verify failure the .part is deleted; on a network failure it is
    kept so the next run resumes. Raises DownloadError; returns `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and done:  # the .part already holds the whole file
            response = None
        else:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}; nothing was installed at {target}.") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise DownloadError(f"{url} did not answer within {timeout:g} s; run the command again later.") from None
        raise DownloadError(f"cannot reach {url} ({reason}); check the connection and run the command again.") from None
    if response is not None:
        with response:
            if done and response.status != 206:  # the server ignored the Range: start over
                done = 0
            total = _content_length(response)
            expected = done + total if total is not None else None
            mode = "ab" if done else "wb"
            try:
                with open(part, mode) as out, tqdm(
                    total=expected, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=target.name, disable=None,
                ) as bar:
                    while chunk := response.read1(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            except (socket.timeout, TimeoutError) as err:
                raise DownloadError(
                    f"the download of {url} stalled (no data for {timeout:g} s) after "
                    f"{_size(part)}; run the same command again to resume from {part}."
                ) from err
            except (OSError, http.client.HTTPException) as err:  # connection reset, IncompleteRead...
                raise DownloadError(
                    f"the download of {url} broke off after {_size(part)} ({err}); "
                    f"run the same command again to resume from {part}."
                ) from err
            if expected is not None and part.stat().st_size < expected:
                raise DownloadError(
                    f"the download of {url} ended early ({_size(part)} of {expected:,} bytes); "
                    f"run the same command again to resume from {part}."
                )
    if md5_prefix is not None:
        digest = _md5(part)
        if not digest.startswith(md5_prefix):
            part.unlink()
            raise DownloadError(
                f"{target.name}: checksum mismatch (MD5 {digest[:12]}..., the official file starts "
                f"with {md5_prefix}); the corrupt download was removed. Run the command again; if "
                f"it fails again, the file at {url} is not the official one."
            )
    if verify is not None:
        try:
            verify(part)
        except Exception as err:  # any failure to load means: not the file we want
            part.unlink()
            raise DownloadError(f"{url} did not give a usable {target.name} ({err}); it was removed.") from err
    os.replace(part, target)
    return target


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> str:
    return f"{path.stat().st_size:,} bytes" if path.is_file() else "0 bytes"


# ---------------------------------------------------------------------- the pieces
def sam_md5_prefix(file_name: str) -> str:
    """The hex suffix of an official SAM file name: sam_vit_l_0b3195.pth -> '0b3195'."""
    return Path(file_name).stem.rsplit("_", 1)[-1]


def download_sam(file_name: str, *, base_url: str | None = None, timeout: float = 30.0) -> Path:
    """An official SAM checkpoint (file name or 'vit_b' / 'vit_l' / 'vit_h') into checkpoints/."""
    file_name = OFFICIAL_SAM.get(file_name, file_name)
    if file_name not in OFFICIAL_SAM.values():
        raise DownloadError(f"{file_name} is not an official SAM checkpoint ({', '.join(OFFICIAL_SAM.values())})")
    base = base_url or os.environ.get(SAM_URL_ENV) or SAM_URL
    url = base.rstrip("/") + "/" + file_name
    return fetch_file(url, presets.checkpoints_dir() / file_name, md5_prefix=sam_md5_prefix(file_name), timeout=timeout)


def verify_head(path: Path, lmm_shape: tuple[int, int, int, int]) -> None:
    """Raise unless `path` loads as an F-LMM head for an LMM of (layers, heads, hidden, grids)."""
    from flmm_demo.heads import load_official_flmm

    layers, heads, hidden, grids = lmm_shape
    load_official_flmm(path, num_layers=layers, num_heads=heads, hidden_size=hidden, input_grids=grids)


def head_url(preset: Preset) -> str:
    template = os.environ.get(HEAD_URL_ENV) or DRIVE_DOWNLOAD_URL
    return template.format(id=preset.flmm_head_drive_id, name=preset.flmm_head)


def download_head(preset: Preset, *, url: str | None = None, lmm_shape: tuple[int, int, int, int] | None = None,
                  timeout: float = 30.0) -> Path:
    """The preset's released F-LMM head into checkpoints/, installed only if it loads as that head.

    lmm_shape: (layers, heads, hidden, grids) of the LMM; default HEAD_LMM_SHAPES[preset.name].
    """
    if preset.flmm_head is None:
        raise DownloadError(f"no F-LMM head was released for {preset.name!r}")
    shape = lmm_shape or HEAD_LMM_SHAPES[preset.name]
    target = presets.checkpoints_dir() / preset.flmm_head
    try:
        return fetch_file(url or head_url(preset), target, timeout=timeout, verify=lambda p: verify_head(p, shape))
    except DownloadError as err:
        raise DownloadError(
            f"{err}\nGet it by hand: open {preset.flmm_head_url}, download {preset.flmm_head} "
            f"and put it at {target} (`pip install gdown && gdown {preset.flmm_head_drive_id} -O {target}` "
            "does the same)."
        ) from None


def download_lmm(hub_id: str) -> Path:
    """The LMM's files from the hub into the Hugging Face cache; its snapshot folder.

    With HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, only the cache is read.
    """
    cache = presets._hf_cache_dir()
    cached = presets._cached_snapshot(hub_id)
    if not presets.downloads_allowed():
        if cached is not None:
            return cached
        raise DownloadError(
            f"{hub_id} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE "
            "is set, so nothing is fetched. Unset it (e.g. `HF_HUB_OFFLINE=0 python -m flmm_demo download ...`) "
            "on a machine with internet."
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            hub_id, allow_patterns=LMM_FILES, cache_dir=cache, endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except Exception as err:  # hub, HTTP and file-system errors alike: say which and what to do
        raise DownloadError(
            f"could not download {hub_id} from the Hugging Face hub into {cache}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\nCheck the connection (and `hf auth login` for a "
            "gated model), then run the command again: finished files are kept."
        ) from None
    folder = Path(folder)
    if not presets._complete(folder):
        raise DownloadError(f"{hub_id}: the download in {folder} has no config.json or weights ({presets._why_not(folder)})")
    return folder


def download_preset(name: str, *, log: Callable[[str], None] = print) -> bool:
    """Fetch every missing piece of a preset (or a hub id); True when all are in place."""
    if name not in presets.PRESETS and presets._looks_like_hub_id(name):
        try:
            log(f"{name}: {download_lmm(name)}")
            return True
        except DownloadError as err:
            log(f"{name}: {err}")
            return False
    missing = presets.missing_pieces(name)  # ValueError for an unknown name
    preset = presets.PRESETS[name]
    if not missing:
        log(f"{name}: everything is present ({_present_summary(preset)})")
        return True
    if preset.how_to_get:
        log(f"{name}: {', '.join(p.what for p in missing)} missing. {preset.how_to_get}")
        return False
    ok = True
    for piece in missing:
        try:
            if piece.what.startswith("LMM"):
                where = download_lmm(preset.hub_id)
            elif piece.what == "F-LMM head":
                where = download_head(preset)
            else:
                where = download_sam(preset.sam)
            log(f"{name}: {piece.what} -> {where}")
        except DownloadError as err:
            ok = False
            log(f"{name}: {piece.what} not installed: {err}")
    return ok


def _present_summary(preset: Preset) -> str:
    resolved = presets.resolve_preset(preset.name)
    parts = [f"LMM {resolved.where}"]
    if resolved.head_path:
        parts.append(f"head {resolved.head_path}")
    if resolved.sam_path:
        parts.append(f"SAM {resolved.sam_path}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="PRESET", help="preset names (or Hugging Face ids)")
    parser.add_argument("--all-missing", action="store_true", help="every preset that lacks a piece")


def run(args: argparse.Namespace) -> int:
    names = list(args.names)
    if args.all_missing:
        names += [p.name for p in presets.PRESETS.values()
                  if p.how_to_get is None and presets.missing_pieces(p) and p.name not in names]
        if not names:
            print("every preset is complete; nothing to download")
            return 0
    if not names:
        print(f"name a preset ({', '.join(presets.PRESETS)}) or pass --all-missing", file=sys.stderr)
        return 2
    try:
        results = [download_preset(name) for name in names]
    except ValueError as err:  # an unknown preset name
        print(err, file=sys.stderr)
        return 2
    return 0 if all(results) else 1
