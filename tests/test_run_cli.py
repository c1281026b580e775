"""`modstream run` serves plain kafka-python clients that know only DESIGN.md,
and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
VERDICT_FIELDS = {"schema", "event_id", "image_id", "action", "label", "score", "source", "matched_image_id",
                  "signals", "hashes", "model_version", "latency_ms", "ts"}
pytestmark = pytest.mark.integration


def test_plain_clients_get_one_verdict_per_event_and_sigterm_drains(make_settings, modstream_home,
                                                                     tmp_path) -> None:
    settings = make_settings()
    config = tmp_path / "modstream.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "MODSTREAM_HOME": str(modstream_home), "RAY_ADDRESS": ""}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    run = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    bootstrap = settings.kafka.bootstrap
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        sent = []
        for path in sorted(SAMPLES.glob("*.jpg"))[:2]:
            event = {"schema": 1, "event_id": str(uuid.uuid4()), "image_id": path.stem, "uri": path.as_uri(),
                     "ts": "2026-11-23T10:00:00Z", "metadata": {"from": "a plain producer"}, "extra": "ignored"}
            producer.send(settings.topics.uploads, key=path.stem.encode(), value=json.dumps(event).encode())
            sent.append(event)
        producer.flush()
        producer.close()

        consumer = KafkaConsumer(settings.topics.verdicts, bootstrap_servers=bootstrap, group_id="downstream",
                                 auto_offset_reset="earliest", session_timeout_ms=6000,
                                 heartbeat_interval_ms=1000, max_poll_interval_ms=10000)
        verdicts: dict[str, dict] = {}
        deadline = time.monotonic() + 240
        while len(verdicts) < len(sent) and time.monotonic() < deadline and run.poll() is None:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    verdict = json.loads(record.value)
                    verdicts[verdict["event_id"]] = verdict
                    assert record.key.decode() == verdict["image_id"]
        consumer.close()
        assert set(verdicts) == {e["event_id"] for e in sent}, run.stderr.read()[-3000:] if run.poll() else ""
        for verdict in verdicts.values():
            assert set(verdict) >= VERDICT_FIELDS
            assert verdict["schema"] == 1 and verdict["source"] == "model"
            assert verdict["action"] in {"allow", "review", "block"} and 0 <= verdict["score"] <= 1
            assert len(verdict["hashes"]["md5"]) == 32 and len(verdict["hashes"]["phash"]) == 16

        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr[-3000:]
        assert "verdicts=2" in stderr  # the totals it drained and committed
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
