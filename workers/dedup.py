"""Dedup shard actors: method 1 of the design (see README) (same bytes or a resized copy get
the earlier verdict without any model work), with state sharded by MD5 so it
scales out, a changelog so it survives restarts, and the hash banks.

Routing: a shard owns the MD5s and image ids that hash to it. The exact
lookup, the bank check and the verdict of an image go to its MD5's owner
only; near matching goes to every shard (a copy's MD5 says nothing about
where its original lives), and only for hashes good enough to near-match.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray

from common.banks import BankFollower
from common.changelog import Changelog
from common.config import Settings
from common.dedupstate import (
    DedupState,
    Entry,
    ImageRecord,
    Match,
    bank_match,
    match_rank,
    reviewed_entry,
    shard_of,
)
from common.features import near_matchable

RESTORE_CHUNK = 100_000  # changelog records parsed before they are applied in bulk


@dataclass(frozen=True)
class Query:
    """One image's lookup. md5 None: not this shard's MD5 (near matching only)."""

    md5: str | None
    pdq_variants: tuple[int, ...]
    pdq_quality: int
    image_id: str | None


def dedup_topic(settings: Settings) -> str:
    return f"{settings.topics.state_prefix}.dedup"


def owns_partition(shard: int, shards: int) -> Any:
    """The partitions shard reads on restore: its own share when partitions are a multiple of
    shards (crc32 % partitions % shards == crc32 % shards), else all of them."""
    def only(partition: int, partitions: int) -> bool:
        return partitions % shards != 0 or partition % shards == shard
    return only


@ray.remote(max_restarts=-1, max_task_retries=-1)
class DedupShard:
    """Owns the entries whose MD5, and the images whose id, hash to ``shard``."""

    def __init__(self, settings: Settings, shard: int, shards: int) -> None:
        self.settings = settings
        self.shard, self.shards = shard, shards
        pipeline = settings.pipeline
        self.state = DedupState(pipeline.pdq_max_distance, pipeline.dedup_max_images, pipeline.dedup_max_age_s)
        self.changelog = Changelog(self.settings, dedup_topic(self.settings))
        self.restored_records = 0
        self._restore()
        self.banks = BankFollower(settings, pipeline.pdq_max_distance)

    def _owns(self, key: str) -> bool:
        return shard_of(key, self.shards) == self.shard

    def _restore(self) -> None:
        """Rebuild from this shard's changelog partitions before serving (Ray calls wait for __init__),
        in chunks applied in bulk."""
        entries: list[Entry] = []
        images: list[ImageRecord] = []
        for key, value in self.changelog.replay(only=owns_partition(self.shard, self.shards)):
            self.restored_records += 1
            kind, _, ident = key.partition(":")
            if kind == "entry" and self._owns(ident):
                entries.append(Entry.from_dict(value))
            elif kind == "image" and self._owns(ident):
                images.append(ImageRecord(**value))
            elif kind == "imagereview" and self._owns(ident):
                self.state.review_image_id(ident, value["label"])
            if len(entries) + len(images) >= RESTORE_CHUNK:
                self.state.load(entries, images)
                entries, images = [], []
        self.state.load(entries, images)

    def stats(self) -> dict[str, Any]:
        with self.banks.lock:
            banks = self.banks.index.names()
        return {"shard": self.shard, "entries": len(self.state), "images": self.state.image_count(),
                "restored_records": self.restored_records, "evicted": self.state.evicted,
                "state_bytes": self.state.nbytes, "banks": banks}

    def lookup_many(self, queries: list[Query]) -> list[Match | None]:
        """Best local match per query, bank hits included for the MD5s this shard owns."""
        answers = []
        for query in queries:
            found = [self.state.lookup(query.md5, query.pdq_variants, query.pdq_quality, query.image_id)]
            if query.md5 is not None:
                with self.banks.lock:
                    found.append(bank_match(query.md5, query.pdq_variants, query.pdq_quality, self.banks.index))
            matches = [match for match in found if match is not None]
            answers.append(min(matches, key=match_rank) if matches else None)
        return answers

    def remember_many(self, entries: list[Entry], images: list[ImageRecord]) -> None:
        """Log, then apply: a verdict is only remembered once it is durable. Only what is new
        (a new image, a changed verdict) is logged, so a replayed batch writes nothing."""
        now = time.time()
        entries = [replace(entry, added_s=entry.added_s or now) for entry in entries
                   if self._owns(entry.md5) and self._is_new_knowledge(entry)]
        images = [image for image in images if self._owns(image.image_id) and self.state.image(image.image_id) != image]
        records = [(f"entry:{e.md5}", e.to_dict(), self.changelog.partition_for(e.md5)) for e in entries]
        records += [(f"image:{i.image_id}", i.to_dict(), self.changelog.partition_for(i.image_id)) for i in images]
        if records:
            self.changelog.append(records)
        for entry in entries:
            self.state.remember(entry)
        for image in images:
            self.state.remember_image(image)

    def _is_new_knowledge(self, entry: Entry) -> bool:
        current = self.state.get(entry.md5)
        return current is None or ((entry.reviewed or not current.reviewed) and (
            replace(current, added_s=0.0) != replace(entry, added_s=0.0)))

    def image(self, image_id: str) -> ImageRecord | None:
        return self.state.image(image_id)

    def apply_review(self, md5: str, pdq: str, pdq_quality: int, image_id: str, label: str) -> Entry:
        """A human label overrides this image's verdict, and so its duplicates'."""
        base = self.state.get(md5) or Entry(
            md5=md5, pdq=pdq, pdq_quality=pdq_quality, image_id=image_id, event_key=0,
            action="", label=label, score=0.0)
        entry = replace(reviewed_entry(base, label), added_s=time.time())
        self.changelog.append([(f"entry:{md5}", entry.to_dict(), self.changelog.partition_for(md5))])
        return self.state.remember(entry, keep_reviewed=False)

    def review_image_id(self, image_id: str, label: str) -> None:
        """Remember a label for an image id, for uploads of it that come later."""
        self.changelog.append([(f"imagereview:{image_id}", {"label": label}, self.changelog.partition_for(image_id))])
        self.state.review_image_id(image_id, label)


def best_match(answers: list[Match | None]) -> Match | None:
    """The best of the shards' answers by the same rule as within a shard (ties: lowest shard)."""
    found = [(match_rank(m), i, m) for i, m in enumerate(answers) if m is not None]
    return min(found, key=lambda item: item[:2])[2] if found else None


def lookup_all(shards: list[Any], images: Sequence[tuple[str, tuple[int, ...], int, str]]) -> list[Match | None]:
    """Route each (md5, pdq_variants, pdq_quality, image_id) to the shards that can answer it, in
    parallel, and merge per image: the MD5's owner gets the whole query, the image id's owner its
    review part, every other shard only the near part (none for a low-quality hash)."""
    if not images:
        return []
    count = len(shards)
    per_shard: list[list[tuple[int, Query]]] = [[] for _ in range(count)]
    for position, (md5, variants, quality, image_id) in enumerate(images):
        md5_owner, image_owner = shard_of(md5, count), shard_of(image_id, count)
        for shard in range(count):
            near = variants if near_matchable(quality) else ()
            query = Query(md5 if shard == md5_owner else None, near if shard != md5_owner else variants, quality,
                          image_id if shard == image_owner else None)
            if query.md5 is not None or query.image_id is not None or query.pdq_variants:
                per_shard[shard].append((position, query))
    calls = {shard: shards[shard].lookup_many.remote([query for _, query in asked])
             for shard, asked in enumerate(per_shard) if asked}
    answers: list[list[Match | None]] = [[None] * count for _ in images]
    for shard, ref in calls.items():
        for (position, _), match in zip(per_shard[shard], ray.get(ref), strict=True):
            answers[position][shard] = match
    return [best_match(per_image) for per_image in answers]
