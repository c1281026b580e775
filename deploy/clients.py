"""The producer- and consumer-side tools of the CLI: publish upload events,
publish review decisions, read verdicts. They speak only the contracts of docs/contracts.md,
exactly as an outside producer or consumer would."""

from __future__ import annotations

import base64
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from common.config import Settings
from common.errors import ModstreamError
from common.kafkaio import make_consumer, make_producer, publish_acknowledged, read_from_beginning
from common.logend import log_end
from common.messages import MessageError, ReviewDecision, UploadEvent, Verdict, parse_verdict, to_json_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class PublishError(ModstreamError):
    """Nothing to publish, or the broker did not acknowledge."""


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given plus image files found (recursively, sorted) in folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise PublishError(f"no such file or folder: {path}")
    return found


def upload_event_for(path: Path, inline: bool, image_id: str | None = None) -> UploadEvent:
    """An UploadEvent for a local file: by ``file://`` URI, or with its bytes inline."""
    image_id = image_id or path.stem
    if inline:
        data = base64.b64encode(path.read_bytes()).decode()
        return UploadEvent(event_id=str(uuid.uuid4()), image_id=image_id, data_b64=data)
    return UploadEvent(event_id=str(uuid.uuid4()), image_id=image_id, uri=path.resolve().as_uri())


def publish_events(settings: Settings, events: Iterable[UploadEvent], timeout_s: float = 60.0) -> int:
    """Send events keyed by image_id and wait until the broker acknowledges all of them.

    Warns (once) about file:// events outside limits.file_roots: a pipeline with
    the same settings would dead-letter them as not allowed.
    """
    events = list(events)
    roots = [Path(root).resolve() for root in settings.limits.file_roots]
    outside = [str(path) for path in (Path(url2pathname(urlsplit(event.uri).path)).resolve()
                                      for event in events if event.uri and event.uri.startswith("file://"))
               if not any(path.is_relative_to(root) for root in roots)]
    if outside:
        print(f"warning: {len(outside)} file:// event(s) outside limits.file_roots "
              f"(MODSTREAM_LIMITS_FILE_ROOTS={','.join(map(str, roots))}), e.g. {outside[0]}: a pipeline "
              "with these settings refuses them (dead letter fetch_failed, not allowed)", file=sys.stderr)
    return publish_acknowledged(settings, settings.topics.uploads,
                                ((event.image_id, to_json_bytes(event)) for event in events), timeout_s)


def publish_review(settings: Settings, decision: ReviewDecision, timeout_s: float = 30.0) -> None:
    """Send one decision keyed by image_id; PublishError unless the broker acknowledged it."""
    try:
        producer = make_producer(settings, bootstrap_timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise PublishError(f"the review of {decision.image_id} was not sent: cannot reach Kafka at "
                           f"{settings.kafka.bootstrap}: {exc}") from None
    try:
        future = producer.send(settings.topics.reviews, key=decision.image_id, value=to_json_bytes(decision))
        producer.flush(timeout=timeout_s)
        future.get(timeout=timeout_s)
    except KafkaError as exc:
        raise PublishError(f"the broker did not acknowledge the review of {decision.image_id}: "
                           f"{type(exc).__name__}: {exc}") from None
    finally:
        producer.close(timeout=timeout_s)


@dataclass(frozen=True, order=True)
class TimedVerdict:
    """A verdict with the Kafka record timestamp that orders it across partitions."""

    timestamp_ms: int
    partition: int
    offset: int
    verdict: Verdict = field(compare=False)


def time_ordered(records: Iterable[TimedVerdict]) -> list[TimedVerdict]:
    """By Kafka timestamp across partitions; ties keep partition then offset order."""
    return sorted(records)


def read_verdicts(settings: Settings, follow: bool, idle_s: float = 3.0,
                  stop: Callable[[], bool] = lambda: False, since_ms: int | None = None,
                  image_id: str | None = None) -> Iterator[Verdict]:
    """The verdicts on the topic in time order, without joining a group: those already there first
    (from ``since_ms`` when given), then with ``follow`` each new poll's, in time order too.

    The backlog ends once every partition is read up to where it ended when the
    reader started (see common.logend), or after ``idle_s`` with nothing new.
    """
    consumer = make_consumer(settings, topics=None, group_id=None)
    try:
        partitions = read_from_beginning(consumer, [settings.topics.verdicts])
        if since_ms is not None:
            _seek_to_time(consumer, partitions, since_ms)
        listed = consumer.end_offsets(partitions)
        backlog: list[TimedVerdict] = []
        last_seen = time.monotonic()
        while not stop():
            fresh = _poll_verdicts(consumer, since_ms, image_id)
            if fresh:
                last_seen = time.monotonic()
            backlog += fresh
            reached = all(consumer.position(tp) >= log_end(listed[tp], consumer.highwater(tp)) for tp in partitions)
            if reached or time.monotonic() - last_seen > idle_s:
                break
        for timed in time_ordered(backlog):
            yield timed.verdict
        while follow and not stop():
            for timed in time_ordered(_poll_verdicts(consumer, since_ms, image_id)):
                yield timed.verdict
    finally:
        consumer.close()


def _seek_to_time(consumer: KafkaConsumer, partitions: list[TopicPartition], since_ms: int) -> None:
    """Start each partition at its first record stamped ``since_ms`` or later (its end if none)."""
    found = consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
    ends = consumer.end_offsets(partitions)
    for tp in partitions:
        at = found.get(tp)
        consumer.seek(tp, at.offset if at is not None else ends[tp])


def _poll_verdicts(consumer: KafkaConsumer, since_ms: int | None, image_id: str | None) -> list[TimedVerdict]:
    """One poll's verdicts that pass the filters; malformed records are reported and skipped."""
    found = []
    for records in consumer.poll(timeout_ms=200).values():
        for record in records:
            if since_ms is not None and record.timestamp < since_ms:
                continue
            try:
                verdict = parse_verdict(record.value if record.value is not None else b"")
            except MessageError as exc:
                print(f"skipping malformed verdict at {record.topic}[{record.partition}]@{record.offset}: {exc}",
                      file=sys.stderr)
                continue
            if image_id is None or verdict.image_id == image_id:
                found.append(TimedVerdict(record.timestamp, record.partition, record.offset, verdict))
    return found


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_since(text: str, now_ms: int | None = None) -> int:
    """``--since``: a duration back from now (``90s``, ``15m``, ``2h``, ``1d``) or an ISO 8601
    date-time (UTC when it names no offset), as epoch milliseconds."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    match = _DURATION.match(text)
    if match:
        return now_ms - int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a duration (90s, 15m, 2h, 1d) or an ISO 8601 date-time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


VERDICT_COLUMNS = ("image_id", "action", "label", "score", "source", "matched_image_id", "knn", "cnn",
                   "pdq_distance", "latency_ms")


def verdict_row(verdict: Verdict) -> dict[str, str]:
    """One verdict flattened to the table's columns, every cell a short string."""
    signals = verdict.signals
    cells = {
        "image_id": verdict.image_id, "action": verdict.action, "label": verdict.label,
        "score": f"{verdict.score:.3f}", "source": verdict.source,
        "matched_image_id": verdict.matched_image_id or "-",
        "knn": "-" if signals.knn is None else f"{signals.knn:.3f}",
        "cnn": "-" if signals.cnn is None else f"{signals.cnn:.3f}",
        "pdq_distance": "-" if signals.pdq_distance is None else str(signals.pdq_distance),
        "latency_ms": f"{verdict.latency_ms:.1f}",
    }
    return cells


def print_table(rows: list[dict[str, str]], columns: tuple[str, ...], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up now, so a redirected stdout is honoured
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=out)
    print("  ".join("-" * widths[c] for c in columns), file=out)
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns), file=out)


def print_verdicts(verdicts: Iterable[Verdict], as_json: bool, out: TextIO | None = None) -> int:
    """JSON lines, one per verdict as it arrives, or a table at the end."""
    out = out or sys.stdout
    count = 0
    rows = []
    for verdict in verdicts:
        count += 1
        if as_json:
            print(json.dumps(json.loads(to_json_bytes(verdict))), file=out, flush=True)
        else:
            rows.append(verdict_row(verdict))
    if not as_json:
        print_table(rows, VERDICT_COLUMNS, out)
    return count
