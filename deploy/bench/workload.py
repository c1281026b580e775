"""The pipeline suite's generated workload: JPEG files in a folder, published by file://
URI as producers of large images do (100 KB records consume at only ~20-100/s with kafka-python)."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.bundle import Bundle, load_bundle, write_manifest
from common.messages import UploadEvent
from deploy.bench.synthetic import HistogramSource, jpeg, photo, resized_jpeg

COPY_LAG = 3  # in the paced mix a copy follows its original by this many events
WARMUP_IMAGES = 8  # joins the consumer group, opens the Serve route, runs the first model batches


@dataclass(frozen=True)
class Workload:
    """Events for the three phases: unique images, then copies of them (at full load), then a
    fresh mix of both in the same proportion (paced at half load); warm-up images go first.
    ``more_unique`` are further rounds of as many fresh unique images, so the unique phase can
    be repeated in one run (a repeat of the same images would only find copies)."""

    warmup: list[UploadEvent]
    unique: list[UploadEvent]
    duplicates: list[UploadEvent]
    mixed: list[UploadEvent]
    more_unique: tuple[list[UploadEvent], ...] = ()

    @property
    def unique_rounds(self) -> tuple[list[UploadEvent], ...]:
        return (self.unique, *self.more_unique)

    @property
    def full_load(self) -> list[UploadEvent]:
        return self.unique + self.duplicates


class WorkloadWriter:
    """Writes each image once; copies reuse (exact) or shrink (near) the original's file."""

    def __init__(self, folder: Path, size: tuple[int, int], seed: int) -> None:
        self.folder, self.size = folder, size
        self.rng = np.random.default_rng(seed)
        self.paths: dict[str, Path] = {}

    def unique(self, image_id: str) -> UploadEvent:
        path = self.folder / f"{image_id}.jpg"
        path.write_bytes(jpeg(photo(self.rng, *self.size)))
        return self._event(image_id, path)

    def copy_of(self, original: UploadEvent, image_id: str, near: bool) -> UploadEvent:
        """An exact copy (the same bytes under a new id) or a near one (resized to half)."""
        source = self.paths[original.image_id]
        if not near:
            return self._event(image_id, source)
        path = self.folder / f"{image_id}.jpg"
        with Image.open(source) as image:
            path.write_bytes(resized_jpeg(image.convert("RGB"), 0.5))
        return self._event(image_id, path)

    def _event(self, image_id: str, path: Path) -> UploadEvent:
        self.paths[image_id] = path
        return UploadEvent(event_id=str(uuid.uuid4()), image_id=image_id, uri=path.resolve().as_uri())


def build_workload(folder: Path, images: int, dup_ratio: float, size: tuple[int, int], seed: int,
                   unique_rounds: int = 1) -> Workload:
    """images events at full load (unique first, then copies, alternating exact and near),
    then images / 2 more in the same mix, each copy COPY_LAG events after its original; the
    unique images come in unique_rounds rounds of fresh images (the copies are of the first)."""
    writer = WorkloadWriter(folder, size, seed)
    warmup = [writer.unique(f"w{i:05d}") for i in range(WARMUP_IMAGES)]
    copies = round(images * dup_ratio)
    unique = [writer.unique(f"u{i:05d}") for i in range(images - copies)]
    duplicates = [writer.copy_of(unique[original], f"d{i:05d}", near=i % 2 == 1)
                  for i, original in enumerate(writer.rng.integers(0, len(unique), copies))]
    mixed_unique = [writer.unique(f"m{i:05d}") for i in range(max(1, len(unique) // 2))]
    after: dict[int, list[UploadEvent]] = {}
    for i, original in enumerate(np.sort(writer.rng.integers(0, len(mixed_unique), copies // 2))):
        copy = writer.copy_of(mixed_unique[original], f"c{i:05d}", near=i % 2 == 1)
        after.setdefault(min(int(original) + COPY_LAG, len(mixed_unique) - 1), []).append(copy)
    mixed = [event for i, original in enumerate(mixed_unique) for event in (original, *after.get(i, []))]
    more_unique = tuple([writer.unique(f"r{round_}-{i:05d}") for i in range(len(unique))]
                        for round_ in range(1, unique_rounds))
    return Workload(warmup, unique, duplicates, mixed, more_unique)


def bundle_with_references(base: Bundle, folder: Path, references: int,
                           seed: int) -> tuple[Bundle, np.ndarray]:
    """A copy of base whose kNN index also holds references synthetic labelled histograms, so
    that the kNN stage does the work it does in production (the default bundle has none),
    and those histograms (the naive loop searches them by brute force)."""
    shutil.copytree(base.path, folder)
    index = base.load_references()
    histograms = HistogramSource(seed).sample(references)
    index.add(histograms, np.random.default_rng(seed).integers(0, 2, references).tolist())
    index.save(folder / base.manifest["knn"]["path"])
    manifest = json.loads(json.dumps(base.manifest))
    manifest["id"] = f"{base.id}-bench{references}"
    manifest["knn"]["references"] = len(index)
    write_manifest(folder, manifest)
    return load_bundle(folder), histograms
