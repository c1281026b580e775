"""The verdict sink without a broker: a record the broker refuses for good is replaced and
never stalls the batch, one it loses is sent again, and dedup failures are bounded."""

from __future__ import annotations

import json

from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from common.messages import DeadLetter, parse_dead_letter
from tests.test_scorer import Fakes, item
from workers.scorer import Unavailable
from workers.sink import Batch, BatchState, VerdictSink


class Future:
    def __init__(self, error: Exception | None) -> None:
        self.exception = error
        self.is_done = True

    def failed(self) -> bool:
        return self.exception is not None

    def get(self, timeout: float | None = None) -> None:
        if self.exception:
            raise self.exception


class Producer:
    """Refuses values that contain ``refuse`` (on ``refuse_topic``, if given) and loses the first ``lose``
    sends."""

    def __init__(self, refuse: bytes | None = None, lose: int = 0, refuse_always: bool = False,
                 refuse_topic: str | None = None) -> None:
        self.refuse_topic = refuse_topic
        self.refuse, self.lose, self.refuse_always = refuse, lose, refuse_always
        self.sent: list[tuple[str, bytes]] = []
        self.acked: list[tuple[str, bytes]] = []

    def send(self, topic: str, key: str, value: bytes) -> Future:
        self.sent.append((topic, value))
        if self.lose:
            self.lose -= 1
            return Future(KafkaTimeoutError("expired"))
        refused = self.refuse and self.refuse in value and self.refuse_topic in (None, topic)
        if self.refuse_always or refused:
            return Future(MessageSizeTooLargeError("too large"))
        self.acked.append((topic, value))
        return Future(None)

    def flush(self, timeout: float | None = None) -> None:
        pass


def scored_batch(dead_letters: list[DeadLetter] | None = None) -> Batch:
    items = [item(1), item(2)]
    batch = Batch(items, dead_letters or [], positions={})
    batch.scored(Fakes().scorer().score(items))
    return batch


def sink(producer: Producer, remember=lambda scored: "ref", wait=lambda ref: None) -> VerdictSink:
    return VerdictSink(producer, "verdicts", "dlq", remember=remember, wait_remembered=wait, attempts=3,
                       sleep=lambda s: None)


def run(batch: Batch, verdict_sink: VerdictSink) -> None:
    verdict_sink.publish(batch)
    assert batch.state is BatchState.PUBLISHED
    verdict_sink.settle(batch)
    assert batch.state is BatchState.SETTLED


def test_a_dead_letter_refused_as_too_large_is_sent_again_without_its_record() -> None:
    refused = DeadLetter.for_record("bad-1", "invalid_event", "not JSON", b"REFUSE-ME" * 10)
    producer = Producer(refuse=b"UkVGVVNFLU1F")  # the base64 of REFUSE-ME
    batch = scored_batch([refused])
    run(batch, sink(producer))
    letters = [parse_dead_letter(value) for topic, value in producer.acked if topic == "dlq"]
    assert [(d.event_id, d.original_encoding) for d in letters] == [("bad-1", "absent")]
    assert "record dropped: MessageSizeTooLargeError" in letters[0].detail
    assert len([1 for topic, _ in producer.acked if topic == "verdicts"]) == 2


def test_a_refused_verdict_becomes_a_processing_failed_dead_letter() -> None:
    batch = scored_batch()
    producer = Producer(refuse=batch.verdicts[0].verdict.event_id.encode(), refuse_topic="verdicts")
    run(batch, sink(producer))
    verdicts = [json.loads(value) for topic, value in producer.acked if topic == "verdicts"]
    letters = [parse_dead_letter(value) for topic, value in producer.acked if topic == "dlq"]
    assert [v["event_id"] for v in verdicts] == [batch.verdicts[1].verdict.event_id]
    assert [(d.event_id, d.reason) for d in letters] == [(batch.verdicts[0].verdict.event_id, "processing_failed")]
    assert [d.event_id for d in batch.published_dead_letters] == [letters[0].event_id]


def test_a_record_the_broker_always_refuses_is_dropped_and_the_batch_still_settles() -> None:
    producer = Producer(refuse_always=True)
    run(scored_batch(), sink(producer))
    assert producer.acked == [] and len(producer.sent) == 2 * 4  # bounded: never waits forever


def test_records_the_broker_lost_are_sent_again_unchanged() -> None:
    producer = Producer(lose=2)
    batch = scored_batch()
    run(batch, sink(producer))
    assert sorted(producer.acked) == sorted(producer.sent[:2])


def test_dedup_unavailable_is_waited_for_and_a_recurring_failure_remembers_one_by_one() -> None:
    waits: list[object] = []

    def flaky(ref: object) -> None:
        waits.append(ref)
        if len(waits) <= 2:
            raise Unavailable("shard restarting")
    run(scored_batch(), sink(Producer(), wait=flaky))
    assert len(waits) == 3

    remembered: list[list] = []

    def remember(scored: list) -> list:
        remembered.append([s.item.event.image_id for s in scored])
        return scored

    def refuse_batches(ref: list) -> None:
        if len(ref) > 1 or ref[0].item.event.image_id == "img-2":
            raise ValueError("cannot store")
    run(scored_batch(), sink(Producer(), remember=remember, wait=refuse_batches))
    assert remembered[-2:] == [["img-1"], ["img-2"]]
