"""The Kafka contract through librdkafka (confluent-kafka), the client most non-Python
services use: a librdkafka producer publishes UploadEvents with every compression codec,
the real pipeline answers each one, and a librdkafka consumer in a consumer group reads the
verdicts and dead letters (which modstream compresses with its own default codec)."""

from __future__ import annotations

import uuid
from pathlib import Path

import confluent_kafka
import pytest

from common.config import COMPRESSION_TYPES
from common.messages import DeadLetter, Verdict, parse_dead_letter, parse_verdict, to_json_bytes
from deploy.clients import upload_event_for
from tests.conftest import wait_for

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
pytestmark = pytest.mark.integration


def test_every_codec_from_a_librdkafka_producer_gets_its_verdict(start_pipeline) -> None:
    pipeline, _ = start_pipeline()
    settings = pipeline.settings
    images = sorted(SAMPLES.glob("*.jpg"))
    sent: dict[str, list[str]] = {}  # codec -> event ids
    malformed: dict[str, str] = {}  # codec -> key of a record that is not an UploadEvent
    for index, codec in enumerate(COMPRESSION_TYPES):
        producer = confluent_kafka.Producer({"bootstrap.servers": settings.kafka.bootstrap,
                                             "compression.type": codec, "linger.ms": 50, "acks": "all"})
        # Inline base64 JPEGs compress, so librdkafka really sends these batches compressed.
        events = [upload_event_for(path, inline=True, image_id=f"{codec}-{path.stem}")
                  for path in images[2 * index:2 * index + 2]]
        for event in events:
            producer.produce(settings.topics.uploads, key=event.image_id, value=to_json_bytes(event))
        malformed[codec] = f"not-json-{codec}"
        producer.produce(settings.topics.uploads, key=malformed[codec], value=b"{not json " + codec.encode() * 40)
        assert producer.flush(30) == 0, f"{codec}: records left unsent"
        sent[codec] = [event.event_id for event in events]

    verdicts, dead_letters = read_outputs(settings.kafka.bootstrap, settings.topics.verdicts, settings.topics.dlq,
                                          verdicts=sum(len(ids) for ids in sent.values()),
                                          dead_letters=len(malformed))

    answered = {verdict.event_id for verdict in verdicts}
    for codec, event_ids in sent.items():
        assert set(event_ids) <= answered, f"{codec}: events without a verdict"
    assert sorted(letter.reason for letter in dead_letters) == ["invalid_event"] * len(malformed)


def read_outputs(bootstrap: str, verdict_topic: str, dlq_topic: str, verdicts: int, dead_letters: int,
                 timeout_s: float = 120.0) -> tuple[list[Verdict], list[DeadLetter]]:
    """Read both output topics with a librdkafka consumer in its own group, committing as it goes."""
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"librdkafka-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
        "enable.auto.commit": True})
    consumer.subscribe([verdict_topic, dlq_topic])
    got_verdicts: list[Verdict] = []
    got_letters: list[DeadLetter] = []

    def enough() -> bool:
        for message in consumer.consume(num_messages=100, timeout=0.5):
            assert message.error() is None, message.error()
            if message.topic() == verdict_topic:
                got_verdicts.append(parse_verdict(message.value()))
            else:
                got_letters.append(parse_dead_letter(message.value()))
        return len({v.event_id for v in got_verdicts}) >= verdicts and len(got_letters) >= dead_letters

    try:
        wait_for(enough, timeout_s, interval_s=0, message=f"{verdicts} verdicts and {dead_letters} dead letters "
                                                         "through librdkafka")
    finally:
        consumer.close()
    return got_verdicts, got_letters
