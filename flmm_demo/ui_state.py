"""What one browser tab of the app holds, and the pictures and files drawn from it.

A tab's `UIState` keeps its `Session` (image, conversation, SAM embedding) and the
grounded phrases on display. The browser only ever gets display-size pictures: each
phrase's mask and heat map are kept at display size, and its full-size mask as a COCO
RLE for the exports, so a 12-megapixel photo costs kilobytes per phrase, not tens of
megabytes. `SessionRegistry` counts the live sessions of all tabs and releases them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from flmm_demo import render
from flmm_demo.geometry import mask_box, resize_map, resize_mask
from flmm_demo.grounder import Grounder, Session
from flmm_demo.images import fit_for_model
from flmm_demo.presets import PRESETS
from flmm_demo.types import GroundedPhrase

DISPLAY_MAX_SIDE = 1280  # longest side of the pictures sent to the browser
LOW_SCORE = 0.5  # below this mean mask probability / SAM IoU the mask is flagged as unsure


@dataclass
class Item:
    """One grounded phrase on display.

    label: unique name, '1. a red circle'. colour: its mask colour. shown: the phrase with
    its mask, box and heat map at display size. full_mask: the mask at the image's full
    size as COCO RLE, full_box: its box there (both for the exports). in_answer: a span of
    the answer on display. typed: the user typed it (it can be removed). unknown: words
    of it the model cannot spell.
    """

    label: str
    colour: render.RGB
    shown: GroundedPhrase
    full_mask: dict
    full_box: tuple[int, int, int, int] | None
    in_answer: bool
    typed: bool = False
    unknown: tuple[str, ...] = ()

    @property
    def unsure(self) -> bool:
        return bool(self.unknown) or self.shown.score < LOW_SCORE

    def choice(self) -> tuple[str, str]:
        """(what the 'Mask shown' list displays, the value it returns)."""
        note = " · low confidence" if self.unsure else ""
        return f"{self.label} · score {self.shown.score:.2f}{note}", self.label

    def full(self) -> GroundedPhrase:
        """The phrase with its full-size mask and box, for the exports (which write no heat map)."""
        return replace(self.shown, mask=render.rle_to_mask(self.full_mask), box=self.full_box)


@dataclass
class UIState:
    """Everything one browser tab owns. Gradio makes one per tab (the class is the State's value)."""

    session: Session | None = None
    display: Image.Image | None = None  # the session's image at display size
    preset: str | None = None
    answer: str = ""
    items: list[Item] = field(default_factory=list)
    selected: int | None = None  # index into items; None shows every mask
    labels_made: int = 0  # numbers the next label, so labels stay unique after a removal
    pending: Image.Image | None = None  # a new image waiting for "start a new conversation?"
    image_removed: bool = False  # the user cleared the image box
    key: str | None = None  # Gradio's session hash, once a session was started
    export_dir: Path | None = None  # this tab's download folder
    busy: int = 0  # events of this tab running now (see SessionRegistry.expire)
    expired: bool = False  # Gradio expired the state while an event was using it

    def start(self, session: Session) -> None:
        """Make `session` this tab's conversation; the previous one is released."""
        if self.session is not None and self.session is not session:
            self.session.close()
        self.session = session
        self.display = fit_for_model(session.image, DISPLAY_MAX_SIDE)[0]
        self.pending = None
        self.image_removed = False
        self.set_answer("", [])

    def set_answer(self, answer: str, grounded: list[GroundedPhrase]) -> None:
        self.answer = answer
        self.items, self.selected, self.labels_made = [], None, 0
        for g in grounded:
            self.add(g, in_answer=True)

    def add(self, grounded: GroundedPhrase, *, in_answer: bool, typed: bool = False,
            unknown: tuple[str, ...] = ()) -> Item:
        """Keep a full-size grounded phrase as a display-size item with a contrasting colour."""
        size = self.display.size
        mask = resize_mask(grounded.mask, size)
        shown = GroundedPhrase(grounded.phrase, mask, mask_box(mask), grounded.score,
                               resize_map(grounded.heatmap, size))
        colour = render.contrasting_color(self.display, mask, [it.colour for it in self.items])
        item = Item(item_label(self.labels_made, grounded.phrase.text), colour, shown,
                    render.mask_to_rle(grounded.mask), grounded.box, in_answer, typed, unknown)
        self.labels_made += 1
        self.items.append(item)
        return item

    def release(self) -> None:
        """Free the session (its SAM embedding included), the pictures and the download folder."""
        if self.session is not None:
            self.session.close()
        if self.export_dir is not None:
            shutil.rmtree(self.export_dir, ignore_errors=True)
        self.session = self.display = self.pending = None
        self.export_dir = None
        self.set_answer("", [])


def item_label(index: int, text: str, max_chars: int = 40) -> str:
    """'1. a red circle': unique per item, short enough for a radio button and a legend."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return f"{index + 1}. {text}"


def highlighted(answer: str, items: list[Item]) -> list[tuple[str, str | None]]:
    """HighlightedText value: the answer cut into plain text and labelled phrases.

    Overlapping spans keep the earlier phrase (the later one stays selectable in the list).
    """
    spans = sorted(((it.shown.phrase.char_span, it.label) for it in items if it.in_answer), key=lambda s: s[0][0])
    out: list[tuple[str, str | None]] = []
    pos = 0
    for (start, end), label in spans:
        if start < pos:
            continue
        if start > pos:
            out.append((answer[pos:start], None))
        out.append((answer[start:end], label))
        pos = end
    if pos < len(answer):
        out.append((answer[pos:], None))
    return out


def pictures(state: UIState, alpha: float, show_heat: bool) -> tuple[Image.Image | None, Image.Image | None]:
    """(mask overlay, raw attention picture) at display size; (None, None) without masks.

    "Show all" with the raw attention on shows every phrase's map side by side.
    """
    if state.display is None or not state.items:
        return None, None
    items = state.items
    if state.selected is None:
        colours = [it.colour for it in items]
        shown = render.overlay(state.display, [it.shown.mask for it in items], colours, alpha)
        overlay = render.with_legend(shown, [it.label for it in items], colours)
        heat = (render.heatmap_tiles(state.display, [it.shown.heatmap for it in items],
                                     [it.label for it in items], colours) if show_heat else None)
        return overlay, heat
    item = items[state.selected]
    overlay = render.overlay(state.display, [item.shown.mask], [item.colour], alpha, dim_others=True)
    heat = render.heatmap_overlay(state.display, item.shown.heatmap) if show_heat else None
    return overlay, heat


def write_exports(state: UIState, overlay: Image.Image, root: Path, masks: bool = True) -> dict[str, Path]:
    """Write the overlay picture and, with masks, the full-size masks on display (the selected
    one or all) as a PNG zip (its overlay.png is the display-size `overlay`) and COCO JSON.
    Returns {'png': ..., 'zip': ..., 'json': ...}.

    Each call writes into a fresh folder: a download never gets a file that another event
    of the same tab is rewriting. The tab keeps only the latest two.
    """
    if state.export_dir is None:
        state.export_dir = root / uuid.uuid4().hex
    folder = state.export_dir / uuid.uuid4().hex
    folder.mkdir(parents=True)
    old = sorted((p for p in state.export_dir.iterdir() if p != folder), key=lambda p: p.stat().st_mtime)
    for stale in old[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    out = {"png": folder / "overlay.png"}
    overlay.save(out["png"])
    if masks:
        chosen = state.items if state.selected is None else [state.items[state.selected]]
        image = state.session.image
        grounded = [it.full() for it in chosen]
        out["zip"] = render.export_png_zip(image, grounded, folder / "masks.zip", [it.colour for it in chosen],
                                           overlay_image=overlay)
        out["json"] = render.export_coco_json(image, grounded, folder / "masks_coco.json")
    return out


class ModelPool:
    """Loaded Grounders by preset name, shared by every browser tab (weights load once).

    loader: name -> Grounder (Grounder.from_preset); it may raise MissingWeightsError.
    max_loaded: how many models stay in memory; the least recently used one is dropped.
    """

    def __init__(self, default: Grounder, loader: Callable[[str], Grounder] = Grounder.from_preset,
                 max_loaded: int = 2):
        self.default_name = default.info.name
        self._loader = loader
        self._max = max(1, max_loaded)
        self._models: OrderedDict[str, Grounder] = OrderedDict({self.default_name: default})
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The default model first, then every preset."""
        return [self.default_name] + [n for n in PRESETS if n != self.default_name]

    def get(self, name: str | None) -> Grounder:
        name = name or self.default_name
        with self._lock:
            if name not in self._models:
                self._models[name] = self._loader(name)
                while len(self._models) > self._max:
                    self._models.popitem(last=False)
            self._models.move_to_end(name)
            return self._models[name]


class SessionRegistry:
    """The tabs that hold a session, so there is a soft limit and a tab's memory can be freed.

    max_sessions: sessions held at once; a newcomer beyond it is asked to come back later.
    A tab is released when it closes (`release(key)`) or when Gradio expires its idle
    state (`expire(state)`); expired keys are remembered so that tab is told why.
    """

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._live: dict[str, UIState] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def live(self) -> int:
        with self._lock:
            return sum(1 for s in self._live.values() if s.session is not None)

    def admit(self, key: str, state: UIState) -> bool:
        """Whether tab `key` may hold a session (it already does, or there is room); records it."""
        with self._lock:
            held = sum(1 for k, s in self._live.items() if k != key and s.session is not None)
            if key not in self._live and held >= self.max_sessions:
                return False
            self._live[key] = state
            state.key = key
            self._expired.pop(key, None)
            return True

    def release(self, key: str) -> None:
        """Tab `key` closed: free its session now."""
        with self._lock:
            state = self._live.pop(key, None)
        if state is not None:
            state.release()
            _return_freed_memory()

    def expire(self, state: UIState) -> None:
        """Gradio dropped an idle tab's state: free it and remember the tab.

        An event still running on the state (a long answer) keeps it: the event hands
        the state back to Gradio, which stores it again; `finished` frees it if not.
        """
        if not isinstance(state, UIState):
            return
        with self._lock:
            if state.busy:
                state.expired = True
                return
            if state.key is not None and self._live.get(state.key) is state:
                del self._live[state.key]
                self._expired[state.key] = None
                while len(self._expired) > 10_000:
                    self._expired.popitem(last=False)
        state.release()
        _return_freed_memory()

    def started(self, state: UIState) -> None:
        """An event began using `state`."""
        with self._lock:
            state.busy += 1

    def finished(self, state: UIState, handed_back: bool) -> None:
        """An event using `state` ended; handed_back: it returned the state, so Gradio keeps it."""
        with self._lock:
            state.busy -= 1
            expire = state.expired and not state.busy
            if expire and handed_back:
                state.expired = expire = False
        if expire:
            state.expired = False
            self.expire(state)

    def was_expired(self, key: str | None) -> bool:
        with self._lock:
            return key is not None and key in self._expired


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them for reuse otherwise, so a
    server's RSS would stay at its peak after every visitor left)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
