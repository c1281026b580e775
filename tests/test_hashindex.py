"""HashIndex (multi-index hashing over 256-bit PDQ) must give exactly the answers of a
numpy XOR + bitwise_count linear scan, on uniform and on clustered hashes."""

import numpy as np
import pytest

from common import hashindex
from common.hashindex import HashIndex, HashIndexError, chunk_radii, ints_to_words, to_words


def _oracle(words: np.ndarray, query: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    distances = np.bitwise_count(words ^ query).sum(axis=1)
    hits = np.flatnonzero(distances <= max_distance)
    return sorted(((int(i), int(distances[i])) for i in hits), key=lambda hit: (hit[1], hit[0]))


def _as_int(words: np.ndarray) -> int:
    return int.from_bytes(b"".join(int(word).to_bytes(8, "big") for word in words), "big")


def _flip(words: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    flipped = words.copy()
    for bit in rng.choice(256, size=count, replace=False):
        flipped[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return flipped


def _uniform(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=(count, 4), dtype=np.uint64, endpoint=False)


def _clustered(rng: np.random.Generator, count: int) -> np.ndarray:
    """Few centres, members 0-40 bits away: many hits per query, crowded buckets, ties."""
    centres = _uniform(rng, 20)
    return np.array([_flip(centres[rng.integers(20)], int(rng.integers(0, 41)), rng) for _ in range(count)])


@pytest.fixture
def small_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge the tail every 500 entries so small tests go through many merges."""
    monkeypatch.setattr(hashindex, "TAIL_LIMIT", 500)


@pytest.mark.parametrize("corpus", [_uniform, _clustered])
@pytest.mark.parametrize("max_distance", [0, 15, 23, 31, 39])
def test_answers_equal_linear_scan_while_growing(corpus, max_distance: int, small_tail: None) -> None:
    rng = np.random.default_rng(max_distance)
    words = corpus(rng, 3_000)
    words[2_000:2_010] = words[5]  # exact repeats: ties broken by the earliest id
    index = HashIndex(max_distance)
    for start in range(0, len(words), 700):  # several merges, and a tail left unindexed
        index.add_words(words[start : start + 700])
        stored = words[: start + 700]
        for _ in range(12):
            query = _flip(stored[rng.integers(len(stored))], int(rng.integers(0, max_distance + 4)), rng)
            assert index.query(_as_int(query)) == _oracle(stored, query, max_distance)
        random_query = _uniform(rng, 1)[0]
        assert index.query(_as_int(random_query)) == _oracle(stored, random_query, max_distance)


def test_a_larger_distance_than_the_index_was_built_for_is_still_exact(small_tail: None) -> None:
    rng = np.random.default_rng(7)
    words = _clustered(rng, 2_000)
    index = HashIndex(23)
    index.add_words(words)
    query = _flip(words[3], 45, rng)
    assert index.query(_as_int(query), max_distance=50) == _oracle(words, query, 50)


def test_pigeonhole_radii_cover_the_distance() -> None:
    for distance in range(64):
        radii = chunk_radii(distance)
        assert sum(radius + 1 for radius in radii) == distance + 1
    assert chunk_radii(31) == [1] * 16


def test_words_round_trip_and_bad_input_is_refused() -> None:
    value = int("0123456789abcdef" * 4, 16)
    assert _as_int(to_words(value)) == value
    assert _as_int(ints_to_words([value])[0]) == value
    index = HashIndex(31)
    with pytest.raises(HashIndexError):
        index.add(1 << 256)
    with pytest.raises(HashIndexError):
        index.add(-1)
    with pytest.raises(HashIndexError):
        index.add("ff")  # type: ignore[arg-type]
    with pytest.raises(HashIndexError):
        index.add_words(np.zeros((2, 3), dtype=np.uint64))
    with pytest.raises(HashIndexError):
        HashIndex(64)
    assert index.query(value) == []
