"""Structural checks of image bytes before any decoder sees them.

Pillow parses headers, markers, chunks and extension blocks in Python, and some
decoders (progressive JPEG) do work per scan: a small file can hold millions of
them and cost seconds of CPU while staying far under every size limit. These
checks walk only the structure (never pixel data), stop as soon as a count is
over its cap, and cost microseconds on ordinary uploads. What they miss, the
decode worker's CPU and memory limits stop (common.decodeworker).

The caps sit far above what real encoders write: libjpeg's progressive mode uses
10 scans (mozjpeg up to ~20), cameras a few dozen markers; PNG encoders split
IDAT into 8-64 KiB chunks (20 MB of PNG is at most ~2,600 of them); GIFs carry a
handful of extension blocks before their first frame.
"""

from __future__ import annotations

import contextlib
import re
import struct

from common.loaderrors import LoadError

MAX_JPEG_SCANS = 100
MAX_JPEG_MARKERS = 1_000
MAX_PNG_CHUNKS = 20_000
MAX_GIF_BLOCKS = 1_000
MAX_GIF_SUB_BLOCKS = 10_000
MAX_TIFF_TAGS = 1_000
MAX_TIFF_STRIPS = 100_000
MAX_TIFF_BITS_PER_SAMPLE = 32
MAX_TIFF_SAMPLES = 16

# A marker inside entropy-coded data: 0xFF then anything but stuffing (00), restart (D0-D7) or fill (FF).
_NEXT_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_STRIP_TAGS = frozenset({273, 279, 324, 325})  # strip/tile offsets and byte counts
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SHORT = 3
_BMP_RLE = frozenset({1, 2})  # BI_RLE8, BI_RLE4: decoded by Pillow in Python, byte by byte


def identify(data: bytes) -> str | None:
    """The format named by the file's magic bytes, or None (then no decoder of ours applies)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def check_structure(data: bytes, image_format: str) -> None:
    """Raise LoadError(too_large) when the structure holds more than its cap of what
    parsers loop over. Truncated or odd structure is left to the decoder to judge."""
    checker = _CHECKS.get(image_format)
    if checker is not None:
        with contextlib.suppress(struct.error, IndexError):  # truncated: the decoder reports it as corrupt
            checker(data)


def _too_large(what: str, count: int, cap: int) -> LoadError:
    return LoadError("too_large", f"{what}: {count}, more than {cap}")


def _check_jpeg(data: bytes) -> None:
    """Markers up to the first scan (each one a step of Pillow's Python parser), then the scans."""
    markers = 0
    position = 2
    while position + 1 < len(data):
        if data[position] != 0xFF:  # garbage between segments: find the next marker
            found = _NEXT_JPEG_MARKER.search(data, position)
            if found is None:
                return
            position = found.start()
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise _too_large("JPEG markers", markers, MAX_JPEG_MARKERS)
        if marker == _JPEG_EOI:
            return
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        position += 2 + length
        if marker == _JPEG_SOS:
            # Past the header (which Pillow parses in Python), libjpeg reads markers in C; what costs
            # there is a pass over the whole image per scan. Entropy-coded data cannot hold FF DA,
            # so counting it is exact, and much faster than walking the data.
            scans = 1 + data.count(b"\xff\xda", position)
            if scans > MAX_JPEG_SCANS:
                raise _too_large("JPEG scans", scans, MAX_JPEG_SCANS)
            return


def _check_png(data: bytes) -> None:
    position, chunks = len(_PNG_SIGNATURE), 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _too_large("PNG chunks", chunks, MAX_PNG_CHUNKS)
        if kind == b"IEND":
            return
        position += 12 + length


def _check_gif(data: bytes) -> None:
    """Blocks up to the first frame (Pillow parses those in Python; later frames only on seek)."""
    flags = data[10]
    position = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = sub_blocks = 0
    while position < len(data) and data[position] == 0x21:  # extension introducer
        blocks += 1
        if blocks > MAX_GIF_BLOCKS:
            raise _too_large("GIF extension blocks before the first frame", blocks, MAX_GIF_BLOCKS)
        position += 2
        while (size := data[position]) != 0:
            sub_blocks += 1
            if sub_blocks > MAX_GIF_SUB_BLOCKS:
                raise _too_large("GIF extension data blocks", sub_blocks, MAX_GIF_SUB_BLOCKS)
            position += 1 + size
        position += 1


def _check_tiff(data: bytes) -> None:
    """The first IFD (the only one decoded): tag count, strip/tile count, bits per sample."""
    order = "<" if data[:2] == b"II" else ">"
    if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 8-byte offsets and counts
        (offset,) = struct.unpack_from(order + "Q", data, 8)
        (tags,) = struct.unpack_from(order + "Q", data, offset)
        entry, first, fields, inline = 20, offset + 8, "HHQ", 8
    else:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        (tags,) = struct.unpack_from(order + "H", data, offset)
        entry, first, fields, inline = 12, offset + 2, "HHI", 4
    if tags > MAX_TIFF_TAGS:
        raise _too_large("TIFF tags", tags, MAX_TIFF_TAGS)
    for index in range(tags):
        at = first + index * entry
        tag, kind, count = struct.unpack_from(order + fields, data, at)
        if tag in _TIFF_STRIP_TAGS and count > MAX_TIFF_STRIPS:
            raise _too_large("TIFF strips or tiles", count, MAX_TIFF_STRIPS)
        if tag == _TIFF_BITS_PER_SAMPLE and kind == _TIFF_SHORT:
            if count > MAX_TIFF_SAMPLES:
                raise _too_large("TIFF samples per pixel", count, MAX_TIFF_SAMPLES)
            value_at = at + entry - inline
            if count * 2 > inline:  # stored elsewhere: the field holds its offset
                (value_at,) = struct.unpack_from(order + fields[-1], data, value_at)
            bits = max(struct.unpack_from(order + "H" * count, data, value_at), default=0)
            if bits > MAX_TIFF_BITS_PER_SAMPLE:
                raise LoadError("too_large", f"TIFF with {bits} bits per sample, limit {MAX_TIFF_BITS_PER_SAMPLE}")


def _check_bmp(data: bytes) -> None:
    """RLE BMPs: no more data than the worst honest encoding of their pixels (2 bytes per pixel
    plus an end-of-line code per row); Pillow's RLE decoder walks every code in Python."""
    (pixel_offset,) = struct.unpack_from("<I", data, 10)
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size < 40:
        return
    width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
    if compression not in _BMP_RLE:
        return
    honest = 2 * abs(width * height) + 2 * abs(height) + 2
    if len(data) - pixel_offset > honest:
        raise LoadError("too_large", f"RLE BMP of {abs(width)}x{abs(height)} with {len(data) - pixel_offset} "
                                     f"bytes of codes, more than {honest} could encode")


_CHECKS = {"JPEG": _check_jpeg, "PNG": _check_png, "GIF": _check_gif, "TIFF": _check_tiff, "BMP": _check_bmp}
