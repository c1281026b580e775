"""kafkaclients suite: the CPU the pipeline's Kafka client costs, beside librdkafka.

modstream talks to Kafka through kafka-python (pure Python: its I/O thread, request
building and parsing run under the GIL). confluent-kafka wraps librdkafka, whose threads
are C. Both are driven here the way the pipeline drives kafka-python, against the same
broker, and measured by process CPU time (every thread of this process; the broker's own
CPU is not counted):

- an idle consumer in a group on a ``topics.partitions`` topic, polled every 100 ms as the ingest
  poll thread does, at the ingest fetch wait (``kafka.fetch_max_wait_ms``) and at the
  followers' (``kafka.follower_fetch_max_wait_ms``): on the embedded broker a fetch waits
  out its whole wait, so the wait sets how many fetches an idle consumer makes;
- producing verdict-shaped records, flushed every ``pipeline.poll_records`` as the sink
  does (``kafka.compression_type``, acks from all replicas), and reading them back from
  assigned partitions.

The clients alternate within each repeat, so a slow spell of the machine moves both.

confluent-kafka is in the dev extra; without it its rows are left out (a note says so).
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from common.config import Settings
from common.kafkaio import ensure_topics, make_consumer, poll_records
from deploy.bench import sizes
from deploy.bench.compression import produce_flushed, read_back, verdict_record
from deploy.bench.report import BenchError, Measure, SuiteResult, ratios
from deploy.runner import kafka_for

KAFKA_PYTHON = "kafka-python"
LIBRDKAFKA = "confluent-kafka (librdkafka)"
POLL_S = 0.1  # the ingest poll thread's poll timeout
READ_TIMEOUT_S = 120.0


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    count = sizes.KAFKA_CLIENT_RECORDS.pick(args.kafka_records, args.quick)
    idle_s = sizes.KAFKA_CLIENT_IDLE_S.pick(None, args.quick)
    join_s = sizes.KAFKA_CLIENT_JOIN_S.pick(None, args.quick)
    waits = sorted({settings.kafka.fetch_max_wait_ms, settings.kafka.follower_fetch_max_wait_ms})
    group = settings.pipeline.poll_records
    rng = random.Random(args.seed)
    records = [verdict_record(rng) for _ in range(count)]
    clients = _clients()
    result = SuiteResult("kafkaclients", params={"records": count, "flush_every": group, "idle_s": idle_s,
                                                 "fetch_waits_ms": waits, "repeats": args.repeats})
    idle = result.table(f"an idle consumer in a group, polled every {POLL_S * 1000:.0f} ms: % of a core",
                        ("client", *(f"fetch wait {wait} ms" for wait in waits)))
    traffic = result.table(f"{count:,} verdict-shaped records ({sum(len(v) for _, v in records) // count} bytes), "
                           f"flushed every {group}: CPU microseconds per record",
                           ("client", "produce", "consume", "total", f"total vs {KAFKA_PYTHON}"))
    with kafka_for(settings) as settings:
        idle_samples: dict[tuple[str, int], list[float]] = {(name, wait): [] for name in clients for wait in waits}
        produce: dict[str, list[float]] = {name: [] for name in clients}
        consume: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.repeats):
            for name, client in clients.items():
                for wait in waits:
                    idle_samples[name, wait].append(client.idle_percent(settings, wait, join_s, idle_s))
                topic = f"bench-clients-{uuid.uuid4().hex[:8]}"
                ensure_topics(settings, {topic: {}})
                produce[name].append(client.produce_us(settings, topic, records, group))
                consume[name].append(client.consume_us(settings, topic, len(records)))
    totals = {name: Measure.of([p + c for p, c in zip(produce[name], consume[name], strict=True)], "us")
              for name in clients}
    for name in clients:
        idle.add(client=name, **{f"fetch wait {wait} ms": Measure.of(idle_samples[name, wait], "%") for wait in waits})
        traffic.add(client=name, produce=Measure.of(produce[name], "us"), consume=Measure.of(consume[name], "us"),
                    total=totals[name], **{f"total vs {KAFKA_PYTHON}": ratios(totals[name], totals[KAFKA_PYTHON])})
    result.notes.append("process CPU time of this process, every thread (the clients' I/O threads included); "
                        "the broker's CPU is not counted")
    if LIBRDKAFKA not in clients:
        result.notes.append("confluent-kafka is not installed (it comes with the dev extra): its rows are left out")
    return result


class _Client:
    """One Kafka client, driven the way the pipeline drives kafka-python."""

    def idle_percent(self, settings: Settings, wait_ms: int, join_s: float, seconds: float) -> float:
        topic = f"bench-idle-{uuid.uuid4().hex[:8]}"
        ensure_topics(settings, {topic: {}})
        poll, close = self.consumer(settings, topic, wait_ms)
        try:
            joined = time.monotonic() + join_s
            while time.monotonic() < joined:
                poll()
            started = time.process_time()
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                poll()
            return (time.process_time() - started) / seconds * 100
        finally:
            close()

    def consumer(self, settings: Settings, topic: str, wait_ms: int) -> tuple[Callable[[], int], Callable[[], None]]:
        """A consumer in a new group subscribed to ``topic``: its poll (records it returned) and its close."""
        raise NotImplementedError

    def produce_us(self, settings: Settings, topic: str, records: list[tuple[bytes, bytes]], group: int) -> float:
        raise NotImplementedError

    def consume_us(self, settings: Settings, topic: str, count: int) -> float:
        raise NotImplementedError


class _KafkaPython(_Client):
    """kafka-python through ``common.kafkaio``, whatever ``kafka.client`` the settings name (the
    default is librdkafka: this row would otherwise measure the stand-in, not kafka-python)."""

    @staticmethod
    def _pinned(settings: Settings) -> Settings:
        return settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"client": "kafka-python"})})

    def consumer(self, settings: Settings, topic: str, wait_ms: int) -> tuple[Callable[[], int], Callable[[], None]]:
        consumer = make_consumer(self._pinned(settings), [topic], f"bench-{uuid.uuid4().hex[:8]}",
                                 fetch_max_wait_ms=wait_ms)
        return lambda: len(poll_records(consumer, int(POLL_S * 1000)).records), consumer.close

    def produce_us(self, settings: Settings, topic: str, records: list[tuple[bytes, bytes]], group: int) -> float:
        started = time.process_time()
        produce_flushed(self._pinned(settings), topic, records, group, settings.kafka.compression_type)
        return (time.process_time() - started) * 1e6 / len(records)

    def consume_us(self, settings: Settings, topic: str, count: int) -> float:
        started = time.process_time()
        read_back(self._pinned(settings), topic, count)
        return (time.process_time() - started) * 1e6 / count


class _Librdkafka(_Client):
    def __init__(self, module: Any) -> None:
        self.kafka = module

    @staticmethod
    def _config(settings: Settings, **extra: Any) -> dict[str, Any]:
        return {"bootstrap.servers": settings.kafka.bootstrap, **extra}

    def consumer(self, settings: Settings, topic: str, wait_ms: int) -> tuple[Callable[[], int], Callable[[], None]]:
        consumer = self.kafka.Consumer(self._config(
            settings, **{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "fetch.wait.max.ms": wait_ms,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": settings.kafka.session_timeout_ms,
                         "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms}))
        consumer.subscribe([topic])
        return lambda: len(consumer.consume(settings.pipeline.poll_records, POLL_S)), consumer.close

    def produce_us(self, settings: Settings, topic: str, records: list[tuple[bytes, bytes]], group: int) -> float:
        producer = self.kafka.Producer(self._config(settings, **{
            "linger.ms": 5, "acks": "all", "compression.type": settings.kafka.compression_type}))
        started = time.process_time()
        for start in range(0, len(records), group):
            for key, value in records[start:start + group]:
                producer.produce(topic, key=key, value=value)
            if producer.flush(30) != 0:
                raise BenchError(f"librdkafka left records of {topic} unsent")
        return (time.process_time() - started) * 1e6 / len(records)

    def consume_us(self, settings: Settings, topic: str, count: int) -> float:
        consumer = self.kafka.Consumer(self._config(
            settings, **{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}))
        try:
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            consumer.assign([self.kafka.TopicPartition(topic, partition, self.kafka.OFFSET_BEGINNING)
                             for partition in partitions])
            started = time.process_time()
            seen = 0
            deadline = time.monotonic() + READ_TIMEOUT_S
            while seen < count:
                if time.monotonic() > deadline:
                    raise BenchError(f"read {seen} of {count} records back from {topic}")
                seen += sum(1 for message in consumer.consume(500, 0.2) if message.error() is None)
            return (time.process_time() - started) * 1e6 / count
        finally:
            consumer.close()


def _clients() -> dict[str, _Client]:
    clients: dict[str, _Client] = {KAFKA_PYTHON: _KafkaPython()}
    try:
        import confluent_kafka
    except ImportError:
        return clients
    clients[LIBRDKAFKA] = _Librdkafka(confluent_kafka)
    return clients
