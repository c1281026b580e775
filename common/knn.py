"""Colour-histogram kNN signal: P(adult) from the labelled reference images closest in colour.

Why Hellinger distance: histograms are distributions. Plain L2 between them is
dominated by the few largest bins, so two images that share a dominant
background look alike whatever else they show. Taking element-wise square roots
of L1-normalised histograms first turns L2 into (sqrt 2 times) the Hellinger
distance, which weighs relative differences in small bins too. The roots have
unit L2 norm, so distances are bounded (hnswlib's "l2" space reports squared
L2, in [0, 2]) and comparable across images, which the distance-weighted vote
needs.

hnswlib must not run add_items concurrently with knn_query (its README), and
Ray actors may serve calls on several threads, so every use of the hnsw index
holds one plain lock: queries take well under a millisecond and arrive
batched, so a readers-writer lock would buy little.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import hnswlib
import numpy as np

from common.errors import ModstreamError

LABEL_NORMAL = 0
LABEL_ADULT = 1
VOTE_EPSILON = 1e-6  # keeps an exact match from dividing by zero while letting it dominate the vote
FORMAT_VERSION = 1
INDEX_FILE = "index.bin"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.json"
META_FILE = "meta.json"


class KnnError(ModstreamError, ValueError):
    """Histograms, labels or a saved index the reference index cannot use."""


def hellinger_embedding(histograms: np.ndarray, dim: int) -> np.ndarray:
    """Rows L1-normalised then square-rooted, as float32: the vectors the index stores."""
    histograms = np.asarray(histograms, dtype=np.float64)
    if histograms.ndim != 2 or histograms.shape[1] != dim:
        raise KnnError(f"histograms must have shape (n, {dim}), got {histograms.shape}")
    if not np.isfinite(histograms).all() or (histograms < 0).any():
        raise KnnError("histograms must be finite and non-negative")
    totals = histograms.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        raise KnnError("a histogram is empty (all bins zero)")
    return np.sqrt(histograms / totals).astype(np.float32)


def brute_force_knn(refs: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest refs for each query row, as hnswlib's knn_query returns them:
    (indices, squared L2 distances), each of shape (queries, k), nearest first.

    refs and query are embeddings (hellinger_embedding); the exact oracle for the index
    and its brute-force baseline.
    """
    refs = np.asarray(refs, dtype=np.float32)
    query = np.atleast_2d(np.asarray(query, dtype=np.float32))
    k = min(k, len(refs))
    if k < 1:
        return np.empty((len(query), 0), dtype=np.intp), np.empty((len(query), 0), dtype=np.float32)
    squared = (
        np.einsum("ij,ij->i", query, query)[:, None]
        - 2.0 * (query @ refs.T)
        + np.einsum("ij,ij->i", refs, refs)[None, :]
    )
    np.maximum(squared, 0.0, out=squared)
    nearest = np.argpartition(squared, k - 1, axis=1)[:, :k]
    nearest_squared = np.take_along_axis(squared, nearest, axis=1)
    order = np.argsort(nearest_squared, axis=1, kind="stable")
    return np.take_along_axis(nearest, order, axis=1), np.take_along_axis(nearest_squared, order, axis=1)


class ReferenceIndex:
    """Labelled reference histograms in an HNSW graph; votes P(adult) for new histograms.

    Labels are LABEL_NORMAL (0) or LABEL_ADULT (1). A reference added with an id that is
    already present replaces that reference (a re-reviewed image, a replayed review), so
    at-least-once delivery of reviews never duplicates references.
    """

    def __init__(
        self,
        dim: int = 64,
        *,
        k: int = 10,
        ef: int = 100,
        M: int = 16,
        ef_construction: int = 200,
        max_elements: int = 1024,
    ) -> None:
        for name, value in (
            ("dim", dim),
            ("k", k),
            ("ef", ef),
            ("M", M),
            ("ef_construction", ef_construction),
        ):
            if value < 1:
                raise KnnError(f"{name} must be >= 1, got {value}")
        self.dim, self.k, self.ef, self.M, self.ef_construction = dim, k, ef, M, ef_construction
        self._index = hnswlib.Index(space="l2", dim=dim)
        self._index.init_index(max_elements=max(max_elements, 1), ef_construction=ef_construction, M=M)
        self._index.set_ef(max(ef, k))  # hnswlib cannot return k results with ef < k
        self._labels = np.zeros(self._index.get_max_elements(), dtype=np.int8)  # by slot (hnswlib's label)
        self._ids: list[str | None] = []  # by slot
        self._slot_of_id: dict[str, int] = {}
        self._class_counts = np.zeros(2, dtype=np.int64)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def configure_search(self, k: int, ef: int) -> None:
        """Set the vote's k and hnswlib's search breadth (recall against latency) after loading."""
        if k < 1 or ef < 1:
            raise KnnError(f"k and ef must be >= 1, got k={k}, ef={ef}")
        with self._lock:
            self.k, self.ef = k, ef
            self._index.set_ef(max(ef, k))  # hnswlib cannot return k results with ef < k

    def add(self, histograms: np.ndarray, labels: Sequence[int], ids: Sequence[str] | None = None) -> None:
        """Add labelled references (rows of histograms); an id seen before replaces its reference."""
        vectors = hellinger_embedding(histograms, self.dim)
        labels_array = np.asarray(labels)
        if labels_array.shape != (len(vectors),) or not np.isin(labels_array, (LABEL_NORMAL, LABEL_ADULT)).all():
            raise KnnError(f"need one label in {{0, 1}} per histogram, got {labels!r}")
        if ids is not None:
            if len(ids) != len(vectors) or not all(isinstance(image_id, str) for image_id in ids):
                raise KnnError("need one str id per histogram")
            rows = _last_occurrences(ids)  # within one batch the last label for an id wins
            vectors, labels_array, ids = vectors[rows], labels_array[rows], [ids[row] for row in rows]
        if len(vectors) == 0:
            return
        with self._lock:
            slots = self._assign_slots(ids, len(vectors))
            self._reserve(len(self._ids) + sum(slot >= len(self._ids) for slot in slots))
            self._index.add_items(vectors, slots)
            self._record(slots, labels_array.astype(np.int8), ids)

    def probability(self, histogram: np.ndarray) -> float | None:
        """P(adult) for one histogram, or None when the references cannot tell (see probabilities)."""
        return self.probabilities(np.asarray(histogram)[None, :])[0]

    def probabilities(self, histograms: np.ndarray) -> list[float | None]:
        """Distance-weighted vote (weight 1 / (distance + eps)) of the k nearest references.

        None ("no signal") for every row while the references hold fewer than two classes:
        a vote among one class would be a made-up certainty.
        """
        vectors = hellinger_embedding(histograms, self.dim)
        with self._lock:
            if len(vectors) == 0 or (self._class_counts == 0).any():
                return [None] * len(vectors)
            slots, squared = self._index.knn_query(vectors, k=min(self.k, len(self._ids)))
            neighbour_labels = self._labels[slots.astype(np.intp)]
        weights = 1.0 / (np.sqrt(np.maximum(squared, 0.0)) + VOTE_EPSILON)
        adult = (weights * neighbour_labels).sum(axis=1) / weights.sum(axis=1)
        return [float(p) for p in adult]

    def neighbours(self, histograms: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Slots and squared distances of the k (default self.k) nearest references per row,
        shaped like brute_force_knn's answer; slots count references in the order first added."""
        vectors = hellinger_embedding(histograms, self.dim)
        with self._lock:
            k = min(self.k if k is None else k, len(self._ids))
            if k > self._index.ef:
                raise KnnError(f"k = {k} exceeds ef = {self._index.ef}")
            if len(vectors) == 0 or k == 0:
                return np.empty((len(vectors), 0), dtype=np.intp), np.empty((len(vectors), 0), np.float32)
            slots, squared = self._index.knn_query(vectors, k=k)
        return slots.astype(np.intp), squared

    def save(self, directory: str | Path) -> None:
        """Write the hnsw graph, labels, ids and parameters into directory (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._index.save_index(str(directory / INDEX_FILE))
            np.save(directory / LABELS_FILE, self._labels[: len(self._ids)])
            (directory / IDS_FILE).write_text(json.dumps(self._ids))
            meta = {
                "format": FORMAT_VERSION,
                "space": "l2",
                "embedding": "hellinger",
                "dim": self.dim,
                "k": self.k,
                "ef": self.ef,
                "M": self.M,
                "ef_construction": self.ef_construction,
                "count": len(self._ids),
            }
            (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks a full save

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceIndex:
        """Read what save wrote; the search parameters k and ef come back as saved."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            params = {name: int(meta[name]) for name in ("dim", "k", "ef", "M", "ef_construction", "count")}
            labels = np.load(directory / LABELS_FILE)
            ids = json.loads((directory / IDS_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KnnError(f"no readable reference index in {directory}: {error}") from error
        if meta.get("format") != FORMAT_VERSION or meta.get("embedding") != "hellinger":
            raise KnnError(f"unsupported reference index format in {directory}: {meta}")
        count = params.pop("count")
        if not len(labels) == len(ids) == count or not np.isin(labels, (LABEL_NORMAL, LABEL_ADULT)).all():
            raise KnnError(f"labels or ids in {directory} do not match its {count} references")
        loaded = cls(params.pop("dim"), **params)
        try:
            loaded._index.load_index(str(directory / INDEX_FILE), max_elements=max(count, 1))
        except RuntimeError as error:
            raise KnnError(f"unreadable hnsw graph in {directory}: {error}") from error
        if loaded._index.get_current_count() != count:
            raise KnnError(f"hnsw graph in {directory} does not hold {count} references")
        loaded._index.set_ef(max(loaded.ef, loaded.k))
        loaded._labels = np.zeros(loaded._index.get_max_elements(), dtype=np.int8)
        loaded._labels[:count] = labels
        loaded._ids = ids
        loaded._slot_of_id = {image_id: slot for slot, image_id in enumerate(ids) if image_id is not None}
        loaded._class_counts = np.bincount(labels.astype(np.intp), minlength=2).astype(np.int64)
        return loaded

    def _assign_slots(self, ids: Sequence[str] | None, count: int) -> list[int]:
        """Slot per row: the existing slot of a known id, else the next new one."""
        if ids is None:
            return list(range(len(self._ids), len(self._ids) + count))
        slots = []
        next_slot = len(self._ids)
        for image_id in ids:
            if image_id in self._slot_of_id:
                slots.append(self._slot_of_id[image_id])
            else:
                slots.append(next_slot)
                next_slot += 1
        return slots

    def _reserve(self, count: int) -> None:
        """Room for count references (capacity doubles, so growth is amortised O(1))."""
        capacity = self._index.get_max_elements()
        if count > capacity:
            capacity = max(count, 2 * capacity)
            self._index.resize_index(capacity)
            self._labels = np.concatenate([self._labels, np.zeros(capacity - len(self._labels), np.int8)])

    def _record(self, slots: list[int], labels: np.ndarray, ids: Sequence[str] | None) -> None:
        """Book-keeping after add_items: labels, class counts and ids of the slots written."""
        slot_array = np.array(slots, dtype=np.intp)
        replaced = slot_array[slot_array < len(self._ids)]
        self._class_counts -= np.bincount(self._labels[replaced], minlength=2)
        self._class_counts += np.bincount(labels, minlength=2)
        self._labels[slot_array] = labels
        for row, slot in enumerate(slots):
            if slot == len(self._ids):  # new slots come in row order
                image_id = None if ids is None else ids[row]
                self._ids.append(image_id)
                if image_id is not None:
                    self._slot_of_id[image_id] = slot


def _last_occurrences(ids: Sequence[str]) -> list[int]:
    """Rows to keep so each id appears once, at its last occurrence, in batch order."""
    last = {image_id: row for row, image_id in enumerate(ids)}
    return sorted(last.values())
