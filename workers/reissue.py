"""Re-issued verdicts: a review corrects copies that were scored before it.

Off unless ``pipeline.reissue_window_s`` > 0. When ReviewFeedback applies a
decision, the copies of the reviewed image whose verdicts were written at
most that window before the review (and since), and whose current verdict
disagrees with the reviewer, get a new verdict: ``source: review_cache``,
the reviewer's action and label, and ``supersedes`` naming the event it
corrects. Its event_id is derived from that event and the review record, so
it is the same every time the review is applied.

Exactly once across restarts without a store of its own: the verdict topic
is the record of what was re-issued. Before each review the reader catches
up with the verdict topic (so it sees every earlier re-issue, including
those of a run that crashed before committing the review), and it starts
``2 * window`` back, which covers every verdict a review still inside its
window can touch or has already caused.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from pydantic import ValidationError

from common.config import Settings
from common.dedupstate import REVIEW_ACTIONS
from common.kafkaio import make_consumer, make_producer, read_from_beginning
from common.logend import log_end
from common.messages import MessageError, ReviewDecision, Verdict, parse_verdict, to_json_bytes, utc_timestamp

log = logging.getLogger(__name__)
REISSUE_NAMESPACE = uuid.UUID("5b0f3f8e-8a4c-4a8e-9a59-4c1e0a7d2f11")


def reissue_event_id(corrected_event_id: str, review_key: str) -> str:
    """The same id every time one review record corrects one event."""
    return str(uuid.uuid5(REISSUE_NAMESPACE, f"{corrected_event_id}\n{review_key}"))


@dataclass(slots=True)
class Scored:
    """An upload event's first verdict, kept as read (parsed again only to correct it), and the
    action and label that currently stand for it."""

    raw: bytes
    first_ms: int  # Kafka timestamp of the first verdict
    image_id: str
    matched_image_id: str | None
    md5: str
    current: tuple[str, str]


class RecentVerdicts:
    """Verdicts of the last ``keep_ms``, by event, with the re-issues already on the topic."""

    def __init__(self, keep_ms: int) -> None:
        self.keep_ms = keep_ms
        self.events: dict[str, Scored] = {}
        self.reissued: dict[str, int] = {}  # re-issued event_id -> Kafka timestamp

    def add(self, verdict: Verdict, timestamp_ms: int, raw: bytes | None = None) -> None:
        """A verdict read from the topic (``raw``: its record value), in topic order."""
        if verdict.supersedes is None:
            if verdict.event_id not in self.events:  # a replay repeats the same verdict
                self.events[verdict.event_id] = Scored(
                    raw if raw is not None else to_json_bytes(verdict), timestamp_ms, verdict.image_id,
                    verdict.matched_image_id, verdict.hashes.md5, (verdict.action, verdict.label))
            return
        self.reissued[verdict.event_id] = timestamp_ms
        scored = self.events.get(verdict.supersedes)
        if scored is not None:
            scored.current = (verdict.action, verdict.label)

    def prune(self, now_ms: int) -> None:
        oldest = now_ms - self.keep_ms
        self.events = {key: s for key, s in self.events.items() if s.first_ms >= oldest}
        self.reissued = {key: ts for key, ts in self.reissued.items() if ts >= oldest}

    def first(self, event_id: str) -> Verdict:
        return parse_verdict(self.events[event_id].raw)

    def corrections(self, decision: ReviewDecision, md5: str | None, review_key: str, since_ms: int,
                    now_ms: int) -> list[Verdict]:
        """The verdicts to re-issue for ``decision``: copies of the image first scored at or after
        ``since_ms``, whose standing verdict differs from the reviewer's, not corrected by this review yet.

        A copy is the reviewed image itself, an image whose verdict named it as
        its match, or one with the MD5 the review resolved to.
        """
        action, score = REVIEW_ACTIONS[decision.label]
        found = []
        for event_id, scored in self.events.items():
            if scored.first_ms < since_ms or not (
                    scored.image_id == decision.image_id or scored.matched_image_id == decision.image_id
                    or (md5 is not None and scored.md5 == md5)):
                continue
            if scored.current == (action, decision.label):
                continue
            new_id = reissue_event_id(event_id, review_key)
            if new_id in self.reissued:
                continue
            first = self.first(event_id)
            fields = first.model_dump(by_alias=True)
            if "bank" in fields:  # a bank is named only by hash_bank verdicts
                fields["bank"] = None
            fields.update({
                "event_id": new_id, "action": action, "label": decision.label, "score": score,
                "source": "review_cache", "matched_image_id": decision.image_id,
                "signals": {}, "supersedes": event_id, "ts": utc_timestamp(),
                "latency_ms": first.latency_ms + max(0, now_ms - scored.first_ms),
            })
            try:
                found.append(Verdict.model_validate(fields))
            except ValidationError:  # never let one correction hold up the review itself
                log.exception("cannot re-issue the verdict of %s", event_id)
        return found


class Reissuer:
    """Reads the verdict topic and publishes corrections; called by the review consumer's thread."""

    def __init__(self, settings: Settings, window_s: float) -> None:
        self.settings = settings
        self.window_ms = int(window_s * 1000)
        self.recent = RecentVerdicts(keep_ms=2 * self.window_ms)
        self.consumer: Any = None
        self.partitions: list[TopicPartition] = []
        self.producer: Any = None

    def close(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                client.close()
        self.consumer = self.producer = None

    def after_review(self, decision: ReviewDecision, record: Any, outcome: dict[str, Any]) -> int:
        """Re-issue for one applied review record; the number of verdicts published."""
        now_ms = int(time.time() * 1000)
        review_ms = record.timestamp
        if review_ms < now_ms - self.window_ms:
            log.info("review of %s is older than the re-issue window: nothing re-issued", decision.image_id)
            return 0
        self._catch_up(now_ms)
        entry = outcome.get("entry")
        md5 = decision.md5 or (entry if isinstance(entry, str) and len(entry) == 32 else None)
        review_key = f"{record.topic}-{record.partition}@{record.offset}"
        corrections = self.recent.corrections(decision, md5, review_key, review_ms - self.window_ms, now_ms)
        if not corrections:
            return 0
        if self.producer is None:
            self.producer = make_producer(self.settings)
        futures = [self.producer.send(self.settings.topics.verdicts, key=v.image_id, value=to_json_bytes(v))
                   for v in corrections]
        self.producer.flush()
        for verdict, future in zip(corrections, futures, strict=True):
            metadata = future.get(timeout=30)
            self.recent.add(verdict, metadata.timestamp if metadata.timestamp > 0 else now_ms)
        log.info("review of %s re-issued %d verdicts", decision.image_id, len(corrections))
        return len(corrections)

    def _catch_up(self, now_ms: int, timeout_s: float = 60.0) -> None:
        """Read the verdict topic up to where it ends now (the first time, from 2 * window back)."""
        if self.consumer is None:
            self.consumer = make_consumer(self.settings, topics=None, group_id=None)
            self.partitions = read_from_beginning(self.consumer, [self.settings.topics.verdicts])
            start = self.consumer.offsets_for_times(dict.fromkeys(self.partitions, now_ms - 2 * self.window_ms))
            for tp in self.partitions:
                found = start.get(tp)
                if found is None:
                    self.consumer.seek_to_end(tp)
                else:
                    self.consumer.seek(tp, found.offset)
        listed = self.consumer.end_offsets(self.partitions)
        deadline = time.monotonic() + timeout_s
        while not all(self.consumer.position(tp) >= log_end(listed[tp], self.consumer.highwater(tp))
                      for tp in self.partitions):
            if time.monotonic() > deadline:  # a broker error: the review is applied again, later
                raise KafkaTimeoutError(f"the verdict topic was not read to its end in {timeout_s}s")
            for records in self.consumer.poll(timeout_ms=200).values():
                for record in records:
                    try:
                        self.recent.add(parse_verdict(record.value or b""), record.timestamp, record.value)
                    except MessageError:
                        continue  # not ours to judge: the verdict reader reports it
        self.recent.prune(now_ms)
