"""Seeded test data shaped like the real thing where it matters for speed.

Colour histograms: photos put most pixels in a few of the 64 bins, and many photos share a
palette (beaches, offices, skin), so references form clusters. Each histogram mixes one of
a fixed set of sparse palettes with a sparse palette of its own, then counts the pixels of
a 128 x 96 image drawn from that mix: counts / pixels, as common.features.color_histogram
makes them, which also keeps the values far from float32 denormals (raw Dirichlet
samples slow BLAS brute force tenfold).

Photos: smooth colour fields at three scales plus sensor grain. JPEG decode time follows
pixels and entropy, so the grain matters; a flat image would decode unrealistically fast.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from common.features import HISTOGRAM_BINS

HISTOGRAM_PIXELS = 128 * 96  # what color_histogram counts for a 4:3 photo
_PALETTE_CONCENTRATION = 0.08  # Dirichlet alpha: most mass in a handful of bins
_CHUNK = 100_000


class HistogramSource:
    """Histograms from one seeded set of shared palettes; draw references and queries from
    the same source so that queries have real neighbours."""

    def __init__(self, seed: int, palettes: int = 1000) -> None:
        self._rng = np.random.default_rng(seed)
        self._palettes = self._rng.dirichlet(np.full(HISTOGRAM_BINS, _PALETTE_CONCENTRATION), size=palettes)

    def sample(self, count: int) -> np.ndarray:
        """count histograms, float32 rows summing to 1."""
        out = np.empty((count, HISTOGRAM_BINS), dtype=np.float32)
        for start in range(0, count, _CHUNK):
            rows = min(_CHUNK, count - start)
            own = self._rng.dirichlet(np.full(HISTOGRAM_BINS, _PALETTE_CONCENTRATION), size=rows)
            shared = self._palettes[self._rng.integers(0, len(self._palettes), rows)]
            weight = self._rng.uniform(0.5, 0.95, size=(rows, 1))
            counts = self._rng.multinomial(HISTOGRAM_PIXELS, weight * shared + (1 - weight) * own)
            out[start:start + rows] = counts / HISTOGRAM_PIXELS
        return out


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A distinct photo-like RGB image: broad colour regions, mid-scale shading, grain."""
    columns = max(2, round(3 * width / height))
    pixels = _upscaled(rng.uniform(0, 255, (3, columns, 3)), width, height)
    for cells, spread in ((12, 35.0), (48, 12.0)):  # shading, then texture, around mid grey
        pixels += _upscaled(128 + rng.normal(0, spread, (cells, cells * columns // 3, 3)), width, height) - 128
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * 6.0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _upscaled(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def resized_jpeg(image: Image.Image, factor: float, quality: int = 90) -> bytes:
    """A resized copy as a new upload: a near duplicate for dedup."""
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return jpeg(image.resize(size, Image.Resampling.LANCZOS), quality)
