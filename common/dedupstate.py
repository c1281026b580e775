"""One dedup shard's state, as pure logic (the Ray actor in workers/dedup.py
wraps it with a changelog and the hash banks).

A shard owns the verdicts whose MD5 hashes to it (with a PDQ index for near
matches) and the images whose id hashes to it (image id -> hashes and
histogram, so a review naming only an image id can find them, and reviews
that arrived before their image).

Memory is what bounds a shard at millions of images, so both tables are
columns of fixed-width numpy arrays instead of Python objects: a verdict takes
~200 bytes (MD5 16, PDQ 32 + 64 of index, scores 24, codes, an 8-byte digest
of its event id, its image id in a shared byte buffer), an image record ~130
(the histogram as uint8). Keys are found through sorted uint64 digests with a
small unsorted tail. `max_images` and `max_age_s` bound the tables: the
oldest unreviewed rows go first, reviewed ones only when nothing else is left.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from common.features import near_matchable, pdq_hex_of_int, pdq_to_int
from common.hashindex import WORDS, HashIndex, distances_to, ints_to_words, to_words

MatchKind = Literal["exact", "near", "image_review", "bank"]
ACTIONS = ("allow", "review", "block")
LABELS = ("normal", "adult")
EVICT_SHARE = 0.1  # a full table drops this share at once, so compaction is rare
_TAIL_LIMIT = 16_384
_AGE_CHECK_EVERY = 1024  # rows added between scans for aged rows


def shard_of(key: str, shards: int) -> int:
    """Stable across processes and runs (unlike ``hash()``)."""
    return zlib.crc32(key.encode()) % shards


def digest64(text: str) -> int:
    """A 64-bit digest of an id: equal ids, equal digests; a collision is ~1e-6 at 10M ids."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Entry:
    """A remembered verdict, keyed by the MD5 of the image bytes (the changelog's record)."""

    md5: str
    pdq: str
    pdq_quality: int
    image_id: str
    event_key: int  # digest64 of the event id that made it: a replay gets its own verdict back
    action: str
    label: str
    score: float
    reviewed: bool = False
    signals: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    added_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Entry:
        return cls(**value)


@dataclass(frozen=True)
class ImageRecord:
    """What a review naming only ``image_id`` needs: its hashes and histogram (uint8 counts of 255)."""

    image_id: str
    md5: str
    pdq: str
    pdq_quality: int
    histogram: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantise_histogram(histogram: Sequence[float]) -> list[int]:
    """A normalised histogram as uint8 shares of 255 (1 byte per bin instead of 8)."""
    return [int(v) for v in np.clip(np.rint(np.asarray(histogram, dtype=np.float64) * 255), 0, 255)]


def dequantise_histogram(histogram: Sequence[int]) -> list[float]:
    values = np.asarray(histogram, dtype=np.float64)
    total = values.sum()
    return [float(v) for v in (values / total if total > 0 else values)]


@dataclass(frozen=True)
class BankHit:
    name: str
    entry_id: str | None


@dataclass(frozen=True)
class Match:
    kind: MatchKind
    entry: Entry
    distance: int
    bank: BankHit | None = None


_KIND_RANK = {"bank": 0, "exact": 1, "image_review": 2, "near": 3}


def match_rank(match: Match) -> tuple[int, int, int]:
    """Sort key: reviews first, then bank hits, then remembered verdicts (exact before near); then distance."""
    authority = 0 if match.entry.reviewed else 1 if match.kind == "bank" else 2
    return (authority, _KIND_RANK[match.kind], match.distance)


REVIEW_ACTIONS = {"adult": ("block", 1.0), "normal": ("allow", 0.0)}


def reviewed_entry(base: Entry, label: str, event_key: int = 0) -> Entry:
    """The entry a human decision turns ``base`` into: final, whatever the model said."""
    action, score = REVIEW_ACTIONS[label]
    return replace(base, action=action, label=label, score=score, reviewed=True, event_key=event_key,
                   signals={})


class KeyTable:
    """uint64 key -> int row: a sorted array plus a small dict tail (12 bytes per key, not ~100)."""

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.uint64)
        self._rows = np.empty(0, dtype=np.uint32)
        self._tail: dict[int, int] = {}

    def get(self, key: int) -> int | None:
        row = self._tail.get(key)
        if row is not None:
            return row
        at = int(np.searchsorted(self._keys, np.uint64(key)))
        return int(self._rows[at]) if at < len(self._keys) and int(self._keys[at]) == key else None

    def put(self, key: int, row: int) -> None:
        """Map a key that is not present yet."""
        self._tail[key] = row
        if len(self._tail) > _TAIL_LIMIT:
            self._merge()

    def rebuild(self, keys: np.ndarray) -> None:
        """Key i -> row i for every key given."""
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows, self._tail = keys[order], order.astype(np.uint32), {}

    def _merge(self) -> None:
        keys = np.concatenate([self._keys, np.fromiter(self._tail, dtype=np.uint64, count=len(self._tail))])
        rows = np.concatenate([self._rows, np.fromiter(self._tail.values(), dtype=np.uint32, count=len(self._tail))])
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows, self._tail = keys[order], rows[order], {}

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._rows.nbytes + 100 * len(self._tail)


class _Columns:
    """Growable fixed-width columns sharing one row count."""

    def __init__(self, spec: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
        self.spec = spec
        self.count = 0
        self.data = {name: np.zeros((1024, *shape), dtype=dtype) for name, (dtype, shape) in spec.items()}

    def append(self) -> int:
        if self.count == len(next(iter(self.data.values()))):
            for name, column in self.data.items():
                grown = np.zeros((2 * len(column), *column.shape[1:]), dtype=column.dtype)
                grown[: self.count] = column[: self.count]
                self.data[name] = grown
        self.count += 1
        return self.count - 1

    def extend(self, count: int) -> slice:
        """Room for count more rows; returns their slice."""
        needed = self.count + count
        capacity = len(next(iter(self.data.values())))
        if needed > capacity:
            for name, column in self.data.items():
                grown = np.zeros((max(needed, 2 * capacity), *column.shape[1:]), dtype=column.dtype)
                grown[: self.count] = column[: self.count]
                self.data[name] = grown
        rows = slice(self.count, needed)
        self.count = needed
        return rows

    def keep(self, rows: np.ndarray) -> None:
        """Keep only these rows, in this order."""
        for name, column in self.data.items():
            kept = column[rows]
            grown = np.zeros((max(1024, len(kept)), *column.shape[1:]), dtype=column.dtype)
            grown[: len(kept)] = kept
            self.data[name] = grown
        self.count = len(rows)

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.data.values())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]


class _Strings:
    """Short strings in one UTF-8 byte buffer with int64 end offsets (8 bytes + the text each)."""

    def __init__(self, max_bytes: int = 256) -> None:
        self.max_bytes = max_bytes
        self._data = bytearray()
        self._ends = np.empty(1024, dtype=np.int64)
        self._count = 0

    def append(self, text: str) -> int:
        self._data += text.encode()[: self.max_bytes]
        if self._count == len(self._ends):
            self._ends = np.concatenate([self._ends, np.empty(len(self._ends), dtype=np.int64)])
        self._ends[self._count] = len(self._data)
        self._count += 1
        return self._count - 1

    def __getitem__(self, position: int) -> str:
        start = int(self._ends[position - 1]) if position else 0
        return self._data[start : int(self._ends[position])].decode(errors="replace")

    def keep(self, positions: np.ndarray) -> _Strings:
        kept = _Strings(self.max_bytes)
        for position in positions:
            kept.append(self[int(position)])
        return kept

    @property
    def nbytes(self) -> int:
        return len(self._data) + self._ends.nbytes


class DedupState:
    """Exact (MD5) and near (PDQ within ``max_distance``) lookup over this shard's verdicts."""

    def __init__(self, max_distance: int, max_images: int | None = None, max_age_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_distance = max_distance
        self.max_images = max_images
        self.max_age_s = max_age_s
        self.clock = clock
        self.models: list[str] = [""]
        self._model_codes: dict[str, int] = {"": 0}
        self._entries = _Columns({
            "md5": (np.uint8, (16,)), "quality": (np.uint8, ()), "action": (np.uint8, ()),
            "label": (np.uint8, ()), "reviewed": (np.bool_, ()), "score": (np.float64, ()),
            "knn": (np.float64, ()), "cnn": (np.float64, ()), "event": (np.uint64, ()),
            "model": (np.uint16, ()), "added": (np.float64, ()),
        })
        self._entry_ids = _Strings()
        self._entry_keys = KeyTable()
        self._near = HashIndex(max_distance)
        self._images = _Columns({
            "md5": (np.uint8, (16,)), "pdq": (np.uint64, (WORDS,)), "quality": (np.uint8, ()),
            "histogram": (np.uint8, (64,)), "added": (np.float64, ()),
        })
        self._image_ids = _Strings()
        self._image_keys = KeyTable()
        self.image_reviews: dict[str, str] = {}  # image_id -> label, for reviews of unseen images
        self.evicted = 0

    # -- verdicts --------------------------------------------------------------------------------

    def lookup(self, md5: str | None, pdq_variants: Sequence[int] = (), pdq_quality: int = 0,
               image_id: str | None = None) -> Match | None:
        """The match whose verdict this image should reuse.

        A human decision wins over a model verdict: a reviewed near duplicate
        beats an unreviewed exact one. Otherwise exact beats near, and the
        nearest near match wins. ``md5`` None skips the exact lookup (another
        shard owns it); an empty ``pdq_variants`` skips near matching.
        """
        candidates: list[Match] = []
        row = self._entry_row(md5) if md5 else None
        if row is not None:
            candidates.append(Match("exact", self._entry(row), 0))
        label = self.image_reviews.get(image_id) if image_id else None
        if label is not None:
            pdq = pdq_hex_of_int(pdq_variants[0]) if pdq_variants else "0" * 64
            base = Entry(md5=md5 or "", pdq=pdq, pdq_quality=pdq_quality, image_id=image_id or "", event_key=0,
                         action="", label=label, score=0.0)
            candidates.append(Match("image_review", reviewed_entry(base, label), 0))
        if pdq_variants and near_matchable(pdq_quality):
            near = self.nearest(pdq_variants, exclude=row)
            if near is not None:
                candidates.append(Match("near", self._entry(near[0]), near[1]))
        return min(candidates, key=match_rank) if candidates else None

    def nearest(self, pdq_variants: Sequence[int], exclude: int | None = None) -> tuple[int, int] | None:
        """(row, distance) of the best near-matchable entry for any variant: reviewed first, then nearest."""
        best: tuple[tuple[bool, int, int], int, int] | None = None
        for variant in pdq_variants:
            ids, distances = self._near.query_arrays(to_words(variant), self.max_distance)
            for row, distance in zip(ids.tolist(), distances.tolist(), strict=True):
                if row == exclude or not near_matchable(int(self._entries["quality"][row])):
                    continue
                rank = (not bool(self._entries["reviewed"][row]), distance, row)
                if best is None or rank < best[0]:
                    best = (rank, row, distance)
        return (best[1], best[2]) if best else None

    def get(self, md5: str) -> Entry | None:
        row = self._entry_row(md5)
        return None if row is None else self._entry(row)

    def _entry_row(self, md5: str) -> int | None:
        """The row of this MD5; the key table holds a 64-bit fold of it, so the MD5 is checked here."""
        row = self._entry_keys.get(_md5_key(md5))
        if row is None or self._entries["md5"][row].tobytes().hex() != md5:
            return None
        return row

    def remember(self, entry: Entry, keep_reviewed: bool = True) -> Entry:
        """Store a verdict; a model verdict never overwrites a human one."""
        row = self._entry_row(entry.md5)
        if row is not None:
            if keep_reviewed and bool(self._entries["reviewed"][row]) and not entry.reviewed:
                return self._entry(row)
            self._write_entry(row, entry)
            return entry
        row = self._entries.append()
        self._entry_ids.append(entry.image_id)
        self._write_entry(row, entry)
        self._entries["md5"][row] = np.frombuffer(bytes.fromhex(entry.md5), dtype=np.uint8)
        self._entry_keys.put(_md5_key(entry.md5), row)
        self._near.add(pdq_to_int(entry.pdq))
        self._enforce_limits()
        return entry

    def load(self, entries: Sequence[Entry], images: Sequence[ImageRecord]) -> None:
        """Apply changelog records in order, as remember(keep_reviewed=False) and remember_image
        would, but with the rows of new keys written in bulk: restoring a million images then
        costs seconds, not minutes. Records for keys already present take the one-by-one path."""
        latest_entries = {entry.md5: entry for entry in entries}  # the log's last word per key
        fresh = [entry for md5, entry in latest_entries.items() if self._entry_row(md5) is None]
        for md5, entry in latest_entries.items():
            if self._entry_row(md5) is not None:
                self.remember(entry, keep_reviewed=False)
        if fresh:
            self._load_entries(fresh)
        latest_images = {image.image_id: image for image in images}
        for image in latest_images.values():
            if self._image_keys.get(digest64(image.image_id)) is not None:
                self.remember_image(image)
        fresh_images = [image for image in latest_images.values()
                        if self._image_keys.get(digest64(image.image_id)) is None]
        if fresh_images:
            self._load_images(fresh_images)
        self._enforce_limits(force_age_check=True)

    def _load_entries(self, entries: list[Entry]) -> None:
        rows = self._entries.extend(len(entries))
        columns, now = self._entries, self.clock()
        columns["md5"][rows] = np.frombuffer(bytes.fromhex("".join(e.md5 for e in entries)),
                                             dtype=np.uint8).reshape(-1, 16)
        columns["quality"][rows] = [e.pdq_quality for e in entries]
        columns["action"][rows] = [ACTIONS.index(e.action) if e.action in ACTIONS else 0 for e in entries]
        columns["label"][rows] = [LABELS.index(e.label) for e in entries]
        columns["reviewed"][rows] = [e.reviewed for e in entries]
        columns["score"][rows] = [e.score for e in entries]
        columns["knn"][rows] = [_nan_if_none(e.signals.get("knn")) for e in entries]
        columns["cnn"][rows] = [_nan_if_none(e.signals.get("cnn")) for e in entries]
        columns["event"][rows] = np.array([e.event_key for e in entries], dtype=np.uint64)
        columns["model"][rows] = [self._model_code(e.model_version) for e in entries]
        columns["added"][rows] = [e.added_s or now for e in entries]
        for entry in entries:
            self._entry_ids.append(entry.image_id)
        self._near.add_words(_hex_to_words([e.pdq for e in entries]))
        self._entry_keys.rebuild(_md5_keys(columns["md5"][: columns.count]))

    def _load_images(self, images: list[ImageRecord]) -> None:
        rows = self._images.extend(len(images))
        columns = self._images
        columns["md5"][rows] = np.frombuffer(bytes.fromhex("".join(i.md5 for i in images)),
                                             dtype=np.uint8).reshape(-1, 16)
        columns["pdq"][rows] = _hex_to_words([i.pdq for i in images])
        columns["quality"][rows] = [i.pdq_quality for i in images]
        columns["histogram"][rows] = np.array([i.histogram for i in images], dtype=np.uint8)
        columns["added"][rows] = self.clock()
        first = rows.start
        for offset, image in enumerate(images):
            self._image_ids.append(image.image_id)
            self._image_keys.put(digest64(image.image_id), first + offset)

    def _write_entry(self, row: int, entry: Entry) -> None:
        columns = self._entries
        columns["quality"][row] = entry.pdq_quality
        columns["action"][row] = ACTIONS.index(entry.action) if entry.action in ACTIONS else 0
        columns["label"][row] = LABELS.index(entry.label)
        columns["reviewed"][row] = entry.reviewed
        columns["score"][row] = entry.score
        columns["knn"][row] = _nan_if_none(entry.signals.get("knn"))
        columns["cnn"][row] = _nan_if_none(entry.signals.get("cnn"))
        columns["event"][row] = np.uint64(entry.event_key)
        columns["model"][row] = self._model_code(entry.model_version)
        columns["added"][row] = entry.added_s or self.clock()

    def _entry(self, row: int) -> Entry:
        columns = self._entries
        signals = {"knn": _none_if_nan(columns["knn"][row]), "cnn": _none_if_nan(columns["cnn"][row])}
        reviewed = bool(columns["reviewed"][row])
        return Entry(
            md5=columns["md5"][row].tobytes().hex(), pdq=_words_to_hex(self._near.words(row)),
            pdq_quality=int(columns["quality"][row]), image_id=self._entry_ids[row],
            event_key=int(columns["event"][row]), action=ACTIONS[int(columns["action"][row])],
            label=LABELS[int(columns["label"][row])], score=float(columns["score"][row]), reviewed=reviewed,
            signals={} if reviewed else signals, model_version=self.models[int(columns["model"][row])],
            added_s=float(columns["added"][row]))

    def _model_code(self, model_version: str) -> int:
        code = self._model_codes.get(model_version)
        if code is None:
            code = self._model_codes[model_version] = len(self.models)
            self.models.append(model_version)
        return code

    # -- images ----------------------------------------------------------------------------------

    def remember_image(self, record: ImageRecord) -> bool:
        """Store an image's hashes; False when it is already known as is (nothing to log)."""
        key = digest64(record.image_id)
        row = self._image_keys.get(key)
        if row is not None and self.image(record.image_id) == record:
            return False
        if row is None:
            row = self._images.append()
            self._image_ids.append(record.image_id)
            self._image_keys.put(key, row)
        columns = self._images
        columns["md5"][row] = np.frombuffer(bytes.fromhex(record.md5), dtype=np.uint8)
        columns["pdq"][row] = to_words(pdq_to_int(record.pdq))
        columns["quality"][row] = record.pdq_quality
        columns["histogram"][row] = record.histogram
        columns["added"][row] = self.clock()
        self._enforce_limits()
        return True

    def image(self, image_id: str) -> ImageRecord | None:
        row = self._image_keys.get(digest64(image_id))
        if row is None:
            return None
        columns = self._images
        return ImageRecord(image_id=image_id, md5=columns["md5"][row].tobytes().hex(),
                           pdq=_words_to_hex(columns["pdq"][row]), pdq_quality=int(columns["quality"][row]),
                           histogram=[int(v) for v in columns["histogram"][row]])

    def review_image_id(self, image_id: str, label: str) -> None:
        self.image_reviews[image_id] = label

    def image_count(self) -> int:
        return self._images.count

    def __len__(self) -> int:
        return self._entries.count

    @property
    def nbytes(self) -> int:
        """Bytes held by both tables and their indexes (array capacity included)."""
        return (self._entries.nbytes + self._entry_ids.nbytes + self._entry_keys.nbytes + self._near.nbytes
                + self._images.nbytes + self._image_ids.nbytes + self._image_keys.nbytes)

    # -- retention -------------------------------------------------------------------------------

    def _enforce_limits(self, force_age_check: bool = False) -> None:
        now = self.clock()
        for table in ("entries", "images"):
            count = len(self) if table == "entries" else self.image_count()
            over_size = self.max_images is not None and count > self.max_images
            columns = self._entries if table == "entries" else self._images
            over_age = False
            if self.max_age_s is not None and count and (force_age_check or count % _AGE_CHECK_EVERY == 0):
                over_age = now - float(columns["added"][:count].min()) > self.max_age_s
            if over_size or over_age:
                self._evict(table, now)

    def _evict(self, table: str, now: float) -> None:
        """Drop aged rows, and the oldest rows beyond the limit (unreviewed ones first), then rebuild."""
        columns = self._entries if table == "entries" else self._images
        count = columns.count
        added = columns["added"][:count]
        protected = columns["reviewed"][:count] if table == "entries" else np.zeros(count, dtype=bool)
        keep = np.ones(count, dtype=bool)
        if self.max_age_s is not None:
            keep &= protected | (now - added <= self.max_age_s)
        if self.max_images is not None:
            target = max(1, int(self.max_images * (1 - EVICT_SHARE)))
            order = np.lexsort((added, protected))  # unreviewed first, oldest first
            excess = int(keep.sum()) - target
            if excess > 0:
                drop = order[keep[order]][:excess]
                keep[drop] = False
        rows = np.flatnonzero(keep)
        self.evicted += count - len(rows)
        if table == "entries":
            words = self._near.words(rows)
            columns.keep(rows)
            self._entry_ids = self._entry_ids.keep(rows)
            self._near = HashIndex(self.max_distance)
            self._near.add_words(np.ascontiguousarray(words))
            self._entry_keys.rebuild(_md5_keys(columns["md5"][: len(rows)]))
        else:
            self._image_ids = self._image_ids.keep(rows)
            columns.keep(rows)
            self._image_keys.rebuild(np.array([digest64(self._image_ids[i]) for i in range(len(rows))],
                                              dtype=np.uint64))


class BankIndex:
    """One shard's copy of every hash bank: MD5 and PDQ entries, looked up before anything else."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self.entries: dict[tuple[str, str, str], BankEntryValue] = {}  # (bank, kind, hash) -> value
        self._md5: dict[str, list[tuple[str, str]]] = {}
        self._pdq_words = np.empty((0, WORDS), dtype=np.uint64)
        self._pdq_keys: list[tuple[str, str]] = []
        self._dirty = False

    def put(self, bank: str, kind: str, hash_hex: str, value: BankEntryValue | None) -> None:
        """Add or replace one entry; None removes it (a tombstone)."""
        key = (bank, kind, hash_hex)
        if value is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = value
        self._dirty = True

    def remove_bank(self, bank: str) -> None:
        for key in [key for key in self.entries if key[0] == bank]:
            del self.entries[key]
        self._dirty = True

    def _rebuild(self) -> None:
        """Banks change rarely and hold few entries next to the verdicts, so a change rebuilds them."""
        self._md5 = {}
        pdq_keys: list[tuple[str, str]] = []
        pdq_values: list[int] = []
        for bank, kind, hash_hex in self.entries:
            if kind == "md5":
                self._md5.setdefault(hash_hex, []).append((bank, hash_hex))
            else:
                pdq_keys.append((bank, hash_hex))
                pdq_values.append(pdq_to_int(hash_hex))
        self._pdq_keys = pdq_keys
        self._pdq_words = ints_to_words(pdq_values)
        self._dirty = False

    def lookup(self, md5: str, pdq_variants: Sequence[int],
               pdq_quality: int) -> tuple[BankHit, BankEntryValue, int] | None:
        """The bank entry this image matches: by MD5 (distance 0) or the nearest PDQ within the distance.

        Banks are linear-scanned: they are small next to the remembered verdicts (a million PDQs
        scan in ~35 ms; index them with HashIndex if banks grow beyond that)."""
        if self._dirty:
            self._rebuild()
        hits = [(0, bank, "md5", hash_hex) for bank, hash_hex in self._md5.get(md5, [])]
        if pdq_variants and near_matchable(pdq_quality) and len(self._pdq_keys):
            for variant in pdq_variants:
                distances = distances_to(self._pdq_words, to_words(variant))
                for position in np.flatnonzero(distances <= self.max_distance):
                    bank, hash_hex = self._pdq_keys[position]
                    hits.append((int(distances[position]), bank, "pdq", hash_hex))
        if not hits:
            return None
        distance, bank, kind, hash_hex = min(hits)
        value = self.entries[(bank, kind, hash_hex)]
        return BankHit(bank, value.entry_id), value, distance

    def names(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for bank, _, _ in self.entries:
            counts[bank] = counts.get(bank, 0) + 1
        return counts


@dataclass(frozen=True)
class BankEntryValue:
    """What a bank says about its hashes: the label and action a match gets, and the list's own id."""

    label: str
    action: str
    entry_id: str | None = None


def bank_match(md5: str, pdq_variants: Sequence[int], pdq_quality: int, banks: BankIndex) -> Match | None:
    found = banks.lookup(md5, pdq_variants, pdq_quality)
    if found is None:
        return None
    hit, value, distance = found
    pdq = pdq_hex_of_int(pdq_variants[0]) if pdq_variants else "0" * 64
    entry = Entry(md5=md5, pdq=pdq, pdq_quality=pdq_quality, image_id="", event_key=0, action=value.action,
                  label=value.label, score=1.0 if value.label == "adult" else 0.0, signals={})
    return Match("bank", entry, distance, hit)


def _md5_key(md5: str) -> int:
    """Both halves of the MD5 folded into the 64-bit table key (the row's full MD5 is checked)."""
    return int(md5[:16], 16) ^ int(md5[16:], 16)


def _md5_keys(md5s: np.ndarray) -> np.ndarray:
    halves = np.ascontiguousarray(md5s).view(">u8").astype(np.uint64)
    return halves[:, 0] ^ halves[:, 1]


def _hex_to_words(hexes: list[str]) -> np.ndarray:
    """64-hex-digit PDQs as an (n, 4) uint64 array, most significant word first."""
    for text in hexes:
        pdq_to_int(text)  # validates
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").reshape(-1, WORDS).astype(np.uint64)


def _words_to_hex(words: np.ndarray) -> str:
    return "".join(f"{int(word):016x}" for word in words)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _none_if_nan(value: np.floating) -> float | None:
    return None if np.isnan(value) else float(value)
