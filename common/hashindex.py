"""Near-duplicate lookup over 64-bit perceptual hashes by multi-index hashing.

Why not a linear scan: XOR + popcount over 10M hashes costs tens of milliseconds
per query, and dedup queries once per image.

How: each hash is cut into m bands. If two hashes differ in at most d bits, then
for any per-band radii r_i with sum(r_i + 1) >= d + 1, at least one band i
differs in at most r_i bits (generalised pigeonhole: otherwise the bands alone
would differ in >= d + 1 bits). So per band we look up every band value within
r_i bits of the query's band (precomputed flip masks), and verify the few
candidates by their full Hamming distance. The classic m = d + 1 bands with
r_i = 0 is one case; at 10M entries it leaves ~5-7-bit bands whose buckets hold
hundreds of thousands of entries, so m is chosen per index size instead, by
minimising probes + expected candidates (3 bands of ~21 bits at 10M, d = 8).

Storage, sized for 10M entries (~0.8 GB there, against ~20 ms for a linear scan
and ~0.1 ms here at d = 8): hashes in one growable uint64 array (ids are
positions, so "earliest added" is "smallest id"); keys as one UTF-8 byte buffer;
per band a bucket table (CSR: uint32 starts per band value, then uint32 ids and a
copy of their hashes grouped by value). New entries sit in a short unindexed
tail that is scanned linearly and merged into the tables once it exceeds
TAIL_LIMIT; a merge moves the old slots without re-sorting them, so it costs
O(n + 2**bits), not O(n log n) (~0.4 s at 10M, once per TAIL_LIMIT adds).

Not thread-safe: one owner (the dedup actor) mutates and queries it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from functools import cache
from itertools import combinations

import numpy as np

from common.errors import ModstreamError

HASH_BITS = 64
MAX_SUPPORTED_DISTANCE = 32
MAX_BAND_BITS = 22  # a bucket table of 2**22 uint32 starts is 16 MiB per band
MIN_BANDS = math.ceil(HASH_BITS / MAX_BAND_BITS)
TAIL_LIMIT = 16_384  # unindexed entries scanned linearly before they are merged
LINEAR_COST_FACTOR = 8  # a probe or random-access candidate costs ~ this many scanned hashes
_MAX_ENTRIES = 2**32 - 1  # ids are stored as uint32


class HashIndexError(ModstreamError, ValueError):
    """A hash, key or distance the index cannot take."""


def linear_scan_nearest(hashes: np.ndarray, hash_int: int, max_distance: int) -> int | None:
    """Position of the closest hash within max_distance (earliest on ties), or None.

    The exact oracle and baseline for HashIndex: one vectorised XOR + popcount.
    """
    distances = np.bitwise_count(np.asarray(hashes, dtype=np.uint64) ^ _as_hash(hash_int))
    if distances.size == 0:
        return None
    best = int(np.argmin(distances))  # argmin returns the first minimum
    return best if distances[best] <= max_distance else None


class HashIndex:
    """Keys of images by 64-bit perceptual hash; finds those within max_distance bits."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = _check_distance(max_distance)
        self._hashes = np.empty(1024, dtype=np.uint64)
        self._size = 0
        self._keys = _KeyStore()
        self._indexed = 0  # entries [0, _indexed) are in the band tables; the rest is the tail
        self._bands: _BandTables | None = None  # None: too small to beat a linear scan

    def __len__(self) -> int:
        return self._size

    def add(self, hash_int: int, key: str) -> None:
        """Remember that key has this hash; re-adding the same (hash, key) is a no-op."""
        value = _as_hash(hash_int)
        _check_key(key)
        if not self._contains(value, key):
            self._append(np.array([value], dtype=np.uint64), [key])

    def add_many(self, hashes: np.ndarray, keys: Sequence[str]) -> None:
        """Bulk add (restores, benchmarks); pairs already present or repeated are skipped."""
        hashes = np.asarray(hashes)
        if hashes.ndim != 1 or hashes.dtype != np.uint64:
            raise HashIndexError(f"hashes must be a 1-d uint64 array, got {hashes.dtype} {hashes.shape}")
        if len(keys) != len(hashes):
            raise HashIndexError(f"{len(hashes)} hashes but {len(keys)} keys")
        for key in keys:
            _check_key(key)
        keep = self._new_pairs(hashes, keys)
        if keep.all():
            self._append(hashes, keys)
        else:
            self._append(hashes[keep], [key for key, kept in zip(keys, keep, strict=True) if kept])

    def nearest(self, hash_int: int) -> tuple[str, int] | None:
        """Closest key within max_distance and its distance; the earliest added wins ties."""
        ids, distances = self._matches(_as_hash(hash_int), self.max_distance)
        return (self._keys[int(ids[0])], int(distances[0])) if ids.size else None

    def query(self, hash_int: int, max_distance: int | None = None) -> list[tuple[str, int]]:
        """All keys within max_distance (default: the index's), nearest first.

        A distance above the index's own is answered exactly by a linear scan.
        """
        distance = self.max_distance if max_distance is None else _check_distance(max_distance)
        ids, distances = self._matches(_as_hash(hash_int), distance)
        return [(self._keys[int(i)], int(d)) for i, d in zip(ids, distances, strict=True)]

    def _contains(self, value: np.uint64, key: str) -> bool:
        ids, _ = self._matches(value, 0)
        return any(self._keys[int(i)] == key for i in ids)

    def _new_pairs(self, hashes: np.ndarray, keys: Sequence[str]) -> np.ndarray:
        """Mask of the batch entries to add, in batch order.

        Only entries whose hash is already indexed or repeats within the batch are
        checked one by one; for fresh random hashes that is almost none.
        """
        suspects = self._hashes_present(hashes) | _repeated(hashes)
        keep = np.ones(len(hashes), dtype=bool)
        seen: set[tuple[int, str]] = set()
        for position in np.flatnonzero(suspects):
            pair = (int(hashes[position]), keys[position])
            if pair in seen or self._contains(hashes[position], pair[1]):
                keep[position] = False
            else:
                seen.add(pair)
        return keep

    def _hashes_present(self, hashes: np.ndarray) -> np.ndarray:
        present = np.isin(hashes, self._hashes[self._indexed : self._size])
        if self._bands is None:
            return present | np.isin(hashes, self._hashes[: self._indexed])
        return present | self._bands.contains(hashes)

    def _append(self, hashes: np.ndarray, keys: Sequence[str]) -> None:
        end = self._size + len(hashes)
        if end > _MAX_ENTRIES:
            raise HashIndexError(f"a HashIndex holds at most {_MAX_ENTRIES} entries")
        self._hashes = _reserve(self._hashes, self._size, end)
        self._hashes[self._size : end] = hashes
        self._keys.extend(keys)
        self._size = end
        if self._size - self._indexed > TAIL_LIMIT:
            self._merge_tail()

    def _merge_tail(self) -> None:
        """Index the tail, re-cutting the bands when the best layout for the new size changed."""
        widths = _choose_band_widths(self._size, self.max_distance)
        if widths is None:
            self._bands = None
        else:
            if self._bands is None or widths != self._bands.widths:
                self._bands = _BandTables(widths)
                self._indexed = 0
            self._bands.merge(self._hashes[self._indexed : self._size])
        self._indexed = self._size

    def _matches(self, value: np.uint64, distance: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids within distance and their distances, sorted by (distance, id)."""
        if self._bands is None or distance > self.max_distance:
            ids, distances = self._scan(0, self._size, value, distance)
        else:
            indexed_ids, indexed_distances = self._probe(self._bands, value, distance)
            tail_ids, tail_distances = self._scan(self._indexed, self._size, value, distance)
            ids = np.concatenate([indexed_ids, tail_ids])
            distances = np.concatenate([indexed_distances, tail_distances])
        order = np.lexsort((ids, distances))
        return ids[order], distances[order]

    def _scan(self, start: int, end: int, value: np.uint64, distance: int) -> tuple[np.ndarray, np.ndarray]:
        distances = np.bitwise_count(self._hashes[start:end] ^ value)
        hits = np.flatnonzero(distances <= distance)
        return hits + start, distances[hits]

    def _probe(self, bands: _BandTables, value: np.uint64, distance: int) -> tuple[np.ndarray, np.ndarray]:
        ids, distances = bands.lookup(value, distance)
        ids, first = np.unique(ids, return_index=True)  # a hash may match on several bands
        return ids.astype(np.int64), distances[first]


class _BandTables:
    """Every band's bucket table in flat arrays, so a query is one short run of numpy calls.

    Band b maps band value v to the slots b * count + starts[table_bases[b] + v] up to
    b * count + starts[table_bases[b] + v + 1]; ids[slot] is an entry and hashes[slot] its hash
    (a copy: verifying candidates then reads contiguous memory instead of one cache miss each,
    which halves query time at 10M for 8 bytes per entry and band). Within a value, ids are in
    insertion order.
    """

    def __init__(self, widths: tuple[int, ...]) -> None:
        self.widths = widths
        self.shifts = np.cumsum((0,) + widths[:-1]).astype(np.uint64)
        self.masks = np.array([(1 << bits) - 1 for bits in widths], dtype=np.uint64)
        self.table_bases = _table_bases(widths)
        self.starts = np.zeros(int(self.table_bases[-1]) + (1 << widths[-1]) + 1, dtype=np.uint32)
        self.ids = np.empty(0, dtype=np.uint32)
        self.hashes = np.empty(0, dtype=np.uint64)
        self.count = 0

    def lookup(self, value: np.uint64, distance: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids within distance of value and their distances; an id may repeat."""
        probe_bands, probe_rows, flips = _probe_plan(self.widths, distance)
        band_values = ((value >> self.shifts) & self.masks).astype(np.intp)
        rows = probe_rows + (band_values[probe_bands] ^ flips)
        slot_bases = probe_bands * self.count
        slots, _ = _expand_ranges(self.starts[rows] + slot_bases, self.starts[rows + 1] + slot_bases)
        distances = np.bitwise_count(self.hashes[slots] ^ value)
        close = distances <= distance
        return self.ids[slots[close]], distances[close]

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of the hashes that some indexed entry has exactly (looked up in the first band)."""
        rows = ((hashes >> self.shifts[0]) & self.masks[0]).astype(np.intp)
        slots, lengths = _expand_ranges(self.starts[rows], self.starts[rows + 1])
        owners = np.repeat(np.arange(len(hashes)), lengths)
        present = np.zeros(len(hashes), dtype=bool)
        present[owners[self.hashes[slots] == hashes[owners]]] = True
        return present

    def merge(self, tail: np.ndarray) -> None:
        """Index tail's hashes as ids count, count + 1, ..."""
        new_count = self.count + len(tail)
        merged_ids = np.empty(len(self.widths) * new_count, dtype=np.uint32)
        merged_hashes = np.empty(len(self.widths) * new_count, dtype=np.uint64)
        tail_ids = np.arange(self.count, new_count, dtype=np.uint32)
        for band, bits in enumerate(self.widths):
            rows = slice(self.table_bases[band], self.table_bases[band] + (1 << bits) + 1)
            old = slice(band * self.count, (band + 1) * self.count)
            new = slice(band * new_count, (band + 1) * new_count)
            values = ((tail >> self.shifts[band]) & self.masks[band]).astype(np.intp)
            new_starts, old_targets, tail_order, tail_targets = _merge_targets(self.starts[rows], values)
            for merged, old_part, tail_part in (
                (merged_ids, self.ids, tail_ids),
                (merged_hashes, self.hashes, tail),
            ):
                merged[new][old_targets] = old_part[old]
                merged[new][tail_targets] = tail_part[tail_order]
            self.starts[rows] = new_starts
        self.ids, self.hashes, self.count = merged_ids, merged_hashes, new_count


def _merge_targets(
    starts: np.ndarray, tail_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where one band's old slots and its tail entries go when the tail joins the table.

    Returns the new starts, each old slot's new slot, the tail in bucket order (stable) and
    the new slot of each tail entry in that order. Old slots only shift by the number of tail
    entries in lower buckets, so nothing old is re-sorted.
    """
    tail_counts = np.bincount(tail_values, minlength=len(starts) - 1)
    tail_before = np.zeros(len(starts), dtype=np.int64)
    np.cumsum(tail_counts, out=tail_before[1:])
    old_counts = np.diff(starts).astype(np.int64)
    new_starts = starts + tail_before
    old_targets = np.arange(int(starts[-1])) + np.repeat(tail_before[:-1], old_counts)
    tail_order = np.argsort(tail_values, kind="stable")
    sorted_values = tail_values[tail_order]
    rank_in_bucket = np.arange(len(tail_order)) - tail_before[sorted_values]
    tail_targets = new_starts[sorted_values] + old_counts[sorted_values] + rank_in_bucket
    return new_starts, old_targets, tail_order, tail_targets


class _KeyStore:
    """Keys as one UTF-8 byte buffer plus end offsets: ~8 bytes + the key per entry
    instead of ~70 for a list of str."""

    def __init__(self) -> None:
        self._data = np.empty(4096, dtype=np.uint8)
        self._ends = np.empty(1024, dtype=np.int64)
        self._count = 0

    def extend(self, keys: Sequence[str]) -> None:
        encoded = [key.encode() for key in keys]
        start = int(self._ends[self._count - 1]) if self._count else 0
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self._data = _reserve(self._data, start, start + len(blob))
        self._data[start : start + len(blob)] = blob
        self._ends = _reserve(self._ends, self._count, self._count + len(encoded))
        self._ends[self._count : self._count + len(encoded)] = start + np.cumsum(lengths)
        self._count += len(encoded)

    def __getitem__(self, position: int) -> str:
        start = int(self._ends[position - 1]) if position else 0
        return self._data[start : self._ends[position]].tobytes().decode()


def _as_hash(hash_int: int) -> np.uint64:
    try:
        value = operator.index(hash_int)
    except TypeError:
        raise HashIndexError(f"a hash must be an integer, got {type(hash_int).__name__}") from None
    if not 0 <= value < 1 << HASH_BITS:
        raise HashIndexError(f"a hash must fit in {HASH_BITS} unsigned bits, got {value}")
    return np.uint64(value)


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise HashIndexError(f"a key must be a str, got {type(key).__name__}")


def _check_distance(distance: int) -> int:
    if isinstance(distance, bool) or not isinstance(distance, int):
        raise HashIndexError(f"max_distance must be an int, got {distance!r}")
    if not 0 <= distance <= MAX_SUPPORTED_DISTANCE:
        raise HashIndexError(f"max_distance must be in 0..{MAX_SUPPORTED_DISTANCE}, got {distance}")
    return distance


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """Mask of batch entries whose hash occurs more than once in the batch."""
    ordered = np.sort(hashes)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    return np.isin(hashes, repeats) if repeats.size else np.zeros(len(hashes), dtype=bool)


def _reserve(array: np.ndarray, used: int, needed: int) -> np.ndarray:
    """array, or a copy with room for needed items (capacity doubles, so appends are amortised O(1))."""
    if needed <= len(array):
        return array
    grown = np.empty(max(needed, 2 * len(array)), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown


def _expand_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All positions in the half-open ranges [starts[i], ends[i]), concatenated, and each range's length."""
    starts = starts.astype(np.int64)
    lengths = ends.astype(np.int64) - starts
    first_output = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - first_output, lengths) + np.arange(int(lengths.sum()))
    return positions, lengths


def _band_widths(bands: int) -> tuple[int, ...]:
    wide, extra = divmod(HASH_BITS, bands)
    return tuple(wide + 1 if band < extra else wide for band in range(bands))


def _band_radii(bands: int, distance: int) -> list[int]:
    """Radii with sum(r + 1) == distance + 1; a radius of -1 means the band is not probed."""
    units, extra = divmod(distance + 1, bands)
    return [units + (1 if band < extra else 0) - 1 for band in range(bands)]


def _probe_count(bits: int, radius: int) -> int:
    return sum(math.comb(bits, flipped) for flipped in range(radius + 1))


def _choose_band_widths(size: int, distance: int) -> tuple[int, ...] | None:
    """Band layout with the fewest expected probes + candidates for uniform hashes,
    or None when a linear scan of size hashes would be cheaper."""
    best_cost, best_widths = math.inf, None
    for bands in range(MIN_BANDS, max(MIN_BANDS, distance + 1) + 1):
        widths = _band_widths(bands)
        radii = _band_radii(bands, distance)
        cost = sum(
            _probe_count(bits, radius) * (1 + size / 2**bits)
            for bits, radius in zip(widths, radii, strict=True)
            if radius >= 0
        )
        if cost < best_cost:
            best_cost, best_widths = cost, widths
    return best_widths if best_cost * LINEAR_COST_FACTOR < size else None


def _table_bases(widths: tuple[int, ...]) -> np.ndarray:
    sizes = [(1 << bits) + 1 for bits in widths]
    return np.cumsum([0] + sizes[:-1]).astype(np.intp)


@cache
def _probe_plan(widths: tuple[int, ...], distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each probe: its band, the row of that band's table start, and the flip mask to XOR
    onto the query's band value. Only bands with a radius >= 0 are probed."""
    radii = _band_radii(len(widths), distance)
    bases = _table_bases(widths)
    flips = [(band, _flip_masks(widths[band], radius)) for band, radius in enumerate(radii) if radius >= 0]
    probe_bands = np.concatenate([np.full(len(masks), band, dtype=np.intp) for band, masks in flips])
    plan = (probe_bands, bases[probe_bands], np.concatenate([masks for _, masks in flips]))
    for array in plan:
        array.flags.writeable = False
    return plan


@cache
def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every bits-wide value with at most radius bits set: XOR-ed onto a band value it
    enumerates the band values within radius."""
    masks = [
        sum(1 << position for position in positions)
        for flipped in range(radius + 1)
        for positions in combinations(range(bits), flipped)
    ]
    return np.array(masks, dtype=np.intp)
