"""`python -m flmm_demo download`: SAM and head files over a real local HTTP server (with
Range), the hub path offline against a cache laid out here. Nothing touches the internet."""
from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flmm_demo import download
from flmm_demo.cli import main
from flmm_demo.download import DownloadError, download_head, download_lmm, download_sam, fetch_file
from flmm_demo.heads import FlmmHead, FlmmHeadConfig
from flmm_demo.heads.checkpoint import RENAMES
from flmm_demo.presets import PRESETS, MissingWeightsError, missing_pieces, require_weights

# Contents whose MD5 digests start with the official names' suffixes (found by search once):
# what a real sam_vit_b_01ec64.pth / sam_vit_l_0b3195.pth must satisfy.
SAM_B = bytes(range(256)) * 8192 + b"13448200"
SAM_L = bytes(range(256)) * 8192 + b"42594319"


class _Files(BaseHTTPRequestHandler):
    """Serves server.files with Range support; server.cut / server.stall misbehave on purpose."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if self.headers.get("Range") and not server.ignore_range:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut is not None:  # send part of the body, then drop the connection
            self.wfile.write(body[: server.cut])
            self.wfile.flush()
            self.close_connection = True
            return
        if server.stall is not None:  # send part of the body, then go silent
            self.wfile.write(body[: server.stall])
            self.wfile.flush()
            server.release.wait(10)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.daemon_threads = True
    httpd.files, httpd.ranges, httpd.cut, httpd.stall, httpd.ignore_range = {}, [], None, None, False
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tiny_head_bytes():
    """A released-format head (F-LMM's names, fp16) for an LMM of 2 layers x 2 heads, hidden 32."""
    torch.manual_seed(0)
    head = FlmmHead(FlmmHeadConfig(num_layers=2, num_heads=2, hidden_size=32))
    inverse = {ours: theirs for theirs, ours in RENAMES.items()}
    state = {inverse.get(k, k): v.detach().half() for k, v in head.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _cached_snapshot(cache, hub_id, model_type="llava"):
    """A Hugging Face cache entry as snapshot_download leaves it."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": model_type}))
    (snapshot / "model.safetensors").write_bytes(b"\0" * 8)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


# ---------------------------------------------------------------- files over HTTP
def test_fresh_sam_download_is_verified_and_installed(ckpt, server, monkeypatch):
    server.files["/sam_vit_b_01ec64.pth"] = SAM_B
    monkeypatch.setenv(download.SAM_URL_ENV, server.url)
    path = download_sam("vit_b")
    assert path == ckpt / "sam_vit_b_01ec64.pth" and path.read_bytes() == SAM_B
    assert not (ckpt / "sam_vit_b_01ec64.pth.part").exists()
    assert server.ranges == [None]


def test_interrupted_download_resumes_with_a_range_request(ckpt, server, monkeypatch):
    server.files["/sam_vit_b_01ec64.pth"] = SAM_B
    monkeypatch.setenv(download.SAM_URL_ENV, server.url)
    server.cut = 700_000
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download_sam("vit_b")
    part = ckpt / "sam_vit_b_01ec64.pth.part"
    assert part.stat().st_size == 700_000 and not (ckpt / "sam_vit_b_01ec64.pth").exists()
    server.cut = None
    path = download_sam("vit_b")
    assert path.read_bytes() == SAM_B and not part.exists()
    assert server.ranges[-1] == "bytes=700000-"


def test_checksum_mismatch_removes_the_file(ckpt, server, monkeypatch):
    server.files["/sam_vit_b_01ec64.pth"] = b"not the official checkpoint" * 1000
    monkeypatch.setenv(download.SAM_URL_ENV, server.url)
    with pytest.raises(DownloadError) as err:
        download_sam("vit_b")
    assert "checksum mismatch" in str(err.value) and "01ec64" in str(err.value) and "removed" in str(err.value)
    assert list(ckpt.iterdir()) == []


def test_404_and_stalled_server_install_nothing(ckpt, server, monkeypatch):
    monkeypatch.setenv(download.SAM_URL_ENV, server.url)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_sam("vit_l")
    assert list(ckpt.iterdir()) == []

    server.files["/sam_vit_b_01ec64.pth"] = SAM_B
    server.stall = 300_000
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"stalled \(no data for 0.5 s\)"):
        download_sam("vit_b", timeout=0.5)
    assert time.monotonic() - started < 8
    assert not (ckpt / "sam_vit_b_01ec64.pth").exists()  # only the resumable .part
    assert (ckpt / "sam_vit_b_01ec64.pth.part").stat().st_size == 300_000


def test_fetch_file_restarts_when_the_part_is_complete_or_the_range_is_ignored(tmp_path, server):
    import hashlib

    data = b"0123456789" * 1000
    server.files["/f.bin"] = data
    target = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data)  # a finished .part: the server answers 416
    fetch_file(f"{server.url}/f.bin", target, md5_prefix=hashlib.md5(data).hexdigest()[:6])
    assert target.read_bytes() == data
    target.unlink()
    (tmp_path / "f.bin.part").write_bytes(data[:1234])  # a server without Range support sends it all again
    server.ignore_range = True
    fetch_file(f"{server.url}/f.bin", target, md5_prefix=hashlib.md5(data).hexdigest()[:6])
    assert target.read_bytes() == data and server.ranges[-1] == "bytes=1234-"


def test_unreachable_server_says_so(ckpt, monkeypatch):
    monkeypatch.setenv(download.SAM_URL_ENV, "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(DownloadError, match="cannot reach http://127.0.0.1:9/sam_vit_l_0b3195.pth"):
        download_sam("vit_l")
    assert list(ckpt.iterdir()) == []


# ---------------------------------------------------------------------- heads
def test_head_is_installed_only_when_it_loads_as_the_presets_head(ckpt, server, monkeypatch, tiny_head_bytes):
    preset = PRESETS["llava-1.5-7b"]
    monkeypatch.setenv(download.HEAD_URL_ENV, server.url + "/{name}")
    server.files[f"/{preset.flmm_head}"] = tiny_head_bytes
    # Shaped for another LMM: refused, removed, and the manual route is spelled out.
    with pytest.raises(DownloadError) as err:
        download_head(preset, lmm_shape=(32, 32, 4096, 1))
    message = str(err.value)
    assert "this head expects" in message and preset.flmm_head_url in message
    assert str(ckpt / preset.flmm_head) in message and list(ckpt.iterdir()) == []
    # A web page instead of the file (what Drive sends when it wants a click): refused too.
    server.files[f"/{preset.flmm_head}"] = b"<!DOCTYPE html><html>Google Drive - virus scan warning</html>"
    with pytest.raises(DownloadError, match="did not give a usable"):
        download_head(preset, lmm_shape=(2, 2, 32, 1))
    assert list(ckpt.iterdir()) == []
    server.files[f"/{preset.flmm_head}"] = tiny_head_bytes
    path = download_head(preset, lmm_shape=(2, 2, 32, 1))
    assert path == ckpt / preset.flmm_head and path.read_bytes() == tiny_head_bytes


# ------------------------------------------------------------------ hub path
def test_hub_offline_reads_the_cache_and_never_fetches(ckpt, tmp_path):
    snapshot = _cached_snapshot(tmp_path / "hf-cache", "llava-hf/llava-1.5-7b-hf")
    assert download_lmm("llava-hf/llava-1.5-7b-hf") == snapshot
    with pytest.raises(DownloadError) as err:
        download_lmm("Qwen/Qwen2-VL-2B-Instruct")
    assert "HF_HUB_OFFLINE" in str(err.value) and str(tmp_path / "hf-cache") in str(err.value)


def test_hub_unreachable_is_a_clear_error_without_a_snapshot(ckpt, tmp_path, monkeypatch, server):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # a server that knows no model: every URL is a 404
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_lmm("someone/no-such-model")
    assert time.monotonic() - started < 20
    assert "could not download someone/no-such-model" in str(err.value) and "run the command again" in str(err.value)
    assert not list((tmp_path / "hf-cache").glob("models--someone--no-such-model/snapshots/*/config.json"))


def test_an_interrupted_sharded_snapshot_is_not_taken_for_a_model(ckpt, tmp_path):
    snapshot = _cached_snapshot(tmp_path / "hf-cache", "llava-hf/llava-1.5-7b-hf")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 8)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    pieces = missing_pieces("llava-1.5-7b")
    assert pieces[0].what == "LMM llava-hf/llava-1.5-7b-hf"


# -------------------------------------------------- the message and the CLI
def test_one_message_names_every_missing_piece_and_the_command(ckpt, tmp_path, monkeypatch):
    for offline in ("1", "0"):  # the same, immediate answer online: nothing is fetched on load
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        started = time.monotonic()
        with pytest.raises(MissingWeightsError) as err:
            require_weights("llava-1.5-7b")
        assert time.monotonic() - started < 2
        message = str(err.value)
        assert "3 piece(s) missing" in message
        assert "LMM llava-hf/llava-1.5-7b-hf" in message and str(ckpt / "llava-1.5-7b-hf") in message
        assert str(tmp_path / "hf-cache") in message
        assert f"F-LMM head: looked in {ckpt / PRESETS['llava-1.5-7b'].flmm_head}" in message
        assert f"SAM vit_l: looked in {ckpt / 'sam_vit_l_0b3195.pth'}" in message
        assert "python -m flmm_demo download llava-1.5-7b" in message
        assert ("HF_HUB_OFFLINE" in message) == (offline == "1")
    # Only the SAM missing: the message names only it.
    _cached_snapshot(tmp_path / "hf-cache", "llava-hf/llava-1.5-7b-hf")
    (ckpt / PRESETS["llava-1.5-7b"].flmm_head).write_bytes(b"head")
    with pytest.raises(MissingWeightsError) as err:
        require_weights("llava-1.5-7b")
    assert "1 piece(s) missing" in str(err.value) and "SAM vit_l" in str(err.value)
    assert "F-LMM head" not in str(err.value)


def test_cli_download_fetches_what_is_missing(ckpt, tmp_path, server, monkeypatch, capsys, tiny_head_bytes):
    preset = PRESETS["llava-1.5-7b"]
    server.files["/sam_vit_l_0b3195.pth"] = SAM_L
    server.files[f"/{preset.flmm_head}"] = tiny_head_bytes
    monkeypatch.setenv(download.SAM_URL_ENV, server.url)
    monkeypatch.setenv(download.HEAD_URL_ENV, server.url + "/{name}")
    monkeypatch.setitem(download.HEAD_LMM_SHAPES, "llava-1.5-7b", (2, 2, 32, 1))
    snapshot = _cached_snapshot(tmp_path / "hf-cache", preset.hub_id)
    assert main(["download", "llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert f"SAM vit_l -> {ckpt / 'sam_vit_l_0b3195.pth'}" in out
    assert f"F-LMM head -> {ckpt / preset.flmm_head}" in out
    resolved = require_weights("llava-1.5-7b")
    assert resolved.model_path == str(snapshot) and resolved.head_path and resolved.sam_path
    assert main(["download", "llava-1.5-7b"]) == 0
    assert "everything is present" in capsys.readouterr().out
    # --all-missing: the other presets lack their LMM, which offline cannot be fetched.
    assert main(["download", "--all-missing"]) == 1
    out = capsys.readouterr().out
    assert "qwen2-vl-2b: LMM Qwen/Qwen2-VL-2B-Instruct not installed" in out and "llava-1.5-7b" not in out
    assert main(["download", "gpt-17"]) == 2
