"""dedup suite: near-duplicate lookup over 256-bit PDQ in common.hashindex.HashIndex (multi-index
hashing) against a numpy linear Hamming scan of the same stored hashes, per stored size and max
distance, every answer compared; plus memory per remembered verdict in DedupState."""

from __future__ import annotations

import argparse
import gc
import json

import numpy as np

from common.config import Settings
from common.dedupstate import DedupState, Entry, ImageRecord
from common.features import pdq_hex_of_int
from common.hashindex import HashIndex, distances_to
from deploy.bench import sizes
from deploy.bench.phashes import PhotoHashes, random_hashes
from deploy.bench.report import BenchError, Goal, Measure, SuiteResult, ratios
from deploy.bench.timing import paired, timed
from workers.dedup import RESTORE_CHUNK

GOAL_SIZE, GOAL_SPEEDUP = 10_000_000, 100.0
RESTORE_IMAGES = sizes.Size(1_000_000, 20_000)  # remembered verdicts replayed from changelog records
RESTORE_SHARDS = (1, 4)
RATE_QUERIES = sizes.Size(5_000, 200)  # copies and unseen images each, answered by the index for the shares


def run(args: argparse.Namespace, settings: Settings) -> SuiteResult:
    stored_sizes = sizes.DEDUP_HASHES.pick(args.hashes, args.quick)
    pipeline_distance = settings.pipeline.pdq_max_distance
    distances = sorted(set(args.distances or (23, pipeline_distance, 39)))
    queries_count = sizes.DEDUP_QUERIES.pick(args.dedup_queries, args.quick)
    if not 2 <= queries_count <= min(stored_sizes):
        raise BenchError("--dedup-queries must be at least 2 (half copies, half unseen) and at most --hashes")
    result = SuiteResult("dedup", params={"sizes": list(stored_sizes), "distances": distances, "kinds": args.hash_kinds,
                                          "queries": queries_count, "repeats": args.repeats, "seed": args.seed})
    table = result.table("nearest stored PDQ within the max distance; latency per query",
                         ("hashes", "stored", "max distance", "build s", "index B/hash", "index ms", "linear ms",
                          "speedup x", "copies found %", "unseen matched %", "same answers"))
    photos = PhotoHashes(args.seed)
    for kind in args.hash_kinds:
        for size in stored_sizes:
            rng = np.random.default_rng(args.seed)
            stored, queries = _population(kind, size, queries_count, photos, rng)
            _, rate_queries = _population(kind, size, 2 * RATE_QUERIES.pick(None, args.quick), photos, rng, stored)
            for distance in distances:
                row = _compare(stored, queries, rate_queries, distance, args.repeats)
                table.add(hashes=kind, stored=f"{size:,}", **{"max distance": distance}, **row)
                if size >= GOAL_SIZE or size == max(stored_sizes):
                    result.goals.append(_goal(kind, size, distance, pipeline_distance, row["speedup x"]))
            del stored, queries
            gc.collect()
    profile = photos.distance_profile(photos.members(300))
    _restore_table(result, RESTORE_IMAGES.pick(None, args.quick), args.seed)
    result.notes += [
        ("timed queries: half copies of stored hashes, half hashes of never-seen images; the linear scan is numpy "
         "XOR + bitwise_count over every stored hash (common.hashindex.distances_to)"),
        (f"copies found / unseen matched: {RATE_QUERIES.full:,} of each ({RATE_QUERIES.quick} with --quick), "
         "answered by the index (exact: see same answers)"),
        "same answers: the index returned exactly the linear scan's (id, distance) list for every query",
        ("photos corpus (deploy/bench/phashes.py): real PDQs of random crops of scikit-image photographs as scene "
         "centres, members with each bit flipped with probability 1/4; copies moved by real copy distances. "
         "Pairwise distances: " + ", ".join(f"{name} {value:.0f}" for name, value in profile.items())),
        ("restore: a shard rebuilds DedupState from changelog records (JSON, as written by remember_many: one "
         "per new verdict and one per new image); with its own partitions only, a shard replays 1/shards of them. "
         "Kafka fetch time is not included. bytes/image: DedupState.nbytes (arrays incl. spare capacity, key "
         "tables, PDQ index, ids) per remembered verdict + image record"),
        f"pipeline.pdq_max_distance here: {pipeline_distance}",
    ]
    return result


def _population(kind: str, size: int, queries: int, photos: PhotoHashes, rng: np.random.Generator,
                stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stored hashes (unless given) and the queries: copies of stored hashes first, then unseen ones."""
    copies = queries // 2
    if kind == "random":
        stored = random_hashes(rng, size) if stored is None else stored
        unseen = random_hashes(rng, queries - copies)
    else:
        stored = photos.members(size) if stored is None else stored
        unseen = photos.members(queries - copies)
    picked = stored[rng.choice(size, copies, replace=False)]
    return stored, np.concatenate([photos.copies_of(picked), unseen])


def _compare(stored: np.ndarray, queries: np.ndarray, rate_queries: np.ndarray, distance: int,
             repeats: int) -> dict:
    index = HashIndex(distance)
    build_s, _, _ = timed(lambda: index.add_words(stored))

    def linear(query: np.ndarray) -> list[tuple[int, int]]:
        distances = distances_to(stored, query)
        hits = np.flatnonzero(distances <= distance)
        order = np.lexsort((hits, distances[hits]))
        return [(int(hits[i]), int(distances[hits[i]])) for i in order]

    def indexed(query: np.ndarray) -> list[tuple[int, int]]:
        ids, found = index.query_arrays(query, distance)
        return [(int(i), int(d)) for i, d in zip(ids, found, strict=True)]

    index_s, linear_s, found, scanned = paired(lambda: [indexed(q) for q in queries],
                                               lambda: [linear(q) for q in queries], repeats)
    index_ms = Measure.of((s * 1000 / len(queries) for s in index_s), "ms")
    linear_ms = Measure.of((s * 1000 / len(queries) for s in linear_s), "ms")
    matched = [bool(indexed(query)) for query in rate_queries]
    copies = len(rate_queries) // 2
    return {"build s": build_s, "index B/hash": index.nbytes / len(stored), "index ms": index_ms,
            "linear ms": linear_ms, "speedup x": ratios(linear_ms, index_ms), "same answers": found == scanned,
            "copies found %": 100.0 * np.mean(matched[:copies]),
            "unseen matched %": 100.0 * np.mean(matched[copies:])}


def _changelog_records(count: int, seed: int) -> list[tuple[str, bytes]]:
    """What remember_many writes for count new images: an entry record and an image record each."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        md5, image_id = f"{i:032x}", f"img-{i:010d}"
        pdq = pdq_hex_of_int(int.from_bytes(rng.bytes(32), "big"))
        entry = Entry(md5=md5, pdq=pdq, pdq_quality=100, image_id=image_id, event_key=i, action="allow",
                      label="normal", score=0.1, signals={"knn": 0.2, "cnn": 0.1}, model_version="b1", added_s=1.0)
        records.append((f"entry:{md5}", json.dumps(entry.to_dict()).encode()))
        image = ImageRecord(image_id, md5, pdq, 100, [int(v) for v in rng.integers(0, 8, 64)])
        records.append((f"image:{image_id}", json.dumps(image.to_dict()).encode()))
    return records


def _restore(records: list[tuple[str, bytes]]) -> DedupState:
    """DedupShard._restore without Kafka: parse every record, apply them in chunks."""
    state = DedupState(max_distance=31)
    for start in range(0, len(records), RESTORE_CHUNK):
        entries, images = [], []
        for key, raw in records[start : start + RESTORE_CHUNK]:
            value = json.loads(raw)
            if key.startswith("entry:"):
                entries.append(Entry.from_dict(value))
            else:
                images.append(ImageRecord(**value))
        state.load(entries, images)
    return state


def _restore_table(result: SuiteResult, images: int, seed: int) -> None:
    table = result.table("shard state: memory per image and restore time",
                         ("images", "shards", "images per shard", "restore s per shard", "bytes/image"))
    records = _changelog_records(images, seed)
    for shards in RESTORE_SHARDS:
        share = records[: 2 * (images // shards)]  # the first shard's share (uniform hashing)
        seconds, _, state = timed(lambda share=share: _restore(share))
        table.add(images=f"{images:,}", shards=shards, **{"images per shard": f"{len(state):,}",
                                                           "restore s per shard": seconds,
                                                           "bytes/image": state.nbytes / len(state)})
        del state
        gc.collect()


def _goal(kind: str, size: int, distance: int, pipeline_distance: int, speedup: Measure) -> Goal:
    default = " (pipeline default)" if distance == pipeline_distance else ""
    at_goal_size = size >= GOAL_SIZE
    return Goal(f">= {GOAL_SPEEDUP:.0f}x linear scan at {GOAL_SIZE:,} hashes, {kind}, d={distance}{default}",
                f"{speedup.median:.1f}x at {size:,}",
                speedup.median >= GOAL_SPEEDUP if at_goal_size else None,
                "" if at_goal_size else f"run with --hashes {GOAL_SIZE} to test the goal")
