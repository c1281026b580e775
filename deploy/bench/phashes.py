"""64-bit perceptual hashes for the dedup suite, by the million.

Uniform random hashes are what the index's cost model assumes. Hashes of photos are not
uniform: the first bit (the mean brightness) is almost always set, skies and horizons bias
the low vertical frequencies, so some band values are far more common than others and
their buckets hold more candidates. Hashing millions of real images is out of reach here,
so SceneHashes computes pHash exactly as imagehash does (DCT-II of a 32 x 32 grey image,
the 8 x 8 lowest frequencies, a bit per coefficient above their median, first coefficient
most significant) of synthetic scenes: a brightness level plus a few shared parts (sky and
side gradients, a horizon, blobs, smooth patterns) with random weights, a texture of the
scene's own with the 1/f spectrum of natural images, and the 8-bit rounding of a real
image as noise. The DCT is linear, so a scene's 8 x 8 block is the same weighted sum of
its parts' blocks plus its texture's coefficients: ten million hashes cost matrix
products, not ten million images. Near duplicates are the same scene re-weighted
slightly, with fresh noise. hashes_of_pixels is the same computation on real pixels
(tests/test_bench.py checks it against imagehash).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import zoom

SIDE = 32  # imagehash resizes to 32 x 32 before the DCT
BLOCK = 8  # and keeps the 8 x 8 lowest frequencies
_ROUNDING_NOISE = np.sqrt(1 / 12)  # std of rounding a pixel to an integer
_CHUNK = 200_000
TEXTURE_LEVEL = 40.0  # pixel-scale amplitude of the 1/f texture; sets how far apart unrelated scenes are
# Parts of each kind, in dictionary order (see _scene_parts), and their index ranges.
_PART_COUNTS = {"constant": 1, "sky": 1, "side": 1, "horizon": 28, "blob": 50, "pattern": 40}
_KINDS = {kind: (start - count, start) for kind, count, start in
          zip(_PART_COUNTS, _PART_COUNTS.values(), np.cumsum(list(_PART_COUNTS.values())), strict=True)}


def random_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False)


def dct_matrix() -> np.ndarray:
    """Rows k < 8 of the unnormalised DCT-II (scipy.fftpack's default): 2 cos(pi k (2n + 1) / 2N)."""
    n = np.arange(SIDE)
    return 2.0 * np.cos(np.pi * np.arange(BLOCK)[:, None] * (2 * n[None, :] + 1) / (2 * SIDE))


def hashes_of_blocks(blocks: np.ndarray) -> np.ndarray:
    """pHash integers of (n, 8, 8) low-frequency DCT blocks: bit set above the block's median."""
    flat = blocks.reshape(len(blocks), BLOCK * BLOCK)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def hashes_of_pixels(pixels: np.ndarray) -> np.ndarray:
    """pHash integers of (n, 32, 32) grey images, as imagehash.phash computes them."""
    dct = dct_matrix()
    return hashes_of_blocks(dct @ pixels.astype(np.float64) @ dct.T)


@dataclass(frozen=True)
class Scenes:
    """count scenes: which dictionary parts each uses with what weight, and the 8 x 8
    low-frequency DCT coefficients of its own smooth 1/f texture."""

    parts: np.ndarray  # (count, parts per scene) indices into the dictionary
    weights: np.ndarray  # (count, parts per scene)
    texture: np.ndarray  # (count, 64)


class SceneHashes:
    """A fixed dictionary of scene parts (the structure photos share) plus per-scene texture
    (what makes them differ)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        parts = _scene_parts(self._rng)  # (parts, 32, 32), the constant image first
        dct = dct_matrix()
        self._part_blocks = (dct @ parts @ dct.T).reshape(len(parts), BLOCK * BLOCK)
        # White pixel noise of std 1 gives each coefficient this std (the DCT's rows are orthogonal).
        self._noise_scale = np.sqrt(np.outer((dct**2).sum(axis=1), (dct**2).sum(axis=1))).ravel()
        frequency = np.hypot(*np.mgrid[0:BLOCK, 0:BLOCK]).ravel()
        self._texture_scale = np.where(frequency == 0, 0.0, TEXTURE_LEVEL / (1 + frequency)) * self._noise_scale

    def scenes(self, count: int) -> Scenes:
        rng = self._rng
        columns = [np.zeros(count, dtype=np.int64)]  # the constant image
        weights = [rng.uniform(70, 190, count)]  # mean brightness
        for kind, how_many, spread in (("sky", 1, 40.0), ("side", 1, 20.0), ("horizon", 1, 45.0),
                                       ("blob", 3, 45.0), ("pattern", 2, 30.0)):
            first, last = _KINDS[kind]
            for _ in range(how_many):
                columns.append(rng.integers(first, last, count))
                weights.append(rng.normal(0.0, spread, count))
        texture = rng.standard_normal((count, BLOCK * BLOCK)) * self._texture_scale
        return Scenes(np.stack(columns, axis=1), np.stack(weights, axis=1), texture)

    def near_copies(self, scenes: Scenes) -> Scenes:
        """The same scenes slightly changed, as resizing or re-encoding changes a photo."""
        rng = self._rng
        weights = scenes.weights * rng.normal(1.0, 0.04, scenes.weights.shape)
        weights[:, 0] += rng.normal(0.0, 4.0, len(weights))  # brightness
        return Scenes(scenes.parts, weights, scenes.texture * rng.normal(1.0, 0.04, scenes.texture.shape))

    def hashes(self, scenes: Scenes, pixel_noise: float = _ROUNDING_NOISE) -> np.ndarray:
        """pHashes of the scenes as 8-bit images (rounding is the default noise) or noisier ones."""
        blocks = np.einsum("nj,njb->nb", scenes.weights, self._part_blocks[scenes.parts]) + scenes.texture
        blocks += self._rng.standard_normal(blocks.shape) * (pixel_noise * self._noise_scale)
        return hashes_of_blocks(blocks.reshape(-1, BLOCK, BLOCK))

    def stream(self, count: int) -> Iterator[np.ndarray]:
        """Hashes of count random scenes, in chunks that keep memory flat."""
        for start in range(0, count, _CHUNK):
            yield self.hashes(self.scenes(min(_CHUNK, count - start)))


def _scene_parts(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    parts = [np.ones((SIDE, SIDE)), 0.5 - y, x - 0.5]
    for row in np.linspace(0.2, 0.8, 7):  # level and tilted horizons, soft-edged
        for tilt in (-0.3, -0.1, 0.1, 0.3):
            parts.append(np.tanh((y - row - tilt * (x - 0.5)) * 12) / 2)
    for sigma in (0.08, 0.16):  # round blobs on a 5 x 5 grid
        for cy in np.linspace(0.1, 0.9, 5):
            for cx in np.linspace(0.1, 0.9, 5):
                parts.append(np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)))
    for _ in range(_PART_COUNTS["pattern"]):  # smooth random fields: 4 x 4 noise, cubic upsampling
        parts.append(zoom(rng.normal(0.0, 0.5, (4, 4)), SIDE / 4, order=3))
    return np.array(parts)
