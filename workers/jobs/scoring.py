"""Scoring a labelled split with a bundle's kNN index and CNN, as Ray tasks.

Each task loads the bundle once per worker process (cached by bundle id, so a
rebuilt bundle at the same path is reloaded) and decodes images exactly as the
pipeline's ingest does. kNN searches with the pipeline's k and ef
(settings.pipeline.knn_k / knn_ef, applied with configure_search as the kNN
replicas do), so offline scores are the scores the pipeline will compute.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.bundle import load_bundle
from common.cnn import CnnModel
from common.config import Settings
from common.features import color_histogram
from common.fetch import LoadLimits
from common.fusion import FusionTree
from common.knn import ReferenceIndex
from common.loaderrors import LoadError
from workers.jobs.datasets import Sample, load_image
from workers.jobs.errors import JobError
from workers.jobs.parallel import map_chunks

SIGNALS = ("knn", "cnn")


@dataclass(frozen=True)
class Scores:
    """Per image that loaded: label, kNN P(adult) (NaN: no signal) and CNN P(adult)."""

    uris: list[str]
    labels: np.ndarray
    knn: np.ndarray
    cnn: np.ndarray
    unreadable: int

    def fused(self, tree: FusionTree) -> np.ndarray:
        return fuse(tree, self.knn, self.cnn)


def fuse(tree: FusionTree, knn: np.ndarray, cnn: np.ndarray) -> np.ndarray:
    """The tree's P(adult) per image; a NaN kNN score is a missing signal, as in the pipeline."""
    return np.array([tree.predict({"knn": None if np.isnan(k) else float(k), "cnn": float(c)})
                     for k, c in zip(knn, cnn, strict=True)], dtype=np.float64)


@dataclass(frozen=True)
class KnnSearch:
    """The kNN vote's k and hnswlib's ef, as the pipeline's kNN replicas use them."""

    k: int
    ef: int

    @classmethod
    def of(cls, settings: Settings) -> KnnSearch:
        return cls(settings.pipeline.knn_k, settings.pipeline.knn_ef)


@functools.lru_cache(maxsize=2)
def _models(path: str, bundle_id: str, knn: KnnSearch) -> tuple[CnnModel, ReferenceIndex]:
    bundle = load_bundle(path)
    index = bundle.load_references()
    index.configure_search(knn.k, knn.ef)
    return CnnModel(bundle.cnn), index


def score_chunk(samples: list[Sample], bundle_path: str, limits: LoadLimits, draft: int,
                knn: KnnSearch) -> list[tuple[float, float] | None]:
    """Ray task body: (kNN, CNN) P(adult) per image, None where the image no longer loads."""
    bundle = load_bundle(bundle_path)
    model, index = _models(bundle_path, bundle.id, knn)
    histograms, inputs, loaded = [], [], []
    for position, sample in enumerate(samples):
        try:
            _, image, _ = load_image(sample.uri, limits, draft)
        except LoadError:
            continue
        histograms.append(color_histogram(image))
        inputs.append(bundle.cnn.model_input(image))
        loaded.append(position)
    results: list[tuple[float, float] | None] = [None] * len(samples)
    if loaded:
        knn = index.probabilities(np.stack(histograms))
        cnn = model.predict(np.stack(inputs))
        for position, k, c in zip(loaded, knn, cnn, strict=True):
            results[position] = (float("nan") if k is None else k, float(c))
    return results


def score_samples(bundle: Path, samples: Sequence[Sample], limits: LoadLimits, draft: int, knn: KnnSearch,
                  desc: str) -> Scores:
    answers: list[Any] = map_chunks(score_chunk, list(samples), str(bundle), limits, draft, knn, desc=desc)
    rows = [i for i, answer in enumerate(answers) if answer is not None]
    if not rows:
        raise JobError(f"none of the {len(samples)} images could be loaded")
    return Scores(uris=[samples[i].uri for i in rows],
                  labels=np.array([samples[i].label for i in rows], dtype=np.int64),
                  knn=np.array([answers[i][0] for i in rows], dtype=np.float64),
                  cnn=np.array([answers[i][1] for i in rows], dtype=np.float64),
                  unreadable=len(samples) - len(rows))
