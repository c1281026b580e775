"""State changelogs on compacted Kafka topics (``modstream.state.*``).

Actors that hold state (dedup shards, kNN replicas) append every change here
and replay the topic when they start, so state survives restarts and moves
with the actor to any node. Replay must know when it has caught up; end
offsets are unreliable on the embedded broker (seen in tests: a partition's
listed end can lag its high watermark), so the reader first
writes a unique marker to every partition and reads until it has seen all of
them: this works on any Kafka-compatible broker. Markers are tombstones, so
compaction removes them on a real cluster.

Partitioning: a record may name its partition (`partition_for`: crc32 of the
owning key modulo the partition count, the same hash that shards use), and a
reader may replay only some partitions. With partitions a multiple of the
shard count, shard s owns exactly the partitions p with p % shards == s, so
each shard reads only its own share and restore time follows its own state.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kafka import KafkaProducer

from common.config import Settings
from common.errors import ModstreamError
from common.kafkaio import make_consumer, make_producer, read_from_beginning

MARKER_PREFIX = "marker:"


class ChangelogError(ModstreamError):
    """The changelog topic could not be written or replayed."""


class Changelog:
    """Append-and-replay access to one state topic; values are JSON objects."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._producer: KafkaProducer | None = None
        self._partitions: int | None = None

    def _ready_producer(self) -> KafkaProducer:
        """The producer, made on first use: a changelog that is only replayed never opens one."""
        if self._producer is None:
            self._producer = make_producer(self.settings)
        return self._producer

    def partition_count(self, timeout_s: float = 30.0) -> int:
        """The topic's partitions, as the broker has them (not the configured default)."""
        if self._partitions is None:
            producer = self._ready_producer()
            deadline = time.monotonic() + timeout_s
            while not (found := producer.partitions_for(self.topic)):
                if time.monotonic() > deadline:
                    raise ChangelogError(f"topic {self.topic} has no partitions")
                time.sleep(0.2)
            self._partitions = len(found)
        return self._partitions

    def partition_for(self, owner_key: str) -> int:
        """The partition of records owned by this key (an MD5, an image id)."""
        return zlib.crc32(owner_key.encode()) % self.partition_count()

    def append(self, records: Iterable[tuple[str, dict[str, Any] | None] | tuple[str, dict[str, Any] | None, int]],
               timeout_s: float = 30.0) -> int:
        """Write (key, value[, partition]) records and wait for the broker to acknowledge all of them.

        A value of None is a tombstone: compaction removes the key."""
        producer = self._ready_producer()
        futures = [producer.send(self.topic, key=record[0],
                                       value=None if record[1] is None else json.dumps(record[1]).encode(),
                                       partition=record[2] if len(record) > 2 else None)
                   for record in records]
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
        return len(futures)

    def replay(self, timeout_s: float = 120.0, only: Callable[[int, int], bool] | None = None
               ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every record from the start of the topic up to now, in partition order.

        ``only(partition, partition_count)`` picks the partitions to read (default: all)."""
        consumer = make_consumer(self.settings, topics=None, group_id=None)
        try:
            partitions = read_from_beginning(consumer, [self.topic], timeout_s)
            if only is not None:
                partitions = [tp for tp in partitions if only(tp.partition, len(partitions))]
                consumer.assign(partitions)
                consumer.seek_to_beginning(*partitions)
                if not partitions:
                    return
            marker = MARKER_PREFIX + uuid.uuid4().hex
            producer = make_producer(self.settings)
            try:
                for tp in partitions:
                    producer.send(self.topic, key=marker, value=None, partition=tp.partition)
                producer.flush(timeout=timeout_s)
            finally:
                producer.close()
            pending = {tp.partition for tp in partitions}
            deadline = time.monotonic() + timeout_s
            while pending:
                if time.monotonic() > deadline:
                    raise ChangelogError(f"replay of {self.topic} did not reach its markers in {timeout_s}s")
                for tp, records in consumer.poll(timeout_ms=200).items():
                    for record in records:
                        key = record.key.decode() if record.key else ""
                        if key == marker:
                            pending.discard(tp.partition)
                        elif key.startswith(MARKER_PREFIX) or tp.partition not in pending:
                            continue  # other readers' markers; records after ours are not "now"
                        elif record.value is not None:
                            yield key, json.loads(record.value)
        finally:
            consumer.close()
