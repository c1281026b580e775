"""The part of kafka-python's client API that modstream uses, answered by librdkafka.

With ``kafka.client: librdkafka`` (the default) every producer and consumer
``common.kafkaio`` makes is one of these, over confluent-kafka; ``kafka-python`` gives
kafka-python's own. Why: kafka-python builds and parses every request in Python under the
GIL, while librdkafka does its I/O in C threads. ``modstream bench kafkaclients`` measured an
idle consumer at 5.9% of a core against 0.4%, and 113 against 29 CPU microseconds per record
produced; ``modstream bench pipeline`` the idle pipeline at 24% of a core against 13-19%.

The pipeline's code (source, sink, review consumer, bank follower, changelog) keeps
speaking kafka-python's API: ``TopicPartition`` and ``OffsetAndMetadata``, ``poll`` returning
records by partition, futures with ``get``/``is_done``/``failed``, a rebalance listener.
Where the clients differ, this module bridges:

- librdkafka reports a record batch it cannot decode (bad compression, failing CRC, an
  unknown codec) as an error at the batch's first offset, then fetches the same batch
  forever. The consumer finds where the batch ends (a probe consumer searches for the
  first offset that is no longer inside it) and seeks there, so ``poll_records`` skips and
  reports it exactly as it does for kafka-python.
- Delivery reports and rebalance callbacks run inside ``poll``/``flush``/``consume`` on the
  caller's thread: a future's ``get`` polls for its own report, and an async rebalance
  listener runs to completion inside the consumer's poll (librdkafka's own threads keep
  the group membership alive meanwhile). A thread that polls for delivery reports in the
  background would make every ``flush`` slower: librdkafka's flush then sleeps 10 ms steps.
- ``seek`` right after ``assign`` is refused by librdkafka (the partition is not fetching
  yet); the partition is assigned again at the new offset instead.
- Keys go to partitions by murmur2, as in Java's and kafka-python's clients (librdkafka's
  default hashes with CRC32), so an image id lands on the same partition whoever sent it.
- A client whose broker does not answer fails when it is made (``KafkaConnectionError``), as
  kafka-python's do; librdkafka alone would only time out on the first send or poll.
- Errors surface as kafka-python's ``KafkaError`` with librdkafka's ``retriable`` flag, so
  the callers' retry rules hold unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import confluent_kafka
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, OffsetAndTimestamp

from common.logend import log_end

log = logging.getLogger(__name__)

# librdkafka's error codes for a record batch it cannot read: every later fetch of it fails the same way.
UNDECODABLE_CODES = frozenset({
    confluent_kafka.KafkaError._BAD_MSG, confluent_kafka.KafkaError._BAD_COMPRESSION,
    confluent_kafka.KafkaError._NOT_IMPLEMENTED,
})
# Per probe of a bad batch's extent, once the probe consumer is connected; a probe that sees nothing
# counts as "past it". 2 s ran out on a loaded 2-core host, and the skip fell short.
PROBE_WAIT_S = 5.0
# A future's wait for its report, per poll. A poll returns with the first report it serves, but a
# report served by another thread's poll or flush does not wake this one (a whole slice lost).
REPORT_SLICE_S = 0.005
SEND_BLOCK_S = 60.0  # how long ``send`` waits for room in a full queue, as kafka-python's max_block_ms


class RdkafkaError(KafkaError):  # type: ignore[misc]  # kafka-python has no type information
    """A librdkafka error as kafka-python's, keeping whether a retry can succeed."""

    def __init__(self, error: confluent_kafka.KafkaError | str, retriable: bool | None = None) -> None:
        if isinstance(error, confluent_kafka.KafkaError):
            super().__init__(f"{error.name()}: {error.str()}")
            self.retriable = error.retriable() if retriable is None else retriable
        else:
            super().__init__(error)
            self.retriable = bool(retriable)


def _as_kafka_error(exc: confluent_kafka.KafkaException) -> RdkafkaError:
    error = exc.args[0] if exc.args else None
    return RdkafkaError(error if isinstance(error, confluent_kafka.KafkaError) else str(exc))


# -- configuration ------------------------------------------------------------------------------------

# kafka-python's keyword -> librdkafka's property, for the settings modstream passes.
_CONFIG_NAMES = {
    "bootstrap_servers": "bootstrap.servers", "client_id": "client.id", "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism", "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password", "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
    "group_id": "group.id", "enable_auto_commit": "enable.auto.commit", "auto_offset_reset": "auto.offset.reset",
    "isolation_level": "isolation.level", "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms", "max_poll_interval_ms": "max.poll.interval.ms",
    "fetch_max_wait_ms": "fetch.wait.max.ms", "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "fetch_max_bytes": "fetch.max.bytes", "acks": "acks", "compression_type": "compression.type",
    "enable_idempotence": "enable.idempotence", "linger_ms": "linger.ms", "max_request_size": "message.max.bytes",
}
_HANDLED_HERE = {"key_serializer", "bootstrap_timeout_ms"}
BOOTSTRAP_TIMEOUT_MS = 30_000  # kafka-python's default


def rdkafka_config(kafka_python_config: dict[str, Any]) -> dict[str, Any]:
    """librdkafka's properties for a kafka-python client configuration.

    A keyword with no counterpart raises: silently dropping a setting would change behaviour unseen."""
    config: dict[str, Any] = {"logger": logging.getLogger("librdkafka")}  # through logging, not stderr
    for name, value in kafka_python_config.items():
        if name in _HANDLED_HERE:
            continue
        if name not in _CONFIG_NAMES:
            raise ValueError(f"kafka.client librdkafka has no counterpart for the client setting {name!r}")
        if name == "compression_type":
            config["compression.type"] = value or "none"
        elif name == "bootstrap_servers":
            config["bootstrap.servers"] = value if isinstance(value, str) else ",".join(value)
        elif value is not None:
            config[_CONFIG_NAMES[name]] = value
    return config


def _bootstrap(client: confluent_kafka.Producer | confluent_kafka.Consumer, config: dict[str, Any]) -> None:
    """Fail at construction when no broker answers, as kafka-python's clients do.

    librdkafka would connect in the background and only time out later, on a send or a poll,
    so a tool such as ``modstream review`` could not say "cannot reach Kafka"."""
    timeout_s = config.get("bootstrap_timeout_ms", BOOTSTRAP_TIMEOUT_MS) / 1000
    try:
        client.list_topics(timeout=timeout_s)
    except confluent_kafka.KafkaException as exc:
        raise KafkaConnectionError(f"no broker answered within {timeout_s:g}s: {_as_kafka_error(exc)}") from exc


# -- producer -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordMetadata:
    """What kafka-python's ``FutureRecordMetadata.get`` returns, as far as modstream reads it."""

    topic: str
    partition: int
    offset: int
    timestamp: int


class DeliveryFuture:
    """kafka-python's send future over a librdkafka delivery report.

    Reports are delivered inside the producer's ``poll`` or ``flush``, on whichever thread calls
    it; ``get`` polls in short slices, so a report another thread took costs at most a slice."""

    def __init__(self, producer: confluent_kafka.Producer) -> None:
        self._producer = producer
        self._done = threading.Event()
        self.value: RecordMetadata | None = None
        self.exception: Exception | None = None

    def _deliver(self, error: confluent_kafka.KafkaError | None, message: confluent_kafka.Message) -> None:
        if error is not None:
            self.exception = RdkafkaError(error)
        else:
            self.value = RecordMetadata(message.topic() or "", message.partition() or 0, message.offset() or 0,
                                        message.timestamp()[1])
        self._done.set()

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def failed(self) -> bool:
        return self.is_done and self.exception is not None

    def get(self, timeout: float | None = None) -> RecordMetadata:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                raise KafkaTimeoutError(f"no delivery report within {timeout}s")
            self._producer.poll(REPORT_SLICE_S)
        if self.exception is not None:
            raise self.exception
        assert self.value is not None
        return self.value


class RdkafkaProducer:
    """``KafkaProducer.send``/``flush``/``close``/``partitions_for`` over a librdkafka producer."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        # Keys to partitions as Java's and kafka-python's clients do (murmur2), not librdkafka's CRC32 default:
        # an image id must land on the same partition whichever client published it.
        self._producer = confluent_kafka.Producer({**rdkafka_config(config), "partitioner": "murmur2_random"})
        _bootstrap(self._producer, config)

    def send(self, topic: str, value: bytes | None = None, key: str | bytes | None = None,
             partition: int | None = None) -> DeliveryFuture:
        """Queue one record; raises KafkaError at once for a record librdkafka refuses (too large)."""
        future = DeliveryFuture(self._producer)
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        encoded_key = key.encode() if isinstance(key, str) else key
        deadline = time.monotonic() + SEND_BLOCK_S
        while True:
            try:
                self._producer.produce(topic, value=value, key=encoded_key, on_delivery=future._deliver, **extra)
                return future
            except BufferError as exc:  # the queue is full: serve delivery reports until there is room
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"the producer queue stayed full for {SEND_BLOCK_S}s") from exc
                self._producer.poll(REPORT_SLICE_S)  # delivered records make room
            except confluent_kafka.KafkaException as exc:
                raise _as_kafka_error(exc) from exc

    def flush(self, timeout: float | None = None) -> None:
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records not delivered within {timeout}s")

    def partitions_for(self, topic: str) -> set[int] | None:
        return _partitions(self._producer, topic)

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued (kafka-python's close does too); librdkafka frees the rest on collection."""
        self._producer.flush(30.0 if timeout is None else timeout)


# -- consumer -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkippedBatch:
    """A record batch the consumer moved past: its first offset, where reading resumed, and why."""

    partition: TopicPartition
    offset: int
    next_offset: int
    error: str


def _partitions(client: confluent_kafka.Producer | confluent_kafka.Consumer, topic: str) -> set[int] | None:
    try:
        metadata = client.list_topics(topic, timeout=5.0).topics.get(topic)
    except confluent_kafka.KafkaException as exc:
        raise _as_kafka_error(exc) from exc
    if metadata is None or metadata.error is not None or not metadata.partitions:
        return None
    return set(metadata.partitions)


def _record(message: confluent_kafka.Message) -> ConsumerRecord:
    key, value = message.key(), message.value()
    timestamp_type, timestamp = message.timestamp()
    headers = message.headers() or []
    return ConsumerRecord(message.topic(), message.partition(), None, message.offset(), timestamp, timestamp_type,
                          key, value, headers, None, len(key) if key else -1, len(value) if value else -1, -1)


class RdkafkaConsumer:
    """``KafkaConsumer`` as modstream uses it, over a librdkafka consumer.

    Call it from one thread, as kafka-python's. ``poll_batches`` is the poll that also reports
    the batches skipped as undecodable (``common.kafkaio.poll_records`` uses it); ``poll``
    logs them through ``on_skipped`` and returns the records only."""

    def __init__(self, config: dict[str, Any], on_skipped: Callable[[SkippedBatch], None]) -> None:
        self.config = config
        self.on_skipped = on_skipped
        rdkafka = rdkafka_config(config)
        # librdkafka wants a group even for a consumer that only assigns; it never joins or commits one.
        rdkafka.setdefault("group.id", f"{config.get('client_id', 'modstream')}-unjoined-{uuid.uuid4().hex[:8]}")
        rdkafka["check.crcs"] = True  # as kafka-python: a batch with a failing checksum is not read
        self._rdkafka_config = rdkafka
        self._consumer = confluent_kafka.Consumer(rdkafka)
        _bootstrap(self._consumer, config)
        self._probe: confluent_kafka.Consumer | None = None
        self._skipped_to: dict[TopicPartition, int] = {}
        self._starts: dict[TopicPartition, int] = {}  # assigned, not fetched yet: where fetching starts

    # -- group membership

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        if listener is None:
            self._consumer.subscribe(topics)
            return

        def run(method: str, partitions: list[confluent_kafka.TopicPartition]) -> None:
            outcome = getattr(listener, method)({TopicPartition(tp.topic, tp.partition) for tp in partitions})
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)

        self._consumer.subscribe(
            topics, on_assign=lambda _, partitions: run("on_partitions_assigned", partitions),
            on_revoke=lambda _, partitions: run("on_partitions_revoked", partitions),
            on_lost=lambda _, partitions: run("on_partitions_lost", partitions))

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit and wait; raises KafkaError if any partition's commit failed."""
        wanted = [confluent_kafka.TopicPartition(tp.topic, tp.partition, meta.offset) for tp, meta in offsets.items()]
        try:
            answered = self._consumer.commit(offsets=wanted, asynchronous=False) or []
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc
        for tp in answered:
            if tp.error is not None:
                raise RdkafkaError(tp.error)

    async def commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """For a rebalance listener, which awaits it; librdkafka keeps the membership alive meanwhile."""
        self.commit(offsets)

    def committed(self, partition: TopicPartition) -> int | None:
        found = self._consumer.committed([confluent_kafka.TopicPartition(partition.topic, partition.partition)],
                                         timeout=10.0)
        return found[0].offset if found and found[0].offset >= 0 else None

    def close(self, autocommit: bool = False) -> None:
        """Leave the group (the revoke callback runs first) and close the probe."""
        del autocommit  # modstream commits explicitly; librdkafka's auto-commit is off
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        self._consumer.close()

    # -- assignment and positions

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        self._starts = dict.fromkeys(partitions, confluent_kafka.OFFSET_INVALID)
        self._consumer.assign([confluent_kafka.TopicPartition(tp.topic, tp.partition) for tp in partitions])

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        target = confluent_kafka.TopicPartition(partition.topic, partition.partition, offset)
        if partition not in self._starts:
            try:
                self._consumer.seek(target)
                return
            except confluent_kafka.KafkaException as exc:
                if exc.args[0].code() != confluent_kafka.KafkaError._STATE:
                    raise _as_kafka_error(exc) from exc
        # Not fetching yet: librdkafka refuses a seek, so assign the partition again at the offset.
        self._consumer.incremental_unassign([confluent_kafka.TopicPartition(partition.topic, partition.partition)])
        self._consumer.incremental_assign([target])
        self._starts[partition] = offset

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self.assignment()):
            self.seek(tp, confluent_kafka.OFFSET_BEGINNING)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self.assignment()):
            self.seek(tp, confluent_kafka.OFFSET_END)

    def position(self, partition: TopicPartition) -> int:
        """The offset of the next record to read, resolving a start that is not fetched yet as kafka-python does."""
        found = self._consumer.position([confluent_kafka.TopicPartition(partition.topic, partition.partition)])
        if found and found[0].offset >= 0:
            return int(found[0].offset)
        start = self._starts.get(partition, confluent_kafka.OFFSET_INVALID)
        if start >= 0:
            return start
        low, high = self._watermarks(partition)
        if start == confluent_kafka.OFFSET_END:
            return high
        if start == confluent_kafka.OFFSET_INVALID:
            committed = self.committed(partition)
            if committed is not None:
                return committed
            if self._rdkafka_config.get("auto.offset.reset") == "latest":
                return high
        return low

    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's end as of the last fetch, as kafka-python's (None before any fetch)."""
        high = self._consumer.get_watermark_offsets(
            confluent_kafka.TopicPartition(partition.topic, partition.partition), cached=True)
        return high[1] if high and high[1] >= 0 else None

    def end_offsets(self, partitions: Iterable[TopicPartition], timeout_ms: int | None = None
                    ) -> dict[TopicPartition, int]:
        """One ListOffsets request for all (timestamp "latest"), as kafka-python sends: asked partition by
        partition, each waited behind the connection's pending fetch (4 partitions: 207 ms, not 51)."""
        timeout_s = 30.0 if timeout_ms is None else timeout_ms / 1000
        asked = [confluent_kafka.TopicPartition(tp.topic, tp.partition, confluent_kafka.OFFSET_END)
                 for tp in partitions]
        try:
            found = self._consumer.offsets_for_times(asked, timeout=timeout_s)
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc
        for tp in found:
            if tp.error is not None:
                raise RdkafkaError(tp.error)
        return {TopicPartition(tp.topic, tp.partition): tp.offset for tp in found}

    def _watermarks(self, partition: TopicPartition, timeout_s: float = 30.0) -> tuple[int, int]:
        try:
            low, high = self._consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(partition.topic, partition.partition), timeout=timeout_s)
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc
        return int(low), int(high)

    def offsets_for_times(self, timestamps: dict[TopicPartition, int]
                          ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        asked = [confluent_kafka.TopicPartition(tp.topic, tp.partition, ms) for tp, ms in timestamps.items()]
        try:
            found = self._consumer.offsets_for_times(asked, timeout=30.0)
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc
        return {TopicPartition(tp.topic, tp.partition):
                OffsetAndTimestamp(tp.offset, timestamps[TopicPartition(tp.topic, tp.partition)], -1)
                if tp.offset >= 0 else None for tp in found}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return _partitions(self._consumer, topic)

    def topics(self) -> set[str]:
        try:
            return set(self._consumer.list_topics(timeout=5.0).topics)
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc

    # -- reading

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        records, _ = self.poll_batches(timeout_ms, max_records)
        by_partition: dict[TopicPartition, list[ConsumerRecord]] = {}
        for record in records:
            by_partition.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        return by_partition

    def poll_batches(self, timeout_ms: int, max_records: int | None = None
                     ) -> tuple[list[ConsumerRecord], list[SkippedBatch]]:
        """Records in order, and the undecodable batches moved past (each already passed to ``on_skipped``)."""
        try:
            messages = self._take(max_records or 500, timeout_ms / 1000)
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc
        records: list[ConsumerRecord] = []
        skipped: list[SkippedBatch] = []
        skipped_here: set[TopicPartition] = set()  # later reports of these in this list were fetched before the seek
        misread: dict[TopicPartition, tuple[int, str]] = {}  # reports outside the log: fetch again after the loop
        for message in messages:
            error = message.error()
            tp = TopicPartition(message.topic(), message.partition()) if message.topic() else None
            offset = message.offset()
            offset = -1 if offset is None else offset
            if tp is not None and offset < self._skipped_to.get(tp, -1):
                if tp not in skipped_here and error is not None and error.code() in UNDECODABLE_CODES:
                    self._resume_short_skip(tp, offset)
                continue  # fetched before the seek past a bad batch
            if error is None:
                assert tp is not None
                self._starts.pop(tp, None)
                records.append(_record(message))
            elif error.code() in UNDECODABLE_CODES and tp is not None and offset >= 0:
                said, (low, high) = f"{error.name()}: {error.str()}", self._log_bounds(tp)
                if not low <= offset < high:
                    misread[tp] = (offset, said)
                    continue
                batch = self._skip(tp, offset, high, said)
                skipped.append(batch)
                skipped_here.add(tp)
                self.on_skipped(batch)
            elif error.fatal():
                raise RdkafkaError(error)
            else:  # librdkafka recovers from the rest itself (reconnects, leader moves)
                log.warning("consumer: %s: %s", error.name(), error.str())
        for tp, (offset, said) in misread.items():
            if tp not in skipped_here:
                self._refetch(tp, offset, said)  # after the loop: the position counts every record delivered
        return records, skipped

    def _take(self, limit: int, timeout_s: float) -> list[confluent_kafka.Message]:
        """Up to ``limit`` messages, returning as soon as there are any, as kafka-python's poll does.

        librdkafka's ``consume(limit, timeout)`` waits for all ``limit`` or the whole timeout: a batch
        smaller than ``limit`` would wait out the poll timeout every time."""
        messages = self._consumer.consume(limit, 0)  # already fetched
        if messages:
            return messages
        first = self._consumer.poll(timeout_s)  # returns with the first message to arrive
        if first is None:
            return []
        return [first, *self._consumer.consume(limit - 1, 0)] if limit > 1 else [first]

    def _skip(self, partition: TopicPartition, offset: int, high: int, error: str) -> SkippedBatch:
        end = self._batch_end(partition, offset, offset, high)
        self._fetch_from(partition, end)
        return SkippedBatch(partition, offset, end, error)

    def _log_bounds(self, partition: TopicPartition) -> tuple[int, int]:
        """The partition's first offset and its end (a listed end can be low: common.logend)."""
        low, listed_end = self._watermarks(partition)
        return low, log_end(listed_end, self.highwater(partition))

    def _refetch(self, partition: TopicPartition, offset: int, error: str) -> None:
        """An undecodable-batch report at an offset outside the partition's log is no batch of it:
        librdkafka read record bytes as a batch header (seen on the embedded broker after a batch
        with a failing CRC: offset 0x7a7a7a7a7a7a7a7a, the records' own 'z' bytes). Skipping to
        there would pass every later record; fetch again from the next record instead."""
        position = self.position(partition)
        log.warning("topic %s partition %d: %s reported at offset %d, outside the log; fetching again from %d",
                    partition.topic, partition.partition, error, offset, position)
        self._fetch_from(partition, position)

    def _resume_short_skip(self, partition: TopicPartition, base: int) -> None:
        """The bad batch at ``base`` reported again after the seek past it: either a report fetched
        before the seek, or a probe that timed out made the skip fall short. A probe at the short
        end tells which; a short skip goes on from there (its dead letter was already sent)."""
        short_end = self._skipped_to[partition]
        if not self._inside(partition, base, short_end):
            return
        end = self._batch_end(partition, base, short_end, self._log_bounds(partition)[1])
        log.warning("topic %s partition %d: the skip past the bad batch at offset %d stopped short at %d; "
                    "skipped on to %d", partition.topic, partition.partition, base, short_end, end)
        self._fetch_from(partition, end)

    def _fetch_from(self, partition: TopicPartition, offset: int) -> None:
        """Seek, and drop whatever below ``offset`` was fetched before the seek."""
        self._skipped_to[partition] = offset
        self._starts.pop(partition, None)
        try:
            self._consumer.seek(confluent_kafka.TopicPartition(partition.topic, partition.partition, offset))
        except confluent_kafka.KafkaException as exc:
            raise _as_kafka_error(exc) from exc

    def _batch_end(self, partition: TopicPartition, base: int, inside: int, high: int) -> int:
        """The first offset after the bad batch that starts at ``base``, searched from ``inside``
        up to the log's end ``high``.

        librdkafka reports every offset inside the batch as an error at ``base``, so the end is the
        first offset that does not: gallop, then bisect. A probe that sees nothing in time counts as
        past the batch, which can only make the skip shorter (the rest is found when the batch is
        reported again), never skip a readable record."""
        step = 1
        while inside + step < high and self._inside(partition, base, inside + step):
            inside, step = inside + step, step * 2
        outside = min(inside + step, high)
        while outside - inside > 1:
            middle = (inside + outside) // 2
            if self._inside(partition, base, middle):
                inside = middle
            else:
                outside = middle
        return max(outside, base + 1)

    def _inside(self, partition: TopicPartition, base: int, offset: int) -> bool:
        """Does reading from ``offset`` still fail on the batch that starts at ``base``?"""
        if self._probe is None:
            probe_config = {**self._rdkafka_config, "group.id": f"{self._rdkafka_config['group.id']}-probe",
                            "fetch.wait.max.ms": 10}
            self._probe = confluent_kafka.Consumer(probe_config)
            _bootstrap(self._probe, self.config)  # connected before the first probe's clock starts
        self._probe.assign([confluent_kafka.TopicPartition(partition.topic, partition.partition, offset)])
        try:
            deadline = time.monotonic() + PROBE_WAIT_S
            while time.monotonic() < deadline:
                for message in self._probe.consume(10, 0.1):
                    error = message.error()
                    if message.partition() != partition.partition:
                        continue
                    return error is not None and error.code() in UNDECODABLE_CODES and message.offset() == base
            return False
        finally:
            self._probe.unassign()
