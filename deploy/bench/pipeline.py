"""pipeline suite: the whole Kafka -> Ray -> Kafka path (workers.pipeline.Pipeline) on a
generated workload, side by side with (a) the CNN alone at its best batch, (b) the CPU limit
of this machine (cores / the summed CPU cost per image of every stage) and (c) a naive
sequential loop, all measured in the same run.

Phases, one pipeline, after a few warm-up images (the consumer group join alone takes
seconds): the unique images all at once (full load), in --repeats rounds of fresh images (two
back-to-back runs of one round each on a 2-core VM differed by 17% in unique throughput and
2x in the pipeline's own CPU), then copies of the first round's images (exact and resized)
all at once, then a fresh mix in the same proportion published at half the full-load rate,
which shows latency without a backlog.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.bundle import Bundle, resolve_bundle
from common.config import Settings
from common.kafkaio import make_producer
from common.messages import UploadEvent, to_json_bytes
from common.raysession import ray_session
from common.threadcpu import OTHER_THREADS
from deploy.bench import sizes
from deploy.bench.baselines import Baselines, measure_baselines
from deploy.bench.cluster import (
    CNN_ROLE,
    DECODE_WORKERS,
    INGEST_ROLE,
    OUTSIDE,
    MemoryPeaks,
    MemorySampler,
    ProcessCpu,
    gpu_names,
)
from deploy.bench.features import parse_size
from deploy.bench.report import BenchError, Goal, Measure, SuiteResult, usable_cpus
from deploy.bench.verdicts import VerdictCollector
from deploy.bench.workload import Workload, build_workload, bundle_with_references

GOAL_CPU_LIMIT, GOAL_GPU_CEILING, GOAL_NAIVE, GOAL_DUPLICATES, GOAL_P99_MS = 0.85, 0.9, 3.0, 3.0, 500.0
GOAL_OWN_CPU_MS = 2.0
# The stage work each process role does for a unique image; the rest of its CPU is the pipeline's own.
STAGE_WORK = {INGEST_ROLE: ("fetch", "features"), DECODE_WORKERS: ("decode",), "kNN replicas": ("knn",),
              CNN_ROLE: ("cnn",)}
INGEST_THREADS = {
    "poll": "  ingest: poll thread (Kafka in: fetch, decompress, parse batches; commits)",
    "load": "  ingest: load threads (validate, fetch, features, decode requests)",
    "score": "  ingest: score thread (review sync, actor calls, fusion, verdicts, Kafka out: serialise, send)",
    "kafka consumer I/O": "  ingest: consumer I/O thread (Kafka in: fetch requests, responses)",
    "kafka producer I/O": "  ingest: producer thread (Kafka out: batches, compression, I/O)",
    "kafka heartbeat": "  ingest: consumer heartbeat thread",
    "_run_router_event_loop": "  ingest: Serve handle router (classifier requests)",
    OTHER_THREADS: f"  ingest: {OTHER_THREADS}",
}


@dataclass(frozen=True)
class Phase:
    """Events through the pipeline: from the first send to the last verdict sent."""

    events: int
    seconds: float
    latencies_ms: np.ndarray
    offered_per_s: float | None  # None: published all at once
    cpu_by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds per process role
    ingest_threads: dict[str, float] = field(default_factory=dict)  # CPU seconds per ingest thread group

    @property
    def images_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.events else None


@dataclass(frozen=True)
class UniqueRounds:
    """The unique phase, once per round of fresh images; the tables break down the median round."""

    rounds: tuple[Phase, ...]

    @property
    def median(self) -> Phase:
        """The round of median throughput (the slower middle one of an even count)."""
        return sorted(self.rounds, key=lambda phase: phase.images_per_s)[(len(self.rounds) - 1) // 2]

    def measure(self, value: Callable[[Phase], float], unit: str) -> Measure:
        return Measure.of((value(phase) for phase in self.rounds), unit)


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    from deploy.runner import kafka_for

    if not 0 <= args.dup_ratio < 1:
        raise BenchError(f"--dup-ratio must be in [0, 1), got {args.dup_ratio}")
    images = sizes.PIPELINE_IMAGES.pick(args.images, args.quick)
    if images < 1:
        raise BenchError("--images must be at least 1")
    size = parse_size(sizes.PIPELINE_IMAGE_SIZE.pick(args.image_size, args.quick))
    references = sizes.PIPELINE_REFERENCES.pick(args.references, args.quick)
    gpus = gpu_names()
    result = SuiteResult("pipeline", params={
        "images": images, "dup_ratio": args.dup_ratio, "size": f"{size[0]}x{size[1]}", "references": references,
        "cores": usable_cpus(), "device": ", ".join(gpus) or "CPU", "repeats": args.repeats, "seed": args.seed,
        "kafka_client": settings.kafka.client})
    with tempfile.TemporaryDirectory(prefix="modstream-bench-") as tmp, kafka_for(settings) as settings:
        folder = Path(tmp)
        bundle, histograms = bench_bundle(settings, folder / "bundle", references, args.seed)
        (folder / "images").mkdir()
        workload = build_workload(folder / "images", images, args.dup_ratio, size, args.seed,
                                  unique_rounds=args.repeats)
        run_settings = bench_settings(settings, bundle, gpu=bool(gpus), images=folder / "images")
        with ray_session(run_settings.ray_address):
            unique, phases, idle, memory = _run_pipeline(run_settings, workload,
                                                         sizes.PIPELINE_IDLE_S.pick(None, args.quick))
        baselines = measure_baselines(run_settings, bundle, workload, histograms, args)
    _report(result, unique, phases, idle, memory, baselines, gpu=bool(gpus))
    return result


def bench_bundle(settings: Settings, folder: Path, references: int, seed: int) -> tuple[Bundle, np.ndarray]:
    base = resolve_bundle(settings.bundle)
    if references == 0:
        return base, np.empty((0, 0), np.float32)
    return bundle_with_references(base, folder, references, seed)


def bench_settings(settings: Settings, bundle: Bundle, gpu: bool, images: Path) -> Settings:
    """Topics and group of this run only; the bench bundle; the CNN on the GPU if there is one; file://
    reads from the workload's images folder."""
    tag = uuid.uuid4().hex[:8]
    topics = settings.topics.model_copy(update={
        "uploads": f"bench-{tag}.uploads", "verdicts": f"bench-{tag}.verdicts", "reviews": f"bench-{tag}.reviews",
        "dlq": f"bench-{tag}.dlq", "state_prefix": f"bench-{tag}.state"})
    return settings.model_copy(update={
        "topics": topics, "bundle": str(bundle.path),
        "kafka": settings.kafka.model_copy(update={"group_id": f"bench-{tag}"}),
        "limits": settings.limits.model_copy(update={"file_roots": (*settings.limits.file_roots, str(images))}),
        "classifier": settings.classifier.model_copy(update={"num_gpus": 1.0 if gpu else 0.0})})


def _run_pipeline(settings: Settings, workload: Workload, idle_s: float
                  ) -> tuple[UniqueRounds, dict[str, Phase], dict[str, float], MemoryPeaks]:
    """The unique rounds, the other phases, the idle CPU rates by role (measure_idle) and the
    memory peaks."""
    from ray import serve

    from workers.ingest import APP_NAME
    from workers.pipeline import Pipeline

    # A Ray that already runs the classifier (the test session's) keeps it; otherwise deploy ours.
    pipeline = Pipeline(settings, deploy_classifier=APP_NAME not in serve.status().applications).start()
    collector = VerdictCollector(settings)
    producer = make_producer(settings)
    try:
        run_phase(settings, collector, producer, workload.warmup)
        idle = measure_idle(idle_s)
        with MemorySampler() as sampler:
            unique = UniqueRounds(tuple(run_phase(settings, collector, producer, events, pipeline=pipeline)
                                        for events in workload.unique_rounds))
            duplicates = run_phase(settings, collector, producer, workload.duplicates, pipeline=pipeline)
            mixed = run_phase(settings, collector, producer, workload.mixed,
                              rate=_mix_rate(unique.median, duplicates) / 2)
    finally:
        producer.close()
        collector.close()
        pipeline.stop()
    return unique, {"duplicates": duplicates, "mixed": mixed}, idle, sampler.peaks


def measure_idle(seconds: float) -> dict[str, float]:
    """CPU seconds per second by process role while the started pipeline has nothing to do.

    This is what the pipeline spends whatever the load (empty fetches, heartbeats, Ray's and
    Serve's control loops); divided by a low throughput it is most of the own CPU per image,
    and on a node that scores hundreds of images per second it is next to nothing."""
    processes = ProcessCpu()
    processes.start()
    time.sleep(seconds)
    return {role: spent / seconds for role, spent in processes.stop().items()}


def _mix_rate(unique: Phase, duplicates: Phase) -> float:
    """Images/s of the whole full-load workload (unique and copies in its proportion)."""
    return (unique.events + duplicates.events) / (unique.seconds + duplicates.seconds)


def run_phase(settings: Settings, collector: VerdictCollector, producer: Any, events: list[UploadEvent],
              rate: float | None = None, pipeline: Any = None) -> Phase:
    """Publish events and wait for their verdicts; with ``pipeline``, also account the CPU every
    process of the run spent meanwhile (by role, and by thread inside the ingest actors).

    ``producer`` lives for the whole run, as an upload service's would: a new idempotent
    librdkafka producer holds its first records about 0.5 s while it gets its producer id,
    which would land in the first events' latency."""
    if not events:
        return Phase(0, 0.0, np.empty(0), rate)
    processes = ProcessCpu()
    threads_before = _ingest_threads(pipeline)
    if pipeline is not None:
        processes.start()
    started = time.time()  # the verdicts' record timestamps are wall clock
    _publish(producer, settings.topics.uploads, events, rate)
    arrivals = collector.wait_for([event.event_id for event in events], timeout_s=120 + len(events) / 2)
    last = max(arrived for arrived, _ in arrivals)
    cpu_by_role = processes.stop() if pipeline is not None else {}
    threads = Counter(_ingest_threads(pipeline))
    threads.subtract(threads_before)
    return Phase(len(events), last - started, np.array([v.latency_ms for _, v in arrivals]), rate,
                 cpu_by_role, dict(threads))


def _ingest_threads(pipeline: Any) -> Counter[str]:
    """CPU seconds so far per thread group, summed over the ingest actors."""
    import ray

    totals: Counter[str] = Counter()
    if pipeline is not None:
        for stats in ray.get([actor.stats.remote() for actor in pipeline.ingest]):
            totals.update(stats["cpu_by_thread"])
    return totals


def _publish(producer: Any, topic: str, events: list[UploadEvent], rate: float | None,
             timeout_s: float = 60.0) -> None:
    """All at once, or one every 1 / rate seconds (a steady producer below capacity)."""
    started = time.monotonic()
    futures = []
    for i, event in enumerate(events):
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        futures.append(producer.send(topic, key=event.image_id, value=to_json_bytes(event)))
    producer.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)


def _report(result: SuiteResult, rounds: UniqueRounds, phases: dict[str, Phase], idle: dict[str, float],
            memory: MemoryPeaks, baselines: Baselines, gpu: bool) -> None:
    unique, duplicates, mixed = rounds.median, phases["duplicates"], phases["mixed"]
    throughput = result.table("throughput", ("path", "events", "images/s"))
    throughput.add(path=f"pipeline: unique images, full load ({len(rounds.rounds)} rounds)", events=unique.events,
                   **{"images/s": rounds.measure(lambda phase: phase.images_per_s, "images/s")})
    throughput.add(path="pipeline: duplicates, full load", events=duplicates.events,
                   **{"images/s": duplicates.images_per_s if duplicates.events else None})
    throughput.add(path="pipeline: workload mix, full load", events=unique.events + duplicates.events,
                   **{"images/s": _mix_rate(unique, duplicates)})
    throughput.add(path=f"(a) CNN only, in-process, batch {baselines.best_batch}",
                   **{"images/s": baselines.cnn_ceiling})
    throughput.add(path=f"(b) CPU limit: {baselines.cores} cores / CPU per image", **{"images/s": baselines.cpu_limit})
    limit, replica_ms = _cpu_limit(baselines, unique)
    if limit is not None:
        throughput.add(path=f"(b') CPU limit with the CNN as the replicas ran it ({replica_ms:.1f} ms per image)",
                       **{"images/s": limit})
    throughput.add(path="(c) naive loop (full decode, brute-force kNN, CNN batch 1), workload mix",
                   events=baselines.naive_events, **{"images/s": baselines.naive})

    latency = result.table("event -> verdict latency (Verdict.latency_ms, from the Kafka record timestamp; "
                           "unique: the median round)",
                           ("load", "events", "offered/s", "p50 ms", "p95 ms", "p99 ms", "max ms"))
    for label, phase in (("full: unique images", unique), ("full: duplicates", duplicates),
                         ("half: workload mix, paced", mixed)):
        latency.add(load=label, events=phase.events, **{"offered/s": phase.offered_per_s or "all at once",
                    "p50 ms": phase.percentile(50), "p95 ms": phase.percentile(95), "p99 ms": phase.percentile(99),
                    "max ms": phase.percentile(100)})

    costs = result.table("CPU per image (process CPU time, measured in this run)", ("stage", "CPU ms"))
    for stage, cost in baselines.costs.items():
        costs.add(stage=baselines.labels[stage], **{"CPU ms": cost})
    costs.add(stage="total", **{"CPU ms": baselines.total_cost_ms})

    background_ms = _overhead_table(result, unique, duplicates, idle, baselines)
    own = rounds.measure(lambda phase: _own_ms(phase, baselines), "ms")

    mib = 2**20
    memory_table = result.table("peak resident memory during the pipeline run", ("processes", "MB"))
    memory_table.add(processes="driver (this process)", MB=memory.driver / mib)
    memory_table.add(processes="Ray workers (ray::*: actors, Serve replicas)", MB=memory.ray_workers / mib)
    memory_table.add(processes="driver + Ray workers", MB=(memory.driver + memory.ray_workers) / mib)
    memory_table.add(processes="all descendants too (raylet, GCS, broker)", MB=memory.everything / mib)

    result.goals += _goals(unique, duplicates, mixed, baselines, gpu)
    spread = f" (rounds {own.min:.1f}-{own.max:.1f})" if len(own.samples) > 1 else ""
    result.goals.append(Goal(f"pipeline's own CPU <= {GOAL_OWN_CPU_MS:.0f} ms per unique image",
                             f"{own.median:.1f} ms{spread}", own.median <= GOAL_OWN_CPU_MS,
                             f"{background_ms:.1f} ms of it is the idle pipeline's rate over the median round"))
    result.notes += [
        ("the unique phase runs once per repeat, on fresh images: its throughput and own CPU are the median "
         "(min-max) over rounds, and the other tables break down the median round; the other phases run "
         "once; the baselines show min/median/max over repeats"),
        ("full load: every event published at once, so latency includes the backlog's queueing; half load: "
        "a producer paced at half the full-load rate of the mix"),
        "copies alternate exact (same bytes, new id) and near (resized to half, re-encoded)",
        "memory sums RSS per process: pages shared between processes count once per process",
    ]


def _cpu_limit(baselines: Baselines, unique: Phase) -> tuple[float | None, float]:
    """The CPU limit again, with the CNN at what the replicas spent per unique image in the run when
    that is less than this process's measure (they run it on one thread per call, this process on
    TensorFlow's default pool), so the limit is never lowered by measuring the CNN the slow way.
    None (and the replicas' figure) when the replicas spent more or were not measured."""
    replica_ms = unique.cpu_by_role.get(CNN_ROLE, 0.0) * 1000 / unique.events if unique.events else 0.0
    cnn_ms = baselines.costs["cnn"].median
    if not 0 < replica_ms < cnn_ms:
        return None, replica_ms
    return baselines.cores * 1000 / (baselines.total_cost_ms.median - cnn_ms + replica_ms), replica_ms


def _goals(unique: Phase, duplicates: Phase, mixed: Phase, baselines: Baselines, gpu: bool) -> list[Goal]:
    def ratio_goal(name: str, value: float, baseline: float, target: float, applies: bool = True,
                   note: str = "") -> Goal:
        ratio = value / baseline if baseline else float("inf")
        return Goal(name, f"{value:.1f} / {baseline:.1f} images/s = {ratio:.2f}x",
                    ratio >= target if applies else None, note)

    p99 = mixed.percentile(99)
    return [
        ratio_goal(f"unique throughput >= {GOAL_CPU_LIMIT} x CPU limit (CPU)", unique.images_per_s,
                   max(baselines.cpu_limit.median, _cpu_limit(baselines, unique)[0] or 0.0), GOAL_CPU_LIMIT,
                   not gpu, "the CNN runs on a GPU here" if gpu else "the higher of (b) and (b')"),
        ratio_goal(f"unique throughput >= {GOAL_GPU_CEILING} x CNN-only ceiling (GPU)", unique.images_per_s,
                   baselines.cnn_ceiling.median, GOAL_GPU_CEILING, gpu, "" if gpu else "no GPU here"),
        ratio_goal(f"workload mix >= {GOAL_NAIVE:.0f} x naive loop", _mix_rate(unique, duplicates),
                   baselines.naive.median, GOAL_NAIVE),
        ratio_goal(f"duplicates >= {GOAL_DUPLICATES:.0f} x unique throughput", duplicates.images_per_s,
                   unique.images_per_s, GOAL_DUPLICATES, duplicates.events > 0,
                   "" if duplicates.events else "no duplicates in this workload"),
        Goal(f"p99 latency <= {GOAL_P99_MS:.0f} ms at half load", "-" if p99 is None else f"{p99:.0f} ms",
             None if p99 is None else p99 <= GOAL_P99_MS),
    ]



def _per_event(phase: Phase, seconds: float | None) -> float | None:
    return None if seconds is None or not phase.events else seconds * 1000 / phase.events


def _role_own_ms(phase: Phase, role: str, baselines: Baselines) -> tuple[float, float, float | None]:
    """A role's CPU per unique image, the stage work in it, and the rest (None outside the pipeline)."""
    spent = _per_event(phase, phase.cpu_by_role.get(role, 0.0)) or 0.0
    stage = sum(baselines.costs[name].median for name in STAGE_WORK.get(role, ()))
    return spent, stage, None if role in OUTSIDE else spent - stage


def _own_ms(phase: Phase, baselines: Baselines) -> float:
    """The pipeline's own CPU per unique image: the roles' own CPU above zero. Below zero, the stage
    measured in this process costs more than the role spent on it (the replica runs the CNN on one
    thread per call, this process on TensorFlow's default pool): that says nothing about overhead
    elsewhere, so it offsets nothing."""
    return sum(max(_role_own_ms(phase, role, baselines)[2] or 0.0, 0.0) for role in phase.cpu_by_role)


def _overhead_table(result: SuiteResult, unique: Phase, duplicates: Phase, idle: dict[str, float],
                    baselines: Baselines) -> float:
    """CPU per event of each process role during the full-load phases, the unique phase's split
    into stage work (what the CPU limit counts) and the pipeline's own, and each role's CPU at
    idle (the broker and the bench driver are outside the pipeline). Returns how much of the own
    CPU per unique image the pipeline's roles would have spent idle over the phase's time."""
    table = result.table("CPU per event by process, full load (process CPU clocks; own = beyond the stage work)",
                         ("process", "unique: ms/image", "stage work ms", "own ms", "duplicates: ms/event",
                          "idle: % of a core"))

    roles = sorted(set(unique.cpu_by_role) | set(duplicates.cpu_by_role),
                   key=lambda role: (role in OUTSIDE, -unique.cpu_by_role.get(role, 0.0)))
    idle_rate = sum(rate for role, rate in idle.items() if role not in OUTSIDE)
    for role in roles:
        spent, stage, own = _role_own_ms(unique, role, baselines)
        table.add(process=role + (" (outside the pipeline)" if role in OUTSIDE else ""), **{
            "unique: ms/image": spent, "stage work ms": stage or None, "own ms": own,
            "duplicates: ms/event": _per_event(duplicates, duplicates.cpu_by_role.get(role)),
            "idle: % of a core": idle[role] * 100 if role in idle else None})
        if role == INGEST_ROLE:
            groups = [*INGEST_THREADS, *sorted((set(unique.ingest_threads) | set(duplicates.ingest_threads))
                                               - set(INGEST_THREADS))]
            for group in groups:
                table.add(process=INGEST_THREADS.get(group, f"  ingest: thread {group}"), **{
                    "unique: ms/image": _per_event(unique, unique.ingest_threads.get(group)),
                    "duplicates: ms/event": _per_event(duplicates, duplicates.ingest_threads.get(group))})
    table.add(process="pipeline total (own)", **{"own ms": _own_ms(unique, baselines),
                                                 "idle: % of a core": idle_rate * 100})
    background_ms = _per_event(unique, idle_rate * unique.seconds) or 0.0
    table.add(process="  of it, the idle rate over the unique phase", **{"own ms": background_ms})
    return background_ms
