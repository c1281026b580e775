"""Launching the pipeline in this process: embedded broker if no Kafka is
configured, a local Ray (or ``ray_address``), clean stop on SIGTERM/Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from common.config import Settings
from common.raysession import ray_session


@contextlib.contextmanager
def kafka_for(settings: Settings) -> Iterator[Settings]:
    """The settings as given, or pointing at an embedded broker started for them."""
    if settings.kafka.bootstrap:
        yield settings
        return
    from deploy.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        print(f"embedded broker at {broker.bootstrap}", file=sys.stderr)
        yield settings.with_bootstrap(broker.bootstrap)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT, so the pipeline drains instead of dying."""
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_pipeline(settings: Settings, exit_when_idle: float | None) -> dict[str, Any]:
    """Run until a signal, or until idle for ``exit_when_idle`` seconds; return the totals."""
    from workers.pipeline import Pipeline

    with kafka_for(settings) as settings, ray_session(settings.ray_address, settings.metrics_port), \
            stop_on_signals() as stop:
        pipeline = Pipeline(settings).start()
        print(f"pipeline running: bundle {pipeline.bundle_id}, consuming {settings.topics.uploads} "
              f"from {settings.kafka.bootstrap}", file=sys.stderr, flush=True)
        if exit_when_idle is None:
            while not stop.wait(0.5):  # a timed wait lets the signal handler run
                pass
        else:
            pipeline.wait_until_idle(exit_when_idle, stop.is_set)
        return pipeline.stop()
