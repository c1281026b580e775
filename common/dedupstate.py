"""One dedup shard's state, as pure logic (the Ray actor in workers/dedup.py
wraps it with a changelog).

A shard owns the entries whose MD5 hashes to it (the remembered verdicts,
with a perceptual-hash index for near matches) and the images whose id hashes
to it (image id -> hashes and histogram, so a review naming only an image id
can find them, and reviews that arrived before their image).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from common.features import phash_to_int
from common.hashindex import HashIndex

MatchKind = Literal["exact", "near", "image_review"]


def shard_of(key: str, shards: int) -> int:
    """Stable across processes and runs (unlike ``hash()``)."""
    return zlib.crc32(key.encode()) % shards


@dataclass(frozen=True)
class Entry:
    """A remembered verdict, keyed by the MD5 of the image bytes."""

    md5: str
    phash: str
    phash_reliable: bool
    image_id: str
    event_id: str
    action: str
    label: str
    score: float
    reviewed: bool = False
    signals: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Entry:
        return cls(**value)


@dataclass(frozen=True)
class ImageRecord:
    """What a review naming only ``image_id`` needs: its hashes and histogram."""

    image_id: str
    md5: str
    phash: str
    phash_reliable: bool
    histogram: list[float]


@dataclass(frozen=True)
class Match:
    kind: MatchKind
    entry: Entry
    distance: int


_KIND_RANK = {"exact": 0, "image_review": 1, "near": 2}


def match_rank(match: Match) -> tuple[bool, int, int]:
    """Sort key: reviewed first, then exact, a review of the image id, near; then distance."""
    return (not match.entry.reviewed, _KIND_RANK[match.kind], match.distance)


REVIEW_ACTIONS = {"adult": ("block", 1.0), "normal": ("allow", 0.0)}


def reviewed_entry(base: Entry, label: str, event_id: str = "review") -> Entry:
    """The entry a human decision turns ``base`` into: final, whatever the model said."""
    action, score = REVIEW_ACTIONS[label]
    return replace(base, action=action, label=label, score=score, reviewed=True, event_id=event_id,
                   signals={})


class DedupState:
    """Exact (MD5) and near (perceptual hash within ``max_distance``) lookup."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self.entries: dict[str, Entry] = {}
        self.images: dict[str, ImageRecord] = {}
        self.image_reviews: dict[str, str] = {}  # image_id -> label, for reviews of unseen images
        self._near = HashIndex(max_distance)

    def lookup(self, md5: str, phash: str, phash_reliable: bool, image_id: str = "") -> Match | None:
        """The match whose verdict this image should reuse.

        A human decision wins over a model verdict: a reviewed near duplicate
        beats an unreviewed exact one. Otherwise exact beats near, and the
        nearest near match wins.
        """
        candidates: list[Match] = []
        entry = self.entries.get(md5)
        if entry is not None:
            candidates.append(Match("exact", entry, 0))
        label = self.image_reviews.get(image_id) if image_id else None
        if label is not None:
            base = Entry(md5=md5, phash=phash, phash_reliable=phash_reliable, image_id=image_id,
                         event_id="review", action="", label=label, score=0.0)
            candidates.append(Match("image_review", reviewed_entry(base, label), 0))
        if phash_reliable:
            candidates += [Match("near", self.entries[key], distance)
                           for key, distance in self._near.query(phash_to_int(phash)) if key != md5]
        return min(candidates, key=match_rank) if candidates else None

    def remember(self, entry: Entry, keep_reviewed: bool = True) -> Entry:
        """Store a verdict; a model verdict never overwrites a human one."""
        current = self.entries.get(entry.md5)
        if keep_reviewed and current is not None and current.reviewed and not entry.reviewed:
            return current
        self.entries[entry.md5] = entry
        if current is None and entry.phash_reliable:
            self._near.add(phash_to_int(entry.phash), entry.md5)
        return entry

    def remember_image(self, record: ImageRecord) -> None:
        self.images[record.image_id] = record

    def review_image_id(self, image_id: str, label: str) -> None:
        self.image_reviews[image_id] = label

    def __len__(self) -> int:
        return len(self.entries)
