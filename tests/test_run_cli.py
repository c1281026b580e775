"""`modstream run` serves plain kafka-python clients that know only the documented contract
(docs/contracts.md), and on SIGTERM finishes and commits what it had polled."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
VERDICT_FIELDS = {"schema", "event_id", "image_id", "action", "label", "score", "source", "matched_image_id",
                  "signals", "hashes", "model_version", "latency_ms", "ts"}
# Small batches and few in flight, so that a burst is still being worked through when SIGTERM lands.
SMALL_BATCHES = {"pipeline": {"poll_records": 4, "max_inflight_batches": 2}}
BURST = 80
pytestmark = pytest.mark.integration


def distinct_jpeg(seed: int) -> bytes:
    """A small image unlike the others (random colour blocks), so each one needs the model."""
    blocks = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blocks).resize((160, 120), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_totals(stderr: str) -> dict[str, str]:
    """The ``key=value`` totals `modstream run` prints on stderr after draining."""
    for line in reversed(stderr.splitlines()):
        pairs = line.split()
        if pairs and all("=" in pair for pair in pairs) and any(pair.startswith("verdicts=") for pair in pairs):
            return dict(pair.split("=", 1) for pair in pairs)
    raise AssertionError("no totals in the output of modstream run:\n" + stderr[-3000:])


def committed_records(bootstrap: str, group_id: str, topic: str) -> int:
    """Offsets the group committed on ``topic``, summed over partitions: records it is done with."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"no partitions of {topic}"
        return sum(consumer.committed(tp) or 0 for tp in partitions)
    finally:
        consumer.close()


def test_plain_clients_get_one_verdict_per_event_and_sigterm_drains(make_settings, modstream_home,
                                                                     tmp_path) -> None:
    settings = make_settings(**SMALL_BATCHES)
    config = tmp_path / "modstream.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "MODSTREAM_HOME": str(modstream_home), "RAY_ADDRESS": ""}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    run = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    bootstrap = settings.kafka.bootstrap
    verdicts: dict[str, dict] = {}
    consumer = KafkaConsumer(settings.topics.verdicts, bootstrap_servers=bootstrap, group_id="downstream",
                             auto_offset_reset="earliest", session_timeout_ms=6000,
                             heartbeat_interval_ms=1000, max_poll_interval_ms=10000)

    def read(done: Callable[[], bool], limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while not done() and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    verdict = json.loads(record.value)
                    verdicts[verdict["event_id"]] = verdict
                    assert record.key.decode() == verdict["image_id"]

    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        sent = []
        for path in sorted(SAMPLES.glob("*.jpg"))[:2]:
            event = {"schema": 1, "event_id": str(uuid.uuid4()), "image_id": path.stem, "uri": path.as_uri(),
                     "ts": "2026-11-23T10:00:00Z", "metadata": {"from": "a plain producer"}, "extra": "ignored"}
            producer.send(settings.topics.uploads, key=path.stem.encode(), value=json.dumps(event).encode())
            sent.append(event)
        producer.flush()
        read(lambda: len(verdicts) >= len(sent) or run.poll() is not None, 240)
        assert set(verdicts) == {e["event_id"] for e in sent}, run.stderr.read()[-3000:] if run.poll() else ""
        for verdict in verdicts.values():
            assert set(verdict) >= VERDICT_FIELDS
            assert verdict["schema"] == 1 and verdict["source"] == "model"
            assert verdict["action"] in {"allow", "review", "block"} and 0 <= verdict["score"] <= 1
            assert len(verdict["hashes"]["md5"]) == 32

        burst = [{"schema": 1, "event_id": str(uuid.uuid4()), "image_id": f"burst-{i}",
                  "data_b64": base64.b64encode(distinct_jpeg(i)).decode(), "ts": "2026-11-23T10:00:01Z"}
                 for i in range(BURST)]
        for event in burst:
            producer.send(settings.topics.uploads, key=event["image_id"].encode(), value=json.dumps(event).encode())
        producer.flush()
        producer.close()
        sent += burst
        read(lambda: any(e["event_id"] in verdicts for e in burst) or run.poll() is not None, 120)
        run.send_signal(signal.SIGTERM)  # mid-burst: batches are polled and queued behind the one being scored
        answered_at_sigterm = len(verdicts)
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr[-3000:]
        totals = {key: int(value) for key, value in run_totals(stderr).items() if value.isdigit()}
        read(lambda: False, 3.0)  # everything the drain published

        print(f"{answered_at_sigterm} of {len(sent)} events answered when SIGTERM was sent, "
              f"{totals['verdicts']} after the drain")  # shown with pytest -rP
        # The drain answered and counted what was in flight, then stopped taking new work.
        assert answered_at_sigterm < totals["verdicts"] < len(sent), (answered_at_sigterm, totals)
        assert set(verdicts) <= {e["event_id"] for e in sent}
        assert len(verdicts) == totals["verdicts"]
        # It committed exactly what it answered: the rest stays on the topic for the next run.
        answered = totals["verdicts"] + totals.get("dead_letters", 0)
        assert committed_records(bootstrap, settings.kafka.group_id, settings.topics.uploads) == answered
    finally:
        consumer.close()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
