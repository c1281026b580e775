"""Classification measures shared by training, fusion and evaluation.

Plain numpy on (labels, P(adult)) pairs, so every number in a report can be
checked by hand. "adult" (label 1) is the positive class; an image is called
adult when P(adult) >= common.fusion.ADULT_MIN, as verdict labels are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.fusion import ADULT_MIN
from common.messages import LABELS


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def confusion(labels: Sequence[int], predicted: Sequence[int]) -> list[list[int]]:
    """Counts by [true label][predicted label]."""
    matrix = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.intp), np.asarray(predicted, dtype=np.intp)), 1)
    return matrix.tolist()


def classification(labels: Sequence[int], scores: Sequence[float], cut: float = ADULT_MIN) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision / recall / F1 / support, and the confusion matrix."""
    truth = np.asarray(labels, dtype=np.intp)
    predicted = (np.asarray(scores, dtype=np.float64) >= cut).astype(np.intp)
    matrix = np.asarray(confusion(truth, predicted))
    per_class = {}
    for label, name in enumerate(LABELS):
        hits = matrix[label, label]
        precision = _ratio(hits, matrix[:, label].sum())
        recall = _ratio(hits, matrix[label, :].sum())
        per_class[name] = {"precision": precision, "recall": recall,
                           "f1": _ratio(2 * precision * recall, precision + recall),
                           "support": int(matrix[label, :].sum())}
    return {
        "count": len(truth),
        "accuracy": _ratio(np.trace(matrix), matrix.sum()),
        "balanced_accuracy": float(np.mean([per_class[name]["recall"] for name in LABELS])),
        "per_class": per_class,
        "confusion": matrix.tolist(),
    }


def adult_f1(labels: Sequence[int], scores: Sequence[float]) -> float:
    return classification(labels, scores)["per_class"][LABELS[1]]["f1"]


def precision_recall_curve(labels: Sequence[int], scores: Sequence[float]) -> dict[str, list[float]]:
    """Precision and recall of "score >= t" for every distinct score t, highest t first."""
    truth = np.asarray(labels, dtype=np.intp)
    values = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(values)[::-1]
    positives = max(int(truth.sum()), 1)
    precision, recall = [], []
    for threshold in thresholds:
        flagged = values >= threshold
        hits = int((truth[flagged] == 1).sum())
        precision.append(_ratio(hits, int(flagged.sum())))
        recall.append(hits / positives)
    return {"thresholds": thresholds.tolist(), "precision": precision, "recall": recall}


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Sum over thresholds of (recall gained) x precision: the area under the step PR curve."""
    curve = precision_recall_curve(labels, scores)
    previous, area = 0.0, 0.0
    for precision, recall in zip(curve["precision"], curve["recall"], strict=True):
        area += (recall - previous) * precision
        previous = recall
    return float(area)


def threshold_row(labels: Sequence[int], scores: Sequence[float], threshold: float, block: float) -> dict[str, float]:
    """What a review threshold means for the people downstream.

    flagged_share: images with P >= threshold (blocked or reviewed); review_share: those a human must look at
    (threshold <= P < block); harmful_recall: adult images flagged; precision: adult share of the flagged.
    """
    truth = np.asarray(labels, dtype=np.intp)
    values = np.asarray(scores, dtype=np.float64)
    flagged = values >= threshold
    reviewed = flagged & (values < block)
    hits = int((truth[flagged] == 1).sum())
    return {
        "threshold": float(threshold),
        "flagged_share": _ratio(int(flagged.sum()), len(values)),
        "review_share": _ratio(int(reviewed.sum()), len(values)),
        "harmful_recall": _ratio(hits, int(truth.sum())),
        "precision": _ratio(hits, int(flagged.sum())),
    }


def actions(labels: Sequence[int], scores: Sequence[float], review: float, block: float) -> dict[str, float]:
    """Outcome of the block/review thresholds: shares of images per action, adult images caught and missed."""
    truth = np.asarray(labels, dtype=np.intp)
    values = np.asarray(scores, dtype=np.float64)
    blocked, reviewed = values >= block, (values >= review) & (values < block)
    adult = truth == 1
    return {
        "review_threshold": review, "block_threshold": block,
        "blocked_share": _ratio(int(blocked.sum()), len(values)),
        "review_share": _ratio(int(reviewed.sum()), len(values)),
        "allowed_share": _ratio(int((values < review).sum()), len(values)),
        "adult_blocked": _ratio(int((blocked & adult).sum()), int(adult.sum())),
        "adult_caught": _ratio(int(((blocked | reviewed) & adult).sum()), int(adult.sum())),
        "normal_blocked": _ratio(int((blocked & ~adult).sum()), int((~adult).sum())),
    }
