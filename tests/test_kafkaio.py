"""poll_records with kafka-python's consumer (``kafka.client: kafka-python``) against the
real embedded broker: batches the client cannot decode are skipped and reported, never
raised, never mistaken for idleness, and the other partitions keep flowing. The same for
librdkafka's: tests/test_rdkafka.py.

The hostile batches come from real producers: librdkafka with zstd while
kafka-python's zstd support is hidden (the codec library missing, as it was
before modstream required it), and kafka-python with its lz4 encoder or its
CRC replaced, so the broker stores a batch whose payload or checksum is wrong.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator

import confluent_kafka
import kafka.codec
import kafka.record.default_records as default_records
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from common.config import Settings
from common.kafkaio import Polled, Undecodable, ensure_topics, make_consumer, poll_records
from deploy.broker import EmbeddedBroker
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(make_settings: Callable[..., Settings]) -> tuple[Settings, str]:
    """A fresh two-partition topic on the session broker, read with kafka-python."""
    settings = make_settings(kafka={"client": "kafka-python"})
    name = f"poll-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {name: {}})
    return settings, name


def produce(bootstrap: str, topic: str, partition: int, values: list[bytes], **config: object) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, **config)
    futures = [producer.send(topic, value=value, partition=partition) for value in values]
    producer.flush()
    for future in futures:
        future.get(timeout=10)
    producer.close()


def produce_zstd_with_librdkafka(bootstrap: str, topic: str, partition: int, values: list[bytes]) -> None:
    """One zstd batch (librdkafka sends it uncompressed unless that saves bytes: give it compressible values)."""
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": "zstd",
                                         "linger.ms": 20})
    for value in values:
        producer.produce(topic, value=value, partition=partition)
    assert producer.flush(10) == 0


@contextlib.contextmanager
def patched(module: object, name: str, replacement: object) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def consumer_on(settings: Settings, topic: str) -> KafkaConsumer:
    consumer = make_consumer(settings, topics=None, group_id=None)
    consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    consumer.seek_to_beginning()
    return consumer


def drain(consumer: KafkaConsumer, want_values: int, want_undecodable: int) -> tuple[list[bytes], list[Undecodable]]:
    values: list[bytes] = []
    undecodable: list[Undecodable] = []

    def done() -> bool:
        polled = poll_records(consumer, timeout_ms=200)
        values.extend(record.value for record in polled.records)
        undecodable.extend(polled.undecodable)
        return len(values) >= want_values and len(undecodable) >= want_undecodable

    wait_for(done, 30, interval_s=0, message=f"{want_values} records and {want_undecodable} undecodable batches")
    return values, undecodable


def undecodable_count(topic: str) -> float:
    return REGISTRY.get_sample_value("modstream_undecodable_batches_total", {"topic": topic}) or 0.0


def test_a_batch_with_a_missing_codec_is_skipped_and_reported(topic, broker: EmbeddedBroker, monkeypatch,
                                                              caplog) -> None:
    settings, name = topic
    produce(broker.bootstrap, name, 0, [b"before"])
    produce_zstd_with_librdkafka(broker.bootstrap, name, 0, [b"zstd %d " % i * 50 for i in range(5)])
    produce(broker.bootstrap, name, 0, [b"after"])
    produce(broker.bootstrap, name, 1, [b"other-%d" % i for i in range(3)])
    monkeypatch.setattr(kafka.codec, "has_zstd", lambda: False)
    consumer = consumer_on(settings, name)
    caplog.set_level(logging.ERROR, logger="common.kafkaio")

    values, undecodable = drain(consumer, want_values=5, want_undecodable=1)

    assert sorted(values) == [b"after", b"before", b"other-0", b"other-1", b"other-2"]
    assert undecodable == [Undecodable(topic=name, partition=0, offset=1, next_offset=6,
                                       error="UnsupportedCodecError: Libraries for zstd compression codec not found")]
    assert undecodable_count(name) == 1
    assert f"topic {name} partition 0 at offset 1" in caplog.text
    assert consumer.position(TopicPartition(name, 0)) == 7
    assert poll_records(consumer, timeout_ms=100).idle  # nothing left, and nothing stuck
    consumer.close()


def test_a_corrupt_compressed_payload_and_a_failing_crc_are_skipped(topic, broker: EmbeddedBroker) -> None:
    settings, name = topic
    with patched(default_records, "lz4_encode", lambda data: b"not an lz4 frame"):
        produce(broker.bootstrap, name, 0, [b"x" * 100 for _ in range(4)], compression_type="lz4")
    produce(broker.bootstrap, name, 0, [b"between"])
    with patched(default_records, "calc_crc32c", lambda data: 12345):
        produce(broker.bootstrap, name, 0, [b"bad crc", b"bad crc"])
    produce(broker.bootstrap, name, 0, [b"last"])
    consumer = consumer_on(settings, name)

    values, undecodable = drain(consumer, want_values=2, want_undecodable=2)

    assert values == [b"between", b"last"]
    assert [(u.partition, u.offset, u.next_offset) for u in undecodable] == [(0, 0, 4), (0, 5, 7)]
    assert "LZ4" in undecodable[0].error
    assert undecodable[1].error.startswith("CorruptRecordError")
    consumer.close()


def test_an_undecodable_batch_neither_stalls_other_partitions_nor_looks_idle(topic, broker: EmbeddedBroker,
                                                                             monkeypatch) -> None:
    """Partition 0 holds only an undecodable batch; partition 1 keeps getting records."""
    settings, name = topic
    produce_zstd_with_librdkafka(broker.bootstrap, name, 0, [b"zstd %d " % i * 50 for i in range(3)])
    produce(broker.bootstrap, name, 1, [b"first"])
    monkeypatch.setattr(kafka.codec, "has_zstd", lambda: False)
    consumer = consumer_on(settings, name)

    polls: list[Polled] = []
    wait_for(lambda: polls.append(poll_records(consumer, timeout_ms=200)) or
             (sum(len(p.records) for p in polls) == 1 and sum(len(p.undecodable) for p in polls) == 1),
             30, interval_s=0, message="the record on partition 1 and the batch on partition 0")
    assert [p.idle for p in polls].count(False) == 2  # one poll had the record, one the skipped batch

    produce(broker.bootstrap, name, 1, [b"second"])
    values, _ = drain(consumer, want_values=1, want_undecodable=0)
    assert values == [b"second"]
    consumer.close()


def test_errors_that_are_not_about_decoding_are_raised(topic, broker: EmbeddedBroker) -> None:
    """A failing deserializer is the caller's bug, not a batch to skip."""
    settings, name = topic
    produce(broker.bootstrap, name, 0, [b"fine"])

    def refuse(value: bytes) -> bytes:
        raise ValueError("deserializer says no")

    consumer = make_consumer(settings, topics=None, group_id=None, value_deserializer=refuse)
    consumer.assign([TopicPartition(name, 0)])
    consumer.seek_to_beginning()
    with pytest.raises(ValueError, match="deserializer says no"):
        wait_for(lambda: poll_records(consumer, timeout_ms=200).records, 30, interval_s=0)
    consumer.close()
