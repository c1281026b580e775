"""Review feedback: human decisions teach the caches and the index.

A ReviewDecision overrides the remembered verdict of its image (found by the
hashes it carries or by its image id) so later copies get it, is remembered
by image id for uploads still to come, and adds the image's histogram to the
kNN references with the human label.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from kafka import TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from common import metrics  # by module: Ray pickles actor classes by value
from common.changelog import Changelog
from common.config import Settings
from common.dedupstate import dequantise_histogram, shard_of
from common.features import MIN_PDQ_QUALITY, md5_hex
from common.kafkaio import make_consumer, make_producer
from common.logend import log_end
from common.messages import (
    DeadLetter,
    MessageError,
    ReviewDecision,
    parse_review_decision,
    record_placeholder_id,
    to_json_bytes,
)
from workers.knn import references_topic
from workers.reissue import Reissuer

log = logging.getLogger(__name__)
UNKNOWN_PDQ = "0" * 64  # quality 0: never near-matched
POLL_RECORDS = 500
ENDS_TIMEOUT_MS = 5000  # caught_up answers "no" rather than keep callers waiting on an unreachable broker
# End offsets listed at T answer later questions about records stamped before T - this margin (a
# record is at the broker within moments of its timestamp); a backlog's batches then share one listing.
ENDS_REUSE_MARGIN_MS = 100
APPLY_ATTEMPTS = 5  # a decision failing this often for a reason other than those below is dead-lettered
# Failures that pass: a shard or replica restarting (Ray restarts them), the broker away.
TRANSIENT: tuple[type[BaseException], ...] = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                                               ray.exceptions.ObjectLostError, KafkaError)


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


class ReviewProgress:
    """Where the review consumer stands in each partition: fetched, applied, committed.

    Pure bookkeeping, shared by the consumer thread (which writes it) and
    ``caught_up`` (which reads it) under one lock. A record counts as applied
    once the decision took effect or the record went to the dead-letter
    topic; only applied positions are ever committed.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.partitions: dict[int, PartitionProgress] = {}

    def start(self, partition: int, committed: int) -> int:
        """Where a new consumer starts ``partition``: where the last one stopped applying, else at its
        group's commit (or the earliest offset)."""
        with self.lock:
            known = self.partitions.get(partition)
            position = known.applied_to if known else committed
            self.partitions[partition] = PartitionProgress(position, position, known.committed_to if known
                                                           else committed)
            return position

    def started(self) -> list[int]:
        with self.lock:
            return sorted(self.partitions)

    def fetched(self, partition: int, records: list[tuple[int, int]], position: int,
                highwater: int | None) -> None:
        """Records (offset, timestamp ms) handed out by a poll, the consumer's position after it, and
        the newest high watermark its fetches reported."""
        with self.lock:
            progress = self.partitions[partition]
            progress.pending.extend(records)
            progress.fetched_to = max(progress.fetched_to, position)
            if highwater is not None:
                progress.highwater = max(progress.highwater or 0, highwater)
            if not progress.pending:  # nothing to apply: positions skipped (e.g. control records) count
                progress.applied_to = progress.fetched_to

    def applied(self, partition: int, offset: int) -> None:
        """The record at ``offset`` took effect (or was dead-lettered); records are applied in order."""
        with self.lock:
            progress = self.partitions[partition]
            while progress.pending and progress.pending[0][0] <= offset:
                progress.pending.popleft()
            progress.applied_to = progress.fetched_to if not progress.pending else offset + 1

    def to_commit(self) -> dict[int, int]:
        """Applied positions not committed yet."""
        with self.lock:
            return {p: progress.applied_to for p, progress in self.partitions.items()
                    if progress.applied_to > progress.committed_to}

    def committed(self, offsets: dict[int, int]) -> None:
        with self.lock:
            for partition, offset in offsets.items():
                progress = self.partitions[partition]
                progress.committed_to = max(progress.committed_to, offset)

    def caught_up(self, listed_ends: dict[int, int], until_ms: int) -> bool:
        """Whether every record that ``listed_ends`` (asked after the question) covers and whose
        timestamp is at most ``until_ms`` is applied.

        A partition passes when everything up to its end is applied, or when
        everything up to its end is fetched and none of the fetched records
        still waiting has a timestamp at or before ``until_ms``.
        """
        with self.lock:
            if not listed_ends:
                return False
            for partition, listed_end in listed_ends.items():
                progress = self.partitions.get(partition)
                if progress is None:
                    return False
                target = log_end(listed_end, progress.highwater)
                if progress.applied_to >= target:
                    continue
                if progress.fetched_to >= target and all(ts > until_ms for _, ts in progress.pending):
                    continue
                return False
            return True


@dataclass
class PartitionProgress:
    applied_to: int  # every offset below is applied
    fetched_to: int  # every offset below was handed out by a poll
    committed_to: int
    highwater: int | None = None
    pending: deque[tuple[int, int]] = field(default_factory=deque)  # (offset, timestamp ms), fetched, not applied


class ReviewFeed:
    """The body of the ReviewFeedback actor (a plain class, so it runs without Ray too).

    One thread owns the consumer of the review topic: it assigns every
    partition (no group join to wait for; offsets are committed under its own
    group, starting from the earliest record when the group has none), applies
    each decision in order, and commits only the positions it applied. Broker
    and actor failures are retried without end; a decision that keeps failing
    for another reason, or a record that is not a ReviewDecision, goes to the
    dead-letter topic. If the thread dies anyway, ``on_death`` is called (the
    actor exits, so Ray restarts it).
    """

    def __init__(self, settings: Settings, applier: Any, on_death: Callable[[], None] = lambda: None,
                 after_apply: Callable[[ReviewDecision, Any, dict[str, Any]], int] | None = None) -> None:
        self.settings = settings
        self.applier = applier
        self.on_death = on_death
        self.after_apply = after_apply
        self.group_id = f"{settings.kafka.group_id}-reviews"
        self.topic = settings.topics.reviews
        self.progress = ReviewProgress()
        self.counts: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reviews", daemon=True)
        self._ends_consumer: Any = None
        self._ends_lock = threading.Lock()
        self._listed: tuple[float, dict[int, int]] | None = None  # (listed at, ms; end offset per partition)
        self._producer: Any = None

    def start(self) -> ReviewFeed:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive() or self.stopping.is_set()

    def stats(self) -> dict[str, int]:
        return {"reviews_applied": self.counts["applied"], "reviews_dead_lettered": self.counts["dead_letters"],
                "reviews_reissued": self.counts["reissued"]}

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        self.stopping.set()
        self.thread.join(timeout=timeout_s)
        with self._ends_lock:
            if self._ends_consumer is not None:
                self._ends_consumer.close()
                self._ends_consumer = None
        if self._producer is not None:
            self._producer.close()
        return self.stats()

    # -- caught_up: any thread ---------------------------------------------------------------------

    def caught_up(self, until_ms: int) -> bool:
        """True once every record in the review topic with a timestamp at or before ``until_ms``, as
        of this call, is applied. End offsets are asked now, so a review the broker held when the
        call was made is never missed; records that arrive later are not waited for. Ends listed
        after ``until_ms`` (by ENDS_REUSE_MARGIN_MS) already answer that, so a backlog's batches,
        all stamped before the last listing, share one broker request instead of one each."""
        partitions = self.progress.started()
        if not partitions:
            return False  # the consumer has not started: its backlog is unknown
        try:
            with self._ends_lock:
                listed = self._listed
                if listed is None or until_ms > listed[0] - ENDS_REUSE_MARGIN_MS or set(listed[1]) != set(partitions):
                    listed = (time.time() * 1000, self._list_ends(partitions))
                    self._listed = listed
        except KafkaError:
            log.warning("end offsets of %s unavailable; not caught up", self.topic, exc_info=True)
            return False
        return self.progress.caught_up(listed[1], until_ms)

    def _list_ends(self, partitions: list[int]) -> dict[int, int]:
        if self._ends_consumer is None:
            self._ends_consumer = make_consumer(self.settings, topics=None, group_id=None)
        ends = self._ends_consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions],
                                               timeout_ms=ENDS_TIMEOUT_MS)
        return {tp.partition: end for tp, end in ends.items()}

    # -- the consumer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._consume()
        except BaseException:
            log.critical("the review consumer thread died", exc_info=True)
            self.on_death()
            raise

    def _consume(self) -> None:
        consumer = None
        attempt = 0
        while not self.stopping.is_set():
            try:
                if consumer is None:
                    consumer = self._connect()
                self._poll_once(consumer)
                self._commit(consumer)
                attempt = 0
            except KafkaError:  # start over from what was applied: a poll may have been half handed out
                attempt += 1
                log.warning("review consumer: broker error (attempt %d); reconnecting", attempt, exc_info=True)
                if consumer is not None:
                    self._close(consumer)
                    consumer = None
                self.stopping.wait(min(5.0, 0.2 * 2 ** attempt))
        if consumer is not None:
            try:
                self._commit(consumer)
            except KafkaError:
                log.warning("review consumer: final commit failed; the next start re-applies", exc_info=True)
            self._close(consumer)

    @staticmethod
    def _close(consumer: Any) -> None:
        try:
            consumer.close(autocommit=False)
        except KafkaError:
            log.debug("closing the review consumer failed", exc_info=True)

    def _connect(self) -> Any:
        """Assign every partition at its group's committed offset (or the earliest)."""
        consumer = make_consumer(self.settings, topics=None, group_id=self.group_id,
                                 fetch_max_wait_ms=self.settings.kafka.follower_fetch_max_wait_ms)
        try:
            partitions = read_partitions(consumer, self.topic)
            consumer.assign(partitions)
            for tp in partitions:
                position = self.progress.start(tp.partition, consumer.position(tp))
                consumer.seek(tp, position)
        except BaseException:
            consumer.close(autocommit=False)
            raise
        log.info("review consumer at %s", {tp.partition: consumer.position(tp) for tp in partitions})
        return consumer

    def _poll_once(self, consumer: Any) -> None:
        polled = consumer.poll(timeout_ms=200, max_records=POLL_RECORDS)
        for tp in consumer.assignment():
            records = polled.get(tp, [])
            self.progress.fetched(tp.partition, [(r.offset, r.timestamp) for r in records], consumer.position(tp),
                                  consumer.highwater(tp))
        for records in polled.values():
            for record in records:
                if not self._handle(record):
                    return  # stopping: the rest stays unapplied and uncommitted
                self.progress.applied(record.partition, record.offset)

    def _commit(self, consumer: Any) -> None:
        offsets = self.progress.to_commit()
        if offsets:
            consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
            self.progress.committed(offsets)

    def _handle(self, record: Any) -> bool:
        """Apply one record, retrying failures; False only when stopping first."""
        try:
            decision = parse_review_decision(record.value if record.value is not None else b"")
        except MessageError as exc:
            log.warning("malformed review at %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            return self._dead_letter(record, "invalid_event", str(exc))
        failures = 0
        while not self.stopping.is_set():
            try:
                outcome = self.applier.apply(decision)
                if self.after_apply is not None:
                    self.counts["reissued"] += self.after_apply(decision, record, outcome)
            except TRANSIENT:  # a shard restarting, the broker away: it comes back
                log.warning("applying the review of %s failed; retrying", decision.image_id, exc_info=True)
                self.stopping.wait(1.0)
                continue
            except Exception as exc:  # anything else is retried a few times, then isolated
                failures += 1
                log.warning("applying the review of %s failed (%d of %d)", decision.image_id, failures,
                            APPLY_ATTEMPTS, exc_info=True)
                if failures >= APPLY_ATTEMPTS:
                    return self._dead_letter(record, "processing_failed", f"{type(exc).__name__}: {exc}")
                self.stopping.wait(0.5 * failures)
                continue
            self.counts["applied"] += 1
            metrics.REVIEWS_APPLIED.labels(label=decision.label).inc()
            log.debug("applied review %s", outcome)
            return True
        return False

    def _dead_letter(self, record: Any, reason: str, detail: str) -> bool:
        """Send the record to the dead-letter topic and wait for the broker; False only when stopping first."""
        letter = DeadLetter.for_record(record_placeholder_id(record.topic, record.partition, record.offset),
                                       reason, detail, record.value)
        while not self.stopping.is_set():
            try:
                if self._producer is None:
                    self._producer = make_producer(self.settings)
                self._producer.send(self.settings.topics.dlq, key=letter.event_id,
                                    value=to_json_bytes(letter)).get(timeout=30)
                self.counts["dead_letters"] += 1
                metrics.DEAD_LETTERS.labels(reason=reason).inc()
                return True
            except KafkaError:
                log.warning("dead-lettering %s failed; retrying", letter.event_id, exc_info=True)
                self.stopping.wait(1.0)
        return False


def read_partitions(consumer: Any, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
    """Every partition of ``topic``, waiting for a topic created moments ago to appear in metadata."""
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic):
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"topic {topic} has no partitions in the broker's metadata")
        consumer.topics()  # refresh metadata
        time.sleep(0.2)
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]


@ray.remote(max_restarts=-1, max_task_retries=0)
class ReviewFeedback:
    """Consumes the review topic and applies each decision in order (see ReviewFeed)."""

    def __init__(self, settings: Settings, shards: list[Any], knn_replicas: list[Any],
                 make_applier: Callable[[Settings, list[Any], list[Any]], Any] = ReviewApplier) -> None:
        logging.basicConfig(level=logging.INFO)
        window_s = settings.pipeline.reissue_window_s
        self.reissuer = Reissuer(settings, window_s) if window_s > 0 else None
        self.feed = ReviewFeed(settings, make_applier(settings, shards, knn_replicas), on_death=_exit_loudly,
                               after_apply=self.reissuer.after_review if self.reissuer else None)
        self.feed.start()

    def caught_up(self, until_ms: int) -> bool:
        """True once every review already in the topic with a Kafka timestamp <= ``until_ms`` is applied."""
        return self.feed.caught_up(until_ms)

    def stats(self) -> dict[str, int]:
        """Counts; raises while the consumer thread is dead, so a health check sees it."""
        if not self.feed.alive():
            raise RuntimeError("the review consumer thread is dead")
        return self.feed.stats()

    def stop(self) -> dict[str, int]:
        stats = self.feed.stop()
        if self.reissuer is not None:
            self.reissuer.close()
        return stats


def _exit_loudly() -> None:
    """A dead consumer thread takes the actor with it: Ray restarts the actor, which resumes from the
    last commit, rather than keep an actor that answers calls but applies nothing."""
    logging.shutdown()
    os._exit(70)


def wait_until_caught_up(review: Any, until_ms: int, timeout_s: float, poll_s: float = 0.02) -> bool:
    """Ask a ReviewFeedback actor until it is caught up to ``until_ms``; False when ``timeout_s`` ran out
    (or the actor kept failing to answer)."""
    deadline = time.monotonic() + timeout_s
    pending = None  # one question at a time: an answer can take seconds while the broker is away
    while True:
        try:
            pending = pending or review.caught_up.remote(until_ms)
            answer = ray.get(pending, timeout=max(0.0, deadline - time.monotonic()))
            pending = None
            if answer:
                return True
        except ray.exceptions.GetTimeoutError:
            pass  # still thinking: keep waiting on the same question
        except ray.exceptions.RayError:
            pending = None  # restarting: ask again, the bound still holds
            log.debug("review feedback did not answer caught_up", exc_info=True)
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
