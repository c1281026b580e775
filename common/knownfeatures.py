"""The features of images an ingest actor loaded lately, by MD5: an exact copy skips its decode.

Every feature is a function of the file's bytes (and of the actor's draft size and model
input, fixed for its life), so bytes seen before need neither a decode worker nor hashing:
on a 1024x768 JPEG that is ~10 of the ~20 CPU ms a duplicate costs. Only what dedup and
the verdict use is kept (hashes, histogram, size), not the CNN input (150 KB for open_nsfw),
so an entry costs ~2 KB (20,000 of them ~40 MB). A copy that then misses in dedup (its
original was dead-lettered, or evicted from dedup state) is decoded again before it goes to
the model.

MD5 is the key dedup already trusts for exact copies; this cache adds no new trust in it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from common import metrics
from common.features import ImageFeatures

NO_MODEL_INPUT = np.zeros((0, 0, 3), np.uint8)
"""The cnn_input of features served from the cache: empty, never scored."""
NO_MODEL_INPUT.setflags(write=False)


def has_model_input(features: ImageFeatures) -> bool:
    """False for features from the cache: the CNN cannot score them as they are."""
    return features.cnn_input.size > 0


class KnownFeatures:
    """A thread-safe LRU of ImageFeatures without their model input, by MD5; capacity 0 keeps nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_md5: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._by_md5)

    def get(self, md5: str) -> ImageFeatures | None:
        with self._lock:
            found = self._by_md5.get(md5)
            if found is not None:
                self._by_md5.move_to_end(md5)
                self.hits += 1
        if found is not None:
            metrics.DECODES_SKIPPED.inc()
        return found

    def put(self, features: ImageFeatures) -> None:
        if self.capacity <= 0:
            return
        kept = replace(features, cnn_input=NO_MODEL_INPUT)
        with self._lock:
            self._by_md5[features.md5] = kept
            self._by_md5.move_to_end(features.md5)
            while len(self._by_md5) > self.capacity:
                self._by_md5.popitem(last=False)
