"""knn suite: the HNSW reference index (common.knn.ReferenceIndex) against exact numpy
brute force over the same references: latency one query at a time and in batches,
recall@k against brute force, build time and memory."""

from __future__ import annotations

import argparse

import numpy as np

from common.config import Settings
from common.features import HISTOGRAM_BINS
from common.knn import ReferenceIndex, brute_force_knn, hellinger_embedding
from deploy.bench import sizes
from deploy.bench.report import Goal, Measure, SuiteResult, ratios
from deploy.bench.synthetic import HistogramSource
from deploy.bench.timing import paired, rss_bytes, timed

K = 10
GOAL_REFS, GOAL_SPEEDUP, GOAL_RECALL = 1_000_000, 50.0, 0.99
_EXACT_CHUNK = 100  # queries per brute-force call when computing the exact answers


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    refs = sizes.KNN_REFS.pick(args.refs, args.quick)
    queries_count = sizes.KNN_QUERIES.pick(args.queries, args.quick)
    ef = args.ef or settings.pipeline.knn_ef
    result = SuiteResult("knn", params={"refs": refs, "queries": queries_count, "query_batch": args.query_batch,
                                        "k": K, "M": args.hnsw_m, "ef_construction": args.ef_construction,
                                        "ef": ef, "repeats": args.repeats, "seed": args.seed})
    source = HistogramSource(args.seed)
    references = source.sample(refs)
    queries = source.sample(queries_count)
    batch = source.sample(args.query_batch)
    embedded = hellinger_embedding(references, HISTOGRAM_BINS)
    labels = np.random.default_rng(args.seed).integers(0, 2, refs)

    before = rss_bytes()
    index = ReferenceIndex(HISTOGRAM_BINS, k=K, ef=ef, M=args.hnsw_m, ef_construction=args.ef_construction,
                           max_elements=refs)
    build_s, _, _ = timed(lambda: index.add(references, labels))
    index_mb = (rss_bytes() - before) / 2**20

    recall = _recall(index, embedded, queries)
    hnsw_single, brute_single = _ms_per_query(
        lambda: [index.neighbours(queries[i:i + 1]) for i in range(queries_count)],
        lambda: [_brute(embedded, queries[i:i + 1]) for i in range(queries_count)],
        args.repeats, queries_count)
    hnsw_batch, brute_batch = _ms_per_query(lambda: index.neighbours(batch), lambda: _brute(embedded, batch),
                                            args.repeats, len(batch))
    single_speedup, batch_speedup = ratios(brute_single, hnsw_single), ratios(brute_batch, hnsw_batch)

    table = result.table(f"k = {K} nearest of {refs:,} colour histograms (64 bins); latency per query",
                         ("method", "build s", "memory MB", "single ms", "batched ms", f"recall@{K}",
                          "single speedup x", "batched speedup x"))
    table.add(**{"method": f"hnswlib M={args.hnsw_m} efC={args.ef_construction} ef={ef}", "build s": build_s,
                 "memory MB": index_mb, "single ms": hnsw_single, "batched ms": hnsw_batch,
                 f"recall@{K}": recall, "single speedup x": single_speedup, "batched speedup x": batch_speedup})
    table.add(**{"method": "brute force (numpy)", "build s": 0.0, "memory MB": embedded.nbytes / 2**20,
                 "single ms": brute_single, "batched ms": brute_batch, f"recall@{K}": 1.0})
    at_goal_size = refs >= GOAL_REFS
    result.goals.append(Goal(
        f"single query >= {GOAL_SPEEDUP:.0f}x brute force at recall@{K} >= {GOAL_RECALL} ({GOAL_REFS:,} refs)",
        f"{single_speedup.median:.1f}x at recall@{K} {recall:.4f} with {refs:,} refs",
        (single_speedup.median >= GOAL_SPEEDUP and recall >= GOAL_RECALL) if at_goal_size else None,
        "" if at_goal_size else f"run with --refs {GOAL_REFS} to test the goal"))
    result.notes += [
        ("memory: hnswlib = growth of this process's RSS while building (graph, vectors, per-reference locks "
        "and label map; noise below ~10 MB); brute force = the float32 embedding matrix it scans"),
        f"batched = one call with {len(batch)} queries; brute force computes the full distance matrix",
        "histograms: clustered sparse palettes, counts / pixels (deploy/bench/synthetic.py)",
    ]
    return result


def _brute(embedded: np.ndarray, histograms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The baseline does what the index does per call: embed the queries, then search."""
    return brute_force_knn(embedded, hellinger_embedding(histograms, HISTOGRAM_BINS), K)


def _recall(index: ReferenceIndex, embedded: np.ndarray, queries: np.ndarray) -> float:
    found, _ = index.neighbours(queries, K)
    hits = 0
    for start in range(0, len(queries), _EXACT_CHUNK):
        exact, _ = _brute(embedded, queries[start:start + _EXACT_CHUNK])
        hits += sum(len(set(a) & set(b)) for a, b in zip(found[start:start + _EXACT_CHUNK], exact, strict=True))
    return hits / (len(queries) * K)


def _ms_per_query(index_call, brute_call, repeats: int, queries: int) -> tuple[Measure, Measure]:
    index_call(), brute_call()  # warm up caches and lazy initialisation
    index_s, brute_s, _, _ = paired(index_call, brute_call, repeats)
    return (Measure.of((s * 1000 / queries for s in index_s), "ms"),
            Measure.of((s * 1000 / queries for s in brute_s), "ms"))
