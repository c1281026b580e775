"""Wires the actors into one pipeline on a running Ray cluster.

Order matters: topics exist before anyone subscribes, the bundle is resolved
once (so every actor loads the same one), state actors finish restoring
before ingest starts asking them, review feedback exists before ingest (each
batch waits, bounded, for the reviews published before it), and ingest stops
(draining and committing) before anything it calls goes away.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import ray
from ray import serve

from common.bundle import resolve_bundle
from common.config import Settings
from common.kafkaio import ensure_topics
from workers.classifier import classifier_app
from workers.dedup import DedupShard
from workers.ingest import Ingest
from workers.knn import KnnReplica
from workers.review import ReviewFeedback, wait_until_caught_up

log = logging.getLogger(__name__)

# Ray's SPREAD strategy places actors on the least used nodes, but it ignores actors that
# reserve nothing, and node affinity would pin a restarted actor to a dead node. These
# actors mostly wait on I/O or other actors, so they reserve a token share of a CPU.
ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 0.01, "scheduling_strategy": "SPREAD"}


class Pipeline:
    """Start, observe and stop the whole pipeline from a Ray driver."""

    def __init__(self, settings: Settings, deploy_classifier: bool = True) -> None:
        bundle = resolve_bundle(settings.bundle)
        self.bundle_id = bundle.id
        self.settings = settings.model_copy(update={"bundle": str(bundle.path)})
        self.deploy_classifier = deploy_classifier
        self.shards: list[Any] = []
        self.knn_replicas: list[Any] = []
        self.ingest: list[Any] = []
        self.review: Any = None

    def start(self) -> Pipeline:
        settings = self.settings
        ensure_topics(settings)
        if self.deploy_classifier:
            serve.start(proxy_location="Disabled")
            serve.run(classifier_app(settings.bundle, settings.classifier, settings.pipeline.poll_records),
                      name=settings.classifier.app_name, route_prefix=None)
        pipeline = settings.pipeline
        self.shards = [DedupShard.options(**ACTOR_OPTIONS).remote(settings, i, pipeline.dedup_shards)
                       for i in range(pipeline.dedup_shards)]
        self.knn_replicas = [KnnReplica.options(**ACTOR_OPTIONS).remote(settings)
                             for i in range(pipeline.knn_replicas)]
        ray.get([shard.stats.remote() for shard in self.shards] +
                [replica.size.remote() for replica in self.knn_replicas])
        self.review = ReviewFeedback.options(**ACTOR_OPTIONS).remote(settings, self.shards, self.knn_replicas)
        if not wait_until_caught_up(self.review, int(time.time() * 1000), pipeline.review_backlog_wait_s):
            log.warning("the review backlog was not applied within %.0f s; scoring uploads anyway",
                        pipeline.review_backlog_wait_s)
        self.ingest = [self._new_ingest(i) for i in range(pipeline.ingest_actors)]
        ray.get([actor.stats.remote() for actor in self.ingest])
        return self

    def _new_ingest(self, index: int) -> Any:
        return Ingest.options(**ACTOR_OPTIONS).remote(self.settings, self.shards, self.knn_replicas, self.review,
                                                      index)

    def stats(self) -> dict[str, Any]:
        """Counts summed over ingest actors; ``idle_for_s`` is the least idle actor's."""
        per_actor = ray.get([actor.stats.remote() for actor in self.ingest])
        totals: Counter[str] = Counter()
        for stats in per_actor:
            totals.update({k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
                           and k not in {"worker", "pid"}})
        review = ray.get(self.review.stats.remote()) if self.review else {}
        return {**totals, **review, "idle": all(s["idle"] for s in per_actor),
                "idle_for_s": min(s["idle_for_s"] for s in per_actor)}

    def wait_until_idle(self, idle_s: float, should_stop: Any = lambda: False, poll_s: float = 0.5) -> None:
        """Return once nothing has arrived for ``idle_s`` and nothing is in flight."""
        while not should_stop():
            try:
                stats = self.stats()
            except ray.exceptions.RayError:
                time.sleep(poll_s)  # an ingest actor is restarting, or failing its health check before it does
                continue
            if stats["idle"] and stats["idle_for_s"] >= idle_s:
                return
            time.sleep(poll_s)

    def stop(self) -> dict[str, Any]:
        """Drain and commit every ingest actor, then take the rest down."""
        ray.get([actor.stop.remote() for actor in self.ingest])
        if self.review is not None:
            ray.get(self.review.stop.remote())
        totals = self.stats() if self.ingest else {}  # after the drain: what was finished and committed
        for actor in [*self.ingest, self.review, *self.knn_replicas, *self.shards]:
            if actor is not None:
                ray.kill(actor)
        if self.deploy_classifier:
            serve.delete(self.settings.classifier.app_name)
        self.ingest, self.review, self.knn_replicas, self.shards = [], None, [], []
        return totals
