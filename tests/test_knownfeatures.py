"""KnownFeatures: a bounded LRU by MD5 that never keeps a model input."""

from __future__ import annotations

import numpy as np
from PIL import Image

from common.features import extract_features
from common.knownfeatures import KnownFeatures, has_model_input


def features(seed: int):
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return extract_features(f"bytes-{seed}".encode(), image, image.size)


def test_keeps_every_feature_but_the_model_input() -> None:
    known = KnownFeatures(4)
    original = features(1)
    known.put(original)
    kept = known.get(original.md5)
    assert kept is not None and has_model_input(original) and not has_model_input(kept)
    assert (kept.md5, kept.pdq, kept.pdq_variants, kept.phash) == (original.md5, original.pdq,
                                                                     original.pdq_variants, original.phash)
    assert known.hits == 1 and known.get("0" * 32) is None and known.hits == 1


def test_holds_at_most_its_capacity_and_drops_the_least_recently_used() -> None:
    known = KnownFeatures(2)
    first, second, third = features(1), features(2), features(3)
    known.put(first)
    known.put(second)
    assert known.get(first.md5) is not None  # first is now the most recently used
    known.put(third)
    assert len(known) == 2 and known.get(second.md5) is None
    assert known.get(first.md5) is not None and known.get(third.md5) is not None


def test_capacity_zero_keeps_nothing() -> None:
    known = KnownFeatures(0)
    known.put(features(1))
    assert len(known) == 0 and known.get(features(1).md5) is None
