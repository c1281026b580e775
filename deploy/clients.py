"""The producer- and consumer-side tools of the CLI: publish upload events,
publish review decisions, read verdicts. They speak only DESIGN.md's
contracts, exactly as an outside producer or consumer would."""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from common.config import Settings
from common.errors import ModstreamError
from common.kafkaio import make_consumer, make_producer, read_from_beginning
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
    roots = [Path(root).resolve() for root in settings.limits.file_roots]
    outside: list[str] = []
    producer = make_producer(settings)
    try:
        futures = []
        for event in events:
            if event.uri and event.uri.startswith("file://"):
                path = Path(url2pathname(urlsplit(event.uri).path)).resolve()
                if not any(path.is_relative_to(root) for root in roots):
                    outside.append(str(path))
            futures.append(producer.send(settings.topics.uploads, key=event.image_id, value=to_json_bytes(event)))
        if outside:
            print(f"warning: {len(outside)} file:// event(s) outside limits.file_roots "
                  f"(MODSTREAM_LIMITS_FILE_ROOTS={','.join(map(str, roots))}), e.g. {outside[0]}: a pipeline "
                  "with these settings refuses them (dead letter fetch_failed, not allowed)", file=sys.stderr)
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)
    finally:
        producer.close()
    return len(futures)


def publish_review(settings: Settings, decision: ReviewDecision, timeout_s: float = 30.0) -> None:
    producer = make_producer(settings)
    try:
        producer.send(settings.topics.reviews, key=decision.image_id, value=to_json_bytes(decision))
        producer.flush(timeout=timeout_s)
    finally:
        producer.close()


def read_verdicts(settings: Settings, follow: bool, idle_s: float = 3.0,
                  stop: Callable[[], bool] = lambda: False) -> Iterator[Verdict]:
    """Every verdict on the topic from the beginning, without joining a group.

    Without ``follow`` it ends after ``idle_s`` with nothing new: the embedded
    broker reports end offsets wrongly, so "caught up" means "quiet".
    """
    consumer = make_consumer(settings, topics=None, group_id=None)
    try:
        read_from_beginning(consumer, [settings.topics.verdicts])
        last_seen = time.monotonic()
        while not stop():
            batches = consumer.poll(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    last_seen = time.monotonic()
                    try:
                        yield parse_verdict(record.value)
                    except MessageError as exc:
                        print(f"skipping malformed verdict at {record.topic}[{record.partition}]@"
                              f"{record.offset}: {exc}", file=sys.stderr)
            if not follow and time.monotonic() - last_seen > idle_s:
                return
    finally:
        consumer.close()


VERDICT_COLUMNS = ("image_id", "action", "label", "score", "source", "matched_image_id", "knn", "cnn",
                   "hamming", "latency_ms")


def verdict_row(verdict: Verdict) -> dict[str, str]:
    """One verdict flattened to the table's columns, every cell a short string."""
    signals = verdict.signals
    cells = {
        "image_id": verdict.image_id, "action": verdict.action, "label": verdict.label,
        "score": f"{verdict.score:.3f}", "source": verdict.source,
        "matched_image_id": verdict.matched_image_id or "-",
        "knn": "-" if signals.knn is None else f"{signals.knn:.3f}",
        "cnn": "-" if signals.cnn is None else f"{signals.cnn:.3f}",
        "hamming": "-" if signals.hamming is None else str(signals.hamming),
        "latency_ms": f"{verdict.latency_ms:.1f}",
    }
    return cells


def print_table(rows: list[dict[str, str]], columns: tuple[str, ...], out: TextIO = sys.stdout) -> None:
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=out)
    print("  ".join("-" * widths[c] for c in columns), file=out)
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns), file=out)


def print_verdicts(verdicts: Iterable[Verdict], as_json: bool, out: TextIO = sys.stdout) -> int:
    """JSON lines, one per verdict as it arrives, or a table at the end."""
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
