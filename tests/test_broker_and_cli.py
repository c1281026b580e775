"""The embedded broker and the producer-side CLI against real Kafka clients."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer

from common.config import load_settings
from common.kafkaio import ensure_topics, make_admin, make_consumer, pipeline_topics
from common.messages import parse_upload_event
from deploy.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
pytestmark = pytest.mark.integration


def config_file(settings, folder: Path) -> str:
    """The CLI reads these settings (unique topics) from a YAML file, as a user would."""
    path = folder / "modstream.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return str(path)


def _drain(consumer: KafkaConsumer, want: int, timeout_s: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def test_publish_then_consume_in_a_group_commit_and_no_redelivery(make_settings, tmp_path) -> None:
    settings = make_settings()
    folder = tmp_path / "uploads"
    folder.mkdir()
    for sample in sorted(SAMPLES.glob("*.jpg"))[:3]:
        (folder / sample.name).write_bytes(sample.read_bytes())
    (folder / "readme.txt").write_text("not an image: skipped by folder search")

    code = main(["publish", "--config", config_file(settings, tmp_path), str(folder)])
    assert code == 0

    # A plain kafka-python consumer that knows only docs/contracts.md, in a group.
    consumer = KafkaConsumer(settings.topics.uploads, bootstrap_servers=settings.kafka.bootstrap,
                             group_id="outsiders", enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=10000)
    records = _drain(consumer, 3)
    events = [parse_upload_event(r.value) for r in records]
    assert sorted(e.image_id for e in events) == sorted(p.stem for p in sorted(SAMPLES.glob("*.jpg"))[:3])
    assert all(e.uri and e.uri.startswith("file://") and Path(e.uri[7:]).is_file() for e in events)
    assert all(r.key.decode() == e.image_id for r, e in zip(records, events, strict=True))
    consumer.commit()
    consumer.close()

    restarted = KafkaConsumer(settings.topics.uploads, bootstrap_servers=settings.kafka.bootstrap,
                              group_id="outsiders", enable_auto_commit=False, auto_offset_reset="earliest",
                              session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=10000)
    assert _drain(restarted, 1, timeout_s=8) == []
    restarted.close()


def test_publish_inline_embeds_the_bytes(make_settings, tmp_path) -> None:
    settings = make_settings()
    sample = sorted(SAMPLES.glob("*.jpg"))[0]
    assert main(["publish", "--inline", "--config", config_file(settings, tmp_path), str(sample)]) == 0
    consumer = make_consumer(settings, [settings.topics.uploads], group_id="inline-check")
    [record] = _drain(consumer, 1)
    consumer.close()
    event = parse_upload_event(record.value)
    assert event.uri is None and event.inline_bytes() == sample.read_bytes()


def test_publish_without_a_broker_is_a_clear_error(capsys, tmp_path) -> None:
    assert main(["publish", str(tmp_path)]) == 2
    assert "MODSTREAM_KAFKA_BOOTSTRAP" in capsys.readouterr().err


def test_ensure_topics_is_idempotent(make_settings) -> None:
    settings = make_settings()
    ensure_topics(settings)
    ensure_topics(settings)  # a second run must not fail on existing topics
    admin = make_admin(settings)
    try:
        assert set(pipeline_topics(settings)) <= set(admin.list_topics())
    finally:
        admin.close()


def test_modstream_broker_serves_real_clients() -> None:
    process = subprocess.Popen([sys.executable, "-m", "deploy.cli", "broker"], stdout=subprocess.PIPE,
                               text=True)
    try:
        bootstrap = process.stdout.readline().strip()
        assert bootstrap.startswith("127.0.0.1:")
        settings = load_settings({"kafka": {"bootstrap": bootstrap}}, env={})
        ensure_topics(settings, {"hello": {}})
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        producer.send("hello", json.dumps({"n": 1}).encode()).get(timeout=10)
        producer.close()
        consumer = make_consumer(settings, ["hello"], group_id="hello-readers")
        [record] = _drain(consumer, 1)
        consumer.close()
        assert json.loads(record.value) == {"n": 1}
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0
