"""The Kafka source of ingest: poll records, commit what is settled, hand partitions over.

Offsets move in one direction only. Every batch is stamped, per partition,
with the assignment epoch it was polled in; a partition's epoch changes
whenever it is assigned, revoked or lost. Settling a batch records its
offsets only if its partitions still carry the same epoch, and a commit only
goes out when it is ahead of the last one. So a batch that settles after its
partition moved to another consumer can never commit an offset behind what
that consumer committed.

On a rebalance the consumer calls ``on_partitions_revoked`` before any other
member gets the partitions: the source waits (bounded) until the batches in
flight are settled, commits them, and only then lets the partitions go, so
the next owner does not replay settled work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from common import metrics
from common.config import Settings
from common.kafkaio import Undecodable, make_consumer, poll_records
from common.messages import DeadLetter, record_placeholder_id

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
DRAIN_STEP_S = 0.05

Positions = dict[TopicPartition, tuple[int, int]]  # partition -> (epoch, next offset to read)


class CommitLedger:
    """Which offsets may be committed; thread-safe, no Kafka client inside."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epochs: dict[TopicPartition, int] = {}
        self._owned: set[TopicPartition] = set()
        self._settled: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._new_epoch(tp)
                self._owned.add(tp)

    def release(self, partitions: Iterable[TopicPartition]) -> None:
        """The partitions are gone (revoked or lost): what settles for them later is dropped."""
        with self._lock:
            for tp in partitions:
                self._new_epoch(tp)
                self._owned.discard(tp)

    def _new_epoch(self, tp: TopicPartition) -> None:
        self._epochs[tp] = self._epochs.get(tp, 0) + 1
        self._settled.pop(tp, None)
        self._committed.pop(tp, None)

    def stamp(self, next_offsets: dict[TopicPartition, int]) -> Positions:
        """Positions for a polled batch: each partition's next offset with its current epoch."""
        with self._lock:
            return {tp: (self._epochs.get(tp, 0), offset) for tp, offset in next_offsets.items()}

    def settle(self, positions: Positions) -> None:
        """The batch is durable: its offsets may be committed, unless its partitions moved since."""
        with self._lock:
            for tp, (epoch, offset) in positions.items():
                if tp in self._owned and self._epochs.get(tp) == epoch:
                    self._settled[tp] = max(self._settled.get(tp, 0), offset)

    def to_commit(self, partitions: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Settled offsets ahead of the last commit (of ``partitions``, or of all owned ones)."""
        with self._lock:
            wanted = self._owned if partitions is None else set(partitions) & self._owned
            return {tp: offset for tp, offset in self._settled.items()
                    if tp in wanted and offset > self._committed.get(tp, -1)}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, offset in offsets.items():
                if tp in self._owned:
                    self._committed[tp] = max(self._committed.get(tp, -1), offset)

    def owned(self) -> set[TopicPartition]:
        with self._lock:
            return set(self._owned)


@dataclass
class SourceBatch:
    """What one poll returned: records in order, record batches skipped as undecodable, and the
    positions to settle once all of them are answered."""

    records: list[Any]
    undecodable: list[Undecodable]
    positions: Positions

    @property
    def empty(self) -> bool:
        return not self.records and not self.undecodable


def undecodable_dead_letter(skipped: Undecodable) -> DeadLetter:
    """The answer for a record batch the client could not decode (its records cannot be read at all)."""
    return DeadLetter.for_record(
        record_placeholder_id(skipped.topic, skipped.partition, skipped.offset), "invalid_event",
        f"undecodable record batch {skipped.topic}[{skipped.partition}]@{skipped.offset}, skipped to "
        f"{skipped.next_offset}: {skipped.error}", None)


class _CommitOnRevoke(AsyncConsumerRebalanceListener):
    """Runs on the consumer's I/O thread; async, so heartbeats go on while in-flight batches settle."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.source.hand_over(revoked)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        log.warning("lost %s: another consumer replays what was not committed", sorted(lost))
        self.source.ledger.release(lost)
        self.source.forget_lag(lost)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))
        self.source.ledger.assign(assigned)


class KafkaSource:
    """Owns the consumer; call everything but ``settle`` from one thread (the poll thread)."""

    def __init__(self, settings: Settings, drained: Callable[[], bool], consumer: Any = None) -> None:
        self.settings = settings
        self.drained = drained
        self.ledger = CommitLedger()
        self.consumer = consumer or make_consumer(settings, topics=None, group_id=settings.kafka.group_id)
        self.consumer.subscribe([settings.topics.uploads], listener=_CommitOnRevoke(self))
        self._next_lag_report = 0.0

    def poll(self, timeout_ms: int, max_records: int) -> SourceBatch:
        polled = poll_records(self.consumer, timeout_ms, max_records)
        next_offsets: dict[TopicPartition, int] = {}
        for record in polled.records:
            tp = TopicPartition(record.topic, record.partition)
            next_offsets[tp] = max(next_offsets.get(tp, 0), record.offset + 1)
        for skipped in polled.undecodable:
            tp = TopicPartition(skipped.topic, skipped.partition)
            next_offsets[tp] = max(next_offsets.get(tp, 0), skipped.next_offset)
        return SourceBatch(polled.records, polled.undecodable, self.ledger.stamp(next_offsets))

    def settle(self, positions: Positions) -> None:
        """Called by the thread that settled the batch (any thread)."""
        self.ledger.settle(positions)

    def commit(self) -> None:
        """Commit what is settled; a failure is logged and the offsets stay pending for the next try."""
        offsets = self.ledger.to_commit()
        if not offsets:
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
        except Exception as exc:
            log.warning("commit of %s failed, will retry: %s", _describe_offsets(offsets), exc)
            return
        self.ledger.committed(offsets)

    def report_lag(self) -> None:
        if time.monotonic() >= self._next_lag_report:
            report_lag(self.consumer)
            self._next_lag_report = time.monotonic() + LAG_INTERVAL_S

    async def hand_over(self, revoked: set[TopicPartition]) -> None:
        """Wait (bounded) for in-flight batches to settle, commit them, then let the partitions go."""
        deadline = time.monotonic() + self.settings.pipeline.revoke_drain_timeout_s
        pause = getattr(getattr(self.consumer, "_net", None), "sleep", None)
        while not self.drained() and time.monotonic() < deadline:
            if pause is not None:
                await pause(DRAIN_STEP_S)  # the consumer's own event loop keeps heartbeating meanwhile
            else:
                time.sleep(DRAIN_STEP_S)
        if not self.drained():
            log.warning("handing over %s with batches still in flight; the next owner replays them",
                        sorted(revoked))
        offsets = self.ledger.to_commit(revoked)
        if offsets:
            try:
                await self.consumer.commit_async(
                    {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
                log.info("committed %s before handing over", _describe_offsets(offsets))
            except Exception as exc:
                log.warning("commit of %s on revoke failed; the next owner replays them: %s",
                            _describe_offsets(offsets), exc)
        self.ledger.release(revoked)
        self.forget_lag(revoked)

    @staticmethod
    def forget_lag(partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:  # the next owner reports these; a stale value here would linger
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(0)

    def close(self) -> None:
        """Leave the group; the revoke on close commits what settled meanwhile."""
        self.consumer.close(autocommit=False)


def _describe_offsets(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(offsets.items()))


def report_lag(consumer: Any) -> None:
    """Lag per assigned partition: end offset minus committed offset.

    The embedded broker can report end offsets wrongly; a negative difference
    is such a report and is shown as 0 rather than trusted.
    """
    assigned = list(consumer.assignment())
    if not assigned:
        return
    try:
        ends = consumer.end_offsets(assigned)
        for tp in assigned:
            committed = consumer.committed(tp) or 0
            lag = max(0, ends.get(tp, 0) - committed)
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
    except Exception:  # lag is advisory: never let it stop ingest
        log.debug("lag unavailable", exc_info=True)
