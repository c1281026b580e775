"""After a small run through the real broker, the summed multiprocess metrics
show the counters and histograms with the expected counts."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import multiprocess_registry, serve_metrics
from deploy.broker import free_loopback_port
from deploy.clients import publish_events, upload_event_for
from deploy.demo import publish_malformed
from tests.conftest import wait_for

SAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "samples"
pytestmark = pytest.mark.integration


def samples_of(registry) -> dict[tuple[str, tuple], float]:
    values: dict[tuple[str, tuple], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = values.get(key, 0.0) + sample.value
    return values


def total(values: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and wanted <= set(ls))


def test_counts_add_up_after_a_small_run(start_pipeline, metrics_dir, tmp_path) -> None:
    registry = multiprocess_registry(metrics_dir)
    before = samples_of(registry)
    pipeline, outputs = start_pipeline()
    settings = pipeline.settings
    images = sorted(SAMPLES.glob("*.jpg"))[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    publish_events(settings, [upload_event_for(p, inline=False) for p in images])
    publish_events(settings, [upload_event_for(images[0], inline=False, image_id="copy"),
                              upload_event_for(bad, inline=False)])
    publish_malformed(settings, [b"garbage"])
    outputs.wait(4, dead_letters=2)

    def counted() -> dict:
        """Every family written: each is its own file, written at its own step of the batch."""
        after = samples_of(registry)
        delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
        return delta if total(delta, "modstream_events_consumed_total") >= 6 and \
            total(delta, "modstream_verdicts_total") >= 4 and \
            total(delta, "modstream_stage_latency_seconds_count", stage="end_to_end") >= 4 else {}

    delta = wait_for(counted, 30, message="metrics to be written")
    topic = settings.topics.uploads
    events = total(delta, "modstream_events_consumed_total", topic=topic)
    verdicts = total(delta, "modstream_verdicts_total")
    dead = total(delta, "modstream_dead_letters_total")
    assert (events, verdicts, dead) == (6, 4, 2)  # events = verdicts + dead letters
    assert total(delta, "modstream_verdicts_total", source="exact_duplicate") == 1
    assert total(delta, "modstream_dead_letters_total", reason="invalid_event") == 1
    assert total(delta, "modstream_dead_letters_total", reason="unsupported_format") == 1
    assert total(delta, "modstream_dedup_lookups_total", result="miss") == 3
    assert total(delta, "modstream_dedup_lookups_total", result="exact") == 1
    assert total(delta, "modstream_stage_latency_seconds_count", stage="end_to_end") == 4
    # The copy is decoded unless its ingest actor had loaded the same bytes already.
    assert total(delta, "modstream_stage_latency_seconds_count", stage="decode") + \
        total(delta, "modstream_decodes_skipped_total") == 4
    assert total(delta, "modstream_stage_latency_seconds_count", stage="classifier_queue") >= 3
    assert total(delta, "modstream_classifier_batch_size_sum") >= 3
    assert total(samples_of(registry), "modstream_bundle_info", bundle_id=pipeline.bundle_id) == 1


def test_metrics_endpoint_serves_the_sum(ray_cluster, metrics_dir) -> None:
    port = free_loopback_port()
    serve_metrics(port, address="127.0.0.1", path=metrics_dir)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"modstream_classifier_replicas", "modstream_bundle_info"} <= names


def test_live_gauges_of_dead_processes_are_dropped(tmp_path) -> None:
    import subprocess
    import sys

    script = ("import os; os.environ['PROMETHEUS_MULTIPROC_DIR'] = {path!r}\n"
              "from common.metrics import CLASSIFIER_REPLICAS; CLASSIFIER_REPLICAS.set(1)")
    subprocess.run([sys.executable, "-c", script.format(path=str(tmp_path))], check=True)
    assert list(tmp_path.glob("gauge_livesum_*.db"))  # the process wrote its gauge, then exited
    values = samples_of(multiprocess_registry(str(tmp_path)))
    assert total(values, "modstream_classifier_replicas") == 0
    assert not list(tmp_path.glob("gauge_livesum_*.db"))
