"""The source's commit logic without a broker: offsets only move forward, a batch that
settles after its partition moved on commits nothing, and a revoke commits what is settled
before the partitions go."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from kafka import TopicPartition

from common.config import load_settings
from common.kafkaio import Polled, Undecodable
from workers.source import CommitLedger, KafkaSource, undecodable_dead_letter

P0, P1 = TopicPartition("up", 0), TopicPartition("up", 1)


def test_settled_offsets_commit_once_and_only_forward() -> None:
    ledger = CommitLedger()
    ledger.assign([P0, P1])
    first, second = ledger.stamp({P0: 10, P1: 4}), ledger.stamp({P0: 20})
    ledger.settle(second)
    ledger.settle(first)  # settling out of order never moves an offset back
    assert ledger.to_commit() == {P0: 20, P1: 4}
    ledger.committed({P0: 20, P1: 4})
    assert ledger.to_commit() == {}
    ledger.settle(first)
    assert ledger.to_commit() == {}


def test_a_batch_from_an_earlier_assignment_commits_nothing() -> None:
    ledger = CommitLedger()
    ledger.assign([P0])
    old = ledger.stamp({P0: 50})
    ledger.release([P0])  # revoked; another consumer commits 80 meanwhile
    ledger.assign([P0])  # and it comes back
    ledger.settle(old)  # the late batch
    assert ledger.to_commit() == {}
    ledger.settle(ledger.stamp({P0: 90}))
    assert ledger.to_commit() == {P0: 90}


def test_a_partition_not_owned_is_never_committed() -> None:
    ledger = CommitLedger()
    ledger.assign([P0])
    stamped = ledger.stamp({P0: 5, P1: 7})
    ledger.settle(stamped)
    assert ledger.to_commit() == {P0: 5}
    ledger.release([P0])
    assert ledger.to_commit() == {} and ledger.owned() == set()


@dataclass
class FakeConsumer:
    fail_commits: int = 0

    def __post_init__(self) -> None:
        self.commits: list[dict] = []
        self.listener = None

    def subscribe(self, topics: list[str], listener: object) -> None:
        self.listener = listener

    def commit(self, offsets: dict) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise TimeoutError("broker frozen")
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})

    async def commit_async(self, offsets: dict) -> None:
        self.commit(offsets)


def source(consumer: FakeConsumer, drained=lambda: True) -> KafkaSource:
    settings = load_settings({"pipeline": {"revoke_drain_timeout_s": 0.3}}, env={})
    return KafkaSource(settings, drained, consumer=consumer)


def test_a_failed_commit_stays_pending_and_is_retried() -> None:
    consumer = FakeConsumer(fail_commits=1)
    kafka = source(consumer)
    asyncio.run(consumer.listener.on_partitions_assigned({P0}))
    kafka.settle(kafka.ledger.stamp({P0: 3}))
    kafka.commit()
    assert consumer.commits == []
    kafka.commit()
    kafka.commit()
    assert consumer.commits == [{P0: 3}]


def test_revoke_waits_for_in_flight_batches_then_commits_them() -> None:
    consumer = FakeConsumer()
    in_flight: list = []
    kafka = source(consumer, drained=lambda: not in_flight)
    listener = consumer.listener
    asyncio.run(listener.on_partitions_assigned({P0, P1}))
    kafka.settle(kafka.ledger.stamp({P0: 10}))
    in_flight.append(kafka.ledger.stamp({P0: 15, P1: 2}))

    def settle_later() -> None:  # the score thread settles while the revoke waits
        time.sleep(0.05)
        kafka.settle(in_flight[0])
        in_flight.clear()

    score_thread = threading.Thread(target=settle_later)
    score_thread.start()
    asyncio.run(listener.on_partitions_revoked({P0, P1}))
    score_thread.join()
    assert consumer.commits == [{P0: 15, P1: 2}]
    assert kafka.ledger.owned() == set()


def test_revoke_with_a_stuck_batch_commits_what_settled_and_drops_the_late_one() -> None:
    consumer = FakeConsumer()
    kafka = source(consumer, drained=lambda: False)
    asyncio.run(consumer.listener.on_partitions_assigned({P0}))
    kafka.settle(kafka.ledger.stamp({P0: 10}))
    stuck = kafka.ledger.stamp({P0: 15})
    asyncio.run(consumer.listener.on_partitions_revoked({P0}))  # gives up after revoke_drain_timeout_s
    assert consumer.commits == [{P0: 10}]
    asyncio.run(consumer.listener.on_partitions_assigned({P0}))
    kafka.settle(stuck)  # settles after the hand-over: the next owner replays it instead
    kafka.commit()
    assert consumer.commits == [{P0: 10}]


def test_lost_partitions_are_not_committed() -> None:
    consumer = FakeConsumer()
    kafka = source(consumer)
    asyncio.run(consumer.listener.on_partitions_assigned({P0}))
    kafka.settle(kafka.ledger.stamp({P0: 10}))
    asyncio.run(consumer.listener.on_partitions_lost({P0}))
    kafka.commit()
    assert consumer.commits == []


def test_an_undecodable_batch_is_answered_and_its_offsets_settle_past_it(monkeypatch) -> None:
    skipped = Undecodable(topic="up", partition=0, offset=40, error="CorruptRecordError: bad CRC", next_offset=52)
    monkeypatch.setattr("workers.source.poll_records",
                        lambda consumer, timeout_ms, max_records: Polled(records=[], undecodable=[skipped]))
    consumer = FakeConsumer()
    kafka = source(consumer)
    asyncio.run(consumer.listener.on_partitions_assigned({P0}))
    polled = kafka.poll(100, 32)
    assert not polled.empty  # a skipped batch is progress, never idleness
    letter = undecodable_dead_letter(skipped)
    assert (letter.event_id, letter.reason, letter.original_encoding) == ("up-0@40", "invalid_event", "absent")
    assert "up[0]@40" in letter.detail and "52" in letter.detail and "bad CRC" in letter.detail
    kafka.settle(polled.positions)
    kafka.commit()
    assert consumer.commits == [{P0: 52}]
