"""The CNN as a Ray Serve deployment: method 3 of the talk.

Each request carries a caller's images (at most a batch); ``@serve.batch``
merges requests from every ingest actor into model batches counted in images.
Serve cannot fill a batch from more than ``max_ongoing_requests`` requests
(FACTS.md), so that is derived from the batch size.
The model is loaded once per replica; replicas take ``num_gpus`` when the
cluster has GPUs and run on CPU otherwise.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray import serve

from common import metrics  # by module: Serve pickles the class by value, metrics are not picklable
from common.bundle import resolve_bundle
from common.cnn import CnnError, CnnModel
from common.config import ClassifierConfig

DEPLOYMENT_NAME = "Classifier"
MAX_CONCURRENT_BATCHES = 2  # one batch computing while the next fills


def images_in(requests: list[tuple[np.ndarray, float]]) -> int:
    """Batch size in images, not requests: each request carries a caller's batch."""
    return sum(len(images) for images, _ in requests)


@serve.deployment(name=DEPLOYMENT_NAME)
class Classifier:
    def __init__(self, bundle_path: str) -> None:
        self.bundle = resolve_bundle(bundle_path)
        self.model = CnnModel(self.bundle.cnn)
        self.model.predict(np.zeros((1, self.model.spec.input_size, self.model.spec.input_size, 3), np.uint8))
        metrics.BUNDLE_INFO.labels(bundle_id=self.bundle.id).set(1)
        metrics.CLASSIFIER_REPLICAS.set(1)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch settings change without restarting the replica."""
        self.score.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
        self.score.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.01)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_BATCHES,
                 batch_size_fn=images_in)
    async def score(self, requests: list[tuple[np.ndarray, float]]) -> list[list[float]]:
        """P(adult) per image of every request; results match requests one-to-one or every caller fails."""
        started = time.perf_counter()
        for images, arrived in requests:
            for _ in range(len(images)):
                metrics.STAGE_LATENCY.labels(stage="classifier_queue").observe(started - arrived)
        batch = np.concatenate([images for images, _ in requests])
        metrics.CLASSIFIER_BATCH_SIZE.observe(len(batch))
        try:
            scores = await asyncio.get_running_loop().run_in_executor(None, self.model.predict, batch)
            if len(scores) != len(batch):
                raise CnnError(f"model returned {len(scores)} scores for {len(batch)} images")
        except Exception:
            metrics.CLASSIFIER_ERRORS.inc(len(requests))
            raise
        metrics.STAGE_LATENCY.labels(stage="classifier_batch").observe(time.perf_counter() - started)
        ends = np.cumsum([len(images) for images, _ in requests])
        return [[float(s) for s in part] for part in np.split(scores, ends[:-1])]

    async def __call__(self, images: np.ndarray) -> list[float]:
        """Score ``(n, size, size, 3)`` uint8 images; one request per caller batch keeps
        the per-request cost (routing, serialisation) off every image."""
        return await self.score((images, time.perf_counter()))

    def bundle_id(self) -> str:
        return self.bundle.id


def classifier_options(config: ClassifierConfig) -> dict[str, Any]:
    """Serve deployment options from modstream's classifier settings."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_batch_size * MAX_CONCURRENT_BATCHES * 2,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "user_config": {"max_batch_size": config.max_batch_size,
                        "batch_wait_timeout_s": config.batch_wait_timeout_s},
    }
    if config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


def classifier_app(bundle_path: str, config: ClassifierConfig) -> serve.Application:
    return Classifier.options(**classifier_options(config)).bind(bundle_path)
