"""Review feedback: human decisions teach the caches and the index.

A ReviewDecision overrides the remembered verdict of its image (found by the
hashes it carries or by its image id) so later copies get it, is remembered
by image id for uploads still to come, and adds the image's histogram to the
kNN references with the human label.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from common import metrics  # by module: Ray pickles actor classes by value
from common.changelog import Changelog
from common.config import Settings
from common.dedupstate import dequantise_histogram, shard_of
from common.features import MIN_PDQ_QUALITY, md5_hex
from common.kafkaio import make_consumer
from common.messages import MessageError, ReviewDecision, parse_review_decision
from workers.knn import references_topic

log = logging.getLogger(__name__)
UNKNOWN_PDQ = "0" * 64  # quality 0: never near-matched


class ReviewApplier:
    """Applies one decision to dedup shards and kNN replicas (no Kafka consumer here)."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any]) -> None:
        self.shards = shards
        self.knn_replicas = knn_replicas
        self.references = Changelog(settings, references_topic(settings))

    def _shard(self, key: str) -> Any:
        return self.shards[shard_of(key, len(self.shards))]

    def apply(self, decision: ReviewDecision) -> dict[str, Any]:
        """The decision's own hashes win over what the pipeline saw for its image id; a
        decision with only a PDQ is remembered under a key derived from it (no bytes, no MD5)."""
        image_owner = self._shard(decision.image_id)
        record = ray.get(image_owner.image.remote(decision.image_id))
        ray.get(image_owner.review_image_id.remote(decision.image_id, decision.label))
        md5 = decision.md5 or (record.md5 if record else None)
        pdq = decision.pdq or (record.pdq if record else None)
        quality = record.pdq_quality if record and pdq == record.pdq else MIN_PDQ_QUALITY if pdq else 0
        outcome = {"image_id": decision.image_id, "label": decision.label, "entry": None, "reference": False}
        if md5 or pdq:
            key = md5 or md5_hex(f"pdq:{pdq}".encode())
            entry = ray.get(self._shard(key).apply_review.remote(
                key, pdq or UNKNOWN_PDQ, quality, decision.image_id, decision.label))
            outcome["entry"] = entry.md5
        if record is not None:
            value = {"label": decision.label, "histogram": dequantise_histogram(record.histogram)}
            self.references.append([(decision.image_id, value)])
            ray.get([replica.add.remote([value], [decision.image_id]) for replica in self.knn_replicas])
            outcome["reference"] = True
        return outcome


@ray.remote(max_restarts=-1, max_task_retries=0)
class ReviewFeedback:
    """Consumes the review topic in its own group and applies each decision in order."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any]) -> None:
        self.settings = settings
        self.applier = ReviewApplier(settings, shards, knn_replicas)
        self.applied = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="reviews", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        consumer = make_consumer(self.settings, [self.settings.topics.reviews],
                                 group_id=f"{self.settings.kafka.group_id}-reviews")
        try:
            while not self.stopping.is_set():
                polled = consumer.poll(timeout_ms=200)
                for records in polled.values():
                    for record in records:
                        self._apply_record(record)
                if polled:
                    consumer.commit()
        finally:
            consumer.close(autocommit=False)

    def _apply_record(self, record) -> None:
        try:
            decision = parse_review_decision(record.value or b"")
        except MessageError as exc:
            log.warning("skipping malformed review at %s[%d]@%d: %s", record.topic, record.partition,
                        record.offset, exc)
            return
        while not self.stopping.is_set():
            try:
                self.applier.apply(decision)
                self.applied += 1
                metrics.REVIEWS_APPLIED.labels(label=decision.label).inc()
                return
            except ray.exceptions.RayError:  # a shard is restarting: try again
                log.exception("applying review of %s failed; retrying", decision.image_id)
                self.stopping.wait(1.0)

    def stats(self) -> dict[str, int]:
        return {"reviews_applied": self.applied}

    def stop(self) -> dict[str, int]:
        self.stopping.set()
        self.thread.join(timeout=30)
        return self.stats()
