"""Offline jobs, data side: reading datasets, hygiene (planted problems) and stratified group splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.fetch import LoadLimits
from common.messages import LABEL_IDS
from tests.synthetic_data import folder_dataset, manifest_with_leakage, scene
from workers.jobs.datasets import read_dataset, read_split
from workers.jobs.errors import JobError
from workers.jobs.hygiene import run_check
from workers.jobs.splits import parse_fractions, stratified_group_split

DRAFT = 256
PHASH_DISTANCE = 10


def check(dataset: Path, out: Path, seed: int = 0) -> dict:
    return run_check(dataset, out, LoadLimits(), DRAFT, PHASH_DISTANCE, (0.7, 0.15, 0.15), seed, placeholder_min=5)


def test_folder_csv_and_jsonl_datasets_give_label_ids(tmp_path) -> None:
    rng = np.random.default_rng(3)
    for split, label in (("train", "adult"), ("test", "normal")):
        (tmp_path / "folders" / split / label).mkdir(parents=True)
        scene(rng, label).save(tmp_path / "folders" / split / label / "a.jpg")
    samples = read_dataset(tmp_path / "folders")
    assert [(Path(s.uri).parent.name, s.label, s.split) for s in samples] == [
        ("normal", LABEL_IDS["normal"], "test"), ("adult", LABEL_IDS["adult"], "train")]

    (tmp_path / "list.csv").write_text("path,label\nfolders/train/adult/a.jpg,adult\nfolders/test/normal/a.jpg,0\n")
    from_csv = read_dataset(tmp_path / "list.csv")
    assert [s.label for s in from_csv] == [1, 0] and all(Path(s.uri).is_absolute() for s in from_csv)

    lines = [{"uri": "s3://bucket/x.jpg", "label": "Adult", "split": "val"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (only,) = read_dataset(tmp_path / "list.jsonl")
    assert (only.uri, only.label, only.split) == ("s3://bucket/x.jpg", 1, "validation")

    (tmp_path / "bad.csv").write_text("path,label\na.jpg,nsfw\n")
    with pytest.raises(JobError, match=r"bad\.csv:2: unknown label 'nsfw'"):
        read_dataset(tmp_path / "bad.csv")
    (tmp_path / "mixed.csv").write_text("path,label,split\na.jpg,adult,train\nb.jpg,normal,\n")
    with pytest.raises(JobError, match="some images have a split"):
        read_dataset(tmp_path / "mixed.csv")


def test_split_is_stratified_seeded_order_free_and_keeps_groups_whole() -> None:
    rng = np.random.default_rng(0)
    labels = [0] * 140 + [1] * 60
    groups = [f"g{i}" for i in range(200)]
    for i in range(0, 20, 2):  # ten pairs of duplicates
        groups[i + 1] = groups[i]
    for i in range(140, 150, 2):
        groups[i + 1] = groups[i]
    split = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=5)

    for label, total in ((0, 140), (1, 60)):
        counts = Counter(s for s, lab in zip(split, labels, strict=True) if lab == label)
        for name, share in (("train", 0.7), ("validation", 0.15), ("test", 0.15)):
            assert abs(counts[name] - share * total) <= 2, (label, counts)
    homes: dict[str, set[str]] = {}
    for group, name in zip(groups, split, strict=True):
        homes.setdefault(group, set()).add(name)
    assert all(len(found) == 1 for found in homes.values())

    assert stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=5) == split
    order = rng.permutation(200)
    shuffled = stratified_group_split([labels[i] for i in order], [groups[i] for i in order], (0.7, 0.15, 0.15), 5)
    assert [shuffled[list(order).index(i)] for i in range(200)] == split
    assert stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=6) != split


def test_fractions_parse_and_reject_nonsense() -> None:
    assert parse_fractions("70/15/15") == pytest.approx((0.7, 0.15, 0.15))
    assert parse_fractions("8/1/1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("70/30", "a/b/c", "0/50/50", "-1/1/1"):
        with pytest.raises(JobError):
            parse_fractions(bad)


def test_hygiene_drops_planted_junk_and_keeps_copies_in_one_split(ray_cluster, tmp_path) -> None:
    planted = folder_dataset(tmp_path / "data", seed=11)
    summary = check(tmp_path / "data", tmp_path / "work")
    status = summary["status"]
    assert status["unreadable"] == len(planted.unreadable)
    assert status["placeholder"] == len(planted.placeholders)
    assert status["exact_duplicate"] == len(planted.exact_copies)
    assert summary["images_in_near_duplicate_groups"] == 2 * len(planted.resized_copies)
    assert summary["leakage_after_split"] == 0

    splits = {name: read_split(tmp_path / "work", name) for name in ("train", "validation", "test")}
    where = {sample.uri: name for name, samples in splits.items() for sample in samples}
    junk = planted.unreadable + planted.placeholders
    assert not any(str(path) in where for path in junk)
    for copy in planted.resized_copies:
        original = copy.parent / copy.name.replace("resized-", "adult-00")
        assert where[str(copy)] == where[str(original)]
    assert sum(len(s) for s in splits.values()) == summary["status"]["kept"]
    for name in ("report.md", "hygiene.json", "class_distribution.png", "image_sizes.png"):
        assert (tmp_path / "work" / "hygiene" / name).stat().st_size > 0
    assert "Class distribution" in (tmp_path / "work" / "hygiene" / "report.md").read_text()


def test_hygiene_finds_leakage_across_given_splits(ray_cluster, tmp_path) -> None:
    manifest, leaks = manifest_with_leakage(tmp_path / "data")
    summary = check(manifest, tmp_path / "work")
    leaked = {Path(row["image"]).name for row in summary["leakage"]}
    assert leaked == {path.name for path in leaks}
    test_split = {Path(sample.uri).name for sample in read_split(tmp_path / "work", "test")}
    assert not test_split & leaked
    train_split = {Path(sample.uri).name for sample in read_split(tmp_path / "work", "train")}
    assert {"train-normal-0.jpg", "train-adult-0.jpg"} <= train_split  # the originals stay where they were
    assert "leak-exact.jpg" in (tmp_path / "work" / "hygiene" / "report.md").read_text()
