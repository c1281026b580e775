"""The pipeline suite's yardsticks, measured in this process on the same workload:

- the CPU cost per image of each stage (fetch, draft decode, features, kNN, the CNN at its
  best batch), whose sum bounds any implementation on this machine: cores / sum;
- the CNN alone at its best batch: the ceiling when it is the bottleneck (a GPU node);
- a naive sequential loop: full decode, hashes, brute-force kNN and the CNN at batch 1,
  one image at a time, every image (no dedup).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.bundle import Bundle
from common.cnn import CnnModel
from common.config import Settings
from common.decode import decode_image, decode_in_process
from common.features import HISTOGRAM_BINS, ImageFeatures, color_histogram, extract_features, md5_hex, phash_hex
from common.fetch import LoadLimits, fetch_bytes
from common.knn import brute_force_knn, hellinger_embedding
from deploy.bench import sizes
from deploy.bench.classifier import in_process
from deploy.bench.report import Measure, usable_cpus
from deploy.bench.timing import timed
from deploy.bench.workload import Workload


@dataclass(frozen=True)
class Baselines:
    """The yardsticks, each over repeats."""

    cores: int
    costs: dict[str, Measure]  # stage (fetch, decode, features, knn, cnn) -> CPU ms per image
    labels: dict[str, str]  # stage -> what was measured, for the tables
    total_cost_ms: Measure
    cpu_limit: Measure  # images/s
    best_batch: int
    cnn_ceiling: Measure  # images/s
    naive: Measure  # images/s
    naive_events: int


@dataclass(frozen=True)
class CpuStages:
    """The CPU-side stages' cost per image, and the features they made (whose CNN inputs the
    CNN measurements reuse)."""

    costs: dict[str, Measure]  # stage (fetch, decode, features, knn) -> CPU ms per image
    labels: dict[str, str]
    features: list[ImageFeatures]


def measure_cpu_stages(settings: Settings, bundle: Bundle, uris: list[str], repeats: int) -> CpuStages:
    """What every unique image costs before the CNN, each stage by this process's CPU clock."""
    limits = settings.load_limits()
    draft = (settings.pipeline.draft_size, settings.pipeline.draft_size)
    index = bundle.load_references()
    index.k = settings.pipeline.knn_k
    blobs = [fetch_bytes(uri, limits) for uri in uris]
    images = [decode_image(data, limits, draft_to=draft) for data in blobs]
    model_input = bundle.cnn.model_input  # the serving bundle's resize and crop, as ingest makes it
    features = [extract_features(data, image, image.size, model_input)
                for data, image in zip(blobs, images, strict=True)]
    histograms = np.stack([f.histogram for f in features])
    batch = settings.pipeline.poll_records

    def cpu_ms(fn: Callable[[], object]) -> Measure:
        fn()
        return Measure.of((timed(fn)[1] * 1000 / len(uris) for _ in range(repeats)), "ms")

    # The decode itself, in this process: the worker process that guards it in the pipeline is
    # the pipeline's own cost (and its CPU would not show in this process's clock).
    costs = {
        "fetch": cpu_ms(lambda: [fetch_bytes(uri, limits) for uri in uris]),
        "decode": cpu_ms(lambda: [decode_in_process(data, limits, draft_to=draft) for data in blobs]),
        "features": cpu_ms(
            lambda: [extract_features(data, image, image.size, model_input)
                     for data, image in zip(blobs, images, strict=True)]),
        "knn": cpu_ms(
            lambda: [index.probabilities(histograms[i:i + batch]) for i in range(0, len(histograms), batch)]),
    }
    labels = {"fetch": "fetch (file://)", "decode": f"decode (draft {draft[0]}, in process)",
              "features": "features (MD5, PDQ, histogram, CNN input)",
              "knn": f"kNN ({len(index):,} references, batches of {batch})"}
    return CpuStages(costs, labels, features)


def measure_baselines(settings: Settings, bundle: Bundle, workload: Workload, references: np.ndarray,
                      args: argparse.Namespace) -> Baselines:
    sample_size = sizes.BASELINE_SAMPLE.pick(args.naive_images, args.quick)
    limits = settings.load_limits()
    model = CnnModel(bundle.cnn)
    stages = measure_cpu_stages(settings, bundle, [event.uri for event in workload.unique[:sample_size]],
                                args.repeats)
    costs, features = dict(stages.costs), stages.features
    batches = tuple(sizes.BATCHES.pick(args.batch_sizes, args.quick))
    cnn_count = max(2 * max(batches), sizes.BASELINE_CNN_IMAGES.pick(None, args.quick))
    cnn_inputs = np.resize(np.stack([f.cnn_input for f in features]), (cnn_count, *features[0].cnn_input.shape))
    best = max(in_process(model, cnn_inputs, batches, args.repeats), key=lambda run: run.images_per_s.median)
    costs["cnn"] = best.cpu_ms
    labels = {**stages.labels, "cnn": f"CNN (batch {best.batch})"}
    totals = [sum(samples) for samples in zip(*(cost.samples for cost in costs.values()), strict=True)]
    cores = usable_cpus()
    naive_events = workload.full_load[::max(1, len(workload.full_load) // sample_size)][:sample_size]
    embedded = hellinger_embedding(references, HISTOGRAM_BINS) if len(references) else None
    naive_loop = _naive_loop([event.uri for event in naive_events], limits, model, embedded,
                             settings.pipeline.knn_k)
    naive_loop()
    naive = Measure.of((len(naive_events) / timed(naive_loop)[0] for _ in range(args.repeats)), "images/s")
    return Baselines(cores=cores, costs=costs, labels=labels, total_cost_ms=Measure.of(totals, "ms"),
                     cpu_limit=Measure.of((cores * 1000 / total for total in totals), "images/s"),
                     best_batch=best.batch, cnn_ceiling=best.images_per_s, naive=naive,
                     naive_events=len(naive_events))


def _naive_loop(uris: list[str], limits: LoadLimits, model: CnnModel, references: np.ndarray | None,
                k: int) -> Callable[[], None]:
    """What a first version would do: everything, for every image, one at a time."""

    def loop() -> None:
        for uri in uris:
            data = fetch_bytes(uri, limits)
            image = decode_in_process(data, limits)
            md5_hex(data), phash_hex(image)
            histogram = color_histogram(image)
            if references is not None:
                brute_force_knn(references, hellinger_embedding(histogram[None], HISTOGRAM_BINS), k)
            model.predict(model.spec.model_input(image)[None])

    return loop
