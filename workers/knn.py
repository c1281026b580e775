"""kNN replicas: method 2 of the design (see README) (colour histogram, distance-weighted vote
over labelled references). Read-mostly: queries from every ingest actor, adds
only from reviews, serialised inside ReferenceIndex (hnswlib forbids a
concurrent add and query)."""

from __future__ import annotations

import time

import numpy as np
import ray

from common import metrics  # by module: Ray pickles actor classes by value
from common.bundle import resolve_bundle
from common.changelog import Changelog
from common.config import Settings
from common.messages import LABELS


def references_topic(settings: Settings) -> str:
    return f"{settings.topics.state_prefix}.references"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class KnnReplica:
    """The bundle's reference index plus every reviewed image since."""

    def __init__(self, settings: Settings) -> None:
        self.index = resolve_bundle(settings.bundle).load_references()
        self.index.configure_search(settings.pipeline.knn_k, settings.pipeline.knn_ef)
        restored = list(Changelog(settings, references_topic(settings)).replay())
        if restored:
            self._add([value for _, value in restored], [key for key, _ in restored])

    def _add(self, values: list[dict], ids: list[str]) -> None:
        histograms = np.asarray([value["histogram"] for value in values], dtype=np.float32)
        self.index.add(histograms, [LABELS.index(value["label"]) for value in values], ids)

    def add(self, values: list[dict], ids: list[str]) -> int:
        self._add(values, ids)
        return len(self.index)

    def probabilities(self, histograms: np.ndarray) -> list[float | None]:
        started = time.perf_counter()
        answers = self.index.probabilities(histograms)
        metrics.STAGE_LATENCY.labels(stage="knn").observe(time.perf_counter() - started)
        return answers

    def size(self) -> int:
        return len(self.index)
