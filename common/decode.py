"""Bytes to an RGB Pillow image, safely, within a CPU and a memory budget.

decode_image runs every decode in a worker process (common.decodeworker) that is
killed when it overruns limits.decode_cpu_s of CPU, and whose address space is
capped at limits.decode_memory_bytes above its idle size: whatever a crafted file
makes a decoder do, it costs at most that. Inside the worker, decode_in_process:

- opens only the formats in limits.formats (JPEG, PNG, WebP and GIF unless more
  are allowed), recognised by their magic bytes;
- walks the file's structure first and refuses what no real encoder writes
  (common.imagechecks: scan, marker, chunk, block, strip counts);
- checks pixels and the estimated memory of the whole decode against the
  limits from the header, before any pixel is decoded;
- decodes the first frame only, reduced early when a small image is enough,
  with EXIF orientation applied and every pixel mode mapped to the RGB a viewer
  would see, without full-size float copies.

Every failure is a LoadError: too_large for anything over a limit or budget,
decode_failed for data no decoder accepts, unsupported_format for the rest.
"""

from __future__ import annotations

import io
from typing import cast

from PIL import Image, ImageFile, JpegImagePlugin

from common.fetch import EVERYDAY_FORMATS, IMAGE_FORMATS, LoadLimits
from common.imagechecks import check_structure, identify
from common.loaderrors import LoadError

__all__ = ["EVERYDAY_FORMATS", "IMAGE_FORMATS", "LoadError", "LoadLimits", "decode_image", "decode_in_process",
           "estimated_decode_bytes", "to_rgb"]

_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_HIGH_DEPTH_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F"})
_BYTES_PER_STORED_PIXEL = {"1": 1, "L": 1, "P": 1} | dict.fromkeys(_SIXTEEN_BIT_MODES, 2)  # else 4 (Pillow's layout)
# libwebp decodes into its own buffer, Pillow copies that to bytes and then into the image.
_FRAME_COPIES = {"WEBP": 3}


def decode_image(data: bytes, limits: LoadLimits, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode the first frame of `data` to an upright RGB image, in a budgeted worker process.

    draft_to=(w, h) asks for a cheap reduced decode that is still at least w x h
    (upright): JPEGs decode at 1/2..1/8 scale, other formats are reduced right
    after decoding. For consumers that need only a small image (hashes, histograms, CNN).
    """
    _check_arguments(data, limits, draft_to)
    from common.decodeworker import decode_in_worker

    return decode_in_worker(data, limits, draft_to)


def decode_in_process(data: bytes, limits: LoadLimits, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """decode_image's work in this process: every check, but no hard stop. For the worker (and tests).

    Relies on Pillow's default ImageFile.LOAD_TRUNCATED_IMAGES = False; code that
    flips that global makes truncated images decode as partly grey.
    """
    _check_arguments(data, limits, draft_to)
    image_format = identify(data)
    if image_format is None:
        raise LoadError("unsupported_format", f"not one of {', '.join(limits.formats)}")
    if image_format not in limits.formats:
        raise LoadError("unsupported_format", f"{image_format} is not enabled (limits.formats: "
                                              f"{', '.join(limits.formats)})")
    check_structure(data, image_format)
    try:
        return _decode(data, image_format, limits, draft_to)
    except LoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise LoadError("too_large", f"{image_format}: {exc}") from exc
    except MemoryError as exc:
        raise LoadError("too_large", f"decoding this {image_format} needs more than the memory budget "
                                     f"({limits.decode_memory_bytes >> 20} MiB)") from exc
    except Exception as exc:  # hostile bytes make Pillow raise anything: all of it means "corrupt"
        raise LoadError("decode_failed", f"corrupt {image_format} data: {type(exc).__name__}: {exc}") from exc


def _check_arguments(data: bytes, limits: LoadLimits, draft_to: tuple[int, int] | None) -> None:
    if draft_to is not None and min(draft_to) < 1:
        raise ValueError(f"draft_to must be positive, got {draft_to}")
    if not data:
        raise LoadError("decode_failed", "empty image data")
    if len(data) > limits.max_bytes:
        raise LoadError("too_large", f"{len(data)} bytes of image data, limit {limits.max_bytes}")


def _decode(data: bytes, image_format: str, limits: LoadLimits, draft_to: tuple[int, int] | None) -> Image.Image:
    if image_format not in Image.OPEN:
        Image.init()  # plugins load lazily; AVIF exists only where Pillow was built with libavif
    if image_format not in Image.OPEN:
        raise LoadError("unsupported_format", f"this Pillow cannot open {image_format}")
    try:
        image = Image.open(io.BytesIO(data), formats=(image_format,))
    except Image.UnidentifiedImageError as exc:
        raise LoadError("decode_failed", f"unreadable {image_format} header") from exc
    width, height = image.size  # from the header: no pixel decoded yet
    if width * height > limits.max_pixels:
        raise LoadError("too_large", f"{width}x{height} pixels, limit {limits.max_pixels}")
    if width == 0 or height == 0:
        raise LoadError("decode_failed", f"image has no pixels ({width}x{height})")
    is_jpeg = isinstance(image, JpegImagePlugin.JpegImageFile)
    # A JPEG's EXIF is in its header, and its draft must be set before decoding. Other formats' EXIF
    # may follow the pixels (PNG's getexif() decodes the whole image): read it after the memory check.
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1) if is_jpeg else None
    if draft_to is not None and is_jpeg:
        image.draft("RGB", _stored(draft_to, orientation))
    targets = [None] if draft_to is None else [_stored(draft_to, orientation), _stored(draft_to, 6)]
    needed = max(estimated_decode_bytes(image, image_format, (width, height), target) for target in targets)
    if needed > limits.decode_memory_bytes:
        raise LoadError("too_large", f"decoding this {width}x{height} {image.mode} {image_format} needs about "
                                     f"{needed >> 20} MiB, budget {limits.decode_memory_bytes >> 20} MiB")
    if orientation is None:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    stored_target = None if draft_to is None else _stored(draft_to, orientation)
    image.load()  # frame 0 only: Pillow decodes later frames only on seek()
    pixels: Image.Image = image
    if stored_target is not None and image.mode in _REDUCIBLE_MODES:
        pixels = _reduced(image, stored_target)
    rgb = to_rgb(pixels)
    if stored_target is not None:
        rgb = _reduced(rgb, stored_target)
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def _stored(upright: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """The (width, height) in the file's own orientation of a target given upright (None: as stored)."""
    return (upright[1], upright[0]) if orientation in _ORIENTATIONS_SWAPPING_AXES else upright


def _reduced(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    factor = min(image.width // target[0], image.height // target[1])
    return image.reduce(factor) if factor >= 2 else image


def estimated_decode_bytes(image: ImageFile.ImageFile, image_format: str, full_size: tuple[int, int],
                           stored_target: tuple[int, int] | None) -> int:
    """Peak memory of decoding `image` (opened, not loaded, draft already requested) to RGB.

    The decoded frame (three copies for WebP, a premultiplied copy when reducing
    alpha), a progressive JPEG's coefficients (kept for the whole image, even
    when drafting), and the conversion to RGB (4 bytes a pixel, 8 with alpha or
    high depth) at the size it happens. Checked against the worker's measured
    peaks on the decode-bomb corpus (tests/test_decode_bombs.py).
    """
    width, height = image.size
    frame = width * height * _BYTES_PER_STORED_PIXEL.get(image.mode, 4) * _FRAME_COPIES.get(image_format, 1)
    coefficients = 0
    if image_format == "JPEG" and image.info.get("progressive"):
        coefficients = full_size[0] * full_size[1] * len(image.getbands()) * 2
    converted, factor = width * height, 1
    if stored_target is not None and image.mode in _REDUCIBLE_MODES:
        factor = max(1, min(width // stored_target[0], height // stored_target[1]))
        converted //= factor * factor
        if factor > 1 and image.mode in ("LA", "RGBA"):
            frame += width * height * 4  # Pillow reduces these through a premultiplied full-size copy
    per_pixel = 4  # the RGB result (or, for RGB, the reduced copy)
    if image.mode in _HIGH_DEPTH_MODES or _has_alpha(image):
        per_pixel = 8  # an intermediate (grey or RGBA) and the result
    elif image.mode == "RGB" and factor == 1:
        per_pixel = 0  # already what we return
    return frame + coefficients + converted * per_pixel


def _has_alpha(image: Image.Image) -> bool:
    bands = image.getbands()
    return "A" in bands or "a" in bands or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Map any Pillow mode to RGB as it would look on screen.

    Transparency is composited onto white (transparent pixels often carry black or
    arbitrary colour); 16/32-bit integer and float greys are scaled to 8 bits
    rather than clipped at 255, by Pillow's point transforms (no float copies).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _grey_to_l(image).convert("RGB")
    if _has_alpha(image):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba)
        return flat
    return image.convert("RGB")


def _grey_to_l(image: Image.Image) -> Image.Image:
    """Scale high-depth grey to 0..255.

    16-bit samples (how Pillow stores 16-bit PNG and TIFF) and 32-bit integers in
    the 16-bit range keep their high byte. Floats in [0, 1] are normalised
    intensities. Anything else has no agreed scale: its own range is stretched.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I")
    low, high = cast(tuple[float, float], image.getextrema())  # one band: (min, max)
    if image.mode == "I" and low >= 0 and high <= 0xFFFF:
        return image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        return image.point(lambda value: value * 255.0 + 0.5).convert("L")
    if not high > low:  # one value (or NaN): no range to stretch
        return Image.new("L", image.size, 0)
    scale = 255.0 / (high - low)
    return image.point(lambda value: value * scale + (0.5 - low * scale)).convert("L")
