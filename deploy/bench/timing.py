"""Clocks for the suites: wall and process CPU time of a call, and this process's memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


def timed(fn: Callable[[], T]) -> tuple[float, float, T]:
    """Wall seconds, process CPU seconds (every thread, so a multi-threaded TensorFlow call
    counts all the cores it kept busy) and the result of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of repeats calls, after warmup calls that fill caches and
    trigger lazy initialisation."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(repeats)]


def rss_bytes() -> int:
    """Resident memory of this process now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def paired(first: Callable[[], A], second: Callable[[], B], repeats: int) -> tuple[list[float], list[float], A, B]:
    """Wall seconds of two calls measured alternately, repeats times each, and their last
    results. Alternating puts both under the same spells of machine noise, so their ratio
    holds even when the absolute figures wander."""
    first_s, second_s = [], []
    for _ in range(repeats):
        seconds, _, first_result = timed(first)
        first_s.append(seconds)
        seconds, _, second_result = timed(second)
        second_s.append(seconds)
    return first_s, second_s, first_result, second_result
