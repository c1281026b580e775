"""Image features computed once per upload: exact hash, PDQ perceptual hash and
its quality, colour histogram and the CNN's input tensor.

Everything here is a pure function of the raw bytes and the decoded RGB image,
so any actor can compute it and tests can pin its outputs. The decoded image is
usually a JPEG draft of ~256 px, so every feature is built to be cheap and
stable on small images.

PDQ (Meta's 256-bit perceptual hash, the reference C++ via ``pdqhash``) is the
near-duplicate key: on natural photographs a half- or third-size copy or a
JPEG q40 re-encode moves it by at most ~31 bits while distinct photos sit
~100+ bits apart, and it comes with its own quality score (0-100). imagehash's
64-bit pHash is still computed for consumers that index by it, but no decision
uses it: 64 bits cannot separate millions of photos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import imagehash
import numpy as np
import pdqhash
from PIL import Image

from common.errors import ModstreamError

PDQ_BITS = 256
PDQ_HEX_DIGITS = 64
"""A PDQ hash written as 64 lowercase hex digits: the 256 bits pdqhash returns, in order,
read as one big-endian number (ThreatExchange's convention)."""

MIN_PDQ_QUALITY = 50
"""Below this quality a PDQ hash is never used for near matching (the PDQ spec's rule);
exact MD5 matching is still fine. Flat and near-flat images score ~0."""

DEFAULT_PDQ_MAX_DISTANCE = 31
"""Near match: both qualities >= MIN_PDQ_QUALITY and at most this many differing bits."""

MIN_SIDE_FOR_PDQ = 32
"""PDQ upsamples smaller images, and its bits then describe interpolation, not content:
a random 8 x 8 image scores quality 100. Such images get quality 0, so they are never
near-matched (exact matching still applies)."""

PDQ_SIDE = 160
"""Every image is resized to 160 x 160 before PDQ. Hashing whatever size the decode gave
lets the sampling differ between an original (a 2x JPEG draft) and its third-size copy
(no draft): on scikit-image's photographs that moved PDQ by up to 62 bits on textures
(brick, grass). At one fixed size with a proper low-pass the worst 1/2, 1/3 or q40 copy
moved 14 bits, and distinct photos stayed >= 100 apart.

The low-pass is Pillow's bilinear, which widens its triangle filter with the scale when
shrinking. On the 14 photographs of tests/test_features.py it did as well as Lanczos (worst
copy 8 bits against 10, distinct photos >= 90 apart with either) at 0.4x the cost: 1.3
against 3.4 ms for a 512 x 384 draft, which was the largest single cost of an image's
features. A hash from before the switch (Lanczos) differs by at most 6 bits from the same
image's hash now, so remembered state still near-matches."""

DIHEDRAL_VARIANTS = 8  # pdqhash.compute_dihedral: the original, 3 rotations, 4 flips

PHASH_HEX_DIGITS = 16
"""imagehash's 64-bit pHash as lowercase hex: the Verdict's optional `hashes.phash`."""

HISTOGRAM_BINS = 64
"""4 x 4 x 4 RGB bins; bin index = r_bin * 16 + g_bin * 4 + b_bin with channel_bin = value >> 6."""

CNN_INPUT_SIZE = 224  # the default MobileNet graph's fixed input side

_HEX_DIGITS = frozenset("0123456789abcdef")
_HASH_SIZE = 8  # imagehash's default: an 8 x 8 block of DCT coefficients -> 64 bits
_HISTOGRAM_MAX_SIDE = 128


class InvalidHashError(ModstreamError, ValueError):
    """A hash of the wrong length or with non-hex digits, e.g. in a ReviewDecision or a bank file."""



def md5_hex(data: bytes) -> str:
    """MD5 of the raw bytes: the exact-duplicate key (not a security boundary)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def phash_hex(img: Image.Image) -> str:
    """imagehash's 64-bit pHash as 16 lowercase hex digits (informational only).

    The pipeline hashes the PDQ square (``pdq_square``), which imagehash shrinks to
    32 x 32 at a tenth of the cost of shrinking the decoded image."""
    return str(imagehash.phash(img, hash_size=_HASH_SIZE))


def phash_to_int(phash: str) -> int:
    """The integer form of a pHash hex string."""
    return _hex_to_int(phash, PHASH_HEX_DIGITS, "pHash")


def pdq_to_int(pdq: str) -> int:
    """The integer form of a PDQ hex string, for `pdq_distance` and compact storage."""
    return _hex_to_int(pdq, PDQ_HEX_DIGITS, "PDQ hash")


def pdq_hex_of_int(value: int) -> str:
    return f"{value:0{PDQ_HEX_DIGITS}x}"


def _hex_to_int(text: str, digits: int, name: str) -> int:
    if not isinstance(text, str) or len(text) != digits or not set(text.lower()) <= _HEX_DIGITS:
        raise InvalidHashError(f"a {name} is {digits} hex digits, got {text!r}")
    return int(text, 16)


def hamming(a: str | int, b: str | int) -> int:
    """Number of differing bits between two PDQ hashes given as hex strings or ints."""
    left = pdq_to_int(a) if isinstance(a, str) else a
    right = pdq_to_int(b) if isinstance(b, str) else b
    return (left ^ right).bit_count()


def near_matchable(quality: int) -> bool:
    """Whether a PDQ hash of this quality may be used for near matching."""
    return quality >= MIN_PDQ_QUALITY


def pdq_square(img: Image.Image) -> Image.Image:
    """The PDQ_SIDE x PDQ_SIDE RGB image PDQ hashes (see PDQ_SIDE for why one fixed size)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return rgb.resize((PDQ_SIDE, PDQ_SIDE), Image.Resampling.BILINEAR)


def pdq_hashes(img: Image.Image) -> tuple[list[int], int]:
    """PDQ of the image and of its 7 rotations/flips (index 0 is the image itself), and its quality."""
    return _pdq_of_square(pdq_square(img), img.size)


def _pdq_of_square(square: Image.Image, original_size: tuple[int, int]) -> tuple[list[int], int]:
    """compute_dihedral costs about the same as one hash (the DCT is shared), so the
    variants are always computed; matching uses them only when dihedral matching is on."""
    bits, quality_of_all = pdqhash.compute_dihedral(np.ascontiguousarray(np.asarray(square, dtype=np.uint8)))
    quality = int(quality_of_all) if min(original_size) >= MIN_SIDE_FOR_PDQ else 0
    return [_bits_to_int(variant) for variant in bits], quality


def pdq_hex(img: Image.Image) -> tuple[str, int]:
    """The PDQ hash as 64 hex digits and its quality (0 for images under MIN_SIDE_FOR_PDQ)."""
    variants, quality = pdq_hashes(img)
    return pdq_hex_of_int(variants[0]), quality


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes(), "big")


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
    would raise; compare fields explicitly. The arrays are read-only.
    `pdq_variants` are the integer PDQs of the image's 8 rotations/flips, the
    first being `pdq` itself."""

    md5: str
    pdq: str
    pdq_quality: int
    pdq_variants: tuple[int, ...]
    phash: str
    histogram: np.ndarray
    cnn_input: np.ndarray
    width: int
    height: int

    @property
    def pdq_int(self) -> int:
        return self.pdq_variants[0]

    @property
    def near_matchable(self) -> bool:
        return near_matchable(self.pdq_quality)


def extract_features(data: bytes, img: Image.Image, original_size: tuple[int, int],
                     model_input: Callable[[Image.Image], np.ndarray] = cnn_input,
                     md5: str | None = None) -> ImageFeatures:
    """Compute all features of one upload.

    `img` is the decoded (possibly draft-reduced) RGB image; `original_size` is
    the (width, height) of the full image, which a draft decode no longer has.
    `model_input` makes the CNN's uint8 input the way the serving bundle wants it
    (its resize and crop), so the image is resized for the model only once. `md5`: the
    bytes' MD5 when the caller already has it."""
    square = pdq_square(img)
    variants, quality = _pdq_of_square(square, img.size)
    histogram = color_histogram(img)
    tensor = model_input(img)
    histogram.setflags(write=False)
    tensor.setflags(write=False)
    width, height = original_size
    return ImageFeatures(
        md5=md5 or md5_hex(data),
        pdq=pdq_hex_of_int(variants[0]),
        pdq_quality=quality,
        pdq_variants=tuple(variants),
        phash=phash_hex(square),
        histogram=histogram,
        cnn_input=tensor,
        width=width,
        height=height,
    )
