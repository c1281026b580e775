"""Kafka client factories and topic creation, configured once from Settings.

Written for Apache Kafka and checked against the embedded broker, which
differs in ways that matter (README, "The broker"): group joins take session_timeout / 2,
a waiting fetch does not return early, end offsets can be wrong and
``read_committed`` is ignored. So: short session timeouts, short fetch waits,
manual commits after the verdicts are acknowledged, and no reliance on end
offsets for correctness.

Every consumer loop polls through ``poll_records``: a record batch the client
cannot decode (an unknown codec, a corrupt compressed payload, a failing CRC)
is reported and skipped instead of raised, because kafka-python 3.0.12 raises
it from ``poll`` and then spins on the same batch forever on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CorruptRecordError, KafkaError, TopicAlreadyExistsError, UnsupportedCodecError
from kafka.record.abc import ABCRecordBatch
from kafka.record.memory_records import MemoryRecords

from common import metrics  # by module: Ray pickles actor classes by value
from common.config import Settings
from common.errors import ModstreamError

log = logging.getLogger(__name__)


class KafkaSetupError(ModstreamError):
    """Topics could not be created or the cluster could not be reached."""


def make_producer(settings: Settings, **overrides: Any) -> Any:
    """An idempotent producer that waits for all in-sync replicas (acks=all), compressing as configured.

    kafka-python's ``KafkaProducer``, or with ``kafka.client: librdkafka`` its stand-in over librdkafka."""
    compression = settings.kafka.compression_type
    config: dict[str, Any] = {
        **settings.kafka_client_kwargs(),
        "acks": "all",
        "compression_type": None if compression == "none" else compression,
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": settings.limits.max_bytes * 2,  # inline base64 images are 4/3 larger
        "key_serializer": _encode_key,
    }
    config.update(overrides)
    if settings.kafka.client == "librdkafka":
        from common.rdkafka import RdkafkaProducer  # imported only when chosen
        return RdkafkaProducer(config)
    return KafkaProducer(**config)


def publish_acknowledged(settings: Settings, topic: str, records: Iterable[tuple[str, bytes | None]],
                         timeout_s: float = 60.0) -> int:
    """Send (key, value) records and return only once the broker acknowledged every one.

    The one publisher of the CLI's tools: a send that was not acknowledged raises
    (KafkaError) instead of being reported as published. A value of None is a tombstone.
    """
    producer = make_producer(settings)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
    finally:
        producer.close()
    return len(futures)


def make_consumer(settings: Settings, topics: Iterable[str] | None, group_id: str | None,
                  **overrides: Any) -> Any:
    """A consumer with manual commits; subscribe to ``topics`` unless None (assign later).

    kafka-python's ``KafkaConsumer``, or with ``kafka.client: librdkafka`` its stand-in over librdkafka."""
    kafka = settings.kafka
    config: dict[str, Any] = {
        **settings.kafka_client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",  # honoured by Kafka, ignored by the embedded broker
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "max_partition_fetch_bytes": kafka.max_partition_fetch_bytes,
        "fetch_max_bytes": kafka.fetch_max_bytes,
    }
    config.update(overrides)
    consumer: Any
    if kafka.client == "librdkafka":
        from common.rdkafka import RdkafkaConsumer
        consumer = RdkafkaConsumer(config, on_skipped=lambda batch: _report_skipped(
            batch.partition, batch.offset, batch.next_offset, batch.error))
    else:
        consumer = KafkaConsumer(**config)
    if topics is not None:
        consumer.subscribe(list(topics))
    return consumer


def make_admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**settings.kafka_client_kwargs())


def pipeline_topics(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic modstream reads or writes, with its topic-level configs."""
    topics = settings.topics
    state = {"cleanup.policy": "compact"}
    return {
        topics.uploads: {},
        topics.verdicts: {},
        topics.reviews: {},
        topics.dlq: {},
        f"{topics.state_prefix}.dedup": state,
        f"{topics.state_prefix}.references": state,
        f"{topics.state_prefix}.banks": state,
    }


def ensure_topics(settings: Settings, topics: dict[str, dict[str, str]] | None = None,
                  timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    wanted = pipeline_topics(settings) if topics is None else topics
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = make_admin(settings)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaSetupError(f"cannot reach Kafka at {settings.kafka.bootstrap}: {exc}") from exc
            time.sleep(0.5)
    try:
        missing = [name for name in wanted if name not in set(admin.list_topics())]
        new_topics = [
            NewTopic(name, settings.topics.partitions, settings.topics.replication_factor,
                     topic_configs=wanted[name])
            for name in missing
        ]
        if new_topics:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race: fine
                admin.create_topics(new_topics)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot create topics {sorted(wanted)}: {exc}") from exc
    finally:
        admin.close()


def read_from_beginning(consumer: Any, topics: Iterable[str], timeout_s: float = 30.0
                        ) -> list[TopicPartition]:
    """Assign every partition of ``topics`` (no group) and seek to their start.

    A topic created moments ago may not be in the client's metadata yet:
    refresh and wait for it rather than assign nothing.
    """
    deadline = time.monotonic() + timeout_s
    partitions: list[TopicPartition] = []
    for topic in topics:
        while not consumer.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                raise KafkaSetupError(f"topic {topic} does not exist on {consumer.config['bootstrap_servers']}")
            consumer.topics()  # refresh metadata
            time.sleep(0.2)
        partitions += [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    return partitions


@dataclass(frozen=True)
class Undecodable:
    """A record batch this client could not decode, already skipped.

    ``offset`` is the first offset that could not be read; consumption of the
    partition resumed at ``next_offset``. Dead-letter it, then treat
    ``offset`` up to ``next_offset`` as settled when committing.
    """

    topic: str
    partition: int
    offset: int
    error: str
    next_offset: int


@dataclass(frozen=True)
class Polled:
    """One poll: the records in order, and the batches skipped as undecodable.

    Empty in both means idle; a skipped batch is progress, not idleness.
    """

    records: list[ConsumerRecord]
    undecodable: list[Undecodable]

    @property
    def idle(self) -> bool:
        return not self.records and not self.undecodable


_DECODE_ERRORS = (CorruptRecordError, UnsupportedCodecError)
_MAX_ERROR_CHARS = 500


def poll_records(consumer: Any, timeout_ms: int, max_records: int | None = None) -> Polled:
    """``consumer.poll`` that never raises for a batch it cannot decode.

    Policy: skip and report. A batch this client cannot decode will not
    decode on a retry (every codec Kafka defines is installed; a stored
    batch with a bad payload or checksum stays bad), and stopping the
    partition would halt every upload behind it. So the batch is logged at
    ERROR with topic, partition and offsets, counted in
    ``modstream_undecodable_batches_total{topic}``, the partition moves past
    it, and the caller gets it in ``Polled.undecodable`` to dead-letter.
    Other partitions keep flowing: their records come back in the same or
    the next call. Any other error (broker, authorisation, a deserializer)
    is raised as before. librdkafka reports such a batch instead of raising; its consumer
    skips it the same way (``common.rdkafka``).
    """
    if hasattr(consumer, "poll_batches"):  # common.rdkafka's consumer
        records, skipped = consumer.poll_batches(timeout_ms, max_records)
        return Polled(records=records, undecodable=[
            Undecodable(topic=batch.partition.topic, partition=batch.partition.partition, offset=batch.offset,
                        error=batch.error[:_MAX_ERROR_CHARS], next_offset=batch.next_offset) for batch in skipped])
    try:
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    except Exception as exc:  # inspected below; anything not a decode failure is re-raised
        failed = _failed_batch(exc)
        if failed is None:
            raise
        return Polled(records=[], undecodable=[_skip(consumer, exc, *failed)])
    return Polled(records=[record for records in polled.values() for record in records], undecodable=[])


def _failed_batch(exc: BaseException) -> tuple[TopicPartition, ABCRecordBatch | None] | None:
    """The partition and batch being decoded when ``exc`` was raised, or None if it was not a decode failure.

    kafka-python raises decode errors from inside the record batch's own code
    (decompression, record parsing) or from the fetcher's unpacking loop,
    whose frames hold the partition and the batch; the traceback still has
    them. A deserializer's error is raised elsewhere and is not ours to skip.
    """
    frames = list(_frames(exc.__traceback__))
    inside_batch = any(isinstance(frame.f_locals.get("self"), ABCRecordBatch | MemoryRecords) for frame in frames)
    if not (inside_batch or isinstance(exc, _DECODE_ERRORS)):
        return None
    partition = _innermost(frames, TopicPartition)
    if partition is None:
        return None
    return partition, _innermost(frames, ABCRecordBatch)


def _frames(traceback: TracebackType | None) -> Iterable[Any]:
    """The frames from the raise outwards, without the caller's own (the first)."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    return reversed(frames[1:])


def _innermost(frames: list[Any], kind: type) -> Any:
    for frame in frames:
        for value in list(frame.f_locals.values()):
            if isinstance(value, kind):
                return value
    return None


def _skip(consumer: KafkaConsumer, exc: BaseException, partition: TopicPartition,
          batch: ABCRecordBatch | None) -> Undecodable:
    """Move ``partition`` past the batch, say so loudly and describe it.

    Seeking also clears the fetcher's half-read batch, which otherwise makes
    the next ``poll`` spin on it without end.
    """
    first = consumer.position(partition)
    if batch is not None:
        first = max(first, batch.base_offset)
    resume = max(batch.next_offset if batch is not None else 0, first + 1)
    error = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    error = error[:_MAX_ERROR_CHARS]
    _report_skipped(partition, first, resume, error)
    consumer.seek(partition, resume)
    return Undecodable(topic=partition.topic, partition=partition.partition, offset=first, error=error,
                       next_offset=resume)


def _report_skipped(partition: TopicPartition, first: int, resume: int, error: str) -> None:
    log.error("undecodable record batch on topic %s partition %d at offset %d: skipped %d offset(s), "
              "resuming at %d: %s", partition.topic, partition.partition, first, resume - first, resume,
              error[:_MAX_ERROR_CHARS])
    metrics.UNDECODABLE_BATCHES.labels(topic=partition.topic).inc()


def _encode_key(key: str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()
