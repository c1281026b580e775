"""Faults: killed actors and a killed process lose no event and never give one
event two different verdicts (real broker, real Ray, real model).

Each kill must land while work remains, or the test proves nothing about
recovery: after the kill the test reads the verdict topic until it goes quiet
and asserts how many events were still without a verdict."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest
import ray
import yaml
from PIL import Image

from common.messages import UploadEvent
from deploy.clients import publish_events
from tests.conftest import Outputs, wait_for

pytestmark = pytest.mark.integration
SMALL_BATCHES = {"pipeline": {"poll_records": 4, "max_inflight_batches": 2}}
# Events that must still lack a verdict when the kill lands. The kills follow the first verdicts of
# 30-44 events taken four at a time, so far more remain; fewer would mean the run finished first.
MIN_PENDING_AT_KILL = 8


def distinct_jpeg(seed: int) -> bytes:
    """A small image unlike the others (random colour blocks)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blocks).resize((160, 120), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def workload(count: int, copies: int, seed: int) -> list[UploadEvent]:
    """Unique images, then exact copies of the first few."""
    images = [distinct_jpeg(seed + i) for i in range(count)]
    events = [UploadEvent(event_id=str(uuid.uuid4()), image_id=f"img-{seed}-{i}",
                          data_b64=base64.b64encode(data).decode()) for i, data in enumerate(images)]
    events += [UploadEvent(event_id=str(uuid.uuid4()), image_id=f"copy-{seed}-{i}",
                           data_b64=base64.b64encode(images[i]).decode()) for i in range(copies)]
    return events


def assert_one_verdict_each(outputs: Outputs, events: list[UploadEvent]) -> None:
    """Every event has a verdict; repeats (at-least-once) agree on action, label and source."""
    seen: dict[str, set] = defaultdict(set)
    for verdict in outputs.verdicts:
        seen[verdict.event_id].add((verdict.action, verdict.label, verdict.source, verdict.matched_image_id))
    assert set(seen) == {e.event_id for e in events}
    conflicting = {event_id: answers for event_id, answers in seen.items() if len(answers) > 1}
    assert conflicting == {}


def pending_after_kill(outputs: Outputs, events: list[UploadEvent], quiet_s: float = 1.0,
                       limit_s: float = 4.0) -> int:
    """Events without a verdict once the topic is quiet after a kill (read at most ``limit_s``).

    Verdicts written before the kill are readable well within ``quiet_s``. A replacement needs
    longer than ``limit_s`` to start and rejoin, and anything it answers meanwhile only lowers the
    count, so the result never overstates the work that remained at the kill.
    """
    deadline = time.monotonic() + limit_s
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        outputs.poll()
        if len(outputs.verdicts) != seen:
            seen, quiet_since = len(outputs.verdicts), time.monotonic()
    pending = len({e.event_id for e in events} - {v.event_id for v in outputs.verdicts})
    print(f"{pending} of {len(events)} events without a verdict at the kill")  # shown with pytest -rP
    return pending


def test_killing_an_ingest_actor_mid_stream_loses_nothing(start_pipeline, make_settings) -> None:
    pipeline, outputs = start_pipeline(make_settings(**SMALL_BATCHES))
    events = workload(40, 4, seed=100)
    publish_events(pipeline.settings, events)
    outputs.wait(1)
    ray.kill(pipeline.ingest[0], no_restart=False)  # Ray restarts it; it rejoins the group and replays
    assert pending_after_kill(outputs, events) >= MIN_PENDING_AT_KILL
    outputs.wait(len(events), timeout_s=180)
    assert_one_verdict_each(outputs, events)


def test_killing_a_classifier_replica_mid_stream_loses_nothing(start_pipeline, make_settings) -> None:
    pipeline, outputs = start_pipeline(make_settings(**SMALL_BATCHES))
    events = workload(40, 0, seed=200)
    publish_events(pipeline.settings, events)
    outputs.wait(1)
    replicas = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                if "Classifier" in actor["name"] and "REPLICA" in actor["name"].upper()]
    assert replicas, "no classifier replica found"
    for replica in replicas:
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    assert pending_after_kill(outputs, events) >= MIN_PENDING_AT_KILL
    outputs.wait(len(events), timeout_s=180)  # Serve starts a new replica; ingest retries the failed calls
    assert_one_verdict_each(outputs, events)


def test_sigkill_of_modstream_run_then_restart_loses_nothing(make_settings, modstream_home, tmp_path) -> None:
    settings = make_settings(**SMALL_BATCHES)
    config = tmp_path / "modstream.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "MODSTREAM_HOME": str(modstream_home), "RAY_ADDRESS": ""}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "deploy.cli", "run", "--config", str(config)]

    events = workload(30, 6, seed=300)
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        publish_events(settings, events)
        outputs = Outputs(settings)
        outputs.wait(3, timeout_s=240)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the process and everything it started, mid-stream
        first.wait()
    assert pending_after_kill(outputs, events) >= MIN_PENDING_AT_KILL  # nothing can answer them now

    second = subprocess.run([*command, "--exit-when-idle", "5"], env=env, start_new_session=True, check=False,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    wait_for(lambda: outputs.poll() or len({v.event_id for v in outputs.verdicts}) >= len(events), 30,
             message="all verdicts after the restart")
    assert_one_verdict_each(outputs, events)
    duplicates = {v.event_id for v in outputs.verdicts if v.source == "exact_duplicate"}
    assert len(duplicates) == 6  # each copy pair: one model verdict, one duplicate of it
