"""Near-duplicate lookup over 256-bit PDQ hashes by multi-index hashing (MIH).

Why not a linear scan: XOR + popcount over 10M 256-bit hashes costs a few
hundred milliseconds per query, and dedup queries once per image.

How: each hash is cut into 16 chunks of 16 bits. If two hashes differ in at
most d bits, then for any per-chunk radii r_i with sum(r_i + 1) >= d + 1, at
least one chunk i differs in at most r_i bits (generalised pigeonhole:
otherwise the chunks alone would differ in >= d + 1 bits). At d = 31 every
chunk is probed at radius 1 (17 bucket values each, 272 probes); at d = 23
half the chunks at radius 0; at d = 39 half at radius 2. Candidates from the
probed buckets are verified by their full Hamming distance, so the answers are
exactly those of a linear scan.

Storage, ~96 bytes per hash: the hashes as 4 uint64 words (32 B) and, per
chunk, a bucket table (CSR: 65,537 uint32 starts, then uint32 ids grouped by
chunk value: 64 B over the 16 chunks). Ids are insertion positions, so
"earliest added" is "smallest id". New hashes sit in a short unindexed tail
that is scanned linearly and merged into the tables once it exceeds
TAIL_LIMIT; a merge moves the old slots without re-sorting them (O(n)).

Not thread-safe: one owner mutates and queries it.
"""

from __future__ import annotations

import math
import operator
from functools import cache
from itertools import combinations

import numpy as np

from common.errors import ModstreamError

HASH_BITS = 256
WORDS = HASH_BITS // 64
CHUNKS = 16
CHUNK_BITS = HASH_BITS // CHUNKS
CHUNK_VALUES = 1 << CHUNK_BITS
MAX_SUPPORTED_DISTANCE = 63  # radius 3 on every chunk; beyond that a linear scan is as fast
TAIL_LIMIT = 16_384  # unindexed hashes scanned linearly before they are merged
_MAX_ENTRIES = 2**32 - 1  # ids are stored as uint32
_WORD_MASK = (1 << 64) - 1


class HashIndexError(ModstreamError, ValueError):
    """A hash or distance the index cannot take."""


def to_words(value: int) -> np.ndarray:
    """A 256-bit integer as 4 uint64 words, most significant first."""
    try:
        value = operator.index(value)
    except TypeError:
        raise HashIndexError(f"a hash must be an integer, got {type(value).__name__}") from None
    if not 0 <= value < 1 << HASH_BITS:
        raise HashIndexError(f"a hash must fit in {HASH_BITS} unsigned bits")
    return np.array([(value >> (64 * (WORDS - 1 - i))) & _WORD_MASK for i in range(WORDS)], dtype=np.uint64)


def ints_to_words(values: list[int]) -> np.ndarray:
    """Many 256-bit integers as an (n, 4) uint64 array."""
    words = np.empty((len(values), WORDS), dtype=np.uint64)
    for row, value in enumerate(values):
        words[row] = to_words(value)
    return words


def distances_to(words: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of every row of an (n, 4) word array to one query's words."""
    return np.bitwise_count(words ^ query).sum(axis=1, dtype=np.int32)


def linear_scan(words: np.ndarray, value: int, max_distance: int) -> list[tuple[int, int]]:
    """Every (position, distance) within max_distance, nearest first then earliest: the oracle."""
    distances = distances_to(np.asarray(words, dtype=np.uint64).reshape(-1, WORDS), to_words(value))
    hits = np.flatnonzero(distances <= max_distance)
    order = np.lexsort((hits, distances[hits]))
    return [(int(hits[i]), int(distances[hits[i]])) for i in order]


class HashIndex:
    """Ids (insertion positions) of 256-bit hashes; finds those within max_distance bits."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = _check_distance(max_distance)
        self._words = np.empty((1024, WORDS), dtype=np.uint64)
        self._size = 0
        self._indexed = 0  # ids [0, _indexed) are in the chunk tables; the rest is the tail
        self._starts = np.zeros(CHUNKS * (CHUNK_VALUES + 1), dtype=np.uint32)
        self._ids = np.empty(0, dtype=np.uint32)  # chunk c's ids at [c * _indexed, (c + 1) * _indexed)

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes held for the stored hashes and tables (capacity included)."""
        return self._words.nbytes + self._starts.nbytes + self._ids.nbytes

    def words(self, ids: np.ndarray | int) -> np.ndarray:
        return self._words[ids]

    def add(self, value: int) -> int:
        """Store one hash; returns its id."""
        return self.add_words(to_words(value)[None, :])

    def add_words(self, words: np.ndarray) -> int:
        """Store an (n, 4) uint64 block of hashes; returns the id of the first (the rest follow)."""
        words = np.asarray(words)
        if words.ndim != 2 or words.shape[1] != WORDS or words.dtype != np.uint64:
            raise HashIndexError(f"hashes must be an (n, {WORDS}) uint64 array, got {words.dtype} {words.shape}")
        first, end = self._size, self._size + len(words)
        if end > _MAX_ENTRIES:
            raise HashIndexError(f"a HashIndex holds at most {_MAX_ENTRIES} hashes")
        if end > len(self._words):
            grown = np.empty((max(end, 2 * len(self._words)), WORDS), dtype=np.uint64)
            grown[:first] = self._words[:first]
            self._words = grown
        self._words[first:end] = words
        self._size = end
        if self._size - self._indexed > TAIL_LIMIT:
            self._merge_tail()
        return first

    def query(self, value: int, max_distance: int | None = None) -> list[tuple[int, int]]:
        """Every (id, distance) within max_distance (default: the index's), nearest first then earliest."""
        distance = self.max_distance if max_distance is None else _check_distance(max_distance)
        ids, distances = self.query_arrays(to_words(value), distance)
        return [(int(i), int(d)) for i, d in zip(ids, distances, strict=True)]

    def query_arrays(self, query: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids within distance of the query's 4 words and their distances, sorted by (distance, id)."""
        indexed_ids, indexed_distances = self._probe(query, distance)
        tail_distances = distances_to(self._words[self._indexed : self._size], query)
        tail_hits = np.flatnonzero(tail_distances <= distance)
        ids = np.concatenate([indexed_ids, tail_hits + self._indexed])
        distances = np.concatenate([indexed_distances, tail_distances[tail_hits]])
        order = np.lexsort((ids, distances))
        return ids[order], distances[order]

    def _probe(self, query: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
        if self._indexed == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32)
        probe_chunks, flips = _probe_plan(distance)
        chunk_values = _chunk_values(query[None, :])[0]
        rows = probe_chunks * (CHUNK_VALUES + 1) + (chunk_values[probe_chunks] ^ flips)
        bases = probe_chunks * self._indexed
        slots = _expand_ranges(self._starts[rows] + bases, self._starts[rows + 1] + bases)
        candidates = self._ids[slots]
        distances = distances_to(self._words[candidates], query)
        close = distances <= distance
        ids, first = np.unique(candidates[close], return_index=True)  # a hash may hit in several chunks
        return ids.astype(np.int64), distances[close][first]

    def _merge_tail(self) -> None:
        """Index the tail: each chunk's old slots shift by the tail entries in lower buckets."""
        old_count, new_count = self._indexed, self._size
        tail_values = _chunk_values(self._words[old_count:new_count])
        tail_ids = np.arange(old_count, new_count, dtype=np.uint32)
        merged = np.empty(CHUNKS * new_count, dtype=np.uint32)
        for chunk in range(CHUNKS):
            rows = slice(chunk * (CHUNK_VALUES + 1), (chunk + 1) * (CHUNK_VALUES + 1))
            starts = self._starts[rows]
            values = tail_values[:, chunk]
            tail_counts = np.bincount(values, minlength=CHUNK_VALUES)
            tail_before = np.zeros(CHUNK_VALUES + 1, dtype=np.int64)
            np.cumsum(tail_counts, out=tail_before[1:])
            old_counts = np.diff(starts).astype(np.int64)
            new_starts = starts + tail_before
            target = merged[chunk * new_count : (chunk + 1) * new_count]
            old_targets = np.arange(old_count) + np.repeat(tail_before[:-1], old_counts)
            target[old_targets] = self._ids[chunk * old_count : (chunk + 1) * old_count]
            order = np.argsort(values.astype(np.uint16), kind="stable")
            sorted_values = values[order]
            rank = np.arange(len(order)) - tail_before[sorted_values]
            target[new_starts[sorted_values] + old_counts[sorted_values] + rank] = tail_ids[order]
            self._starts[rows] = new_starts
        self._ids, self._indexed = merged, new_count


def _chunk_values(words: np.ndarray) -> np.ndarray:
    """(n, 16) chunk values as intp; chunk c is bits 16 * (c % 4) .. of word c // 4."""
    values = np.empty((len(words), CHUNKS), dtype=np.intp)
    for chunk in range(CHUNKS):
        shift = np.uint64(CHUNK_BITS * (chunk % 4))
        values[:, chunk] = ((words[:, chunk // 4] >> shift) & np.uint64(CHUNK_VALUES - 1)).astype(np.intp)
    return values


def _expand_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """All positions in the half-open ranges [starts[i], ends[i]), concatenated."""
    starts = starts.astype(np.int64)
    lengths = ends.astype(np.int64) - starts
    first_output = np.cumsum(lengths) - lengths
    return np.repeat(starts - first_output, lengths) + np.arange(int(lengths.sum()))


def _check_distance(distance: int) -> int:
    if isinstance(distance, bool) or not isinstance(distance, int):
        raise HashIndexError(f"max_distance must be an int, got {distance!r}")
    if not 0 <= distance <= MAX_SUPPORTED_DISTANCE:
        raise HashIndexError(f"max_distance must be in 0..{MAX_SUPPORTED_DISTANCE}, got {distance}")
    return distance


def chunk_radii(distance: int) -> list[int]:
    """Radii with sum(r + 1) == distance + 1; a radius of -1 means the chunk is not probed."""
    units, extra = divmod(distance + 1, CHUNKS)
    return [units + (1 if chunk < extra else 0) - 1 for chunk in range(CHUNKS)]


def probe_count(distance: int) -> int:
    return sum(math.comb(CHUNK_BITS, k) for r in chunk_radii(distance) for k in range(r + 1))


@cache
def _probe_plan(distance: int) -> tuple[np.ndarray, np.ndarray]:
    """For each probe: its chunk and the flip mask to XOR onto the query's chunk value."""
    parts = [(chunk, _flip_masks(radius)) for chunk, radius in enumerate(chunk_radii(distance)) if radius >= 0]
    probe_chunks = np.concatenate([np.full(len(masks), chunk, dtype=np.intp) for chunk, masks in parts])
    flips = np.concatenate([masks for _, masks in parts])
    probe_chunks.flags.writeable = False
    flips.flags.writeable = False
    return probe_chunks, flips


@cache
def _flip_masks(radius: int) -> np.ndarray:
    """Every 16-bit value with at most radius bits set."""
    masks = [sum(1 << bit for bit in bits) for flipped in range(radius + 1)
             for bits in combinations(range(CHUNK_BITS), flipped)]
    return np.array(masks, dtype=np.intp)
