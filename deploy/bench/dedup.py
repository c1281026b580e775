"""dedup suite: near-duplicate lookup in common.hashindex.HashIndex against a linear Hamming
scan of the same stored hashes, per stored size and max distance; every answer compared."""

from __future__ import annotations

import argparse
import gc

import numpy as np

from common.config import Settings
from common.hashindex import HashIndex, linear_scan_nearest
from deploy.bench import sizes
from deploy.bench.phashes import SceneHashes, random_hashes
from deploy.bench.report import BenchError, Goal, Measure, SuiteResult, ratios
from deploy.bench.timing import paired, rss_bytes, timed

GOAL_SIZE, GOAL_SPEEDUP = 10_000_000, 100.0
MAX_PLANTED_FLIPS = 12  # near copies of random hashes differ in 0..12 bits


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    stored_sizes = sizes.DEDUP_HASHES.pick(args.hashes, args.quick)
    pipeline_distance = settings.pipeline.phash_max_distance
    distances = sorted(set(args.distances or (8, pipeline_distance, 12)))
    queries_count = sizes.DEDUP_QUERIES.pick(args.dedup_queries, args.quick)
    if not 2 <= queries_count <= min(stored_sizes):
        raise BenchError("--dedup-queries must be at least 2 (half near copies, half unseen) and at most --hashes")
    result = SuiteResult("dedup", params={"sizes": list(stored_sizes), "distances": distances, "kinds": args.hash_kinds,
                                          "queries": queries_count, "repeats": args.repeats, "seed": args.seed})
    table = result.table("nearest stored pHash within the max distance; latency per query",
                         ("hashes", "stored", "max distance", "build s", "index MB", "index ms", "linear ms",
                          "speedup x", "copies found %", "unrelated matched %", "same answers"))
    for kind in args.hash_kinds:
        for size in stored_sizes:
            stored, queries = _population(kind, size, queries_count, args.seed)
            keys = [f"img-{i}" for i in range(size)]
            for distance in distances:
                row = _compare(stored, keys, queries, distance, args.repeats)
                table.add(hashes=kind, stored=f"{size:,}", **{"max distance": distance}, **row)
                if size >= GOAL_SIZE or size == max(stored_sizes):
                    result.goals.append(_goal(kind, size, distance, pipeline_distance, row["speedup x"]))
            del stored, keys
            gc.collect()
    result.notes += [
        "queries: half near copies of stored hashes, half hashes of unseen images; the linear scan is "
        "common.hashindex.linear_scan_nearest (numpy XOR + popcount over every stored hash)",
        "same answers: the index returned the linear scan's key and distance for every query",
        "unrelated matched: unseen images that found a stored hash within the distance, i.e. false near "
        "duplicates for this corpus; each one also costs the index candidates to verify",
        "index MB: growth of this process's RSS while building (noise below ~10 MB)",
        "scenes: imagehash's pHash of synthetic 32 x 32 scenes (deploy/bench/phashes.py): biased bits and "
        "clustered scenes, so buckets are uneven and more unrelated hashes fall within the distance",
        f"pipeline.phash_max_distance here: {pipeline_distance}",
    ]
    return result


def _population(kind: str, size: int, queries: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Stored hashes and the queries: near copies of stored hashes first, then unseen ones."""
    rng = np.random.default_rng(seed)
    near = queries // 2
    if kind == "random":
        stored = random_hashes(rng, size)
        originals = stored[rng.choice(size, near, replace=False)]
        copies = [_flip(int(h), int(rng.integers(0, MAX_PLANTED_FLIPS + 1)), rng) for h in originals]
        return stored, copies + [int(h) for h in random_hashes(rng, queries - near)]
    source = SceneHashes(seed)
    stored = np.concatenate(list(source.stream(size)))
    originals = source.scenes(near)
    stored[rng.choice(size, near, replace=False)] = source.hashes(originals)
    copies = source.hashes(source.near_copies(originals), pixel_noise=2.0)
    unseen = source.hashes(source.scenes(queries - near))
    return stored, [int(h) for h in np.concatenate([copies, unseen])]


def _flip(value: int, bits: int, rng: np.random.Generator) -> int:
    for bit in rng.choice(64, size=bits, replace=False):
        value ^= 1 << int(bit)
    return value


def _compare(stored: np.ndarray, keys: list[str], queries: list[int], distance: int, repeats: int) -> dict:
    before = rss_bytes()
    index = HashIndex(distance)
    build_s, _, _ = timed(lambda: index.add_many(stored, keys))
    index_mb = (rss_bytes() - before) / 2**20
    for query in queries[:5]:  # warm up both paths
        index.nearest(query), linear_scan_nearest(stored, query, distance)
    index_s, linear_s, found, scanned = paired(
        lambda: [index.nearest(query) for query in queries],
        lambda: [linear_scan_nearest(stored, query, distance) for query in queries], repeats)
    expected = [None if position is None else (keys[position], int(np.bitwise_count(stored[position] ^ query)))
                for position, query in zip(scanned, queries, strict=True)]
    index_ms = Measure.of((s * 1000 / len(queries) for s in index_s), "ms")
    linear_ms = Measure.of((s * 1000 / len(queries) for s in linear_s), "ms")
    matched = [answer is not None for answer in found]
    copies = len(queries) // 2  # _population puts the near copies first
    return {"build s": build_s, "index MB": index_mb, "index ms": index_ms, "linear ms": linear_ms,
            "speedup x": ratios(linear_ms, index_ms), "same answers": found == expected,
            "copies found %": 100.0 * np.mean(matched[:copies]),
            "unrelated matched %": 100.0 * np.mean(matched[copies:])}


def _goal(kind: str, size: int, distance: int, pipeline_distance: int, speedup: Measure) -> Goal:
    default = " (pipeline default)" if distance == pipeline_distance else ""
    at_goal_size = size >= GOAL_SIZE
    return Goal(f">= {GOAL_SPEEDUP:.0f}x linear scan at {GOAL_SIZE:,} hashes, {kind}, d={distance}{default}",
                f"{speedup.median:.1f}x at {size:,}",
                speedup.median >= GOAL_SPEEDUP if at_goal_size else None,
                "" if at_goal_size else f"run with --hashes {GOAL_SIZE} to test the goal")
