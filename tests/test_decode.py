"""decode_image: every input is generated here, including hostile ones (bombs,
truncation, lying headers), and every pixel mode is checked for the RGB a viewer
would see."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from common.decode import decode_image, to_rgb
from common.fetch import IMAGE_FORMATS, LoadLimits
from common.loaderrors import LoadError
from tests.synthetic_data import encode, png_chunk

LIMITS = LoadLimits()
EVERY_FORMAT = LoadLimits(formats=IMAGE_FORMATS)
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)




def png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def noisy_rgb(width: int, height: int, seed: int = 7) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def halves(width: int, height: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def reason_of(data: bytes, limits: LoadLimits = LIMITS) -> str:
    with pytest.raises(LoadError) as caught:
        decode_image(data, limits)
    return caught.value.reason


@pytest.fixture(scope="session")
def png_bomb() -> bytes:
    """A real 40000x40000 1-bit PNG (1.6 gigapixels) that compresses to ~200 KB.

    Written row by row with zlib: building it with Pillow would need 1.6 GB of memory.
    """
    width = height = 40_000
    rows = (b"\x00" + bytes(width // 8)) * 1000  # filter byte + packed bits, 1000 rows at a time
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.flush()
    return png_from_rows(width, height, bit_depth=1, colour_type=0, idat=idat)


def test_jpeg_decodes_to_rgb_with_its_size_and_colour() -> None:
    image = decode_image(encode(Image.new("RGB", (64, 48), RED), "JPEG"), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (64, 48)
    assert_close(image.getpixel((10, 10)), RED)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "decode_failed"),
        (b"just some text, not an image\n" * 10, "unsupported_format"),
        # Pillow can read EPS by running Ghostscript: deliberately not a format we open.
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "unsupported_format"),
    ],
    ids=["empty", "text", "eps"],
)
def test_non_images_are_rejected_with_their_reason(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_fails_to_decode(fmt: str) -> None:
    whole = encode(noisy_rgb(256, 256), fmt)
    assert decode_image(whole, LIMITS).size == (256, 256)
    assert reason_of(whole[: len(whole) // 2]) == "decode_failed"


def test_png_decompression_bomb_is_too_large(png_bomb: bytes) -> None:
    assert len(png_bomb) < 1_000_000
    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert reason_of(png_bomb) == "too_large"
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # we never loosen Pillow's global guard


def test_bomb_is_too_large_even_when_pillows_own_guard_is_off(
    png_bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert reason_of(png_bomb) == "too_large"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_formats_beyond_the_everyday_ones_are_off_unless_allowed(fmt: str) -> None:
    data = encode(Image.new("RGB", (8, 8), RED), fmt)
    with pytest.raises(LoadError) as caught:
        decode_image(data, LIMITS)
    error = caught.value
    assert error.reason == "unsupported_format"
    assert "limits.formats" in error.detail
    assert decode_image(data, LoadLimits(formats=("JPEG", fmt))).getpixel((4, 4)) == RED


def test_pixel_limit_is_checked_from_the_header_before_any_pixel_is_decoded() -> None:
    # 8000x6250 = 50 Mpx: above our default limit, below Pillow's own. The pixel data is
    # garbage, so decoding would say decode_failed: too_large proves the header check ran first.
    lying = png_from_rows(8000, 6250, bit_depth=8, colour_type=0, idat=b"not zlib")
    assert reason_of(lying) == "too_large"
    assert reason_of(lying, LoadLimits(max_pixels=60_000_000)) == "decode_failed"


def test_max_pixels_and_max_bytes_apply_to_ordinary_images() -> None:
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert reason_of(data, LoadLimits(max_pixels=9_999)) == "too_large"
    assert decode_image(data, LoadLimits(max_pixels=10_000)).size == (100, 100)
    assert reason_of(data, LoadLimits(max_bytes=len(data) - 1)) == "too_large"
    assert decode_image(data, LoadLimits(max_bytes=len(data))).size == (100, 100)


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), LIMITS)
    assert image.mode == "RGB"
    assert_close(image.getpixel((8, 8)), RED)


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("PNG", "<u2"), ("TIFF", "<u2"), ("TIFF", ">u2")],
    ids=["png16", "tiff16-little", "tiff16-big"],
)
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt: str, dtype: str) -> None:
    samples = np.array([[0, 1000, 32768, 65535]], dtype=dtype)
    image = decode_image(encode(Image.fromarray(samples), fmt), EVERY_FORMAT)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (3, 3, 3), (128,) * 3, (255,) * 3]


def test_float_tiff_in_unit_range_is_scaled() -> None:
    samples = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = decode_image(encode(Image.fromarray(samples, "F"), "TIFF"), EVERY_FORMAT)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(
    ("mode", "value", "expected_grey"),
    [
        ("1", 1, 255),
        ("L", 77, 77),
        ("I;16", 77 << 8, 77),
        ("I", 77 << 8, 77),
        ("I", -1000, 0),  # outside the 16-bit range: its own range is stretched (single value -> 0)
        ("F", 77 / 255, 77),
        ("LA", (77, 255), 77),
        ("LA", (77, 0), 255),
    ],
)
def test_every_mode_maps_to_the_grey_a_viewer_sees(mode: str, value: object, expected_grey: int) -> None:
    image = to_rgb(Image.new(mode, (2, 2), value))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (expected_grey,) * 3


def test_rgba_is_composited_onto_white() -> None:
    image = decode_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG"), LIMITS)
    assert_close(image.getpixel((0, 0)), (255, 127, 127), tolerance=1)


def test_palette_transparency_becomes_white() -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # 0: black, 1: red
    palette_image.putpixel((1, 0), 1)
    data = encode(palette_image, "PNG", transparency=0)
    image = decode_image(data, LIMITS)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED


def animated_formats() -> list[str]:
    formats = ["GIF", "PNG"]
    if features.check("webp"):
        formats.append("WEBP")
    return formats


@pytest.mark.parametrize("fmt", animated_formats())
def test_animation_yields_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, (0, 255, 0), BLUE)]
    options: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        options["lossless"] = True
    image = decode_image(encode(frames[0], fmt, **options), LIMITS)
    assert image.size == (8, 8)
    assert_close(image.getpixel((4, 4)), RED, tolerance=2)


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_six_turns_the_image_upright() -> None:
    # Stored 40x20 with red on the left; orientation 6 = rotate 90 degrees clockwise to view.
    image = decode_image(jpeg_with_orientation(halves(40, 20, RED, BLUE), 6), LIMITS)
    assert image.size == (20, 40)
    assert_close(image.getpixel((10, 5)), RED)
    assert_close(image.getpixel((10, 35)), BLUE)


def test_draft_decodes_a_large_jpeg_at_a_reduced_scale() -> None:
    data = encode(halves(2048, 1536, RED, BLUE), "JPEG")
    image = decode_image(data, LIMITS, draft_to=(256, 256))
    # DCT scaling picks 1/4, the largest reduction that keeps both sides >= 256.
    assert image.size == (512, 384)
    assert_close(image.getpixel((10, 10)), RED)
    assert_close(image.getpixel((500, 10)), BLUE)


def test_draft_keeps_exif_orientation() -> None:
    data = jpeg_with_orientation(halves(1024, 512, RED, BLUE), 6)
    image = decode_image(data, LIMITS, draft_to=(64, 256))
    assert image.size == (128, 256)
    assert image.width >= 64 and image.height >= 256
    assert_close(image.getpixel((64, 10)), RED)
    assert_close(image.getpixel((64, 245)), BLUE)


def test_draft_reduces_other_formats_too() -> None:
    image = decode_image(encode(halves(1024, 768, RED, BLUE), "PNG"), LIMITS, draft_to=(256, 256))
    assert image.size == (342, 256)
    assert image.getpixel((5, 5)) == RED


def test_draft_never_enlarges_a_small_image() -> None:
    image = decode_image(encode(Image.new("RGB", (100, 80), RED), "JPEG"), LIMITS, draft_to=(256, 256))
    assert image.size == (100, 80)


def test_draft_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="draft_to"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), LIMITS, draft_to=(0, 10))


def test_limits_come_from_the_environment() -> None:
    from common.config import ConfigError, load_settings

    env = {"MODSTREAM_LIMITS_FORMATS": "jpeg, png,tiff", "MODSTREAM_LIMITS_HTTP_PORTS": "80,8080",
           "MODSTREAM_LIMITS_FILE_ROOTS": "/data/a,/data/b", "MODSTREAM_LIMITS_DECODE_CPU_S": "0.5",
           "MODSTREAM_LIMITS_DECODE_MEMORY_MB": "64", "MODSTREAM_LIMITS_DECODE_WORKERS": "3"}
    limits = load_settings(env=env).load_limits()
    assert limits.formats == ("JPEG", "PNG", "TIFF")
    assert limits.http_ports == (80, 8080)
    assert limits.file_roots == ("/data/a", "/data/b")
    assert (limits.decode_cpu_s, limits.decode_memory_bytes, limits.decode_workers) == (0.5, 64 << 20, 3)
    defaults = load_settings(env={}).load_limits()
    assert defaults.formats == ("JPEG", "PNG", "WEBP", "GIF")
    assert defaults.file_roots == ()
    assert defaults.http_ports == (80, 443)
    for bad in ({"MODSTREAM_LIMITS_FORMATS": "eps"}, {"MODSTREAM_LIMITS_HTTP_PORTS": "0"}):
        with pytest.raises(ConfigError, match="MODSTREAM_LIMITS_"):
            load_settings(env=bad)
