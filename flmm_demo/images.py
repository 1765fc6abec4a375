"""The one image loader: anything a user can hand us -> an upright 8-bit RGB PIL image.

Also `fit_for_model`, which shrinks huge photos before they reach the LMM (a mask goes
back to the full size with `geometry.resize_mask`).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS = 40_000_000
# What a folder given on the command line contributes (by file name, case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """The input could not be turned into an image; the message says why and what to do."""


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` as an RGB image, the right way up.

    source: a file path, the bytes of an encoded file (PNG, JPEG, WebP, ...), a PIL image,
        or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); uint8, uint16, bool or float
        in [0, 1].
    max_pixels: files and bytes larger than this (width * height) are refused from their
        header, before any pixel is decoded (decompression-bomb guard). Images and arrays
        already in memory are not checked.

    EXIF orientation is applied; transparency is composited on white; 16-bit and 32-bit
    grey is scaled (not clipped) to 8 bits; palette, CMYK and other modes are converted.
    Any size is accepted, 1x1 included. Raises ImageError with the reason.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("the image data is empty (0 bytes); upload the file again")
        return _decode(io.BytesIO(data), "the uploaded data", max_pixels)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{source} is a web address; images are not downloaded, save it and give the file")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ImageError(f"image file not found: {path}; check the path")
        if not path.is_file():
            raise ImageError(f"{path} is not a file; give the path of an image file")
        if path.stat().st_size == 0:
            raise ImageError(
                f"image file {path} is empty (0 bytes); it may not have been saved or copied completely"
            )
        return _decode(path, str(path), max_pixels)
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}; "
        "give a file path, the file's bytes, a PIL image or a numpy array"
    )


def image_files(paths: list[str | Path]) -> list[Path]:
    """The images that command-line paths name: a file as given (read later, so a bad file is
    reported where it is used), a folder as its image files by suffix (IMAGE_SUFFIXES), sorted
    by name, not recursive.

    Raises ImageError for a folder that holds no image file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(f"folder {path} holds no image file ({', '.join(IMAGE_SUFFIXES)}); check the path")
            files.extend(found)
        else:
            files.append(path)
    return files


def fit_for_model(image: Image.Image, max_side: int = 2048) -> tuple[Image.Image, float]:
    """Shrink `image` so its longest side is at most `max_side`, keeping the aspect ratio.

    Returns (image, scale) with scale = new longest side / old longest side (1.0 and the
    same image when it already fits). A mask predicted on the small image goes back to
    the full size with `geometry.resize_mask(mask, original.size)`.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image, 1.0
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap lets PIL shrink by whole factors first: fast on 100-megapixel photos.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), scale


def _decode(fp: io.BytesIO | Path, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's global warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(_too_big(name, width, height, max_pixels))
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name} is too large to load safely ({err}); downscale it and try again") from err
    except UnidentifiedImageError as err:
        raise ImageError(
            f"{name} is not an image format that can be read (PNG, JPEG, WebP, BMP, GIF, TIFF "
            "work); check that the file really is an image and not renamed text or a web page"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(
            f"{name} is damaged or truncated and could not be decoded ({err}); "
            "re-download or re-export the image"
        ) from err


def _too_big(name: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{name} is {width}x{height} = {width * height:,} pixels, more than the limit of "
        f"{max_pixels:,}; downscale it first (or raise max_pixels if you trust the file)"
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, 8 bits per channel."""
    if im.mode == "RGB":
        return im  # callers pass a fresh image (exif_transpose copies)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _from_array(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise ImageError(f"images in PIL mode {im.mode!r} are not supported ({err}); save it as RGB") from err


def _from_array(array: np.ndarray) -> Image.Image:
    """(H, W[, C]) array of any common dtype -> RGB image; 16/32-bit data scaled to 8 bits."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"the image array is empty (shape {array.shape})")
    array = _to_uint8(array)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.shape[2] == 4:
        return _to_rgb(Image.fromarray(array, "RGBA"))
    return Image.fromarray(array, "RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return (np.clip(array / peak, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit data (PIL "I;16", numpy uint16) spans 0..65535; other integers are taken
        # as 8-bit when they fit, else scaled by their peak so nothing is clipped.
        top = int(array.max(initial=0))
        peak = 65535 if array.dtype.itemsize == 2 else 255 if top <= 255 else max(65535, top)
        return (np.clip(array.astype(np.int64), 0, None) * 255 // peak).astype(np.uint8)
    raise ImageError(f"unsupported image array dtype {array.dtype}")
