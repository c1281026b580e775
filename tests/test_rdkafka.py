"""``kafka.client: librdkafka`` (the default): modstream's producers and consumers over
librdkafka, against the real embedded broker. The rest of the suite runs the pipeline on
them end to end; test_pipeline runs it once on kafka-python.

The hostile batches come from kafka-python producers with their lz4 encoder or CRC replaced
(as in test_kafkaio): librdkafka reports such a batch and then fetches it forever, so the
consumer must find where it ends and move past it, exactly, without losing a record after it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import confluent_kafka
import kafka.record.default_records as default_records
import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from common.config import Settings
from common.kafkaio import ensure_topics, make_consumer, make_producer, poll_records
from common.logend import log_end
from common.rdkafka import RdkafkaConsumer, RdkafkaProducer
from deploy.broker import EmbeddedBroker
from tests.conftest import wait_for
from tests.test_kafkaio import drain, patched, produce, undecodable_count
from workers.source import KafkaSource

pytestmark = pytest.mark.integration


@pytest.fixture
def rdkafka_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    return lambda **sections: make_settings(**{**sections, "kafka": {"client": "librdkafka",
                                                                      **sections.get("kafka", {})}})


@pytest.fixture
def topic(rdkafka_settings: Callable[..., Settings]) -> tuple[Settings, str]:
    settings = rdkafka_settings()
    name = f"rd-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {name: {}})
    return settings, name


def assigned_from_start(settings: Settings, name: str) -> RdkafkaConsumer:
    consumer = make_consumer(settings, topics=None, group_id=None)
    assert isinstance(consumer, RdkafkaConsumer)
    consumer.assign([TopicPartition(name, 0), TopicPartition(name, 1)])
    consumer.seek_to_beginning()
    return consumer


def test_the_factories_build_librdkafka_clients_and_a_record_goes_round(topic) -> None:
    settings, name = topic
    producer = make_producer(settings)
    assert isinstance(producer, RdkafkaProducer)
    futures = [producer.send(name, key=f"k{i}", value=b"v%d" % i, partition=i % 2) for i in range(6)]
    producer.flush(timeout=10)
    metadata = [future.get(timeout=10) for future in futures]
    assert [(m.partition, m.offset) for m in metadata] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert all(m.timestamp > 0 for m in metadata) and all(f.succeeded() and not f.failed() for f in futures)
    assert producer.partitions_for(name) == {0, 1}
    producer.close()

    consumer = assigned_from_start(settings, name)
    tp0 = TopicPartition(name, 0)
    assert consumer.position(tp0) == 0  # resolved before any fetch, as kafka-python does
    values, undecodable = drain(consumer, want_values=6, want_undecodable=0)
    assert sorted(values) == [b"v%d" % i for i in range(6)] and not undecodable
    assert consumer.position(tp0) == 3 and consumer.highwater(tp0) == 3
    # The embedded broker lists an idempotent producer's end offsets low; log_end corrects it, as the pipeline does.
    assert log_end(consumer.end_offsets([tp0])[tp0], consumer.highwater(tp0)) == 3
    first = consumer.offsets_for_times({tp0: 0})[tp0]
    assert first is not None and first.offset == 0
    consumer.seek(tp0, 1)
    again = poll_records(consumer, timeout_ms=2000).records
    assert [(r.partition, r.offset, r.key) for r in again] == [(0, 1, b"k2"), (0, 2, b"k4")]
    assert consumer.partitions_for_topic(name) == {0, 1} and name in consumer.topics()
    assert consumer.partitions_for_topic(f"missing-{uuid.uuid4().hex[:8]}") is None
    consumer.close()


def test_a_record_too_large_is_refused_at_send_and_not_retriable(topic) -> None:
    settings, name = topic
    producer = make_producer(settings, max_request_size=10_000)
    with pytest.raises(KafkaError) as refused:
        producer.send(name, value=b"x" * 20_000)
    assert "MSG_SIZE_TOO_LARGE" in str(refused.value) and not refused.value.retriable
    producer.close()


def test_a_setting_librdkafka_has_no_counterpart_for_is_refused(topic) -> None:
    settings, _ = topic
    with pytest.raises(ValueError, match="value_deserializer"):
        make_consumer(settings, topics=None, group_id=None, value_deserializer=bytes)


def test_a_corrupt_compressed_payload_and_a_failing_crc_are_skipped_exactly(topic, broker: EmbeddedBroker,
                                                                           caplog) -> None:
    """librdkafka fetches a bad batch forever: the consumer finds its end (gallop, then bisect) and
    resumes right after it; a 37-record batch checks the search lands on its last offset + 1."""
    settings, name = topic
    produce(broker.bootstrap, name, 0, [b"first"])  # 0
    with patched(default_records, "lz4_encode", lambda data: b"not an lz4 frame"):
        produce(broker.bootstrap, name, 0, [b"x" * 100 for _ in range(37)], compression_type="lz4")  # 1..37
    produce(broker.bootstrap, name, 0, [b"between"])  # 38
    with patched(default_records, "calc_crc32c", lambda data: 12345):
        produce(broker.bootstrap, name, 0, [b"bad crc", b"bad crc"])  # 39, 40
    produce(broker.bootstrap, name, 0, [b"last"])  # 41
    produce(broker.bootstrap, name, 1, [b"other"])
    consumer = assigned_from_start(settings, name)
    caplog.set_level(logging.ERROR, logger="common.kafkaio")

    values, undecodable = drain(consumer, want_values=4, want_undecodable=2)

    assert sorted(values) == [b"between", b"first", b"last", b"other"]
    assert [(u.partition, u.offset, u.next_offset) for u in undecodable] == [(0, 1, 38), (0, 39, 41)]
    assert undecodable[0].error.startswith("_BAD_COMPRESSION") and undecodable[1].error.startswith("_BAD_MSG")
    assert undecodable_count(name) == 2
    assert f"topic {name} partition 0 at offset 1: skipped 37 offset(s)" in caplog.text
    assert consumer.position(TopicPartition(name, 0)) == 42
    assert poll_records(consumer, timeout_ms=300).idle  # nothing left, nothing fetched again
    consumer.close()


def test_a_skip_that_stopped_short_goes_on_when_the_batch_is_reported_again(topic, broker: EmbeddedBroker,
                                                                          monkeypatch, caplog) -> None:
    """A probe that sees nothing in time counts as past the batch (on a loaded host, 2 s probes did):
    the skip falls short, librdkafka reports the batch again from there, and the search goes on
    from the short end instead of the report being dropped as fetched before the seek."""
    settings, name = topic
    produce(broker.bootstrap, name, 0, [b"first"])  # 0
    with patched(default_records, "lz4_encode", lambda data: b"not an lz4 frame"):
        produce(broker.bootstrap, name, 0, [b"x" * 100 for _ in range(37)], compression_type="lz4")  # 1..37
    produce(broker.bootstrap, name, 0, [b"after"])  # 38
    probe = RdkafkaConsumer._inside
    timed_out: list[int] = []

    def first_probe_from_8_times_out(self: RdkafkaConsumer, partition: TopicPartition, base: int,
                                     offset: int) -> bool:
        if offset >= 8 and not timed_out:
            timed_out.append(offset)
            return False
        return probe(self, partition, base, offset)

    monkeypatch.setattr(RdkafkaConsumer, "_inside", first_probe_from_8_times_out)
    consumer = assigned_from_start(settings, name)
    caplog.set_level(logging.WARNING, logger="common.rdkafka")

    values, undecodable = drain(consumer, want_values=2, want_undecodable=1)

    assert timed_out == [8]  # the gallop probes 2, 4, 8
    assert sorted(values) == [b"after", b"first"]
    assert [(u.offset, u.next_offset) for u in undecodable] == [(1, 8)]  # one dead letter, with the short end
    assert "the bad batch at offset 1 stopped short at 8; skipped on to 38" in caplog.text
    assert consumer.position(TopicPartition(name, 0)) == 39
    consumer.close()


class MisreadHeader:
    """librdkafka's report of a batch "header" read from record bytes, as it came once in a full suite
    run on the embedded broker after a batch with a failing CRC: its offset is the records' own 'z's."""

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def error(self) -> confluent_kafka.KafkaError:
        return confluent_kafka.KafkaError(confluent_kafka.KafkaError._NOT_IMPLEMENTED,
                                          "Unsupported Message(Set) MagicByte 122")

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0x7A7A7A7A7A7A7A7A


def test_a_bad_batch_reported_outside_the_log_is_fetched_again_not_skipped_to(topic, broker: EmbeddedBroker,
                                                                             monkeypatch, caplog) -> None:
    """Skipping to a report's offset past the log's end would pass every later record: the
    partition is fetched again from its next record instead, with no dead letter, loss or copy."""
    settings, name = topic
    produce(broker.bootstrap, name, 0, [b"first", b"second", b"third"])
    take = RdkafkaConsumer._take

    def with_a_misread_header(self: RdkafkaConsumer, limit: int, timeout_s: float) -> list[object]:
        messages: list[object] = list(take(self, limit, timeout_s))
        if messages:
            monkeypatch.setattr(RdkafkaConsumer, "_take", take)  # once
            messages.insert(1, MisreadHeader(name))
        return messages

    monkeypatch.setattr(RdkafkaConsumer, "_take", with_a_misread_header)
    consumer = assigned_from_start(settings, name)
    caplog.set_level(logging.WARNING, logger="common.rdkafka")

    values, undecodable = drain(consumer, want_values=3, want_undecodable=0)
    produce(broker.bootstrap, name, 0, [b"fourth"])
    later, _ = drain(consumer, want_values=1, want_undecodable=0)

    assert values + later == [b"first", b"second", b"third", b"fourth"]
    assert undecodable == [] and undecodable_count(name) == 0
    assert f"reported at offset {0x7A7A7A7A7A7A7A7A}, outside the log; fetching again from" in caplog.text
    assert consumer.position(TopicPartition(name, 0)) == 4
    assert poll_records(consumer, timeout_ms=300).idle
    consumer.close()


def test_a_bad_batch_at_the_end_of_a_partition_is_skipped_to_its_end(topic, broker: EmbeddedBroker) -> None:
    settings, name = topic
    with patched(default_records, "lz4_encode", lambda data: b"not an lz4 frame"):
        produce(broker.bootstrap, name, 1, [b"y" * 100 for _ in range(3)], compression_type="lz4")
    consumer = assigned_from_start(settings, name)
    _, undecodable = drain(consumer, want_values=0, want_undecodable=1)
    assert [(u.offset, u.next_offset) for u in undecodable] == [(0, 3)]
    produce(broker.bootstrap, name, 1, [b"after"])
    values, _ = drain(consumer, want_values=1, want_undecodable=0)
    assert values == [b"after"]
    consumer.close()


def test_revoke_commits_the_settled_batch_before_the_partitions_move(rdkafka_settings) -> None:
    """The source's async rebalance listener runs inside librdkafka's poll: a second member joining
    makes the first commit what it settled, and the newcomer starts right after it."""
    settings = rdkafka_settings()
    ensure_topics(settings)
    producer = make_producer(settings)
    for i in range(10):
        producer.send(settings.topics.uploads, key=f"k{i}", value=b"e%d" % i, partition=i % 2)
    producer.flush(timeout=10)
    first = KafkaSource(settings, drained=lambda: True)
    polled: list = []
    wait_for(lambda: polled.extend(first.poll(200, 100).records) or len(polled) == 10, 30, interval_s=0,
             message="the first member reads all ten")
    first.settle(first.ledger.stamp({TopicPartition(r.topic, r.partition): r.offset + 1 for r in polled}))

    second = KafkaSource(settings, drained=lambda: True)
    joined: list = []

    def both_poll() -> bool:
        first.poll(100, 100)
        joined.extend(second.poll(100, 100).records)
        return bool(second.ledger.owned()) and bool(first.ledger.owned())

    wait_for(both_poll, 60, interval_s=0, message="both members own partitions")
    reader = make_consumer(settings, topics=None, group_id=settings.kafka.group_id)
    committed = {p: reader.committed(TopicPartition(settings.topics.uploads, p)) for p in (0, 1)}
    assert committed == {0: 5, 1: 5}  # committed on revoke, before the newcomer read anything
    assert joined == []  # nothing settled is read again
    for source in (first, second):
        source.close()
    reader.close()
    producer.close()


def test_commit_of_offsets_goes_to_the_group(rdkafka_settings) -> None:
    settings = rdkafka_settings()
    ensure_topics(settings)
    consumer = make_consumer(settings, topics=None, group_id=settings.kafka.group_id)
    tp = TopicPartition(settings.topics.uploads, 1)
    assert consumer.committed(tp) is None
    consumer.commit({tp: OffsetAndMetadata(0, "", -1)})
    assert consumer.committed(tp) == 0
    consumer.close()
