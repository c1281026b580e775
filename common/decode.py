"""Bytes to an RGB Pillow image, safely: size and pixel caps checked before any
pixel is decoded, only everyday image formats, first frame only, EXIF
orientation applied, and every pixel mode mapped to the RGB a viewer would see.

Pure: no I/O beyond the bytes given. Every failure is a LoadError.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from common.fetch import LoadLimits
from common.loaderrors import LoadError

__all__ = ["DECODABLE_FORMATS", "LoadError", "LoadLimits", "decode_image", "to_rgb"]

# Formats users upload. Pillow can open many more, some through external programs
# (EPS runs Ghostscript) or rarely exercised parsers: not worth the exposure.
DECODABLE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})
_WHITE = (255, 255, 255, 255)

# What a corrupt file makes Pillow's parsers and decoders raise. Bad uploads are data,
# not crashes, so inside this boundary these all mean "decode_failed".
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


def decode_image(data: bytes, limits: LoadLimits, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode the first frame of `data` to an upright RGB image.

    draft_to=(w, h) asks for a cheap reduced decode that is still at least w x h
    (upright): JPEGs decode at 1/2..1/8 scale, other formats are reduced after
    decoding. For consumers that need only a small image (hashes, histograms, CNN).

    Relies on Pillow's default ImageFile.LOAD_TRUNCATED_IMAGES = False; code that
    flips that global makes truncated images decode as partly grey.
    """
    if draft_to is not None and min(draft_to) < 1:
        raise ValueError(f"draft_to must be positive, got {draft_to}")
    if not data:
        raise LoadError("decode_failed", "empty image data")
    if len(data) > limits.max_bytes:
        raise LoadError("too_large", f"{len(data)} bytes of image data, limit {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as exc:
        raise LoadError("too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise LoadError("unsupported_format", f"not one of {', '.join(DECODABLE_FORMATS)}") from exc
    except _CORRUPT_DATA_ERRORS as exc:
        raise LoadError("decode_failed", f"unreadable image header: {exc}") from exc

    width, height = image.size  # from the header: no pixel decoded yet
    if width * height > limits.max_pixels:
        raise LoadError("too_large", f"{width}x{height} pixels, limit {limits.max_pixels}")
    if width == 0 or height == 0:
        raise LoadError("decode_failed", f"image has no pixels ({width}x{height})")
    try:
        return _decode_pixels(image, draft_to)
    except Image.DecompressionBombError as exc:  # a later frame or tile declaring a huge size
        raise LoadError("too_large", str(exc)) from exc
    except _CORRUPT_DATA_ERRORS as exc:
        raise LoadError("decode_failed", f"corrupt {image.format} data: {exc}") from exc


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """DECODABLE_FORMATS this Pillow build has (AVIF is optional); Image.open fails on unknown names."""
    Image.init()
    return tuple(name for name in DECODABLE_FORMATS if name in Image.OPEN)


def _decode_pixels(image: Image.Image, draft_to: tuple[int, int] | None) -> Image.Image:
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    if draft_to is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
        stored_size = draft_to[::-1] if orientation in _ORIENTATIONS_SWAPPING_AXES else draft_to
        image.draft("RGB", stored_size)
    image.load()  # frame 0 only: Pillow decodes later frames only on seek()
    ImageOps.exif_transpose(image, in_place=True)
    rgb = to_rgb(image)
    if draft_to is not None:
        factor = min(rgb.width // draft_to[0], rgb.height // draft_to[1])
        if factor >= 2:
            rgb = rgb.reduce(factor)
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """Map any Pillow mode to RGB as it would look on screen.

    Transparency is composited onto white (transparent pixels often carry black or
    arbitrary colour); 16/32-bit integer and float greys are scaled to 8 bits
    rather than clipped at 255.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(image)), "L").convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale high-depth grey to 0..255.

    Integers that fit in 16 bits are 16-bit samples (how Pillow stores 16-bit PNG
    and TIFF): keep the high byte. Floats in [0, 1] are normalised intensities.
    Anything else has no agreed scale: stretch its own range to 0..255.
    """
    if values.dtype.kind in "ui":
        if values.size and values.min() >= 0 and values.max() <= 0xFFFF:
            return (values.astype(np.uint32) >> 8).astype(np.uint8)
        return _stretch(values.astype(np.float64))
    finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        return np.rint(finite * 255.0).astype(np.uint8)
    return _stretch(finite)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
