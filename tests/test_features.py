"""Image features: PDQ on real photographs (copies found, distinct photos apart,
flat and tiny images never near-matched, rotations only with dihedral matching),
fixed histogram bins, stability guards and the demo samples."""

from __future__ import annotations

import io
import itertools
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_sample_image

from common.decisions import variants
from common.errors import ModstreamError
from common.features import (
    DEFAULT_PDQ_MAX_DISTANCE,
    HISTOGRAM_BINS,
    MIN_PDQ_QUALITY,
    InvalidHashError,
    cnn_input,
    color_histogram,
    extract_features,
    hamming,
    md5_hex,
    pdq_hex,
    pdq_square,
    pdq_to_int,
    phash_hex,
)
from deploy import make_samples

# scikit-image's bundled photographs (no download). clock is left out: PDQ rates it 34,
# below the near-matching floor, which test_low_quality_photos_are_not_near_matched covers.
ASTRONAUT_PDQ = "4d6b12f3ad56cf29c79cabd2506fa83494196c819edd04de0a26b855fc99b724"
PHOTOS = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "colorwheel", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")


def _jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _pipeline_features(data: bytes):
    """Decode as the pipeline does (a JPEG draft of ~256 px), then extract."""
    image = Image.open(io.BytesIO(data))
    size = image.size
    image.draft("RGB", (256, 256))
    return extract_features(data, image.convert("RGB"), size)


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (256, 256)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _checkerboard(side: int, square: int) -> Image.Image:
    rows, columns = np.mgrid[0:side, 0:side]
    grey = (((rows // square + columns // square) % 2) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


@cache
def _sklearn_photo(name: str) -> Image.Image:
    return Image.fromarray(load_sample_image(f"{name}.jpg"))


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: _photo(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def originals(photos: dict[str, Image.Image]) -> dict[str, object]:
    return {name: _pipeline_features(_jpeg_bytes(photo)) for name, photo in photos.items()}


# --- exact hash -------------------------------------------------------------


def test_md5_stability_guard() -> None:
    """Stability guard: the MD5 key of a fixed PNG must never change (stored state depends on it)."""
    rows, columns = np.mgrid[0:16, 0:16]
    pixels = np.stack([columns * 16, rows * 16, (columns + rows) * 8], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    # Level 0 stores the pixels uncompressed, so the bytes do not depend on the zlib build.
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=0)
    assert md5_hex(buffer.getvalue()) == "26f8254f7c7764b30908cf6898156895"


# --- PDQ --------------------------------------------------------------------


def test_pdq_is_64_lowercase_hex_digits_with_quality(photos: dict[str, Image.Image]) -> None:
    for photo in photos.values():
        digest, quality = pdq_hex(photo)
        assert len(digest) == 64 and digest == digest.lower()
        assert pdq_to_int(digest) == int(digest, 16)
        assert 0 <= quality <= 100


def test_pdq_stability_guard(photos: dict[str, Image.Image]) -> None:
    """Stability guard, not a correctness check: remembered state and banks hold these hashes,
    so a change of library, resize or bit order must be noticed (and the state rebuilt)."""
    assert pdq_hex(photos["astronaut"]) == (ASTRONAUT_PDQ, 100)


def test_hamming_counts_differing_bits_of_hex_and_int() -> None:
    assert hamming("0" * 64, "f" * 64) == 256
    assert hamming("8" + "0" * 62 + "1", 0) == 2
    assert hamming("ab" * 32, ("AB" * 32)) == 0


@pytest.mark.parametrize("malformed", ["ab" * 31, "ab" * 33, "g" * 64, "+" * 64, ""])
def test_pdq_to_int_rejects_malformed_hashes(malformed: str) -> None:
    with pytest.raises(InvalidHashError, match="64 hex digits"):
        pdq_to_int(malformed)
    with pytest.raises(ModstreamError):
        hamming(malformed, 0)


@pytest.mark.parametrize("name", PHOTOS)
def test_resized_and_recompressed_copies_are_near_matched(photos: dict[str, Image.Image], originals: dict,
                                                          name: str) -> None:
    photo, original = photos[name], originals[name]
    copies = {
        "half": photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.LANCZOS),
        "third": photo.resize((photo.width // 3, photo.height // 3), Image.Resampling.BILINEAR),
    }
    found = {label: _pipeline_features(_jpeg_bytes(copy)) for label, copy in copies.items()}
    found["q40"] = _pipeline_features(_jpeg_bytes(photo, quality=40))
    assert original.near_matchable
    for label, copy in found.items():
        assert copy.near_matchable, label
        assert hamming(original.pdq, copy.pdq) <= DEFAULT_PDQ_MAX_DISTANCE, label


def test_distinct_photos_are_never_near_matched(originals: dict) -> None:
    for left, right in itertools.combinations(originals, 2):
        assert hamming(originals[left].pdq, originals[right].pdq) > 2 * DEFAULT_PDQ_MAX_DISTANCE, (left, right)


def test_low_quality_photos_are_not_near_matched() -> None:
    clock = _pipeline_features(_jpeg_bytes(_photo("clock")))
    assert clock.pdq_quality < MIN_PDQ_QUALITY
    assert not clock.near_matchable


@pytest.mark.parametrize(
    "image",
    [
        _solid((255, 255, 255)),
        _solid((0, 0, 0)),
        _solid((120, 30, 200)),
        _solid((9, 9, 9), size=(8, 8)),
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)),
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (31, 200, 3), dtype=np.uint8)),
    ],
    ids=["white", "black", "purple", "tiny-flat", "tiny-noise", "thin-noise"],
)
def test_flat_and_tiny_images_are_never_near_matched(image: Image.Image) -> None:
    features = extract_features(_jpeg_bytes(image), image, original_size=image.size)
    assert features.pdq_quality < MIN_PDQ_QUALITY
    assert not features.near_matchable


def test_rotated_copy_is_found_only_with_dihedral_matching(originals: dict, photos: dict[str, Image.Image]) -> None:
    original = originals["coffee"]
    rotated = _pipeline_features(_jpeg_bytes(photos["coffee"].transpose(Image.Transpose.ROTATE_90)))
    mirrored = _pipeline_features(_jpeg_bytes(photos["coffee"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    for copy in (rotated, mirrored):
        assert hamming(original.pdq_int, copy.pdq_int) > DEFAULT_PDQ_MAX_DISTANCE
        assert min(hamming(original.pdq_int, v) for v in variants(copy, dihedral=True)) <= DEFAULT_PDQ_MAX_DISTANCE
        assert variants(copy, dihedral=False) == (copy.pdq_int,)


def test_dihedral_variants_start_with_the_image_itself(photos: dict[str, Image.Image]) -> None:
    features = extract_features(b"", photos["camera"], photos["camera"].size)
    assert len(features.pdq_variants) == 8
    assert features.pdq_variants[0] == pdq_to_int(features.pdq)
    assert len(set(features.pdq_variants)) == 8




def test_histogram_has_64_normalised_float32_bins(photos: dict[str, Image.Image]) -> None:
    histogram = color_histogram(_sklearn_photo("flower"))
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


def test_histogram_stability_guard() -> None:
    """Stability guard: kNN indexes built offline depend on these bin values."""
    histogram = color_histogram(_sklearn_photo("china"))
    expected = {63: 0.35547, 0: 0.18078, 20: 0.11128, 21: 0.10029, 47: 0.06713}
    for bin_index, share in expected.items():
        assert histogram[bin_index] == pytest.approx(share, abs=1e-3), bin_index


# --- CNN input --------------------------------------------------------------


def test_cnn_input_is_uint8_at_the_requested_size(photos: dict[str, Image.Image]) -> None:
    tensor = cnn_input(_sklearn_photo("china"))
    assert tensor.shape == (224, 224, 3)
    assert tensor.dtype == np.uint8
    assert cnn_input(_sklearn_photo("china"), size=96).shape == (96, 96, 3)


def test_cnn_input_resizes_the_whole_image_without_cropping() -> None:
    pixels = np.zeros((100, 400, 3), dtype=np.uint8)
    pixels[:, 300:] = 255  # the right quarter is white; a centre crop would lose it
    tensor = cnn_input(Image.fromarray(pixels, mode="RGB"), size=64)
    assert (tensor[:, -8:] == 255).all()
    assert (tensor[:, :40] == 0).all()


# --- everything at once -----------------------------------------------------


def test_extract_features_matches_the_single_functions(photos: dict[str, Image.Image]) -> None:
    data = _jpeg_bytes(photos["coffee"], quality=90)
    decoded = _decode(data)
    features = extract_features(data, decoded, original_size=(1280, 854))
    assert features.md5 == md5_hex(data)
    assert (features.pdq, features.pdq_quality) == pdq_hex(decoded)
    assert features.phash == phash_hex(pdq_square(decoded))
    np.testing.assert_array_equal(features.histogram, color_histogram(decoded))
    np.testing.assert_array_equal(features.cnn_input, cnn_input(decoded))
    assert (features.width, features.height) == (1280, 854)


def test_extract_features_freezes_arrays() -> None:
    blank = _solid((255, 255, 255))
    features = extract_features(_jpeg_bytes(blank, quality=90), blank, original_size=blank.size)
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
        # other CPUs, which can move a rounded pixel, so allow a few bits, never a new image.
        assert hamming(pdq_hex(regenerated)[0], pdq_hex(sample)[0]) <= 8, name


def test_generator_is_deterministic() -> None:
    first = next(iter(make_samples.SCENES))
    assert make_samples.encode_jpeg(make_samples.render(first)) == make_samples.encode_jpeg(
        make_samples.render(first)
    )


def test_write_samples_writes_every_scene(tmp_path: Path) -> None:
    paths = make_samples.write_samples(tmp_path)
    assert sorted(path.name for path in paths) == sorted(f"{name}.jpg" for name in make_samples.SCENES)
    assert all(_decode(path.read_bytes()).size == (320, 240) for path in paths)


def test_samples_are_near_matchable_and_pairwise_distinct(checked_in_samples: dict[str, Image.Image]) -> None:
    """PDQ rates the clock photograph 34 (below 50), so the demo's copies of it are not
    near-matched, and must not be; every other sample is near-matchable and far from the rest."""
    digests, low_quality = {}, []
    for name, sample in checked_in_samples.items():
        digest, quality = pdq_hex(sample)
        if quality < MIN_PDQ_QUALITY:
            low_quality.append(name)
        digests[name] = digest
    assert low_quality == ["clock"]
    del digests["clock"]
    for left, right in itertools.combinations(digests, 2):
        assert hamming(digests[left], digests[right]) > 2 * DEFAULT_PDQ_MAX_DISTANCE, (left, right)


def test_resized_samples_stay_near_their_original(checked_in_samples: dict[str, Image.Image]) -> None:
    """The demo's resized duplicates must be caught as near duplicates."""
    for name, sample in checked_in_samples.items():
        half_size = sample.resize((160, 120), Image.Resampling.BILINEAR)
        assert hamming(pdq_hex(sample)[0], pdq_hex(half_size)[0]) <= DEFAULT_PDQ_MAX_DISTANCE, name
