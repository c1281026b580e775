"""The CNN as a Ray Serve deployment: method 3 of the design (see README).

Each request carries a caller's images (at most a model batch); ``@serve.batch``
merges requests from every ingest actor into model batches counted in images.
Every answer names the bundle the replica runs and carries that bundle's fusion
tree and thresholds, so a verdict's ``model_version`` and the rules applied to
its scores are the ones of the model that scored it, also while a new bundle
rolls out.

Serve counts requests, not images, and a request is a caller's batch, so the
autoscaling target and ``max_ongoing_requests`` are derived in requests:
``requests_per_batch`` = ceil(max_batch_size / images per request), where a
request holds at most min(poll_records, max_batch_size) images. A replica
keeps one batch computing and one filling (MAX_CONCURRENT_BATCHES), so it
admits ``requests_per_batch * (MAX_CONCURRENT_BATCHES + 1)`` requests (one
batch queued behind them) and autoscaling aims at ``requests_per_batch``
ongoing requests per replica: one full model batch each. With the defaults
(32-image polls and batches) that is 3 and 1, so four busy ingest actors ask
for four replicas; a target of 32 or 64 images would never be reached.
Within a batch the model runs ``model_batch_size`` images at a time: on CPU
the CNN is cheapest per image at 8 (open_nsfw: 36 CPU ms per image against 43
at 32), while Serve is cheapest per image with few, large requests. The model
calls of every batch share MAX_CONCURRENT_BATCHES threads, and on CPU a batch
too small to fill them is split between them: one batch alone (a quiet stream)
runs on both cores instead of one image after another on one, and full batches
(a backlog) are cut and run exactly as before.
These functions are the only source of the Classifier's options: the Helm
chart passes ``config.classifier`` through the config file and sets none of
them itself.
The model is loaded once per replica; replicas take ``num_gpus`` when the
cluster has GPUs and run on CPU otherwise.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from common import metrics  # by module: Serve pickles the class by value, metrics are not picklable
from common.bundle import resolve_bundle
from common.cnn import CnnError, CnnModel
from common.config import ClassifierConfig

DEPLOYMENT_NAME = "Classifier"
MAX_CONCURRENT_BATCHES = 2  # one batch computing while the next fills
CPU_MODEL_BATCH = 8  # images per model call on CPU replicas unless model_batch_size says otherwise


@dataclass(frozen=True)
class Scored:
    """One request's answer: P(adult) per image and the bundle that computed them."""

    scores: list[float]
    bundle_id: str
    fusion: dict[str, Any]  # the bundle's fusion tree (FusionTree.to_dict)
    thresholds: dict[str, float]  # the bundle's own block/review thresholds; {} when it names none


def images_in(requests: list[tuple[np.ndarray, float]]) -> int:
    """Batch size in images, not requests: each request carries a caller's batch."""
    return sum(len(images) for images, _ in requests)


@serve.deployment(name=DEPLOYMENT_NAME)
class Classifier:
    def __init__(self, bundle_path: str, model_threads: int = 0) -> None:
        if model_threads:  # before TensorFlow starts its pools; 0 leaves them at one thread per core
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(model_threads)
        self.bundle = resolve_bundle(bundle_path)
        self.fusion = self.bundle.load_fusion().to_dict()
        self.model = CnnModel(self.bundle.cnn)
        self.model.predict(np.zeros((1, self.model.spec.input_size, self.model.spec.input_size, 3), np.uint8))
        self.model_batch: int | None = None  # None: the whole Serve batch in one call
        self.model_calls = ThreadPoolExecutor(MAX_CONCURRENT_BATCHES, thread_name_prefix="model")
        self.split_small_batches = model_threads > 0  # CPU: one TensorFlow thread per call
        metrics.BUNDLE_INFO.labels(bundle_id=self.bundle.id).set(1)
        metrics.CLASSIFIER_REPLICAS.set(1)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch settings change without restarting the replica."""
        self.score.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
        self.score.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.01)))
        self.model_batch = user_config.get("model_batch_size")

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
            scores = await self._predict(batch)
            if len(scores) != len(batch):
                raise CnnError(f"model returned {len(scores)} scores for {len(batch)} images")
        except Exception:
            metrics.CLASSIFIER_ERRORS.inc(len(requests))
            raise
        metrics.STAGE_LATENCY.labels(stage="classifier_batch").observe(time.perf_counter() - started)
        ends = np.cumsum([len(images) for images, _ in requests])
        return [[float(s) for s in part] for part in np.split(scores, ends[:-1])]

    async def _predict(self, images: np.ndarray) -> np.ndarray:
        """The batch's model calls on the replica's model threads, in order of the images."""
        step = model_call_size(len(images), self.model_batch, self.split_small_batches)
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(*(loop.run_in_executor(self.model_calls, self.model.predict,
                                                            images[start:start + step])
                                       for start in range(0, len(images), step)))
        return np.concatenate(parts)

    async def __call__(self, images: np.ndarray) -> Scored:
        """Score ``(n, size, size, 3)`` uint8 images; one request per caller batch keeps
        the per-request cost (routing, serialisation) off every image."""
        scores = await self.score((images, time.perf_counter()))
        return Scored(scores, self.bundle.id, self.fusion, self.bundle.thresholds)

    def bundle_id(self) -> str:
        return self.bundle.id


def model_call_size(images: int, model_batch: int | None, split_small_batches: bool) -> int:
    """Images per model call: the model batch, or, on CPU, less when that leaves a model thread idle."""
    step = model_batch or images
    if split_small_batches:
        step = min(step, math.ceil(images / MAX_CONCURRENT_BATCHES))
    return max(1, step)


def requests_per_batch(config: ClassifierConfig, poll_records: int | None = None) -> int:
    """Requests that fill one model batch: each carries min(poll_records, max_batch_size) images."""
    request_images = min(poll_records or config.max_batch_size, config.max_batch_size)
    return math.ceil(config.max_batch_size / request_images)


def classifier_options(config: ClassifierConfig, poll_records: int | None = None) -> dict[str, Any]:
    """Serve deployment options from modstream's classifier settings, counted in requests (caller batches).

    ``target_ongoing_requests`` and ``max_ongoing_requests`` are derived unless set explicitly.
    """
    per_batch = requests_per_batch(config, poll_records)
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests or per_batch * (MAX_CONCURRENT_BATCHES + 1),
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "user_config": {"max_batch_size": config.max_batch_size,
                        "batch_wait_timeout_s": config.batch_wait_timeout_s,
                        "model_batch_size": config.model_batch_size or (
                            config.max_batch_size if config.num_gpus > 0 else CPU_MODEL_BATCH)},
    }
    if config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests or float(per_batch),
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


def model_threads(config: ClassifierConfig) -> int:
    """Threads per model call on a CPU replica: the CPUs it reserves. Two batches run at once
    (MAX_CONCURRENT_BATCHES), so a busy replica still uses two cores, without TensorFlow's pool
    waiting on threads the ingest actors' work has pushed off the cores (open_nsfw at batch 8:
    34 CPU ms per image on one thread, 36 on two, alone on 2 cores). 0 (TensorFlow's default)
    on a GPU."""
    return 0 if config.num_gpus > 0 else max(1, round(config.num_cpus))


def classifier_app(bundle_path: str, config: ClassifierConfig, poll_records: int | None = None) -> serve.Application:
    return Classifier.options(**classifier_options(config, poll_records)).bind(bundle_path, model_threads(config))
