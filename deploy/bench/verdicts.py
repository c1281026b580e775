"""Reads the verdict topic in a thread and notes when each verdict was published, so the driver can
publish at a steady pace while verdicts come back."""

from __future__ import annotations

import threading
import time

from common.config import Settings
from common.kafkaio import make_consumer, read_from_beginning
from common.messages import Verdict, parse_verdict
from deploy.bench.report import BenchError

FETCH_WAIT_MS = 200
Arrival = tuple[float, Verdict]  # when the pipeline sent it (the record's timestamp, time.time() seconds), the verdict


class VerdictCollector:
    """Every verdict on the topic from the beginning, with the time it was sent; close() when done.

    The time is the record's own timestamp, not when this consumer read it, so the collector
    can fetch with a longer wait than the pipeline's 50 ms: on the embedded broker a fetch
    waits out its whole wait, and at 50 ms this driver thread alone cost ~5% of a core, taken
    from the pipeline it measures. Each phase's CPU window still closes up to one wait after
    its last verdict, which at 200 ms adds well under 0.1 ms per image.
    """

    def __init__(self, settings: Settings) -> None:
        topic = settings.topics.verdicts
        self._consumer = make_consumer(settings, topics=None, group_id=None,
                                       fetch_max_wait_ms=FETCH_WAIT_MS)
        read_from_beginning(self._consumer, [topic])
        self._arrivals: dict[str, Arrival] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="verdicts", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=1000).values():
                with self._lock:
                    for record in records:
                        verdict = parse_verdict(record.value)
                        self._arrivals.setdefault(verdict.event_id, (record.timestamp / 1000, verdict))

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
