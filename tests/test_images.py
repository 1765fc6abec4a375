"""The one image loader on real files: odd modes, broken files, huge and tiny images."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flmm_demo.geometry import resize_map, resize_mask
from flmm_demo.images import ImageError, fit_for_model, load_image


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _flat_bilevel_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit black PNG written row by row, so a 80-megapixel file costs ~10 MB of zeros to compress."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_every_source_kind_gives_the_same_rgb_image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path), pixels):
        im = load_image(source)
        assert im.mode == "RGB" and im.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(im), pixels)


def test_missing_empty_and_not_an_image_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("these are my notes, not a picture\n")
    with pytest.raises(ImageError, match="not an image format"):
        load_image(text)
    with pytest.raises(ImageError, match="not an image format"):
        load_image(b"\x00\x01garbage" * 10)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)


def test_truncated_jpeg_is_reported_as_damaged():
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(data[: len(data) // 2])
    assert isinstance(ImageError("x"), ValueError)


def test_one_pixel_image_is_valid():
    im = load_image(_png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert im.size == (1, 1) and im.getpixel((0, 0)) == (10, 20, 30)
    small, scale = fit_for_model(im)
    assert small.size == (1, 1) and scale == 1.0
    assert resize_mask(np.ones((1, 1), bool), (4, 3)).shape == (3, 4)


def test_huge_file_is_refused_from_its_header_quickly(tmp_path):
    path = tmp_path / "huge.png"
    _flat_bilevel_png(path, 10_000, 8_000)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="10000x8000") as err:
        load_image(path)
    assert time.perf_counter() - t0 < 0.5  # nothing decoded
    assert "40,000,000" in str(err.value)
    # Beyond PIL's own bomb limit the message is still ours.
    monster = tmp_path / "monster.png"
    _flat_bilevel_png(monster, 20_000, 10_000)
    with pytest.raises(ImageError, match="too large|more than the limit"):
        load_image(monster, max_pixels=10**12)


def test_fit_for_model_keeps_aspect_and_masks_come_back_full_size():
    big = Image.new("L", (10_000, 8_000), 7)
    small, scale = fit_for_model(big, max_side=2048)
    assert small.size == (2048, 1638) and scale == pytest.approx(0.2048)
    mask = np.zeros((1638, 2048), bool)
    mask[:819, :1024] = True  # top-left quarter
    full = resize_mask(mask, big.size)
    assert full.shape == (8_000, 10_000) and full.dtype == bool
    assert full[:3990, :4990].all() and not full[4010:, :].any() and not full[:, 5010:].any()
    heat = resize_map(np.array([[0.0, 1.0]], np.float32), (4, 2))
    assert heat.dtype == np.float32 and heat.shape == (2, 4) and heat[0, 0] == 0.0 and heat[0, 3] == 1.0


def test_rgba_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    im = load_image(_png_bytes(Image.fromarray(rgba, "RGBA")))
    assert im.mode == "RGB"
    px = np.asarray(im)[0]
    assert tuple(px[0]) == (255, 0, 0) and tuple(px[1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in px[2])


def test_grey_palette_and_cmyk_modes():
    grey = load_image(_png_bytes(Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L")))
    assert [grey.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 is transparent
    im = load_image(_png_bytes(pal))
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 0)) == (0, 255, 0)
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(buf, "JPEG", quality=100)
    r, g, b = load_image(buf.getvalue()).getpixel((1, 1))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 30_000, 65_535]], np.uint16)
    png = _png_bytes(Image.fromarray(values))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    im = load_image(png)
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 116, 255]
    assert [load_image(values).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 116, 255]
    floats = load_image(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert [floats.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied():
    # Stored 40 wide x 20 tall with a red block top-left; orientation 6 means "rotate 90
    # degrees clockwise to display", so the block ends up top-right of a 20x40 image.
    stored = np.full((20, 40, 3), 255, np.uint8)
    stored[:6, :6] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    im = load_image(buf.getvalue())
    assert im.size == (20, 40)
    r, g, b = im.getpixel((17, 2))  # top-right corner
    assert r > 200 and g < 60 and b < 60
    for corner in ((2, 2), (2, 37), (17, 37)):
        assert min(im.getpixel(corner)) > 200


def test_bad_arrays_and_types_are_explained():
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="web address"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(42)  # type: ignore[arg-type]
