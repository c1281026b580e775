"""scaleout suite: does ingest and dedup work spread over Ray actors and nodes, and how much
CPU does a GPU node need beside it?

1. One node (a private local Ray): the pipeline suite's unique-image full-load phase with 1,
   then 2 ingest actors, each on fresh topics and a fresh group, on the same images.
2. Two nodes: a ``ray.cluster_utils.Cluster`` of a head and a worker node, both on this
   machine, running the pipeline with 2 ingest actors and 2 dedup shards: which node each
   actor landed on (Ray's state API), what each ingest actor consumed, and the throughput.
3. On paper: the CPU per unique image of everything but the CNN (stage work measured in this
   process plus the pipeline's own, from the 1-actor run's processes), and the cores that
   feed one CNN replica at a given rate.

The suite starts and stops Ray itself (a process holds one Ray at a time), so it refuses to
run inside a process that already joined one, or with ``ray_address`` set.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import Settings
from common.kafkaio import make_producer
from common.messages import UploadEvent
from common.raysession import ray_session
from deploy.bench import sizes
from deploy.bench.baselines import CpuStages, measure_cpu_stages
from deploy.bench.cluster import CNN_ROLE, OUTSIDE, gpu_names
from deploy.bench.features import parse_size
from deploy.bench.pipeline import Phase, bench_bundle, bench_settings, run_phase
from deploy.bench.report import BenchError, Goal, SuiteResult, usable_cpus
from deploy.bench.verdicts import VerdictCollector
from deploy.bench.workload import WARMUP_IMAGES, WorkloadWriter

# Logical CPUs of each node of the two-node cluster (both share this machine's cores). The CNN replica
# reserves a whole CPU, and SPREAD only places actors on nodes with some CPU left: with 1 per node the
# replica's node takes nothing else.
NODE_CPUS = 2
PARTITIONS_WAIT_S = 120.0


@dataclass(frozen=True)
class Placement:
    """Where one Ray actor runs."""

    actor: str  # Ray's class name (a Serve replica's names its application and deployment)
    node: str  # "head" or "worker"
    pid: int


@dataclass(frozen=True)
class Run:
    """One pipeline's unique-image phase and what each of its ingest actors consumed in it."""

    label: str
    phase: Phase
    consumed: dict[int, int]  # ingest actor pid -> events consumed during the phase
    placements: list[Placement] = field(default_factory=list)  # empty unless on the two-node cluster

    @property
    def cpu_side_ms(self) -> float:
        """CPU ms per image of the pipeline's processes but the CNN's: what a CPU node spends."""
        return cpu_side_ms(self.phase.cpu_by_role, self.phase.events)


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    import ray

    from deploy.runner import kafka_for

    if ray.is_initialized() or settings.ray_address:
        raise BenchError("the scaleout suite starts its own Ray (one node, then a two-node cluster on this "
                         "machine): run it in a process that has not joined Ray, without ray_address")
    images = sizes.SCALEOUT_IMAGES.pick(args.scaleout_images, args.quick)
    if images < 1:
        raise BenchError("--scaleout-images must be at least 1")
    rates = sizes.GPU_RATES.pick(args.gpu_rates, args.quick)
    size = parse_size(sizes.PIPELINE_IMAGE_SIZE.pick(args.image_size, args.quick))
    references = sizes.PIPELINE_REFERENCES.pick(args.references, args.quick)
    sample = min(images, sizes.BASELINE_SAMPLE.pick(args.naive_images, args.quick))
    gpus = gpu_names()
    result = SuiteResult("scaleout", params={
        "images": images, "size": f"{size[0]}x{size[1]}", "references": references, "cores": usable_cpus(),
        "device": ", ".join(gpus) or "CPU", "repeats": args.repeats, "seed": args.seed})
    with tempfile.TemporaryDirectory(prefix="modstream-bench-") as tmp, kafka_for(settings) as settings:
        folder = Path(tmp)
        bundle, _ = bench_bundle(settings, folder / "bundle", references, args.seed)
        (folder / "images").mkdir()
        writer = WorkloadWriter(folder / "images", size, args.seed)
        warmup = [writer.unique(f"w{i:05d}") for i in range(WARMUP_IMAGES)]
        events = [writer.unique(f"u{i:05d}") for i in range(images)]

        def fresh(ingest_actors: int) -> Settings:
            """Fresh topics and group, so every run starts with empty dedup state on the same images."""
            run_settings = bench_settings(settings, bundle, gpu=bool(gpus), images=folder / "images")
            return run_settings.model_copy(update={"pipeline": run_settings.pipeline.model_copy(
                update={"ingest_actors": ingest_actors, "dedup_shards": 2})})

        with ray_session():
            runs = [_measure(fresh(n), f"1 node, {n} ingest actor{'s' * (n > 1)}", warmup, events) for n in (1, 2)]
        with two_node_cluster(len(gpus)) as cluster:
            runs.append(_measure(fresh(2), f"2 nodes ({NODE_CPUS} + {NODE_CPUS} CPU), 2 ingest actors",
                                 warmup, events, cluster))
        stages = measure_cpu_stages(fresh(1), bundle, [event.uri for event in events[:sample]], args.repeats)
    _report(result, runs, stages, rates)
    return result


@contextlib.contextmanager
def two_node_cluster(gpus: int) -> Iterator[Any]:
    """A head and a worker node on this machine, NODE_CPUS each (any GPUs on the head), joined by
    this process; yields the ``Cluster``. Both nodes' processes are children of this one, so the
    phase's CPU accounting sees them."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "num_gpus": gpus})
    try:
        cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": env})
        try:
            yield cluster
        finally:
            if "ray.serve" in sys.modules:
                from ray import serve

                serve.shutdown()
            ray.shutdown()
    finally:
        cluster.shutdown()


def _measure(settings: Settings, label: str, warmup: list[UploadEvent], events: list[UploadEvent],
             cluster: Any = None) -> Run:
    """Start a pipeline, wait until every ingest actor owns partitions (a later rebalance would
    stall the phase), warm it up, then time the events; on a ``cluster``, also record placements."""
    from workers.pipeline import Pipeline

    pipeline = Pipeline(settings).start()
    collector = VerdictCollector(settings)
    producer = make_producer(settings)
    try:
        _wait_for_partitions(pipeline, settings.topics.partitions)
        run_phase(settings, collector, producer, warmup)
        before = _consumed(pipeline)
        phase = run_phase(settings, collector, producer, events, pipeline=pipeline)
        after = _consumed(pipeline)
        placements = _placements(cluster) if cluster else []
    finally:
        producer.close()
        collector.close()
        pipeline.stop()
    consumed = {pid: count - before.get(pid, 0) for pid, count in after.items()}
    return Run(label, phase, consumed, placements)


def _wait_for_partitions(pipeline: Any, partitions: int) -> None:
    import ray

    deadline = time.monotonic() + PARTITIONS_WAIT_S
    while True:
        owned = [stats["partitions"] for stats in ray.get([actor.stats.remote() for actor in pipeline.ingest])]
        if all(owned) and sum(owned) == partitions:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"ingest actors own {owned} of {partitions} partitions after {PARTITIONS_WAIT_S:.0f} s")
        time.sleep(0.5)


def _consumed(pipeline: Any) -> dict[int, int]:
    """Events consumed so far by each ingest actor, by its pid."""
    import ray

    return {stats["pid"]: stats.get("events_consumed", 0)
            for stats in ray.get([actor.stats.remote() for actor in pipeline.ingest])}


def _placements(cluster: Any) -> list[Placement]:
    """Every live actor's node, from Ray's state API (what the GCS recorded, not what the actor says).
    The cluster's own address: with none, the API picks the newest Ray on this machine, maybe another's."""
    from ray.util.state import list_actors

    head = cluster.head_node.node_id
    actors = list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000)
    return sorted((Placement(actor.class_name, "head" if actor.node_id == head else "worker", actor.pid or 0)
                   for actor in actors), key=lambda place: (place.actor, place.node, place.pid))


def cpu_side_ms(cpu_by_role: dict[str, float], events: int) -> float:
    """CPU ms per event of the pipeline's processes but the CNN replica's."""
    return _per_event(sum(spent for role, spent in cpu_by_role.items() if role not in (*OUTSIDE, CNN_ROLE)), events)


def _per_event(cpu_s: float, events: int) -> float:
    return cpu_s * 1000 / events if events else 0.0


def cores_needed(images_per_s: float, cpu_ms_per_image: float) -> float:
    """Cores that spend cpu_ms_per_image on each of images_per_s images every second."""
    return images_per_s * cpu_ms_per_image / 1000


def layout_goals(placements: list[Placement], consumed: dict[int, int]) -> list[Goal]:
    """What the two-node run must show: SPREAD put the ingest actors, and the dedup shards, on
    different nodes, and every ingest actor consumed events."""

    def nodes_goal(actor: str) -> Goal:
        nodes = sorted(place.node for place in placements if place.actor == actor)
        return Goal(f"{actor} actors on 2 nodes", " + ".join(nodes) or "none", len(set(nodes)) == 2)

    counts = list(consumed.values())
    return [nodes_goal("Ingest"), nodes_goal("DedupShard"),
            Goal("both ingest actors consumed events (2 nodes)", " + ".join(map(str, counts)) or "none",
                 len(counts) == 2 and all(counts))]


def _report(result: SuiteResult, runs: list[Run], stages: CpuStages, rates: Sequence[int]) -> None:
    single = runs[0]
    throughput = result.table("throughput, unique images at full load (first event sent -> last verdict read)",
                              ("layout", "events", "images/s", "vs 1 actor", "CPU-side ms/image",
                               "events per ingest actor"))
    for run in runs:
        throughput.add(layout=run.label, events=run.phase.events, **{
            "images/s": run.phase.images_per_s, "vs 1 actor": run.phase.images_per_s / single.phase.images_per_s,
            "CPU-side ms/image": run.cpu_side_ms,
            "events per ingest actor": " + ".join(str(count) for count in run.consumed.values())})

    layout = runs[-1]
    where = result.table("two nodes: where each actor runs (Ray state API), events consumed in the phase",
                         ("actor", "node", "pid", "events consumed"))
    for place in layout.placements:
        where.add(actor=place.actor, node=place.node, pid=place.pid,
                  **{"events consumed": layout.consumed.get(place.pid)})
    result.goals += layout_goals(layout.placements, layout.consumed)

    stage_ms = sum(cost.median for cost in stages.costs.values())
    measured_ms = single.cpu_side_ms
    costs = result.table(f"CPU per unique image, CPU side (everything but the CNN), {single.label}",
                         ("part", "CPU ms"))
    for stage, cost in stages.costs.items():
        costs.add(part=f"  {stages.labels[stage]}", **{"CPU ms": cost})
    costs.add(part="stage work (measured in this process)", **{"CPU ms": stage_ms})
    by_role = single.phase.cpu_by_role
    for role in sorted(set(by_role) - {*OUTSIDE, CNN_ROLE}, key=lambda role: -by_role[role]):
        costs.add(part=f"  {role}", **{"CPU ms": _per_event(by_role[role], single.phase.events)})
    costs.add(part="pipeline's processes (measured in the run, the rows above)", **{"CPU ms": measured_ms})
    costs.add(part="  of which the pipeline's own (beyond the stage work)", **{"CPU ms": measured_ms - stage_ms})
    costs.add(part=f"not counted: {CNN_ROLE} (the CNN's process)",
              **{"CPU ms": _per_event(by_role.get(CNN_ROLE, 0.0), single.phase.events)})

    sizing = result.table(f"cores to feed one CNN replica at {measured_ms:.1f} CPU ms per unique image",
                          ("CNN replica images/s", "CPU-side cores"))
    for rate in rates:
        sizing.add(**{"CNN replica images/s": rate, "CPU-side cores": cores_needed(rate, measured_ms)})

    result.notes += [
        "each run is one pipeline on fresh topics and group (empty dedup state) over the same images",
        f"the two nodes share this machine's {usable_cpus()} cores: the layout shows placement, not added capacity",
        ("CPU side: the CPU every process of the pipeline spent during the phase (process clocks), except the "
         "CNN replica, the broker and the bench driver, per unique image; stage work: the same stages timed in "
         "this process on a sample"),
        ("Ray daemons and the Serve controller are partly a fixed cost per node: on a small or slow run they "
         "inflate the CPU per image, and the cores at high rates"),
        ("cores = images/s x CPU ms per image / 1000, for unique images; the pipeline suite's duplicates phase shows "
         "how much less a copy costs"),
    ]
