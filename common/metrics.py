"""Prometheus metrics, defined once at module level.

modstream runs as many processes (Ray actors, Serve replicas). Each records
into prometheus-client's multiprocess files under ``PROMETHEUS_MULTIPROC_DIR``
(one directory per node, passed to every Ray worker through the job's
runtime environment); one exporter per node serves the sum on ``/metrics``
(``serve_metrics``), so no number is lost with a restarted actor or counted
twice. The variable must be set before a process imports prometheus_client;
the launcher does that (``prepare_multiprocess_dir``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "modstream_"

STAGES = ("fetch", "decode", "hash", "dedup", "knn", "classifier_queue", "classifier_batch", "fusion",
          "end_to_end")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

EVENTS_CONSUMED = Counter("modstream_events_consumed", "Upload records consumed (valid or not).", ["topic"])
VERDICTS = Counter("modstream_verdicts", "Verdicts published.", ["action", "source"])
DEAD_LETTERS = Counter("modstream_dead_letters", "Records sent to the dead-letter topic.", ["reason"])
UNDECODABLE_BATCHES = Counter("modstream_undecodable_batches",
                              "Record batches the Kafka client could not decode (skipped and dead-lettered).",
                              ["topic"])
DEDUP_LOOKUPS = Counter("modstream_dedup_lookups", "Dedup lookups by outcome.", ["result"])
DECODES_SKIPPED = Counter("modstream_decodes_skipped",
                          "Images whose bytes an ingest actor had loaded lately: features reused, no decode.")
REVIEWS_APPLIED = Counter("modstream_reviews_applied", "Human review decisions applied.", ["label"])
STAGE_LATENCY = Histogram("modstream_stage_latency_seconds",
                          "Time per stage: per image for fetch/decode/hash/classifier_queue/end_to_end, "
                          "per batch call for dedup/knn/classifier_batch/fusion.", ["stage"],
                          buckets=_LATENCY_BUCKETS)
CLASSIFIER_BATCH_SIZE = Histogram("modstream_classifier_batch_size", "Images per CNN batch.",
                                  buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128))
CLASSIFIER_ERRORS = Counter("modstream_classifier_errors", "Failed classifier requests (retried).")
CLASSIFIER_REPLICAS = Gauge("modstream_classifier_replicas", "Live classifier replicas.",
                            multiprocess_mode="livesum")
BATCH_RETRIES = Counter("modstream_batch_retries", "Failed attempts of a batch step, retried.", ["step"])
REVIEW_SYNC_TIMEOUTS = Counter("modstream_review_sync_timeouts",
                               "Batches scored before review feedback caught up with them.")
INFLIGHT_BATCHES = Gauge("modstream_inflight_batches", "Polled batches not yet committed.",
                         multiprocess_mode="livesum")
CONSUMER_LAG = Gauge("modstream_consumer_lag",
                     "Records behind the end of each partition (end offset - committed offset).",
                     ["topic", "partition"], multiprocess_mode="livemax")
BUNDLE_INFO = Gauge("modstream_bundle_info", "The model bundle in use (value 1).", ["bundle_id"],
                    multiprocess_mode="livemax")


def prepare_multiprocess_dir(path: str | None = None) -> str:
    """Create a fresh directory for this node's metric files and export its path.

    Call it before starting Ray (workers inherit it through the runtime
    environment) and before this process imports anything that records.
    """
    directory = Path(path or tempfile.mkdtemp(prefix="modstream-metrics-"))
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return str(directory)


class _OwnMetrics:
    """Only modstream's families: Ray's own processes also write files into the
    directory (they use prometheus-client too) and export them through Ray."""

    def __init__(self, path: str) -> None:
        self._collector = MultiProcessCollector(None, path=path)
        self._path = path

    def collect(self) -> list[Metric]:
        forget_dead_processes(self._path)
        return [family for family in self._collector.collect() if family.name.startswith(PREFIX)]


def forget_dead_processes(path: str) -> None:
    """Drop the live-gauge files of processes that are gone (a killed actor never says so),
    so replica counts and lag do not keep a dead process's last value."""
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _process_exists(int(pid)):
            mark_process_dead(int(pid), path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """A registry that sums every process's files in ``path`` (or the env's directory)."""
    registry = CollectorRegistry()
    registry.register(_OwnMetrics(path or os.environ[MULTIPROC_ENV]))
    return registry


def serve_metrics(port: int, address: str = "0.0.0.0", path: str | None = None) -> None:
    """Serve this node's summed metrics on ``http://address:port/metrics`` (a daemon thread)."""
    start_http_server(port, addr=address, registry=multiprocess_registry(path))
