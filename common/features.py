"""Image features computed once per upload: exact hash, perceptual hash and its
quality, colour histogram and the CNN's input tensor.

Everything here is a pure function of the raw bytes and the decoded RGB image,
so any actor can compute it and tests can pin its outputs. The decoded image is
usually a JPEG draft of ~256 px, so every feature is built to be cheap and
stable on small images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from scipy.fft import dctn

from common.errors import ModstreamError

PHASH_HEX_DIGITS = 16
"""A 64-bit pHash written as lowercase hex; the dedup key and the Verdict's `hashes.phash`."""

HISTOGRAM_BINS = 64
"""4 x 4 x 4 RGB bins; bin index = r_bin * 16 + g_bin * 4 + b_bin with channel_bin = value >> 6."""

MIN_PHASH_QUALITY = 0.5
"""Below this quality a pHash must not be used for near-duplicate matching (exact MD5
matching is still fine). Natural photos score 0.75-0.9; flat, tiny and synthetic
high-frequency images score 0-0.3, so the threshold sits in the wide gap between."""

CNN_INPUT_SIZE = 224  # the default MobileNet graph's fixed input side

_HEX_DIGITS = frozenset("0123456789abcdef")
_HASH_SIZE = 8  # imagehash's default: an 8 x 8 block of DCT coefficients -> 64 bits
_HASH_SOURCE_SIZE = 32  # imagehash resizes to 32 x 32 greyscale before the DCT
_HISTOGRAM_MAX_SIDE = 128
_MIN_SIDE_FOR_PHASH = 32  # below this pHash upsamples, and its bits describe interpolation, not content
_FULL_CONTRAST_GREY_LEVELS = 8.0  # std of the low-frequency picture at which contrast stops limiting quality
_FULL_LOW_FREQUENCY_SHARE = 0.5  # share of detail energy in the hashed block at which it stops limiting
_ROBUST_BIT_MARGIN = 0.1  # a bit is robust when its coefficient is this far (x rms) from the median


class InvalidPhashError(ModstreamError, ValueError):
    """A pHash that is not 16 hex digits, e.g. in a ReviewDecision from outside."""


def md5_hex(data: bytes) -> str:
    """MD5 of the raw bytes: the exact-duplicate key (not a security boundary)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def phash_hex(img: Image.Image) -> str:
    """imagehash's 64-bit pHash as 16 lowercase hex digits.

    The hex string (or `phash_to_int`) is the key to store; `hash(ImageHash)`
    keeps only 8 bits and must never be used."""
    return str(imagehash.phash(img, hash_size=_HASH_SIZE))


def phash_to_int(phash: str) -> int:
    """The integer form of a pHash hex string, for `hamming` and compact storage."""
    if len(phash) != PHASH_HEX_DIGITS or not set(phash.lower()) <= _HEX_DIGITS:
        raise InvalidPhashError(f"a pHash is {PHASH_HEX_DIGITS} hex digits, got {phash!r}")
    return int(phash, 16)


def hamming(a: str | int, b: str | int) -> int:
    """Number of differing bits between two pHashes given as hex strings or ints."""
    left = phash_to_int(a) if isinstance(a, str) else a
    right = phash_to_int(b) if isinstance(b, str) else b
    return (left ^ right).bit_count()


def phash_quality(img: Image.Image) -> float:
    """How far the pHash of `img` can be trusted for near matching, in [0, 1].

    pHash thresholds the 8 x 8 lowest DCT coefficients of a 32 x 32 greyscale
    copy at their median. A bit is stable only if its coefficient sits clearly
    away from that median, so the score is the share of such robust bits,
    reduced when either of two conditions makes even those bits fragile:

    - too little contrast in the low frequencies (blank or single-colour
      images, faint noise): the coefficients are rounding noise;
    - detail energy mostly outside the hashed block (checkerboards, fine
      patterns, noise): a resize or re-encode aliases it into the block.

    Images under 32 px on a side score 0, because pHash upsamples them.
    Sparse spectra (a gradient, a disc, two halves) leave many coefficients
    tied at the median and score low too: their bits flip with small shifts.
    Compare the result with MIN_PHASH_QUALITY.
    """
    return _quality_of_hash_source(_hash_source(img), shortest_side=min(img.size))


def _hash_source(img: Image.Image) -> Image.Image:
    """The 32 x 32 greyscale copy imagehash's pHash works on (same filter), so that
    hashing it again is a no-op resize and gives the same hash as the full image."""
    return img.convert("L").resize((_HASH_SOURCE_SIZE, _HASH_SOURCE_SIZE), Image.Resampling.LANCZOS)


def _quality_of_hash_source(grey: Image.Image, shortest_side: int) -> float:
    if shortest_side < _MIN_SIDE_FOR_PHASH:
        return 0.0
    # Orthonormal DCT: squared coefficients sum to the pixels' squared values (Parseval).
    coefficients = dctn(np.asarray(grey, dtype=np.float64), norm="ortho")
    block = coefficients[:_HASH_SIZE, :_HASH_SIZE]
    energy = np.square(coefficients)
    dc_energy = energy[0, 0]
    detail_energy = energy.sum() - dc_energy
    low_detail_energy = np.square(block).sum() - dc_energy
    if low_detail_energy <= 0.0:
        return 0.0

    low_frequency_std = float(np.sqrt(low_detail_energy / energy.size))
    contrast = min(1.0, low_frequency_std / _FULL_CONTRAST_GREY_LEVELS)
    low_frequency_share = min(1.0, low_detail_energy / detail_energy / _FULL_LOW_FREQUENCY_SHARE)

    detail_rms = np.sqrt(low_detail_energy / (block.size - 1))
    distance_from_median = np.abs(block - np.median(block))
    robust_share = float(np.mean(distance_from_median >= _ROBUST_BIT_MARGIN * detail_rms))
    return robust_share * contrast * low_frequency_share


def color_histogram(img: Image.Image) -> np.ndarray:
    """Normalised 64-bin RGB histogram (float32, sums to 1), the kNN feature.

    Bins are fixed so indexes built offline and vectors computed online agree:
    each channel is quantised by `value >> 6` into 4 levels and the bin index is
    r_bin * 16 + g_bin * 4 + b_bin. Large images are box-reduced to at most
    128 px first; the histogram of a picture barely changes, and the cost stays
    flat. Counts / pixels keeps the values far from float32 denormals.
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    reduce_factor = -(-max(rgb.size) // _HISTOGRAM_MAX_SIDE)  # ceiling division
    if reduce_factor > 1:
        rgb = rgb.reduce(reduce_factor)
    levels = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3) >> 6
    bin_index = levels[:, 0].astype(np.intp) * 16 + levels[:, 1] * 4 + levels[:, 2]
    counts = np.bincount(bin_index, minlength=HISTOGRAM_BINS)
    return (counts / bin_index.size).astype(np.float32)


def cnn_input(img: Image.Image, size: int = CNN_INPUT_SIZE) -> np.ndarray:
    """The whole image bilinearly resized to (size, size, 3) uint8, no crop.

    The default model was trained on whole resized images; uint8 keeps the
    object passed between Ray actors 4x smaller than float32. The classifier
    applies its model's own scaling ((x - 128) / 128 for the default)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """Every feature of one upload, computed once and passed between stages.

    `eq=False`: numpy arrays have no single truth value, so field-wise equality
    would raise; compare fields explicitly. The arrays are read-only."""

    md5: str
    phash: str
    phash_quality: float
    phash_reliable: bool
    histogram: np.ndarray
    cnn_input: np.ndarray
    width: int
    height: int


def extract_features(data: bytes, img: Image.Image, original_size: tuple[int, int]) -> ImageFeatures:
    """Compute all features of one upload.

    `img` is the decoded (possibly draft-reduced) RGB image; `original_size` is
    the (width, height) of the full image, which a draft decode no longer has."""
    hash_source = _hash_source(img)
    quality = _quality_of_hash_source(hash_source, shortest_side=min(img.size))
    histogram = color_histogram(img)
    tensor = cnn_input(img)
    histogram.setflags(write=False)
    tensor.setflags(write=False)
    width, height = original_size
    return ImageFeatures(
        md5=md5_hex(data),
        phash=phash_hex(hash_source),
        phash_quality=quality,
        phash_reliable=bool(quality >= MIN_PHASH_QUALITY),
        histogram=histogram,
        cnn_input=tensor,
        width=width,
        height=height,
    )
