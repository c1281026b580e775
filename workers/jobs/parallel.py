"""Ray plumbing for the offline jobs: one Ray per command, chunked tasks, a progress bar.

Ray Data would read the same, but it needs pandas and pyarrow, which modstream
does not install; plain tasks over chunks are enough here. Work is cut into
chunks so that a worker loads its model once per chunk (and, cached, once per
process), and at most a few chunks per CPU are in flight so a large dataset
does not flood the object store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from common.raysession import ray_session as ray_session  # the job commands' Ray: the one helper
from workers.jobs.errors import JobError

Item = TypeVar("Item")
Result = TypeVar("Result")

MIN_CHUNK = 4
MAX_CHUNK = 256
IN_FLIGHT_PER_CPU = 2


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_chunks(fn: Callable[..., list[Result]], items: Sequence[Item], *args: Any, desc: str,
               chunk_size: int | None = None, num_cpus: float = 1, num_gpus: float = 0) -> list[Result]:
    """``fn(chunk, *args)`` as Ray tasks over chunks of items; the results flattened, in item order.

    fn must be a module-level function returning one result per item of its chunk; args are small
    (settings, paths), large inputs travel as object refs.
    """
    import ray
    from tqdm import tqdm

    if not items:
        return []
    cpus = cluster_cpus()
    size = chunk_size or min(MAX_CHUNK, max(MIN_CHUNK, math.ceil(len(items) / (2 * cpus))))
    chunks = [list(items[start:start + size]) for start in range(0, len(items), size)]
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    results: list[list[Result] | None] = [None] * len(chunks)
    pending: dict[Any, int] = {}
    submitted = 0
    with tqdm(total=len(items), desc=desc, unit="img", mininterval=0.5) as progress:
        while submitted < len(chunks) or pending:
            while submitted < len(chunks) and len(pending) < IN_FLIGHT_PER_CPU * cpus:
                pending[task.remote(chunks[submitted], *args)] = submitted
                submitted += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            number = pending.pop(done[0])
            chunk_results = ray.get(done[0])
            if len(chunk_results) != len(chunks[number]):
                raise JobError(f"{fn.__name__} returned {len(chunk_results)} results for {len(chunks[number])} items")
            results[number] = chunk_results
            progress.update(len(chunk_results))
    return [result for chunk in results for result in chunk]  # type: ignore[union-attr]
