"""Hostile records, each followed by a good image on one partition, through `modstream run`
on the default Kafka client: every good image gets its verdict, every hostile record its
dead letter with the right reason, nothing stalls, and `--exit-when-idle` exits. Besides
bad events, the producer sends record batches no client can decode (a corrupt lz4 payload,
a failing CRC): each becomes one dead letter at its first offset, skipped to exactly its end."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import kafka.record.default_records as default_records
import pytest
import yaml

from common.kafkaio import ensure_topics, make_producer
from common.messages import MAX_ORIGINAL_BYTES, record_placeholder_id, to_json_bytes
from tests.conftest import Outputs, wait_for
from tests.test_kafkaio import patched, produce

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
SECRETS = (b"hunter2", b"tok-secret")
FETCH = {"fetch_failed"}
pytestmark = pytest.mark.integration


def upload(event_id: str | None = None, **fields: object) -> dict:
    return {"schema": 1, "event_id": event_id or str(uuid.uuid4()), "image_id": f"img-{uuid.uuid4().hex[:8]}",
            "ts": "2026-11-23T10:00:00Z", **fields}


def as_bytes(document: object) -> bytes:
    return json.dumps(document).encode()


def hostile_corpus(folder: Path) -> list[tuple[str, bytes | None, set[str]]]:
    """(name, record value, acceptable dead-letter reasons), built fresh for each run."""
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    truncated = sorted(SAMPLES.glob("*.jpg"))[0].read_bytes()[:2000]
    large = base64.b64encode(os.urandom(700_000)).decode()
    return [
        ("null byte in file uri", as_bytes(upload(uri="file:///tmp/a%00b.jpg")), FETCH),
        ("unclosed IPv6 host", as_bytes(upload(uri="http://[::1/x")), FETCH),
        ("bracket in file host", as_bytes(upload(uri="file://[/x")), FETCH),
        ("credentials in uri", as_bytes(upload(uri="http://bob:hunter2@127.0.0.1:1/x.jpg?token=tok-secret")),
         {"fetch_failed"}),
        ("not JSON", b"\x00\x01 this is not JSON \xff", {"invalid_event"}),
        ("JSON array", b"[1, 2, 3]", {"invalid_event"}),
        ("JSON number", b"42", {"invalid_event"}),
        ("tombstone", None, {"invalid_event"}),
        ("huge event_id", as_bytes(upload(event_id="e" * 300_000, data_b64="AAAA")), {"invalid_event"}),
        ("huge image and uploader ids", as_bytes({**upload(data_b64="AAAA"), "image_id": "i" * 300_000,
                                                  "uploader_id": "u" * 300_000}), {"invalid_event"}),
        ("deep nesting", b'{"event_id": "deep", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
         {"invalid_event"}),
        ("invalid base64", as_bytes(upload(data_b64="this is not base64!")), {"invalid_event"}),
        ("empty inline image", as_bytes(upload(data_b64="")), {"invalid_event"}),
        ("0-byte image file", as_bytes(upload(uri=empty.as_uri())), {"decode_failed", "unsupported_format"}),
        ("truncated JPEG", as_bytes(upload(data_b64=base64.b64encode(truncated).decode())), {"decode_failed"}),
        ("inline image over max_bytes", as_bytes(upload(data_b64=large)), {"too_large"}),
    ]


# Batches a hostile producer's client wrote wrong: name, the patch that breaks it, records, codec,
# and the start of the error librdkafka reports for it.
UNDECODABLE_BATCHES = (
    ("corrupt lz4 batch", ("lz4_encode", lambda data: b"not an lz4 frame"), 3, "lz4", "_BAD_COMPRESSION"),
    ("batch failing its CRC", ("calc_crc32c", lambda data: 12345), 2, None, "_BAD_MSG"),
)


def expected_id(value: bytes | None, topic: str, offset: int) -> str:
    try:
        event_id = json.loads(value or b"").get("event_id")
    except (ValueError, AttributeError, RecursionError):
        event_id = None
    if isinstance(event_id, str) and 0 < len(event_id) <= 256:
        return event_id
    return record_placeholder_id(topic, 0, offset)


def test_hostile_records_never_stop_the_stream_and_run_exits_when_idle(make_settings, modstream_home,
                                                                       tmp_path) -> None:
    settings = make_settings(topics={"partitions": 1},
                             limits={"max_bytes": 500_000, "file_roots": [str(tmp_path), str(SAMPLES)]})
    ensure_topics(settings)
    goods = sorted(SAMPLES.glob("*.jpg"))
    producer = make_producer(settings)
    hostile: dict[str, tuple[str, set[str]]] = {}
    good: dict[str, str] = {}
    undecodable: dict[str, str] = {}  # dead letter id -> what its detail must say

    def send_good(index: int) -> int:
        """A good image after each hostile record; returns the offset after it."""
        image = goods[index % len(goods)]
        event = upload(data_b64=base64.b64encode(image.read_bytes()).decode()) if index % 2 else \
            upload(uri=image.as_uri())
        sent = producer.send(settings.topics.uploads, key=event["image_id"], value=as_bytes(event)).get(timeout=30)
        good[event["event_id"]] = image.name
        return sent.offset + 1

    corpus = hostile_corpus(tmp_path)
    for index, (name, value, reasons) in enumerate(corpus):
        offset = producer.send(settings.topics.uploads, key="hostile", value=value).get(timeout=30).offset
        hostile[expected_id(value, settings.topics.uploads, offset)] = (name, reasons)
        next_offset = send_good(index)
    for index, (name, (function, broken), records, codec, error) in enumerate(UNDECODABLE_BATCHES, len(corpus)):
        with patched(default_records, function, broken):
            produce(settings.kafka.bootstrap, settings.topics.uploads, 0, [b"z" * 100] * records,
                    compression_type=codec)
        letter_id = record_placeholder_id(settings.topics.uploads, 0, next_offset)
        hostile[letter_id] = (name, {"invalid_event"})
        undecodable[letter_id] = f"skipped to {next_offset + records}: {error}"
        next_offset = send_good(index)
    producer.close()

    config = tmp_path / "modstream.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "MODSTREAM_HOME": str(modstream_home), "RAY_ADDRESS": ""}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    run = subprocess.run([sys.executable, "-m", "deploy.cli", "run", "--config", str(config),
                          "--exit-when-idle", "10"], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    outputs = Outputs(settings)
    try:
        wait_for(lambda: outputs.poll() or (len({v.event_id for v in outputs.verdicts}) >= len(good)
                                            and len({d.event_id for d in outputs.dead_letters}) >= len(hostile)),
                 timeout_s=60, message="every answer on the topics")
    except AssertionError as timed_out:
        unanswered = [good[e] for e in set(good) - {v.event_id for v in outputs.verdicts}] + \
            [name for e, (name, _) in hostile.items() if e not in {d.event_id for d in outputs.dead_letters}]
        raise AssertionError(f"{timed_out}; unanswered: {unanswered}; modstream run said:\n{run.stderr[-6000:]}") \
            from None
    answers: dict[str, set] = {}
    for verdict in outputs.verdicts:
        answers.setdefault(verdict.event_id, set()).add((verdict.action, verdict.label, verdict.source))
    assert set(good) <= set(answers), {good[e] for e in set(good) - set(answers)}
    assert all(len(found) == 1 for found in answers.values())  # no event got two different verdicts
    letters = {d.event_id: d for d in outputs.dead_letters}
    for event_id, (name, reasons) in hostile.items():
        assert event_id in letters, f"no dead letter for {name}"
        assert letters[event_id].reason in reasons, (name, letters[event_id].reason, letters[event_id].detail)
    for event_id, said in undecodable.items():
        assert said in letters[event_id].detail, letters[event_id].detail
    for letter in outputs.dead_letters:
        wire = to_json_bytes(letter)
        assert len(wire) < 2 * MAX_ORIGINAL_BYTES + 4096, letter.event_id
        assert not any(secret in wire for secret in SECRETS), letter.event_id
        assert "Traceback" not in letter.detail
    assert f"verdicts={len(good)}" in run.stderr
