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
