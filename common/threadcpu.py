"""CPU time of this process by thread, named by what the thread does.

A process's CPU total says how busy it is, not why. Python threads carry
names (``poll``, ``score``, ``load_0``...), so grouping each thread's CPU
clock by name splits an actor's cost into its parts; whatever is left of the
process total ran on threads Python did not start (Ray's core worker and
gRPC threads, TensorFlow's pools) and is reported as one remainder.
``modstream bench pipeline`` prints the split per image.
"""

from __future__ import annotations

import re
import threading
import time

OTHER_THREADS = "native threads (Ray core worker, gRPC, librdkafka)"
# Thread names that carry a number or a group id; grouped under one name.
_GROUPS = (
    (re.compile(r"^.*-network-thread$"), "kafka producer I/O"),  # kafka-python's sender: <client_id>-network-thread
    (re.compile(r"^kafka-io-.*$"), "kafka consumer I/O"),
    (re.compile(r"^kafka-coordinator-heartbeat-thread.*$"), "kafka heartbeat"),
    (re.compile(r"^Thread-\d+ \((.*)\)$"), r"\1"),  # threading's default name: Thread-N (target)
    (re.compile(r"^(.*?)[_-]\d+$"), r"\1"),
)


def group_name(thread_name: str) -> str:
    """``load_3`` -> ``load``; kafka-python's threads by their role, not their client id; unnamed
    threads by their target."""
    for pattern, replacement in _GROUPS:
        if pattern.match(thread_name):
            return pattern.sub(replacement, thread_name)
    return thread_name


def cpu_by_thread() -> dict[str, float]:
    """CPU seconds so far of each live Python thread group, and of the rest of the process.

    A thread that has exited no longer counts under its name; its time shows in the
    remainder, since the process total keeps it."""
    spent: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            name = group_name(thread.name)
            spent[name] = spent.get(name, 0.0) + time.clock_gettime(clock)
        except OSError:  # the thread exited between enumerate() and here
            continue
    spent[OTHER_THREADS] = max(0.0, time.process_time() - sum(spent.values()))
    return spent
