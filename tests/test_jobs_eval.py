"""Evaluation numbers against a hand computation on a tiny set, and the report's artefacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workers.jobs.evaluate import compute_metrics, dedup_effect, false_positive_rows, write_report
from workers.jobs.hygiene import ScanRecord

LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])  # 3 adult, 5 normal
FUSED = np.array([0.95, 0.7, 0.3, 0.6, 0.2, 0.1, 0.1, 0.05])
KNN = np.array([0.8, np.nan, 0.7, 0.2, np.nan, 0.1, 0.3, 0.6])


def test_measures_match_a_hand_computation() -> None:
    metrics = compute_metrics(LABELS, {"knn": KNN, "cnn": FUSED, "fused": FUSED}, review=0.5, block=0.9)
    fused = metrics["signals"]["fused"]
    # adult at >= 0.5: images 0, 1 (right) and 3 (wrong); image 2 missed
    assert fused["confusion"] == [[4, 1], [1, 2]]
    assert fused["accuracy"] == pytest.approx(6 / 8)
    assert fused["per_class"]["adult"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                                         "support": 3})
    assert fused["per_class"]["normal"] == pytest.approx({"precision": 4 / 5, "recall": 4 / 5, "f1": 4 / 5,
                                                          "support": 5})
    assert fused["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # recall steps of 1/3 at precisions 1 (0.95), 1 (0.7) and 3/4 (0.3)
    assert fused["average_precision"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 4)

    knn = metrics["signals"]["knn"]
    assert knn["coverage"] == pytest.approx(6 / 8)
    assert knn["confusion"] == [[4, 1], [1, 2]]  # no signal counts as "not adult"

    assert metrics["actions"] == pytest.approx({
        "review_threshold": 0.5, "block_threshold": 0.9, "blocked_share": 1 / 8, "review_share": 2 / 8,
        "allowed_share": 5 / 8, "adult_blocked": 1 / 3, "adult_caught": 2 / 3, "normal_blocked": 0.0})
    row = next(r for r in metrics["threshold_table"] if r["threshold"] == 0.5)
    assert row == pytest.approx({"threshold": 0.5, "flagged_share": 3 / 8, "review_share": 2 / 8,
                                 "harmful_recall": 2 / 3, "precision": 2 / 3})
    assert len(metrics["threshold_table"]) == 9  # 0.1 .. 0.9; the review and block thresholds are among them


def record(md5: str, pdq: str | None, reliable: bool = True, ok: bool = True) -> ScanRecord:
    return ScanRecord(f"/{md5}.jpg", 0, None, ok, md5=md5, pdq=pdq, pdq_quality=100 if reliable else 10)


def test_dedup_effect_counts_exact_then_near_copies_in_order() -> None:
    base = int("0123456789ABCDEF" * 4, 16)
    records = [
        record("a", f"{base:064x}"),
        record("a", f"{base:064x}"),  # byte copy
        record("c", f"{base ^ 0b111:064x}"),  # 3 bits away: near copy
        record("d", f"{base ^ (2**40 - 1):064x}"),  # 40 bits away: new
        record("e", None, reliable=False, ok=False),  # unreadable: not counted
        record("f", f"{base:064x}", reliable=False),  # same PDQ but quality < 50: never matched
    ]
    effect = dedup_effect(records, max_distance=31)
    assert (effect["images"], effect["exact_duplicates"], effect["near_duplicates"]) == (5, 1, 1)
    assert effect["not_reviewed_share"] == pytest.approx(2 / 5)


def test_report_writes_every_artefact(tmp_path) -> None:
    metrics = compute_metrics(LABELS, {"knn": KNN, "cnn": FUSED, "fused": FUSED}, review=0.5, block=0.9)
    metrics.update({"bundle": "trained-test", "dataset": "tiny", "unreadable": 0,
                    "dedup": dedup_effect([record("a", None, reliable=False)], 10)})
    write_report(tmp_path, metrics, "tiny set")
    for name in ("report.md", "metrics.json", "pr_curve.png", "confusion.png", "thresholds.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["signals"]["fused"]["confusion"] == [[4, 1], [1, 2]]
    assert written["actions"]["review_share"] == pytest.approx(0.25)
    report = (tmp_path / "report.md").read_text()
    assert "| fused | 0.750 | 0.667 | 0.667 | 0.667 |" in report
    assert "a reviewer would not see 0.0%" in report


def test_false_positive_rows_count_harmless_images_at_or_above_each_threshold() -> None:
    harmless = {"knn": np.array([0.8, np.nan, 0.3, np.nan]), "cnn": np.array([0.05, 0.5, 0.2, 0.9]),
                "fused": np.array([0.0, 0.5, 0.0, 0.9])}
    rows = {row["threshold"]: row for row in false_positive_rows(harmless, [0.1, 0.5, 0.9])}
    assert rows[0.5] == pytest.approx({"threshold": 0.5, "knn": 1 / 4, "cnn": 2 / 4, "fused": 2 / 4})
    assert rows[0.1] == pytest.approx({"threshold": 0.1, "knn": 2 / 4, "cnn": 3 / 4, "fused": 2 / 4})
    assert rows[0.9]["fused"] == pytest.approx(1 / 4)  # >= is inclusive, like the pipeline's block


@pytest.mark.integration
def test_eval_reports_false_positives_of_the_default_bundle_on_everyday_photos(ray_cluster, tmp_path) -> None:

    from common.bundle import default_bundle
    from deploy.cli import main
    from tests.test_bundle_and_model import skimage_photos

    folder = tmp_path / "harmless"
    folder.mkdir()
    for name, photo in skimage_photos().items():
        photo.save(folder / f"{name}.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"not an image")
    bundle = default_bundle()
    before = bundle.manifest
    assert main(["eval", "--harmless", str(folder), "--bundle", str(bundle.path), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "false_positives.json").read_text())
    assert result["images"] == len(skimage_photos()) and result["unreadable"] == 1
    assert result["bundle"] == bundle.id and result["thresholds_from"] == "bundle"
    assert result["flagged"] == []  # nothing harmless is reviewed or blocked
    assert all(row["fused"] == 0.0 for row in result["table"] if row["threshold"] >= bundle.thresholds["review"])
    assert "| threshold | knn | cnn | fused |" in (tmp_path / "out" / "false_positives.md").read_text()
    assert default_bundle().manifest == before  # a built-in bundle is not rewritten
