"""CPU by thread: names grouped by role, and each thread's clock under its own name."""

from __future__ import annotations

import threading
import time

import pytest

from common.threadcpu import OTHER_THREADS, cpu_by_thread, group_name


@pytest.mark.parametrize(("name", "group"), [
    ("load_3", "load"),
    ("score", "score"),
    ("modstream-network-thread", "kafka producer I/O"),
    ("kafka-io-modstream", "kafka consumer I/O"),
    ("kafka-coordinator-heartbeat-thread | bench-1", "kafka heartbeat"),
    ("Thread-2 (_run_router_event_loop)", "_run_router_event_loop"),
])
def test_group_name(name: str, group: str) -> None:
    assert group_name(name) == group


def test_busy_thread_is_charged_under_its_name() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    before = cpu_by_thread()
    busy = [threading.Thread(target=spin, name=f"spin_{i}") for i in range(2)]
    for thread in busy:
        thread.start()
    time.sleep(0.3)
    during = cpu_by_thread()
    stop.set()
    for thread in busy:
        thread.join()
    after = cpu_by_thread()
    assert during["spin"] >= 0.1  # both threads under one group, each with its own clock
    assert "spin" not in before
    # Exited threads' time stays in the process total, so it moves to the remainder.
    assert "spin" not in after
    assert after[OTHER_THREADS] >= before[OTHER_THREADS] + during["spin"] - 0.05
    assert sum(during.values()) == pytest.approx(time.process_time(), abs=0.5)
