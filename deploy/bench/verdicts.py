"""Reads the verdict topic in a thread and notes when each verdict arrived, so the driver can
publish at a steady pace while verdicts come back."""

from __future__ import annotations

import threading
import time

from common.config import Settings
from common.kafkaio import make_consumer, read_from_beginning
from common.messages import Verdict, parse_verdict
from deploy.bench.report import BenchError

Arrival = tuple[float, Verdict]  # time.monotonic() when read, the verdict


class VerdictCollector:
    """Every verdict on the topic from the beginning, with its arrival time; close() when done."""

    def __init__(self, settings: Settings) -> None:
        topic = settings.topics.verdicts
        self._consumer = make_consumer(settings, topics=None, group_id=None)
        read_from_beginning(self._consumer, [topic])
        self._arrivals: dict[str, Arrival] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="verdicts", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                arrived = time.monotonic()
                with self._lock:
                    for record in records:
                        verdict = parse_verdict(record.value)
                        self._arrivals.setdefault(verdict.event_id, (arrived, verdict))

    def wait_for(self, event_ids: list[str], timeout_s: float) -> list[Arrival]:
        """The arrivals of these events' verdicts, once all have come."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                missing = [event_id for event_id in event_ids if event_id not in self._arrivals]
                if not missing:
                    return [self._arrivals[event_id] for event_id in event_ids]
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise BenchError(f"{len(missing)} of {len(event_ids)} verdicts missing after {timeout_s:.0f} s "
                                 "(a dead letter instead? a stalled pipeline?)")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()
