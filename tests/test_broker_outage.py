"""The broker freezes for 30 s mid-stream (SIGSTOP) and comes back (SIGCONT): every event
ends with one agreeing verdict, nothing is lost and the ingest actor is not restarted.
A broker of its own, so the session's broker is never frozen for other tests."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from common.config import load_settings
from deploy.broker import EmbeddedBroker
from deploy.clients import publish_events, upload_event_for
from tests.conftest import Outputs
from workers.pipeline import Pipeline

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
FREEZE_S = 30
pytestmark = pytest.mark.integration


def test_a_frozen_broker_loses_nothing_and_needs_no_restart(ray_cluster) -> None:
    tag = uuid.uuid4().hex[:8]
    images = sorted(SAMPLES.glob("*.jpg"))
    before = [upload_event_for(images[i % len(images)], inline=True, image_id=f"before-{i}") for i in range(40)]
    after = [upload_event_for(images[i % len(images)], inline=True, image_id=f"after-{i}") for i in range(10)]
    with EmbeddedBroker() as broker:
        settings = load_settings({
            "kafka": {"bootstrap": broker.bootstrap, "group_id": f"g-{tag}"},
            "topics": {"uploads": f"up-{tag}", "verdicts": f"ver-{tag}", "reviews": f"rev-{tag}",
                       "dlq": f"dlq-{tag}", "state_prefix": f"state-{tag}", "partitions": 2},
            "pipeline": {"poll_records": 4},
        }, env={})
        pipeline = Pipeline(settings, deploy_classifier=False).start()
        outputs: Outputs | None = None
        try:
            outputs = Outputs(pipeline.settings)
            pids = [s["pid"] for s in _per_actor(pipeline)]
            publish_events(settings, before)
            outputs.wait(5, timeout_s=120)
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                time.sleep(FREEZE_S)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            publish_events(settings, after, timeout_s=120)
            outputs.wait(len(before) + len(after), timeout_s=300)
            assert [s["pid"] for s in _per_actor(pipeline)] == pids  # same processes: no restart
        finally:
            pipeline.stop()
            if outputs is not None:
                outputs.consumer.close()

    assert outputs is not None
    answers: dict[str, set] = defaultdict(set)
    for v in outputs.verdicts:
        answers[v.event_id].add((v.action, v.label, v.score, v.source, v.matched_image_id))
    assert set(answers) == {e.event_id for e in before + after}
    assert all(len(found) == 1 for found in answers.values())
    assert outputs.dead_letters == []


def _per_actor(pipeline: Pipeline) -> list[dict]:
    import ray

    return ray.get([actor.stats.remote() for actor in pipeline.ingest])
