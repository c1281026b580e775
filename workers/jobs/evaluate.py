"""``modstream eval``: how well a bundle does on the test split, and what it means for reviewers.

Per signal (kNN, CNN) and fused: accuracy, per-class precision / recall / F1,
confusion matrix and precision-recall curve; for the fused score, the outcome
of the bundle's block/review thresholds and a threshold table (share of images
a human must review against the recall of harmful images). Plus the dedup
effect: the share of the dataset, as collected, that a reviewer never sees
because it is an exact or near copy of an earlier image (the design's source reported 28 % by MD5
and 6 % more by a resize-robust ID). Writes report.md, metrics.json and PNG
plots, and records the summary in the bundle manifest.

``--harmless FOLDER`` adds a false-positive report: every image under FOLDER
is taken as harmless and scored like production (same input, same kNN search,
the thresholds the pipeline would apply), and the share flagged at each
threshold is tabulated per signal and fused, with the images the bundle would
block or send to review named (false_positives.md / .json).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.bundle import load_bundle
from common.config import ThresholdConfig
from common.features import near_matchable, pdq_to_int
from common.fetch import LoadLimits
from common.fusion import applied_thresholds
from common.hashindex import HashIndex
from workers.jobs import bundles, measures, reporting
from workers.jobs.datasets import Sample, is_workdir, read_dataset, read_split
from workers.jobs.errors import JobError
from workers.jobs.hygiene import (
    DEFAULT_PLACEHOLDER_MIN,
    RECORDS_FILE,
    ScanRecord,
    analyse,
    read_records,
    scan,
)
from workers.jobs.scoring import KnnSearch, score_samples

TABLE_THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(1, 10))
EVAL_DIR = "eval"


def signal_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Measures of one signal; NaN scores (no kNN signal) count as 0 and lower the coverage."""
    covered = ~np.isnan(scores)
    filled = np.where(covered, scores, 0.0)
    result = measures.classification(labels, filled)
    result["coverage"] = float(covered.mean()) if len(scores) else 0.0
    result["average_precision"] = measures.average_precision(labels, filled)
    result["pr_curve"] = measures.precision_recall_curve(labels, filled)
    return result


def compute_metrics(labels: np.ndarray, signals: Mapping[str, np.ndarray], review: float,
                    block: float) -> dict[str, Any]:
    """Every number of the report; signals maps a name to P(adult) per image, and must include "fused"."""
    per_signal = {name: signal_metrics(labels, scores) for name, scores in signals.items()}
    fused = signals["fused"]
    thresholds = sorted({*TABLE_THRESHOLDS, review, block})
    return {
        "images": len(labels),
        "adult_images": int(np.sum(labels == 1)),
        "signals": per_signal,
        "actions": measures.actions(labels, fused, review=review, block=block),
        "threshold_table": [measures.threshold_row(labels, fused, t, block) for t in thresholds],
    }


def dedup_effect(records: Sequence[ScanRecord], max_distance: int) -> dict[str, Any]:
    """Walk the readable images in order as the pipeline would: a byte copy of an earlier image is an exact
    duplicate, one within max_distance PDQ bits of an earlier near-matchable hash a near duplicate."""
    seen: set[str] = set()
    index = HashIndex(max_distance)
    total = exact = near = 0
    for record in records:
        if not record.ok:
            continue
        total += 1
        if record.md5 in seen:
            exact += 1
            continue
        seen.add(record.md5)  # type: ignore[arg-type]
        if near_matchable(record.pdq_quality):
            value = pdq_to_int(record.pdq)  # type: ignore[arg-type]
            if index.query(value):
                near += 1
                continue
            index.add(value)
    shares = {name: count / total if total else 0.0
              for name, count in (("exact_share", exact), ("near_share", near), ("not_reviewed_share", exact + near))}
    return {"images": total, "exact_duplicates": exact, "near_duplicates": near, **shares,
            "pdq_max_distance": max_distance}


def write_report(out: Path, metrics: dict[str, Any], title: str) -> None:
    """report.md, metrics.json, pr_curve.png, confusion.png and thresholds.png in out."""
    out.mkdir(parents=True, exist_ok=True)
    reporting.write_json(out / "metrics.json", metrics)
    signals = metrics["signals"]
    reporting.plot_pr_curves(out / "pr_curve.png", {name: (m["pr_curve"]["precision"], m["pr_curve"]["recall"])
                                                    for name, m in signals.items()})
    reporting.plot_confusion(out / "confusion.png", {name: m["confusion"] for name, m in signals.items()})
    table = metrics["threshold_table"]
    reporting.plot_threshold_tradeoff(out / "thresholds.png", [r["threshold"] for r in table],
                                      [r["review_share"] for r in table], [r["harmful_recall"] for r in table])
    rows = []
    for name, m in signals.items():
        adult, normal = m["per_class"]["adult"], m["per_class"]["normal"]
        rows.append((name, m["accuracy"], adult["precision"], adult["recall"], adult["f1"], normal["precision"],
                     normal["recall"], normal["f1"], m["average_precision"], m["coverage"]))
    confusion_rows = [(name, *m["confusion"][0], *m["confusion"][1]) for name, m in signals.items()]
    actions = metrics["actions"]
    dedup = metrics["dedup"]
    lines = [
        f"# Evaluation: {title}", "",
        (f"Bundle `{metrics['bundle']}` on {metrics['images']} images ({metrics['adult_images']} adult) "
        f"of {metrics['dataset']}; {metrics['unreadable']} could not be loaded."), "",
        "## Per signal (adult when P(adult) >= 0.5)", "",
        reporting.markdown_table(["signal", "accuracy", "adult P", "adult R", "adult F1", "normal P", "normal R",
                                  "normal F1", "avg precision", "coverage"], rows), "",
        "Confusion (true normal: predicted normal / adult; true adult: predicted normal / adult):", "",
        reporting.markdown_table(["signal", "nn", "na", "an", "aa"], confusion_rows), "",
        "![confusion](confusion.png) ![precision-recall](pr_curve.png)", "",
        f"## Actions at review >= {actions['review_threshold']:.3f}, block >= {actions['block_threshold']:.3f}", "",
        reporting.markdown_table(["blocked", "review", "allowed", "adult blocked", "adult caught", "normal blocked"],
                                 [(actions["blocked_share"], actions["review_share"], actions["allowed_share"],
                                   actions["adult_blocked"], actions["adult_caught"], actions["normal_blocked"])]), "",
        "## Review threshold table (fused score)", "",
        "Flagged: blocked or reviewed. Review share: flagged but below the block threshold, i.e. what humans see.",
        "",
        reporting.markdown_table(["threshold", "flagged share", "review share", "harmful recall", "precision"],
                                 [(r["threshold"], r["flagged_share"], r["review_share"], r["harmful_recall"],
                                   r["precision"]) for r in table]), "",
        "![thresholds](thresholds.png)", "",
        "## Dedup effect", "",
        (f"Of {dedup['images']} readable images as collected, {dedup['exact_duplicates']} are byte copies "
        f"({dedup['exact_share']:.1%}) and {dedup['near_duplicates']} more near copies within "
        f"{dedup['pdq_max_distance']} PDQ bits ({dedup['near_share']:.1%}): a reviewer would not see "
        f"{dedup['not_reviewed_share']:.1%} of them."), "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def evaluate(dataset: Path, bundle_path: Path, out: Path | None, limits: LoadLimits, draft: int, knn: KnnSearch,
             max_distance: int, overrides: ThresholdConfig | None = None,
             placeholder_min: int = DEFAULT_PLACEHOLDER_MIN) -> dict[str, Any]:
    """Evaluate on DATASET's test split (a prepared work dir) or on all of a cleaned dataset; returns the
    metrics, also recorded in the manifest under "test" or the dataset's folder name."""
    bundle = load_bundle(bundle_path)
    if is_workdir(dataset):
        samples = read_split(dataset, "test")
        records_file = dataset / RECORDS_FILE
        records = read_records(records_file) if records_file.exists() else []
        name, title = "test", "test split"
    else:  # a dataset of its own: cleaned like data check does, then scored whole
        records = scan(read_dataset(dataset), limits, draft)
        kept = [item.record for item in analyse(records, placeholder_min, max_distance) if item.status == "kept"]
        samples = [Sample(record.uri, record.label, md5=record.md5) for record in kept]
        name, title = dataset.name, "whole dataset (cleaned)"
    scores = score_samples(bundle_path, samples, limits, draft, knn, desc="score test")
    overrides = overrides or ThresholdConfig()
    thresholds, source = applied_thresholds(bundle.thresholds, overrides.block, overrides.review)
    review, block = thresholds.review, thresholds.block
    metrics = compute_metrics(scores.labels, {"knn": scores.knn, "cnn": scores.cnn,
                                              "fused": scores.fused(bundle.load_fusion())}, review, block)
    metrics.update({"thresholds_from": source, "bundle": bundle.id, "dataset": str(dataset), "split": title,
                    "unreadable": scores.unreadable, "dedup": dedup_effect(records, max_distance),
                    "evaluated": bundles.now()})
    write_report(out or bundle_path / EVAL_DIR, metrics, title)
    manifest = dict(bundle.manifest)
    manifest["metrics"] = {**manifest.get("metrics", {}), name: _summary(metrics)}
    bundles.commit(bundle_path, manifest)
    return metrics


FP_SIGNALS = ("knn", "cnn", "fused")
HARMLESS_REPORT = "false_positives"


def harmless_samples(folder: Path) -> list[Sample]:
    """Every file under folder (hidden ones skipped), labelled normal."""
    if not folder.is_dir():
        raise JobError(f"{folder}: not a folder of harmless images")
    samples = [Sample(str(file.resolve()), 0) for file in sorted(folder.rglob("*"))
               if file.is_file() and not file.name.startswith(".")]
    if not samples:
        raise JobError(f"{folder}: no images found")
    return samples


def false_positive_rows(signals: Mapping[str, np.ndarray], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Share of harmless images at or above each threshold, per signal; a missing kNN signal flags nothing."""
    rows = []
    for threshold in thresholds:
        row: dict[str, Any] = {"threshold": float(threshold)}
        for name, scores in signals.items():
            covered = np.where(np.isnan(scores), -1.0, scores)
            row[name] = float(np.mean(covered >= threshold)) if len(scores) else 0.0
        rows.append(row)
    return rows


def false_positives(folder: Path, bundle_path: Path, out: Path | None, limits: LoadLimits, draft: int,
                    knn: KnnSearch, overrides: ThresholdConfig | None = None) -> dict[str, Any]:
    """Score every image of a harmless folder and write the false-positive table (the manifest is left alone,
    so a built-in bundle keeps its id)."""
    bundle = load_bundle(bundle_path)
    scores = score_samples(bundle_path, harmless_samples(folder), limits, draft, knn, desc="score harmless")
    thresholds, source = applied_thresholds(bundle.thresholds, (overrides or ThresholdConfig()).block,
                                            (overrides or ThresholdConfig()).review)
    fused = scores.fused(bundle.load_fusion())
    signals = {"knn": scores.knn, "cnn": scores.cnn, "fused": fused}
    table = false_positive_rows(signals, sorted({*TABLE_THRESHOLDS, thresholds.review, thresholds.block}))
    flagged = [{"uri": uri, "knn": None if np.isnan(k) else float(k), "cnn": float(c), "fused": float(f),
                "action": thresholds.decide(float(f))[0]}
               for uri, k, c, f in zip(scores.uris, scores.knn, scores.cnn, fused, strict=True)
               if f >= thresholds.review]
    result = {"bundle": bundle.id, "folder": str(folder), "images": len(scores.uris),
              "unreadable": scores.unreadable, "review_threshold": thresholds.review,
              "block_threshold": thresholds.block, "thresholds_from": source, "table": table, "flagged": flagged,
              "max": {name: float(np.nanmax(values)) if np.any(~np.isnan(values)) else None
                      for name, values in signals.items()},
              "evaluated": bundles.now()}
    target = out or bundle_path / EVAL_DIR
    target.mkdir(parents=True, exist_ok=True)
    reporting.write_json(target / f"{HARMLESS_REPORT}.json", result)
    (target / f"{HARMLESS_REPORT}.md").write_text(false_positive_markdown(result))
    return result


def false_positive_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        f"# False positives on harmless images: {result['folder']}", "",
        (f"Bundle `{result['bundle']}` on {result['images']} harmless images ({result['unreadable']} could not be "
        f"loaded). Share of them at or above each threshold (a missing kNN signal flags nothing); the pipeline "
        f"reviews from {result['review_threshold']:.3f} and blocks from {result['block_threshold']:.3f} "
        f"(thresholds from the {result['thresholds_from']})."), "",
        reporting.markdown_table(["threshold", *FP_SIGNALS],
                                 [(row["threshold"], *(row[name] for name in FP_SIGNALS)) for row in result["table"]]),
        "",
        "Highest score: " + ", ".join(f"{name} {value:.3f}" if value is not None else f"{name} none"
                                      for name, value in result["max"].items()), "",
        "## Harmless images the pipeline would flag", "",
    ]
    if result["flagged"]:
        lines.append(reporting.markdown_table(["image", "action", "fused", "cnn", "knn"],
                                              [(Path(item["uri"]).name, item["action"], item["fused"], item["cnn"],
                                                "none" if item["knn"] is None else item["knn"])
                                               for item in result["flagged"]]))
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of the metrics worth carrying in the manifest (no curves)."""
    signals = {name: {key: m[key] for key in ("accuracy", "balanced_accuracy", "average_precision", "coverage")}
               | {"adult_f1": m["per_class"]["adult"]["f1"], "confusion": m["confusion"]}
               for name, m in metrics["signals"].items()}
    return {"images": metrics["images"], "dataset": metrics["dataset"], "signals": signals,
            "actions": metrics["actions"], "dedup": metrics["dedup"], "evaluated": metrics["evaluated"]}
