"""A second ingest actor joins the group mid-stream: partitions move, no committed offset
moves backwards, nothing is lost and no event gets two different verdicts."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import pytest
import ray
from kafka import TopicPartition

from common.kafkaio import make_consumer
from deploy.clients import publish_events, upload_event_for
from tests.conftest import wait_for

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
pytestmark = pytest.mark.integration


class CommittedOffsets:
    """Samples the group's committed offsets in the background and keeps every change."""

    def __init__(self, settings) -> None:
        self.reader = make_consumer(settings, topics=None, group_id=settings.kafka.group_id)  # never joins
        self.partitions = [TopicPartition(settings.topics.uploads, p) for p in range(settings.topics.partitions)]
        self.history: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stopping.wait(0.1):
            for tp in self.partitions:
                offset = self.reader.committed(tp)
                seen = self.history[(tp.topic, tp.partition)]
                if offset is not None and (not seen or seen[-1] != offset):
                    seen.append(offset)

    def stop(self) -> dict[tuple[str, int], list[int]]:
        self.stopping.set()
        self.thread.join()
        self.reader.close()
        return dict(self.history)


def answers_by_event(verdicts: list) -> dict[str, set]:
    found: dict[str, set] = defaultdict(set)
    for v in verdicts:
        found[v.event_id].add((v.action, v.label, v.score, v.source, v.matched_image_id))
    return found


class Publisher:
    """Publishes an event every few tens of milliseconds until stopped, so the stream never pauses."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.images = sorted(SAMPLES.glob("*.jpg"))
        self.events: list = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._publish, daemon=True)
        self.thread.start()

    def _publish(self) -> None:
        while not self.stopping.wait(0.05):
            event = upload_event_for(self.images[len(self.events) % len(self.images)], inline=True,
                                     image_id=f"img-{len(self.events)}")
            publish_events(self.settings, [event])
            self.events.append(event)

    def stop(self) -> list:
        self.stopping.set()
        self.thread.join()
        return self.events


def test_a_consumer_joining_mid_stream_moves_no_offset_back_and_changes_no_verdict(start_pipeline,
                                                                                   make_settings) -> None:
    settings = make_settings(pipeline={"poll_records": 4})
    pipeline, outputs = start_pipeline(settings)
    committed = CommittedOffsets(settings)
    publisher = Publisher(settings)
    try:
        outputs.wait(8, timeout_s=120)
        pipeline.ingest.append(pipeline._new_ingest(1))  # joins the group: partitions are revoked and moved
        wait_for(lambda: all(s["partitions"] for s in ray.get([a.stats.remote() for a in pipeline.ingest])),
                 timeout_s=180, message="both ingest actors own a partition")
        published = len(publisher.events)
        wait_for(lambda: len(publisher.events) >= published + 20, timeout_s=120, message="20 more events")
    finally:
        events = publisher.stop()
    try:
        outputs.wait(len(events), timeout_s=240)
        per_actor = ray.get([actor.stats.remote() for actor in pipeline.ingest])
    finally:
        history = committed.stop()

    answers = answers_by_event(outputs.verdicts)
    assert set(answers) == {e.event_id for e in events}
    assert all(len(found) == 1 for found in answers.values()), [f for f in answers.values() if len(f) > 1]
    assert per_actor[1].get("events_consumed", 0) > 0, per_actor  # the newcomer took over a partition
    assert len(history) == settings.topics.partitions, history
    for offsets in history.values():
        assert offsets == sorted(offsets), history
