"""PDQ corpora for the dedup benchmark: uniform random hashes, and a corpus built from
real PDQs of photographs.

"photos": 512 scene centres are real PDQs (common.features.pdq_hashes) of random crops
(30-100% of each side) of scikit-image's photographs; each stored hash is a centre with
every bit flipped with probability 1/4 (an AND of two random words), so hashes cluster
by scene like a real collection (~64 bits from their centre, ~96 from a sibling, where
distinct real photographs sit 100+ apart). `distance_profile` reports the corpus'
pairwise distances next to those of the real crops, so the resemblance can be judged.
Copies are stored hashes with k flipped bits, k drawn from the distances that real
1/2, 1/3 and JPEG q40 copies of the photographs moved (measured at start-up).
"""

from __future__ import annotations

import io
import itertools

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from common.features import pdq_hashes
from common.hashindex import WORDS, ints_to_words

PHOTOS = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "colorwheel", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")
CENTRES = 512


def random_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=(count, WORDS), dtype=np.uint64, endpoint=False)


def _jpeg(image: Image.Image, quality: int = 95) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


class PhotoHashes:
    """Scene centres from real photo crops, members around them, and real copy distances."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in PHOTOS]
        crops = []
        for _ in range(CENTRES):
            photo = photos[int(self.rng.integers(len(photos)))]
            width = int(photo.width * self.rng.uniform(0.3, 1.0))
            height = int(photo.height * self.rng.uniform(0.3, 1.0))
            left = int(self.rng.integers(0, photo.width - width + 1))
            top = int(self.rng.integers(0, photo.height - height + 1))
            crops.append(pdq_hashes(photo.crop((left, top, left + width, top + height)))[0][0])
        self.centres = ints_to_words(crops)
        self.copy_distances = self._real_copy_distances(photos)

    @staticmethod
    def _real_copy_distances(photos: list[Image.Image]) -> np.ndarray:
        distances = []
        for photo in photos:
            original = pdq_hashes(_jpeg(photo))[0][0]
            for copy in (photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.LANCZOS),
                         photo.resize((photo.width // 3, photo.height // 3), Image.Resampling.BILINEAR),
                         _jpeg(photo, 40)):
                distances.append((original ^ pdq_hashes(_jpeg(copy))[0][0]).bit_count())
        return np.array(distances)

    def members(self, count: int) -> np.ndarray:
        """count hashes around random centres (each bit flipped with probability 1/4)."""
        out = np.empty((count, WORDS), dtype=np.uint64)
        for start in range(0, count, 1_000_000):
            n = min(1_000_000, count - start)
            centres = self.centres[self.rng.integers(0, len(self.centres), n)]
            flips = random_hashes(self.rng, n) & random_hashes(self.rng, n)
            out[start : start + n] = centres ^ flips
        return out

    def copies_of(self, stored: np.ndarray) -> np.ndarray:
        """Each hash with as many flipped bits as a real resized / re-encoded copy moved."""
        copies = stored.copy()
        for row, bits in enumerate(self.rng.choice(self.copy_distances, len(stored))):
            for bit in self.rng.choice(256, int(bits), replace=False):
                copies[row, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        return copies

    def distance_profile(self, sample: np.ndarray) -> dict[str, float]:
        """Pairwise distances of a corpus sample beside those of the real crops."""
        def stats(words: np.ndarray) -> tuple[float, float, float]:
            distances = np.array([int(np.bitwise_count(a ^ b).sum()) for a, b in itertools.combinations(words, 2)])
            return float(distances.mean()), float(np.quantile(distances, 0.001)), float(distances.min())
        corpus, real = stats(sample[:300]), stats(self.centres[:300])
        return {"corpus mean": corpus[0], "corpus q0.1%": corpus[1], "corpus min": corpus[2],
                "real crops mean": real[0], "real crops q0.1%": real[1], "real crops min": real[2],
                "real copies max": float(self.copy_distances.max())}
