"""Starting or joining Ray: the one way every modstream command does it (run, demo, bench and the
offline jobs), so they all behave alike on a laptop, in the tests and on a cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

# Serve's controller reconciles every 0.1 s by default, ~3% of a core on an idle deployment; half a
# second still replaces a dead replica within seconds (modstream bench pipeline, "Serve controller").
SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


@contextlib.contextmanager
def ray_session(address: str = "", metrics_port: int = 0) -> Iterator[None]:
    """Use the Ray this process has already joined (the tests', a notebook's); else join ``address``
    or start a private local Ray, and on exit take down only what was started here.

    Never ``ray.init()`` without an address: that joins whichever cluster ``ray start`` last left in
    /tmp/ray, possibly someone else's that is about to go away; "local" always starts a new one.
    Ray workers inherit the Prometheus multiprocess directory, so ``metrics_port`` (0: none) serves
    the sum over every process of this node.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    from common.metrics import MULTIPROC_ENV, prepare_multiprocess_dir, serve_metrics

    metrics_dir = os.environ.get(MULTIPROC_ENV) or prepare_multiprocess_dir()
    env = {MULTIPROC_ENV: metrics_dir, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
           **{name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}}
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False,
             include_dashboard=False, runtime_env={"env_vars": env})
    if metrics_port:
        serve_metrics(metrics_port, path=metrics_dir)
        print(f"metrics on http://0.0.0.0:{metrics_port}/metrics", file=sys.stderr)
    try:
        yield
    finally:
        # Serve on a joined cluster may be serving other applications: only a Ray of our own loses it.
        if not address and "ray.serve" in sys.modules:
            from ray import serve

            serve.shutdown()
        ray.shutdown()
