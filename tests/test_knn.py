"""ReferenceIndex: recall against the exact oracle, honest votes, persistence and thread safety."""

import threading

import numpy as np
import pytest

from common.knn import KnnError, ReferenceIndex, brute_force_knn, hellinger_embedding

DIM = 64


def _histograms(rng: np.random.Generator, count: int, palettes: np.ndarray, pixels: int = 1024) -> np.ndarray:
    """Pixel counts of images that each mix one of a few palettes with their own colours.

    Counts (not raw Dirichlet floats) as real images give, and no float32 denormals,
    which slow BLAS brute force about tenfold.
    """
    palette_of = rng.integers(len(palettes), size=count)
    own_colours = rng.dirichlet(np.full(DIM, 0.3), size=count)
    mixtures = 0.7 * palettes[palette_of] + 0.3 * own_colours
    return np.stack([rng.multinomial(pixels, mixture / mixture.sum()) for mixture in mixtures]).astype(np.float32)


def _palettes(rng: np.random.Generator, count: int = 20) -> np.ndarray:
    return rng.dirichlet(np.full(DIM, 0.2), size=count)


def _two_class_histograms(rng: np.random.Generator, count: int, label: int) -> np.ndarray:
    """Class 0 uses only the first half of the bins, class 1 only the second half."""
    histograms = np.zeros((count, DIM))
    for row in histograms:
        row[label * DIM // 2 : (label + 1) * DIM // 2] = rng.multinomial(512, rng.dirichlet(np.ones(DIM // 2)))
    return histograms


def test_recall_at_10_against_brute_force() -> None:
    rng = np.random.default_rng(11)
    palettes = _palettes(rng)
    references = _histograms(rng, 5_000, palettes)
    queries = _histograms(rng, 200, palettes)
    index = ReferenceIndex(DIM, k=10, ef=100)
    index.add(references, rng.integers(0, 2, size=len(references)))
    found, _ = index.neighbours(queries)
    exact, _ = brute_force_knn(hellinger_embedding(references, DIM), hellinger_embedding(queries, DIM), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.99
    assert len(index) == 5_000


def test_separable_classes_give_confident_votes() -> None:
    rng = np.random.default_rng(5)
    index = ReferenceIndex(DIM, k=10)
    index.add(_two_class_histograms(rng, 300, 0), [0] * 300)
    index.add(_two_class_histograms(rng, 300, 1), [1] * 300)
    adult = index.probabilities(_two_class_histograms(rng, 20, 1))
    normal = index.probabilities(_two_class_histograms(rng, 20, 0))
    assert all(p is not None and p > 0.99 for p in adult)
    assert all(p is not None and p < 0.01 for p in normal)


def test_exact_reference_dominates_the_vote() -> None:
    rng = np.random.default_rng(6)
    histograms = _histograms(rng, 50, _palettes(rng, 3))
    index = ReferenceIndex(DIM, k=10)
    index.add(histograms, [0] * 49 + [1])
    assert index.probability(histograms[49] * 3) > 0.99  # scale does not matter: histograms are normalised


def test_no_signal_without_two_classes() -> None:
    rng = np.random.default_rng(1)
    query = _histograms(rng, 1, _palettes(rng, 2))[0]
    index = ReferenceIndex(DIM)
    assert index.probability(query) is None
    index.add(_histograms(rng, 30, _palettes(rng, 2)), [1] * 30)
    assert index.probability(query) is None
    assert index.probabilities(np.stack([query, query])) == [None, None]
    index.add(query[None, :], [0])
    assert index.probability(query) is not None


def test_capacity_grows_past_max_elements() -> None:
    rng = np.random.default_rng(2)
    index = ReferenceIndex(DIM, k=3, max_elements=8)
    histograms = _histograms(rng, 100, _palettes(rng, 4))
    for start in range(0, 100, 25):
        index.add(histograms[start : start + 25], [start // 25 % 2] * 25)
    assert len(index) == 100
    found = index.probabilities(histograms)
    assert all(p is not None for p in found)


def test_same_id_replaces_its_reference() -> None:
    rng = np.random.default_rng(3)
    palettes = _palettes(rng, 2)
    index = ReferenceIndex(DIM, k=1)
    others = _histograms(rng, 20, palettes)
    index.add(others, [0] * 10 + [1] * 10, ids=[f"img-{i}" for i in range(20)])
    probe = _histograms(rng, 1, palettes)
    index.add(probe, [1], ids=["reviewed"])
    index.add(probe, [1], ids=["reviewed"])  # a replayed review
    assert len(index) == 21
    assert index.probability(probe[0]) == pytest.approx(1.0)
    index.add(np.concatenate([probe, probe]), [1, 0], ids=["reviewed", "reviewed"])  # last one wins
    assert len(index) == 21
    assert index.probability(probe[0]) == pytest.approx(0.0)


def test_save_load_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(4)
    palettes = _palettes(rng)
    index = ReferenceIndex(DIM, k=7, ef=50)
    index.add(_histograms(rng, 500, palettes), rng.integers(0, 2, size=500), ids=[f"r{i}" for i in range(500)])
    queries = _histograms(rng, 50, palettes)
    index.save(tmp_path / "knn")
    loaded = ReferenceIndex.load(tmp_path / "knn")
    assert (loaded.k, loaded.ef, len(loaded)) == (7, 50, 500)
    assert loaded.probabilities(queries) == index.probabilities(queries)
    loaded.add(queries[:1], [1], ids=["r0"])  # ids survive: r0 is replaced, not duplicated
    assert len(loaded) == 500


def test_empty_index_round_trip(tmp_path) -> None:
    ReferenceIndex(DIM).save(tmp_path)
    loaded = ReferenceIndex.load(tmp_path)
    assert len(loaded) == 0
    assert loaded.probability(np.ones(DIM)) is None


def test_load_rejects_missing_or_foreign_directories(tmp_path) -> None:
    with pytest.raises(KnnError):
        ReferenceIndex.load(tmp_path)
    ReferenceIndex(DIM).save(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": 99}')
    with pytest.raises(KnnError):
        ReferenceIndex.load(tmp_path)


def test_adding_while_querying_from_another_thread() -> None:
    rng = np.random.default_rng(8)
    palettes = _palettes(rng, 5)
    batches = [_histograms(rng, 50, palettes) for _ in range(20)]
    queries = _histograms(rng, 16, palettes)
    index = ReferenceIndex(DIM, k=5, max_elements=16)
    index.add(batches[0], [0] * 25 + [1] * 25)
    errors: list[BaseException] = []
    results: list[float | None] = []

    def query_repeatedly() -> None:
        try:
            for _ in range(200):
                results.extend(index.probabilities(queries))
        except BaseException as error:  # re-raised below, in the test's own thread
            errors.append(error)

    reader = threading.Thread(target=query_repeatedly)
    reader.start()
    for batch in batches[1:]:
        index.add(batch, rng.integers(0, 2, size=len(batch)))
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert errors == []
    assert len(results) == 200 * 16 and all(p is not None and 0.0 <= p <= 1.0 for p in results)
    assert len(index) == 1_000


@pytest.mark.parametrize(
    ("histograms", "labels"),
    [
        (np.ones((2, DIM - 1)), [0, 1]),  # wrong dimension
        (-np.ones((1, DIM)), [0]),  # negative counts
        (np.zeros((1, DIM)), [0]),  # empty histogram
        (np.full((1, DIM), np.nan), [0]),
        (np.ones((2, DIM)), [0]),  # one label short
        (np.ones((1, DIM)), [2]),  # not a class
    ],
)
def test_rejects_bad_input(histograms: np.ndarray, labels: list[int]) -> None:
    index = ReferenceIndex(DIM)
    with pytest.raises(KnnError):
        index.add(histograms, labels)
    assert len(index) == 0


def test_brute_force_oracle_orders_by_distance() -> None:
    refs = hellinger_embedding(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=float), 4)
    query = hellinger_embedding(np.array([[3, 1, 0, 0]], dtype=float), 4)
    indices, squared = brute_force_knn(refs, query, 5)
    assert indices.tolist() == [[1, 0, 2]]
    bhattacharyya = np.sqrt(0.75 * 0.5) + np.sqrt(0.25 * 0.5)
    assert squared[0, 0] == pytest.approx(2 - 2 * bhattacharyya, rel=1e-5)  # = 2 * Hellinger**2
    assert squared[0, -1] == pytest.approx(2.0)  # disjoint histograms: the largest squared distance
    assert np.all(np.diff(squared[0]) >= 0)


def test_search_settings_change_after_loading(tmp_path) -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, (200, 64)).astype(np.float32)
    index = ReferenceIndex(dim=64, k=10)
    index.add(counts / counts.sum(axis=1, keepdims=True), [i % 2 for i in range(200)])
    index.save(tmp_path / "knn")
    loaded = ReferenceIndex.load(tmp_path / "knn")
    loaded.configure_search(k=3, ef=50)
    slots, _ = loaded.neighbours(counts[:1] / counts[:1].sum())
    assert (loaded.k, loaded.ef) == (3, 50) and slots.shape == (1, 3)
    with pytest.raises(KnnError):
        loaded.configure_search(k=0, ef=10)
