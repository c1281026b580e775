"""``modstream data check``: clean a dataset, find duplicates and leakage, split it.

What goes wrong with scraped image sets: dead links that all
return the same placeholder image, files that do not decode, the same photo
several times, and above all the same photo (or a resized copy) in both the
training and the test split, which makes every metric lie. Each image is
hashed exactly as the pipeline hashes it (MD5 of the bytes, PDQ of the draft
decode), so "duplicate" means here what it means online.

What happens to each image (its ``status``):
  kept             goes into the splits
  unreadable       fetch or decode failed
  placeholder      its bytes occur ``placeholder_min`` times or more: a dead-link image, not a photo
  exact_duplicate  same bytes as a kept image in the same split
  label_conflict   its duplicate group carries both labels: nobody knows which is right
  leakage          (given splits only) a duplicate of an image in an earlier split
Near duplicates (PDQ within ``pdq_max_distance``, quality >= 50 only: the dedup rule) are
kept but grouped, and a group never spans splits.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.features import extract_features, near_matchable, pdq_to_int
from common.fetch import LoadLimits
from common.hashindex import HashIndex
from common.loaderrors import LoadError
from common.messages import LABELS
from workers.jobs import reporting
from workers.jobs.datasets import SPLITS, Sample, load_image, read_dataset, write_split
from workers.jobs.parallel import map_chunks
from workers.jobs.splits import stratified_group_split

RECORDS_FILE = "records.jsonl"
HYGIENE_DIR = "hygiene"
DEFAULT_PLACEHOLDER_MIN = 5
SMALL_SIDE = 64  # images whose shorter side is below this carry little for a 224-px CNN
_SPLIT_RANK = {name: rank for rank, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class ScanRecord:
    """What one file turned out to be."""

    uri: str
    label: int
    split: str | None
    ok: bool
    reason: str | None = None
    md5: str | None = None
    pdq: str | None = None
    pdq_quality: int = 0
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Checked:
    """A scanned file with its verdict; group names its duplicate group (kept and duplicate files)."""

    record: ScanRecord
    status: str
    group: str | None = None
    duplicate_of: str | None = None


def scan_chunk(samples: list[Sample], limits: LoadLimits, draft: int) -> list[ScanRecord]:
    """Ray task body: hash and measure each image the way the pipeline would."""
    records = []
    for sample in samples:
        try:
            data, image, (width, height) = load_image(sample.uri, limits, draft)
        except LoadError as exc:
            records.append(ScanRecord(sample.uri, sample.label, sample.split, False, reason=str(exc)))
            continue
        features = extract_features(data, image, (width, height))
        records.append(ScanRecord(sample.uri, sample.label, sample.split, True, md5=features.md5,
                                  pdq=features.pdq, pdq_quality=features.pdq_quality,
                                  width=width, height=height))
    return records


class _Groups:
    """Union-find over record positions; the smallest position leads its group."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, left: int, right: int) -> None:
        a, b = self.find(left), self.find(right)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def analyse(records: Sequence[ScanRecord], placeholder_min: int, max_distance: int) -> list[Checked]:
    """A verdict for every record (see the module docstring), in record order."""
    md5_counts = Counter(record.md5 for record in records if record.ok)
    placeholders = {md5 for md5, count in md5_counts.items() if count >= placeholder_min}
    usable = [i for i, record in enumerate(records) if record.ok and record.md5 not in placeholders]
    groups = _Groups(len(records))
    first_of_md5: dict[str, int] = {}
    for i in usable:
        groups.union(first_of_md5.setdefault(records[i].md5, i), i)  # type: ignore[arg-type]
    index = HashIndex(max_distance)
    near_positions: list[int] = []  # index id -> record position
    for i in first_of_md5.values():
        if near_matchable(records[i].pdq_quality):
            hash_int = pdq_to_int(records[i].pdq)  # type: ignore[arg-type]
            for position, _ in index.query(hash_int):
                groups.union(near_positions[position], i)
            index.add(hash_int)
            near_positions.append(i)

    members: dict[int, list[int]] = defaultdict(list)
    for i in usable:
        members[groups.find(i)].append(i)
    checked: list[Checked | None] = [None] * len(records)
    for i, record in enumerate(records):
        if not record.ok:
            checked[i] = Checked(record, "unreadable")
        elif record.md5 in placeholders:
            checked[i] = Checked(record, "placeholder")
    for items in members.values():
        group = records[min(items, key=lambda i: records[i].md5)].md5  # order-free name
        if len({records[i].label for i in items}) > 1:
            for i in items:
                checked[i] = Checked(records[i], "label_conflict", group)
            continue
        ordered = sorted(items, key=lambda i: (_SPLIT_RANK.get(records[i].split, -1), i))
        home = records[ordered[0]]
        kept_md5: dict[str, str] = {}
        for i in ordered:
            record = records[i]
            if record.split != home.split:
                checked[i] = Checked(record, "leakage", group, home.uri)
            elif record.md5 in kept_md5:
                checked[i] = Checked(record, "exact_duplicate", group, kept_md5[record.md5])
            else:
                kept_md5[record.md5] = record.uri  # type: ignore[index]
                checked[i] = Checked(record, "kept", group)
    return checked  # type: ignore[return-value]


def split_kept(checked: Sequence[Checked], fractions: Sequence[float], seed: int) -> dict[str, list[Sample]]:
    """Kept images by split: the given splits, or new stratified group splits."""
    kept = [item for item in checked if item.status == "kept"]
    given = [item.record.split for item in kept]
    if any(split is None for split in given):
        given = stratified_group_split([item.record.label for item in kept], [item.group for item in kept],
                                       fractions, seed)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for item, split in zip(kept, given, strict=True):
        record = item.record
        splits[split].append(Sample(record.uri, record.label, split, record.md5, item.group))
    return splits


def summarise(checked: Sequence[Checked], splits: dict[str, list[Sample]]) -> dict[str, Any]:
    """The numbers of the hygiene report."""
    statuses = Counter(item.status for item in checked)
    readable = [item.record for item in checked if item.record.ok]
    widths = np.array([record.width for record in readable] or [0])
    heights = np.array([record.height for record in readable] or [0])
    md5s_of_group: dict[str, set[str]] = defaultdict(set)
    for item in checked:
        if item.group is not None:
            md5s_of_group[item.group].add(item.record.md5)  # type: ignore[arg-type]
    near = sum(1 for item in checked if item.group is not None and len(md5s_of_group[item.group]) > 1)
    by_split_before = Counter((item.record.split or "all", LABELS[item.record.label]) for item in checked)
    return {
        "files": len(checked),
        "status": dict(sorted(statuses.items())),
        "unreadable_reasons": dict(Counter(item.record.reason.split(":")[0] for item in checked
                                           if not item.record.ok)),  # type: ignore[union-attr]
        "placeholder_hashes": sorted({item.record.md5 for item in checked if item.status == "placeholder"}),
        "images_in_near_duplicate_groups": near,
        "leakage": [{"image": item.record.uri, "split": item.record.split, "duplicate_of": item.duplicate_of}
                    for item in checked if item.status == "leakage"],
        "classes_before": {split: {label: count for (s, label), count in by_split_before.items() if s == split}
                           for split in sorted({s for s, _ in by_split_before})},
        "classes_after": {split: dict(Counter(sample.label_name for sample in samples))
                          for split, samples in splits.items()},
        "leakage_after_split": _leakage_between(splits),
        "image_size": {
            "width": _quantiles(widths), "height": _quantiles(heights),
            f"shorter_side_below_{SMALL_SIDE}": int((np.minimum(widths, heights) < SMALL_SIDE).sum()),
        },
    }


def _quantiles(values: np.ndarray) -> dict[str, int]:
    points = {"min": 0, "p05": 5, "median": 50, "p95": 95, "max": 100}
    return {name: round(float(np.percentile(values, q))) for name, q in points.items()}


def _leakage_between(splits: dict[str, list[Sample]]) -> int:
    """Duplicate groups found in more than one split after splitting: zero by construction, checked anyway."""
    homes: dict[str, set[str]] = defaultdict(set)
    for split, samples in splits.items():
        for sample in samples:
            homes[sample.group].add(split)  # type: ignore[index]
    return sum(1 for found in homes.values() if len(found) > 1)


def write_report(folder: Path, summary: dict[str, Any], checked: Sequence[Checked], placeholder_min: int) -> None:
    """report.md, hygiene.json and the two plots."""
    folder.mkdir(parents=True, exist_ok=True)
    reporting.write_json(folder / "hygiene.json", summary)
    readable = [item.record for item in checked if item.record.ok]
    reporting.plot_class_distribution(folder / "class_distribution.png", summary["classes_after"])
    reporting.plot_image_sizes(folder / "image_sizes.png", [r.width for r in readable], [r.height for r in readable])
    status_rows = [(status, count) for status, count in summary["status"].items()]
    class_rows = [(split, *(counts.get(label, 0) for label in LABELS))
                  for split, counts in summary["classes_after"].items()]
    before_rows = [(split, *(counts.get(label, 0) for label in LABELS))
                   for split, counts in summary["classes_before"].items()]
    size = summary["image_size"]
    size_rows = [(axis, *size[axis].values()) for axis in ("width", "height")]
    leakage = summary["leakage"]
    lines = [
        "# Dataset hygiene", "",
        f"{summary['files']} files scanned.", "",
        reporting.markdown_table(["status", "files"], status_rows), "",
        (f"Unreadable by reason: {summary['unreadable_reasons'] or 'none'}. "
         f"Placeholder files: {summary['status'].get('placeholder', 0)} "
         f"({len(summary['placeholder_hashes'])} distinct image(s) repeated {placeholder_min}+ times). "
         f"Images in near-duplicate groups: {summary['images_in_near_duplicate_groups']}."), "",
        "## Leakage across the given splits", "",
        (reporting.markdown_table(["image", "split", "duplicate of"],
                                  [(row["image"], row["split"], row["duplicate_of"]) for row in leakage[:50]])
         if leakage else "None found."),
        "" if len(leakage) <= 50 else f"\n({len(leakage) - 50} more in hygiene.json)",
        f"Duplicate groups spanning splits after splitting: {summary['leakage_after_split']}.", "",
        "## Class distribution", "",
        "As found:", "", reporting.markdown_table(["split", *LABELS], before_rows), "",
        "After cleaning and splitting:", "", reporting.markdown_table(["split", *LABELS], class_rows), "",
        "![class distribution](class_distribution.png)", "",
        "## Image sizes (stored pixels)", "",
        reporting.markdown_table(["axis", "min", "p05", "median", "p95", "max"], size_rows), "",
        f"Shorter side below {SMALL_SIDE} px: {size[f'shorter_side_below_{SMALL_SIDE}']} images.", "",
        "![image sizes](image_sizes.png)", "",
    ]
    (folder / "report.md").write_text("\n".join(lines))


def write_records(path: Path, checked: Sequence[Checked]) -> None:
    """Every scanned file with its verdict, in dataset order (eval measures the dedup effect on it)."""
    with path.open("w") as file:
        for item in checked:
            row = {**asdict(item.record), "label": LABELS[item.record.label], "status": item.status,
                   "group": item.group, "duplicate_of": item.duplicate_of}
            file.write(json.dumps(row, sort_keys=True) + "\n")


def read_records(path: Path) -> list[ScanRecord]:
    fields = set(ScanRecord.__dataclass_fields__)
    records = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        records.append(ScanRecord(**{**{k: v for k, v in row.items() if k in fields},
                                     "label": LABELS.index(row["label"])}))
    return records


def scan(samples: Sequence[Sample], limits: LoadLimits, draft: int) -> list[ScanRecord]:
    return map_chunks(scan_chunk, samples, limits, draft, desc="scan")


def run_check(dataset: str | Path, out: Path, limits: LoadLimits, draft: int, max_distance: int,
              fractions: Sequence[float], seed: int, placeholder_min: int) -> dict[str, Any]:
    """Scan, judge, split and report; returns the summary also written to hygiene/hygiene.json."""
    records = scan(read_dataset(dataset), limits, draft)
    checked = analyse(records, placeholder_min, max_distance)
    splits = split_kept(checked, fractions, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in splits.items():
        write_split(out, name, samples)
    write_records(out / RECORDS_FILE, checked)
    summary = summarise(checked, splits)
    summary["settings"] = {"dataset": str(dataset), "seed": seed, "fractions": list(fractions),
                           "placeholder_min": placeholder_min, "pdq_max_distance": max_distance,
                           "draft_size": draft}
    write_report(out / HYGIENE_DIR, summary, checked, placeholder_min)
    return summary
