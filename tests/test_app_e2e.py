"""The Gradio app in a real browser: `python app.py` on the bundled model, driven by chromium.

One app server and one browser for the whole file. The browser tests need Debian's
chromium at /usr/bin/chromium (`apt-get install chromium`) and Python Playwright and are
skipped without them; the first tests check the UI's text helpers and need neither.
"""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flmm_demo import render
from flmm_demo.demo_world.scenes import make_scene
from flmm_demo.types import GroundedPhrase, Phrase
from flmm_demo.grounder import find_spans
from flmm_demo.ui_state import Item, highlighted, item_label

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SCENE_SEED = 2  # assets/shapes_2.png: a red cross, a big purple circle and a yellow square
OTHER_SEED = 8  # assets/shapes_8.png
ALPHA = 0.55  # the app's default mask opacity



def test_answer_is_cut_into_coloured_phrases():
    answer = "a red cross, a big purple circle and a yellow square."
    phrases = [(0, 11), (13, 32), (37, 52)]
    items = [_item(i, answer[a:b], (a, b), True) for i, (a, b) in enumerate(phrases)]
    items.append(_item(3, "the cat", (0, 7), False))  # typed, not in the answer
    segments = highlighted(answer, items)
    assert "".join(text for text, _ in segments) == answer
    assert [label for _, label in segments if label] == ["1. a red cross", "2. a big purple circle", "3. a yellow square"]
    assert find_spans(answer, "Big  PURPLE circle") == [(15, 32)]
    assert find_spans(answer, "a green cross") == []
    assert item_label(0, "word " * 30).endswith("…") and len(item_label(0, "word " * 30)) <= 43


def _item(index: int, text: str, span: tuple[int, int], in_answer: bool) -> Item:
    mask = np.zeros((4, 4), bool)
    grounded = GroundedPhrase(Phrase(text, span, (0, 1)), mask, None, 0.0, mask.astype(np.float32))
    return Item(item_label(index, text), (0, 0, 0), grounded, render.mask_to_rle(mask), None, in_answer)


@pytest.fixture(scope="module")
def sync_api():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install chromium` to run the browser tests")
    return pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"app.py did not answer on {url} within 120 s:\n{log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(sync_api):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _open(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    page.goto(url)
    page.locator("#image-in").wait_for()
    return context, page


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, pattern: str, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = _status(page)
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(200)
    raise AssertionError(f"status never matched {pattern!r}; last: {_status(page)!r}")


def _upload(page, path: Path) -> None:
    page.locator("#image-in input[type=file]").set_input_files(str(path))
    _wait_status(page, r"New conversation")


def _ask(page, question: str) -> list[str]:
    """Ask and wait for grounding; returns the assistant text seen while it streamed."""
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    seen = []
    deadline = time.time() + 90
    while time.time() < deadline:
        bot = page.locator("#chatbot .bot")
        if bot.count():
            seen.append(bot.last.inner_text())
        if re.search(r"Grounded \d+ phrase|No noun phrases", _status(page)):
            return seen
        page.wait_for_timeout(100)
    raise AssertionError(f"no grounded answer within 90 s; status: {_status(page)!r}")


def _shown_size(page) -> tuple[int, int]:
    """(width, height) of the picture in the mask view, as sent by the app."""
    img = page.locator("#mask-view img")
    img.wait_for()
    return tuple(img.evaluate("e => [e.naturalWidth, e.naturalHeight]"))


def _shown_image(page) -> np.ndarray:
    """Screenshot of the mask view, cropped to the picture, at its natural size: (H, W, 3)."""
    img = page.locator("#mask-view img")
    width, height = _shown_size(page)
    shot = Image.open(io.BytesIO(img.screenshot())).convert("RGB")
    # object-fit: contain letterboxes the picture inside the element
    scale = min(shot.width / width, shot.height / height)
    w, h = width * scale, height * scale
    x0, y0 = (shot.width - w) / 2, (shot.height - h) / 2
    crop = shot.crop((round(x0), round(y0), round(x0 + w), round(y0 + h)))
    return np.asarray(crop.resize((width, height), Image.BILINEAR), dtype=np.float32)


def _painted(shown: np.ndarray, original: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: pixels nearer the mask-colour blend than the dimmed background."""
    painted = (1 - ALPHA) * original + ALPHA * np.array(color, np.float32)
    dimmed = 0.35 * original
    return np.linalg.norm(shown - painted, axis=-1) < np.linalg.norm(shown - dimmed, axis=-1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def engine():
    """The app's default model in this process: the answer is greedy, so the app must show the same."""
    from flmm_demo.grounder import Grounder

    return Grounder.from_preset()


def test_ask_click_phrase_and_download(browser, app_url, engine, tmp_path):
    scene = make_scene(SCENE_SEED)
    image_path = ROOT / "assets" / f"shapes_{SCENE_SEED}.png"
    context, page = _open(browser, app_url)
    _upload(page, image_path)
    seen = _ask(page, "Describe the image.")

    answer = page.locator("#chatbot .bot").last.inner_text().strip()
    assert answer, "the assistant's answer is empty"
    assert any(0 < len(s.strip()) < len(answer) for s in seen) or len(seen) > 1, "the answer did not stream"
    session = engine.new_session(image_path)
    assert session.chat("Describe the image.", max_new_tokens=128) == answer
    expected = session.ground()

    phrases = page.locator("#answer .token.highlighted")
    texts = [phrases.nth(i).inner_text().strip() for i in range(phrases.count())]
    assert texts == [g.phrase.text for g in expected], "the highlighted phrases are not the grounded ones"
    # Each mask gets the palette colour that contrasts with the pixels under it; the phrase wears it too.
    colours: list[tuple[int, int, int]] = []
    for g in expected:
        colours.append(render.contrasting_color(Image.fromarray(scene.image), g.mask, colours))
    for i, (r, g, b) in enumerate(colours):
        style = phrases.nth(i).get_attribute("style") or ""
        assert f"rgba({r}, {g}, {b}" in style, f"phrase {texts[i]!r} is not in its mask colour: {style}"

    # Click a phrase that names an object of the scene right (colour and shape), else the first one.
    named = {f"{o.colour} {o.shape}": o for o in scene.objects}
    index, target = next(((i, o) for i, t in enumerate(texts) for name, o in named.items() if name in t.lower()),
                         (0, None))
    phrases.nth(index).click()
    page.wait_for_function("i => document.querySelectorAll('#phrase-pick input')[i + 1]?.checked", arg=index)
    page.wait_for_timeout(500)

    width, height = scene.size
    assert _shown_size(page) == (width, height)
    masked = _painted(_shown_image(page), scene.image.astype(np.float32), colours[index])
    mask = expected[index].mask
    # The screenshot's outermost pixels are resampled edges of the element, not the picture.
    inner = (slice(2, -2), slice(2, -2))
    assert _iou(masked[inner], mask[inner]) > 0.85, f"the mask shown for {texts[index]!r} is not the grounded mask"
    if target is not None:
        inside = masked[target.mask].mean()
        assert inside > 0.5, f"the mask of {texts[index]!r} covers only {inside:.0%} of the {target.phrase}"
    if os.environ.get("FLMM_SCREENSHOTS"):  # refreshes the README's screenshots
        page.screenshot(path=str(ROOT / "docs" / "app_grounded.png"), full_page=True)
        page.locator("#show-heat input").check()
        page.locator("#heat-view img").wait_for()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ROOT / "docs" / "app_phrase_heatmap.png"), full_page=True)
        page.locator("#show-heat input").uncheck()

    with page.expect_download() as download:
        page.locator("#dl-zip").click()
    path = tmp_path / "masks.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as zf:
        pngs = [n for n in zf.namelist() if n[:2].isdigit()]
        assert len(pngs) == 1, "the zip should hold the selected phrase only"
        png = np.asarray(Image.open(io.BytesIO(zf.read(pngs[0]))))
        assert ((png == 255) == mask).all()
        assert "overlay.png" in zf.namelist() and "phrases.json" in zf.namelist()
    context.close()


def test_corrupt_upload_shows_error_and_keeps_chat(browser, app_url, tmp_path):
    context, page = _open(browser, app_url)
    _upload(page, ROOT / "assets" / f"shapes_{OTHER_SEED}.png")
    _ask(page, "What is in the image?")
    chat_before = page.locator("#chatbot").inner_text()
    phrases_before = page.locator("#answer").inner_text()

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really an image" * 10)
    page.locator("#image-in input[type=file]").set_input_files(str(bad))
    _wait_status(page, r"Upload failed")
    assert page.get_by_text("Could not use that file").first.is_visible()
    assert page.locator("#chatbot").inner_text() == chat_before
    assert page.locator("#answer").inner_text() == phrases_before
    page.locator("#question textarea").fill("")  # the conversation still works after the error
    _ask(page, "Describe the image.")
    assert page.locator("#chatbot .user").count() == 2
    context.close()


def test_two_browser_sessions_are_independent(browser, app_url):
    ctx_a, page_a = _open(browser, app_url)
    ctx_b, page_b = _open(browser, app_url)
    _upload(page_a, ROOT / "assets" / f"shapes_{SCENE_SEED}.png")
    _upload(page_b, ROOT / "assets" / f"shapes_{OTHER_SEED}.png")
    _ask(page_a, "What is in the image?")
    _ask(page_b, "Describe the image.")
    assert "Describe the image." not in page_a.locator("#chatbot").inner_text()
    assert "What is in the image?" not in page_b.locator("#chatbot").inner_text()
    assert page_a.locator("#chatbot .user").count() == 1
    assert page_b.locator("#chatbot .user").count() == 1
    # Each tab shows its own picture: the scenes differ in size, and "show all" adds a legend below.
    (wa, ha), (wb, hb) = _shown_size(page_a), _shown_size(page_b)
    assert wa == make_scene(SCENE_SEED).size[0] and ha >= make_scene(SCENE_SEED).size[1]
    assert wb == make_scene(OTHER_SEED).size[0] and hb >= make_scene(OTHER_SEED).size[1]
    ctx_a.close()
    ctx_b.close()


def test_visual_chain_of_thought_shows_object_crop_and_both_answers(browser, app_url, engine):
    context, page = _open(browser, app_url)
    image_path = ROOT / "assets" / f"shapes_{SCENE_SEED}.png"
    _upload(page, image_path)
    page.locator("#vcot input[type=checkbox]").check()
    _ask(page, "What colour is the square?")
    expected = engine.new_session(image_path).visual_cot("What colour is the square?", max_new_tokens=128)
    panel = page.locator("#vcot-text").inner_text()
    assert expected.first_answer in panel and expected.answer in panel
    # The conversation holds the whole-image answer; its phrases are the grounded ones.
    assert page.locator("#chatbot .bot").last.inner_text().strip() == expected.first_answer
    x0, y0, x1, y1 = expected.crop_box
    assert f"crop box ({x0}, {y0}, {x1}, {y1})" in panel
    if os.environ.get("FLMM_SCREENSHOTS"):  # refreshes the README's screenshot
        page.screenshot(path=str(ROOT / "docs" / "app_visual_cot.png"), full_page=True)
    context.close()


def test_opacity_typed_or_arrowed_redraws_and_the_image_box_x_ends_the_session(browser, app_url):
    context, page = _open(browser, app_url)
    _upload(page, ROOT / "assets" / f"shapes_{OTHER_SEED}.png")
    _ask(page, "Describe the image.")

    def redrawn_after(action) -> None:
        before = page.locator("#mask-view img").get_attribute("src")
        action()
        page.wait_for_function("s => document.querySelector('#mask-view img')?.getAttribute('src') !== s",
                               arg=before, timeout=30_000)

    box = page.locator("#alpha input[type=number]")
    redrawn_after(lambda: (box.fill("0.95"), box.press("Enter")))
    slider = page.locator("#alpha input[type=range]")
    redrawn_after(lambda: (slider.focus(), slider.press("ArrowLeft")))

    page.locator("#image-in button[aria-label*='lear'], #image-in button[aria-label*='emove']").first.click()
    _wait_status(page, r"Image removed")
    page.locator("#question textarea").fill("Describe the image.")
    page.locator("#ask").click()
    _wait_status(page, r"The image was removed: upload an image")
    context.close()
