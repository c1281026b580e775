"""What the Ray suites share: the GPUs TensorFlow sees and the peak memory of the processes
a local run consists of."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass


def gpu_names() -> list[str]:
    """GPUs TensorFlow can use in this process; the CNN runs there when there are any."""
    import tensorflow as tf

    return [device.name for device in tf.config.list_physical_devices("GPU")]


@dataclass
class MemoryPeaks:
    """Peak resident memory (bytes) over the samples taken."""

    driver: int = 0
    ray_workers: int = 0  # processes named ray::... (actors, Serve replicas, tasks)
    everything: int = 0  # this process and all its descendants: Ray's own daemons, the broker


class MemorySampler:
    """Samples the RSS of this process and its descendants in a thread.

    A local Ray and the embedded broker are children of the driver, so the tree holds the
    whole run. Summed RSS counts pages shared between processes (TensorFlow's libraries)
    once per process, so it overstates; it is what each process costs if it ran alone.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        import ray  # noqa: F401  psutil ships inside Ray and is importable once Ray is

        self.interval_s = interval_s
        self.peaks = MemoryPeaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            driver = ray_workers = everything = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss = process.memory_info().rss
                    everything += rss
                    if process is me:
                        driver = rss
                    elif process.name().startswith("ray::"):
                        ray_workers += rss
            peaks = self.peaks
            peaks.driver, peaks.ray_workers = max(peaks.driver, driver), max(peaks.ray_workers, ray_workers)
            peaks.everything = max(peaks.everything, everything)
            self._stop.wait(self.interval_s)


# Process roles of a local run, by the title Ray gives each worker process (ray::<actor class>).
INGEST_ROLE = "ingest actors"
CNN_ROLE = "classifier replicas"  # the CNN's processes (on a GPU node, not on the CPU side)
ROLE_TITLES = (
    ("ray::Ingest", INGEST_ROLE),
    ("ray::ServeReplica", CNN_ROLE),
    ("ray::DedupShard", "dedup shards (lookups, changelog)"),
    ("ray::KnnReplica", "kNN replicas"),
    ("ray::ReviewFeedback", "review feedback"),
    ("ray::ServeController", "Serve controller"),
)
DECODE_WORKERS = "decode workers (children of ingest)"
RAY_DAEMONS = "Ray daemons: dashboard, agents, monitors, idle workers"
RAY_NODE_DAEMONS = {"raylet": "Ray daemons: raylet (scheduling, object store)", "gcs_server": "Ray daemons: GCS"}
BROKER = "embedded broker"
DRIVER = "bench driver (producer, verdict reader)"
OUTSIDE = (BROKER, DRIVER)  # processes of the bench, not of the pipeline


def process_role(name: str, parent_name: str, is_driver: bool) -> str:
    """What a process of this run is for, from its title and its parent's."""
    if is_driver:
        return DRIVER
    for prefix, role in ROLE_TITLES:
        if name.startswith(prefix):
            return role
    if parent_name.startswith("ray::Ingest"):
        return DECODE_WORKERS
    if name.startswith("tansu"):
        return BROKER
    return RAY_NODE_DAEMONS.get(name, RAY_DAEMONS)


class ProcessCpu:
    """CPU seconds by role of this process and its descendants between ``start`` and ``stop``.

    A process that starts in between counts from zero; one that exits in between loses
    what it spent (the decode workers and actors of a run live through it).
    """

    def __init__(self) -> None:
        self._start: dict[int, float] = {}
        self.by_role: dict[str, float] = {}

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        me = psutil.Process()
        found: dict[int, tuple[str, float]] = {}
        for process in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                parent = process.parent()
                role = process_role(process.name(), parent.name() if parent else "", process.pid == me.pid)
                found[process.pid] = (role, times.user + times.system)
        return found

    def start(self) -> None:
        self._start = {pid: spent for pid, (_, spent) in self._snapshot().items()}

    def stop(self) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for pid, (role, spent) in self._snapshot().items():
            by_role[role] = by_role.get(role, 0.0) + spent - self._start.get(pid, 0.0)
        self.by_role = by_role
        return by_role
