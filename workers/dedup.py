"""Dedup shard actors: method 1 of the talk (same bytes or a resized copy get
the earlier verdict without any model work), with state sharded by hash so it
scales out, and a changelog so it survives restarts."""

from __future__ import annotations

from typing import Any

import ray

from common.changelog import Changelog
from common.config import Settings
from common.dedupstate import DedupState, Entry, ImageRecord, Match, match_rank, reviewed_entry, shard_of

Query = tuple[str, str, bool, str]  # md5, phash, phash_reliable, image_id


def dedup_topic(settings: Settings) -> str:
    return f"{settings.topics.state_prefix}.dedup"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class DedupShard:
    """Owns the entries whose MD5, and the images whose id, hash to ``shard``."""

    def __init__(self, settings: Settings, shard: int, shards: int) -> None:
        self.settings = settings
        self.shard, self.shards = shard, shards
        self.state = DedupState(self.settings.pipeline.phash_max_distance)
        self.changelog = Changelog(self.settings, dedup_topic(self.settings))
        self._restore()

    def _owns(self, key: str) -> bool:
        return shard_of(key, self.shards) == self.shard

    def _restore(self) -> None:
        """Rebuild from the changelog before serving (Ray calls wait for __init__)."""
        for key, value in self.changelog.replay():
            kind, _, ident = key.partition(":")
            if kind == "entry" and self._owns(ident):
                self.state.remember(Entry.from_dict(value), keep_reviewed=False)
            elif kind == "image" and self._owns(ident):
                self.state.remember_image(ImageRecord(**value))
            elif kind == "imagereview" and self._owns(ident):
                self.state.review_image_id(ident, value["label"])

    def stats(self) -> dict[str, int]:
        return {"shard": self.shard, "entries": len(self.state), "images": len(self.state.images)}

    def lookup_many(self, queries: list[Query]) -> list[Match | None]:
        """Best local match per query; the caller merges the answers of all shards."""
        return [self.state.lookup(*query) for query in queries]

    def remember_many(self, entries: list[Entry], images: list[ImageRecord]) -> None:
        """Log, then apply: a verdict is only remembered once it is durable."""
        entries = [entry for entry in entries if self._owns(entry.md5)]
        images = [image for image in images if self._owns(image.image_id)]
        records = [(f"entry:{e.md5}", e.to_dict()) for e in entries if self._is_new_knowledge(e)]
        records += [(f"image:{i.image_id}", i.__dict__) for i in images]
        self.changelog.append(records)
        for entry in entries:
            self.state.remember(entry)
        for image in images:
            self.state.remember_image(image)

    def _is_new_knowledge(self, entry: Entry) -> bool:
        current = self.state.entries.get(entry.md5)
        return current is None or (entry.reviewed or not current.reviewed) and current != entry

    def image(self, image_id: str) -> ImageRecord | None:
        return self.state.images.get(image_id)

    def apply_review(self, md5: str, phash: str, phash_reliable: bool, image_id: str, label: str) -> Entry:
        """A human label overrides this image's verdict, and so its duplicates'."""
        base = self.state.entries.get(md5) or Entry(
            md5=md5, phash=phash, phash_reliable=phash_reliable, image_id=image_id, event_id="review",
            action="", label=label, score=0.0)
        entry = reviewed_entry(base, label)
        self.changelog.append([(f"entry:{md5}", entry.to_dict())])
        return self.state.remember(entry, keep_reviewed=False)

    def review_image_id(self, image_id: str, label: str) -> None:
        """Remember a label for an image id, for uploads of it that come later."""
        self.changelog.append([(f"imagereview:{image_id}", {"label": label})])
        self.state.review_image_id(image_id, label)


def best_match(answers: list[Match | None]) -> Match | None:
    """The best of the shards' answers by the same rule as within a shard (ties: lowest shard)."""
    found = [(match_rank(m), i, m) for i, m in enumerate(answers) if m is not None]
    return min(found, key=lambda item: item[:2])[2] if found else None


def lookup_all(shards: list[Any], queries: list[Query]) -> list[Match | None]:
    """Fan the batch out to every shard in parallel and merge per query."""
    if not queries:
        return []
    per_shard = ray.get([shard.lookup_many.remote(queries) for shard in shards])
    return [best_match([answers[i] for answers in per_shard]) for i in range(len(queries))]
