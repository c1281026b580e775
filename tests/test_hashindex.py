"""HashIndex must give exactly the answers of a linear Hamming scan, whatever its band layout."""

import numpy as np
import pytest

from common import hashindex
from common.hashindex import HashIndex, HashIndexError, linear_scan_nearest


def _flip_bits(value: int, count: int, rng: np.random.Generator) -> int:
    for bit in rng.choice(64, size=count, replace=False):
        value ^= 1 << int(bit)
    return value


def _random_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False)


def _oracle_query(hashes: np.ndarray, query: int, max_distance: int) -> list[tuple[str, int]]:
    distances = np.bitwise_count(hashes ^ np.uint64(query)).astype(int)
    hits = np.flatnonzero(distances <= max_distance)
    return sorted(((f"img-{i}", int(distances[i])) for i in hits), key=lambda hit: (hit[1], int(hit[0][4:])))


def _queries(hashes: np.ndarray, max_distance: int, rng: np.random.Generator) -> list[int]:
    """Near copies of stored hashes at every distance 0..max_distance + 2, plus random hashes."""
    planted = [
        _flip_bits(int(hashes[rng.integers(len(hashes))]), flips, rng)
        for flips in range(max_distance + 3)
        for _ in range(6)
    ]
    return planted + [int(value) for value in _random_hashes(rng, 20)]


def _assert_matches_linear_scan(index: HashIndex, hashes: np.ndarray, rng: np.random.Generator) -> None:
    for query in _queries(hashes, index.max_distance, rng):
        expected = linear_scan_nearest(hashes, query, index.max_distance)
        nearest = index.nearest(query)
        if expected is None:
            assert nearest is None
        else:
            distance = int(np.bitwise_count(hashes[expected] ^ np.uint64(query)))
            assert nearest == (f"img-{expected}", distance)
        assert index.query(query) == _oracle_query(hashes, query, index.max_distance)


@pytest.fixture
def small_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge the tail every 700 entries so small tests go through many merges."""
    monkeypatch.setattr(hashindex, "TAIL_LIMIT", 700)


@pytest.mark.parametrize("max_distance", [0, 1, 3, 8, 12])
def test_answers_equal_linear_scan_while_growing(max_distance: int, small_tail: None) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = _random_hashes(rng, 6_000)
    # Near copies inside the data make several hits per query and ties on distance.
    hashes[3_000:3_200] = [_flip_bits(int(hashes[i]), int(rng.integers(0, 4)), rng) for i in range(200)]
    hashes[3_200:3_210] = hashes[10]
    index = HashIndex(max_distance)
    for start in range(0, len(hashes), 500):  # queries see merged tables and an unmerged tail
        index.add_many(hashes[start : start + 500], [f"img-{i}" for i in range(start, start + 500)])
        _assert_matches_linear_scan(index, hashes[: start + 500], rng)
    assert len(index) == len(hashes)


def test_layout_changes_with_size_keep_answers_exact() -> None:
    """At d = 8 the best layout goes from 5 to 4 bands near 32k entries, forcing a full rebuild."""
    rng = np.random.default_rng(7)
    hashes = _random_hashes(rng, 50_000)
    index = HashIndex(8)
    for start in range(0, 45_000, 9_000):
        index.add_many(hashes[start : start + 9_000], [f"img-{i}" for i in range(start, start + 9_000)])
    for position in range(45_000, 50_000):  # leaves an unmerged tail behind the tables
        index.add(int(hashes[position]), f"img-{position}")
    _assert_matches_linear_scan(index, hashes, rng)


def test_same_hash_under_several_keys_and_repeated_pairs(small_tail: None) -> None:
    rng = np.random.default_rng(3)
    hashes = _random_hashes(rng, 2_000)
    index = HashIndex(4)
    index.add_many(hashes, [f"img-{i}" for i in range(len(hashes))])
    shared = int(hashes[5])
    index.add(shared, "copy-a")
    index.add(shared, "copy-a")  # a replayed event
    index.add(shared, "img-5")
    index.add_many(np.array([shared, shared, shared], dtype=np.uint64), ["copy-b", "copy-b", "img-5"])
    assert len(index) == len(hashes) + 2
    assert index.query(shared) == [("img-5", 0), ("copy-a", 0), ("copy-b", 0)]
    assert index.nearest(_flip_bits(shared, 2, rng)) == ("img-5", 2)


def test_distance_beyond_max_is_not_a_match() -> None:
    index = HashIndex(3)
    index.add(0, "zero")
    index.add(0xFFFF_FFFF_FFFF_FFFF, "ones")
    assert index.nearest(0b111) == ("zero", 3)
    assert index.nearest(0b1111) is None
    assert index.query(0b1111, max_distance=4) == [("zero", 4)]  # wider than the index: linear scan
    assert index.query(0b1111, max_distance=2) == []


def test_empty_index_and_oracle() -> None:
    assert HashIndex(5).nearest(123) is None
    assert len(HashIndex(5)) == 0
    assert linear_scan_nearest(np.empty(0, dtype=np.uint64), 1, 5) is None
    assert linear_scan_nearest(np.array([7, 3, 3], dtype=np.uint64), 1, 1) == 1  # earliest of the ties


@pytest.mark.parametrize("bad_hash", [-1, 2**64, "ff", 1.5])
def test_rejects_hashes_outside_64_bits(bad_hash: object) -> None:
    with pytest.raises(HashIndexError):
        HashIndex(4).add(bad_hash, "key")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_distance", [-1, 33, 2.0, True])
def test_rejects_bad_distances(bad_distance: object) -> None:
    with pytest.raises(HashIndexError):
        HashIndex(bad_distance)  # type: ignore[arg-type]
    with pytest.raises(HashIndexError):
        HashIndex(4).query(1, max_distance=bad_distance)  # type: ignore[arg-type]


def test_rejects_mismatched_batches() -> None:
    index = HashIndex(4)
    with pytest.raises(HashIndexError):
        index.add_many(np.array([1, 2], dtype=np.uint64), ["only-one"])
    with pytest.raises(HashIndexError):
        index.add_many(np.array([1, 2], dtype=np.int64), ["a", "b"])
    with pytest.raises(HashIndexError):
        index.add(1, 42)  # type: ignore[arg-type]
    assert len(index) == 0
