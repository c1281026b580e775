"""Image features: hash robustness on real photos, quality gating of unstable
pHashes, fixed histogram bins, pinned regression values and the demo samples."""

from __future__ import annotations

import hashlib
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from common.errors import ModstreamError
from common.features import (
    HISTOGRAM_BINS,
    MIN_PHASH_QUALITY,
    InvalidPhashError,
    cnn_input,
    color_histogram,
    extract_features,
    hamming,
    md5_hex,
    phash_hex,
    phash_quality,
    phash_to_int,
)
from deploy import make_samples


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (256, 256)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _checkerboard(side: int, square: int) -> Image.Image:
    rows, columns = np.mgrid[0:side, 0:side]
    grey = (((rows // square + columns // square) % 2) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """The two real photos sklearn ships (640 x 427) and crops from opposite corners."""
    images = {}
    for name in ("china", "flower"):
        photo = Image.fromarray(load_sample_image(f"{name}.jpg"))
        images[name] = photo
        images[f"{name}-top-left"] = photo.crop((0, 0, 320, 240))
        images[f"{name}-bottom-right"] = photo.crop((320, 187, 640, 427))
    return images


# --- exact hash -------------------------------------------------------------


def test_md5_is_shared_by_exact_copies_only() -> None:
    data = _jpeg_bytes(_solid((10, 20, 30)), quality=90)
    assert md5_hex(bytes(data)) == md5_hex(data)
    assert md5_hex(data) != md5_hex(data + b"\0")
    assert md5_hex(data) == hashlib.md5(data).hexdigest()


def test_md5_of_a_deterministic_png_is_pinned() -> None:
    rows, columns = np.mgrid[0:16, 0:16]
    pixels = np.stack([columns * 16, rows * 16, (columns + rows) * 8], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    # Level 0 stores the pixels uncompressed, so the bytes do not depend on the zlib build.
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=0)
    assert md5_hex(buffer.getvalue()) == "26f8254f7c7764b30908cf6898156895"


# --- perceptual hash --------------------------------------------------------


def test_phash_is_16_lowercase_hex_digits_with_all_64_bits(photos: dict[str, Image.Image]) -> None:
    digests = [phash_hex(photo) for photo in photos.values()]
    for digest in digests:
        assert len(digest) == 16
        assert digest == digest.lower()
        assert phash_to_int(digest) == int(digest, 16)
    assert any(phash_to_int(digest) >= 1 << 56 for digest in digests), "high byte must survive"


def test_phash_of_china_is_pinned(photos: dict[str, Image.Image]) -> None:
    assert phash_hex(photos["china"]) == "9db8c2c7445dbb24"


def test_hamming_counts_differing_bits_of_hex_and_int() -> None:
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("8000000000000001", 0) == 2
    assert hamming(0b1011, 0b0001) == 2
    assert hamming("9db8c2c7445dbb24", "9DB8C2C7445DBB24") == 0


@pytest.mark.parametrize(
    "malformed", ["9db8c2c7", "9db8c2c7445dbb24ff", "9db8c2c7445dbb2g", "+db8c2c7_45dbb24", ""]
)
def test_phash_to_int_rejects_malformed_hashes(malformed: str) -> None:
    with pytest.raises(InvalidPhashError, match="16 hex digits"):
        phash_to_int(malformed)
    with pytest.raises(ModstreamError):
        hamming(malformed, 0)


@pytest.mark.parametrize("name", ["china", "flower", "china-top-left", "flower-bottom-right"])
def test_resized_and_recompressed_copies_stay_near(photos: dict[str, Image.Image], name: str) -> None:
    original = photos[name]
    half_size = original.resize((original.width // 2, original.height // 2), Image.Resampling.BILINEAR)
    recompressed = _decode(_jpeg_bytes(original, quality=40))
    assert hamming(phash_hex(original), phash_hex(half_size)) <= 6
    assert hamming(phash_hex(original), phash_hex(recompressed)) <= 6


def test_distinct_photos_and_crops_are_far_apart(photos: dict[str, Image.Image]) -> None:
    digests = {name: phash_hex(photo) for name, photo in photos.items()}
    for left, right in itertools.combinations(digests, 2):
        assert hamming(digests[left], digests[right]) >= 20, (left, right)


# --- pHash quality ----------------------------------------------------------


def test_photos_have_reliable_phashes(photos: dict[str, Image.Image]) -> None:
    for name, photo in photos.items():
        assert phash_quality(photo) >= MIN_PHASH_QUALITY, name
        draft_sized = photo.copy()
        draft_sized.thumbnail((160, 160))
        assert phash_quality(draft_sized) >= MIN_PHASH_QUALITY, name


@pytest.mark.parametrize(
    "image",
    [
        _solid((255, 255, 255)),
        _solid((200, 30, 30)),
        Image.fromarray(np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB"),
        _checkerboard(side=256, square=8),
        _checkerboard(side=256, square=1),
        _checkerboard(side=300, square=8),
        _checkerboard(side=256, square=64),
        Image.fromarray(np.random.default_rng(8).integers(0, 256, (256, 256, 3), dtype=np.uint8), mode="RGB"),
    ],
    ids=[
        "blank-white",
        "single-colour",
        "tiny-8x8",
        "checker-8px",
        "checker-1px",
        "checker-300",
        "checker-64px",
        "white-noise",
    ],
)
def test_flat_tiny_and_synthetic_patterns_are_unreliable(image: Image.Image) -> None:
    assert 0.0 <= phash_quality(image) < MIN_PHASH_QUALITY


def test_quality_is_zero_below_32_pixels_on_a_side(photos: dict[str, Image.Image]) -> None:
    assert phash_quality(photos["china"].crop((200, 100, 231, 400))) == 0.0


def test_checkerboard_phash_is_actually_unstable_under_resize() -> None:
    """The reason the quality gate exists: a resize moves this hash by many bits."""
    board = _checkerboard(side=256, square=4)
    assert hamming(phash_hex(board), phash_hex(board.resize((160, 160), Image.Resampling.BILINEAR))) > 6


# --- colour histogram -------------------------------------------------------


def test_histogram_has_64_normalised_float32_bins(photos: dict[str, Image.Image]) -> None:
    histogram = color_histogram(photos["flower"])
    assert histogram.shape == (HISTOGRAM_BINS,) == (64,)
    assert histogram.dtype == np.float32
    assert histogram.sum() == pytest.approx(1.0, abs=1e-6)
    assert (histogram >= 0).all()


@pytest.mark.parametrize(
    ("colour", "expected_bin"),
    [((255, 0, 0), 48), ((0, 255, 0), 12), ((0, 0, 255), 3), ((64, 128, 191), 1 * 16 + 2 * 4 + 2)],
)
def test_single_colour_fills_the_documented_bin(colour: tuple[int, int, int], expected_bin: int) -> None:
    histogram = color_histogram(_solid(colour, size=(300, 200)))
    assert histogram[expected_bin] == 1.0
    assert np.count_nonzero(histogram) == 1


def test_histogram_shares_follow_pixel_areas() -> None:
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[:, :25] = (255, 0, 0)  # a quarter red; the rest black (bin 0)
    histogram = color_histogram(Image.fromarray(pixels, mode="RGB"))
    assert histogram[48] == pytest.approx(0.25)
    assert histogram[0] == pytest.approx(0.75)


def test_histogram_of_a_greyscale_image_uses_the_grey_diagonal() -> None:
    histogram = color_histogram(Image.new("L", (50, 50), 200))
    assert histogram[3 * 16 + 3 * 4 + 3] == 1.0


def test_histogram_of_china_is_pinned(photos: dict[str, Image.Image]) -> None:
    histogram = color_histogram(photos["china"])
    expected = {63: 0.35547, 0: 0.18078, 20: 0.11128, 21: 0.10029, 47: 0.06713}
    for bin_index, share in expected.items():
        assert histogram[bin_index] == pytest.approx(share, abs=1e-3), bin_index


# --- CNN input --------------------------------------------------------------


def test_cnn_input_is_uint8_at_the_requested_size(photos: dict[str, Image.Image]) -> None:
    tensor = cnn_input(photos["china"])
    assert tensor.shape == (224, 224, 3)
    assert tensor.dtype == np.uint8
    assert cnn_input(photos["china"], size=96).shape == (96, 96, 3)


def test_cnn_input_resizes_the_whole_image_without_cropping() -> None:
    pixels = np.zeros((100, 400, 3), dtype=np.uint8)
    pixels[:, 300:] = 255  # the right quarter is white; a centre crop would lose it
    tensor = cnn_input(Image.fromarray(pixels, mode="RGB"), size=64)
    assert (tensor[:, -8:] == 255).all()
    assert (tensor[:, :40] == 0).all()


# --- everything at once -----------------------------------------------------


def test_extract_features_matches_the_single_functions(photos: dict[str, Image.Image]) -> None:
    data = _jpeg_bytes(photos["flower"], quality=90)
    decoded = _decode(data)
    features = extract_features(data, decoded, original_size=(1280, 854))
    assert features.md5 == md5_hex(data)
    assert features.phash == phash_hex(decoded)
    assert features.phash_quality == phash_quality(decoded)
    assert features.phash_reliable is True
    np.testing.assert_array_equal(features.histogram, color_histogram(decoded))
    np.testing.assert_array_equal(features.cnn_input, cnn_input(decoded))
    assert (features.width, features.height) == (1280, 854)


def test_extract_features_hashes_exactly_like_phash_hex(photos: dict[str, Image.Image]) -> None:
    """extract_features hashes its own 32 x 32 copy; that must not change a single bit."""
    images = [*photos.values(), _checkerboard(side=256, square=4), _solid((9, 9, 9), size=(8, 8))]
    for image in images:
        features = extract_features(b"", image, original_size=image.size)
        assert features.phash == phash_hex(image)
        assert features.phash_quality == phash_quality(image)


def test_extract_features_marks_flat_images_unreliable_and_freezes_arrays() -> None:
    blank = _solid((255, 255, 255))
    features = extract_features(_jpeg_bytes(blank, quality=90), blank, original_size=blank.size)
    assert features.phash_reliable is False
    with pytest.raises(ValueError, match="read-only"):
        features.histogram[0] = 0.5
    with pytest.raises(ValueError, match="read-only"):
        features.cnn_input[0, 0, 0] = 1


# --- demo samples -----------------------------------------------------------


@pytest.fixture(scope="module")
def checked_in_samples() -> dict[str, Image.Image]:
    return {
        path.stem: Image.open(path).convert("RGB") for path in sorted(make_samples.SAMPLES_DIR.glob("*.jpg"))
    }


def test_samples_folder_holds_exactly_the_scenes(checked_in_samples: dict[str, Image.Image]) -> None:
    assert set(checked_in_samples) == set(make_samples.SCENES)
    for name, sample in checked_in_samples.items():
        assert sample.size == (make_samples.WIDTH, make_samples.HEIGHT), name
        assert (make_samples.SAMPLES_DIR / f"{name}.jpg").stat().st_size < 30_000, name


def test_generator_reproduces_the_checked_in_samples(checked_in_samples: dict[str, Image.Image]) -> None:
    for name, sample in checked_in_samples.items():
        regenerated = _decode(make_samples.encode_jpeg(make_samples.render(name)))
        # Equal on the machine that wrote them; numpy's sin/exp may differ by an ulp on
        # other CPUs, which can move a rounded pixel, so allow a stray bit, never a new image.
        assert hamming(phash_hex(regenerated), phash_hex(sample)) <= 2, name


def test_generator_is_deterministic() -> None:
    first = next(iter(make_samples.SCENES))
    assert make_samples.encode_jpeg(make_samples.render(first)) == make_samples.encode_jpeg(
        make_samples.render(first)
    )


def test_write_samples_writes_every_scene(tmp_path: Path) -> None:
    paths = make_samples.write_samples(tmp_path)
    assert sorted(path.name for path in paths) == sorted(f"{name}.jpg" for name in make_samples.SCENES)
    assert all(_decode(path.read_bytes()).size == (320, 240) for path in paths)


def test_samples_are_reliable_and_pairwise_distinct(checked_in_samples: dict[str, Image.Image]) -> None:
    digests = {}
    for name, sample in checked_in_samples.items():
        assert phash_quality(sample) >= MIN_PHASH_QUALITY, name
        digests[name] = phash_hex(sample)
    for left, right in itertools.combinations(digests, 2):
        assert hamming(digests[left], digests[right]) >= 16, (left, right)


def test_resized_samples_stay_near_their_original(checked_in_samples: dict[str, Image.Image]) -> None:
    """The demo's resized duplicates must be caught as near duplicates."""
    for name, sample in checked_in_samples.items():
        half_size = sample.resize((160, 120), Image.Resampling.BILINEAR)
        assert hamming(phash_hex(sample), phash_hex(half_size)) <= 6, name
