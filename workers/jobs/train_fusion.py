"""``modstream train fusion``: fuse the kNN and CNN probabilities, method 4 of the design (see README).

On the validation split (images neither signal trained on) each candidate is
judged by cross-validation, so a fitted tree does not win by memorising:

  cnn, knn   each signal alone
  majority   hard votes at 0.5; a split vote scores 0.5 (reported not to help: the signals' errors correlate)
  rule       the original design's ``knn >= a && cnn >= b`` with a, b searched on a grid
  tree       a shallow decision tree over both probabilities

The best by out-of-fold adult F1 (then average precision; then the simpler) is
refitted on the whole split and written to the bundle. Block and review
thresholds come from its out-of-fold scores: block at the lowest threshold
whose precision reaches ``--target-precision``, review at the highest whose
recall reaches ``--target-recall``, each moved halfway down to the next lower
validation score (same decisions there, a margin for unseen images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.fetch import LoadLimits
from common.fusion import FusionTree
from workers.jobs import bundles, measures
from workers.jobs.datasets import read_split
from workers.jobs.errors import JobError
from workers.jobs.scoring import KnnSearch, Scores, fuse, score_samples

CANDIDATES = ("cnn", "knn", "majority", "rule", "tree")  # simplest first: a tie keeps the simpler
RULE_GRID = np.round(np.linspace(0.1, 0.9, 9), 2)
FUSION_FILE = "fusion.json"
MAX_FOLDS = 5

Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray], FusionTree]


def majority_tree() -> FusionTree:
    """Two hard votes at 0.5: both -> 1, one -> 0.5, none -> 0; without kNN the CNN's vote decides."""
    def knn_vote(low: float, high: float, missing: str) -> dict[str, Any]:
        return {"feature": "knn", "threshold": 0.5, "missing": missing,
                "left": {"p_adult": low}, "right": {"p_adult": high}}

    return FusionTree({"feature": "cnn", "threshold": 0.5, "missing": "left",
                       "left": knn_vote(0.0, 0.5, "left"), "right": knn_vote(0.5, 1.0, "right")})


def fit_rule(knn: np.ndarray, cnn: np.ndarray, labels: np.ndarray) -> FusionTree:
    """The grid point (a, b) whose rule tree has the best adult F1."""
    best, best_f1 = FusionTree.rule_tree(0.5, 0.5), -1.0
    for a in RULE_GRID:
        for b in RULE_GRID:
            tree = FusionTree.rule_tree(float(a), float(b))
            f1 = measures.adult_f1(labels, fuse(tree, knn, cnn))
            if f1 > best_f1:
                best, best_f1 = tree, f1
    return best


def tree_fitter(max_depth: int, seed: int) -> Fitter:
    def fit(knn: np.ndarray, cnn: np.ndarray, labels: np.ndarray) -> FusionTree:
        from sklearn.tree import DecisionTreeClassifier

        if len(np.unique(labels)) < 2:  # sklearn would learn one class; say so as a constant
            return FusionTree({"p_adult": float(labels[0]) if len(labels) else 0.0})
        model = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=max(2, len(labels) // 20),
                                       random_state=seed)
        model.fit(np.column_stack([knn, cnn]), labels)
        return FusionTree.from_sklearn(model, ["knn", "cnn"])

    return fit


def fitters(max_depth: int, seed: int) -> dict[str, Fitter]:
    return {
        "cnn": lambda *_: FusionTree({"score_of": "cnn"}),
        "knn": lambda *_: FusionTree({"score_of": "knn"}),
        "majority": lambda *_: majority_tree(),
        "rule": fit_rule,
        "tree": tree_fitter(max_depth, seed),
    }


@dataclass(frozen=True)
class Judged:
    name: str
    out_of_fold: np.ndarray
    adult_f1: float
    average_precision: float


def cross_validate(scores: Scores, fit: Fitter, name: str, seed: int) -> Judged:
    """Out-of-fold P(adult) of a candidate: each fold scored by a fit on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    labels = scores.labels
    folds = min(MAX_FOLDS, int(np.bincount(labels, minlength=2).min()))
    out = np.zeros(len(labels))
    if folds < 2:
        out = fuse(fit(scores.knn, scores.cnn, labels), scores.knn, scores.cnn)
    else:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for train, held_out in splitter.split(np.zeros(len(labels)), labels):
            tree = fit(scores.knn[train], scores.cnn[train], labels[train])
            out[held_out] = fuse(tree, scores.knn[held_out], scores.cnn[held_out])
    return Judged(name, out, measures.adult_f1(labels, out), measures.average_precision(labels, out))


def choose(scores: Scores, max_depth: int, seed: int) -> tuple[FusionTree, Judged, list[Judged]]:
    """The winning candidate refitted on all of scores, its judgement, and every candidate's judgement."""
    candidates = fitters(max_depth, seed)
    judged = [cross_validate(scores, candidates[name], name, seed) for name in CANDIDATES]
    best = max(judged, key=lambda j: (round(j.adult_f1, 9), round(j.average_precision, 9),
                                      -CANDIDATES.index(j.name)))
    return candidates[best.name](scores.knn, scores.cnn, scores.labels), best, judged


def pick_thresholds(labels: np.ndarray, scores: np.ndarray, target_precision: float,
                    target_recall: float) -> dict[str, Any]:
    """Block and review thresholds meeting the targets on these scores (see the module docstring)."""
    curve = measures.precision_recall_curve(labels, scores)
    points = list(zip(curve["thresholds"], curve["precision"], curve["recall"], strict=True))
    precise = [t for t, p, _ in points if p >= target_precision]
    recalled = [t for t, _, r in points if r >= target_recall]
    block = _with_margin(min(precise), curve["thresholds"]) if precise else 1.0
    review = min(_with_margin(max(recalled) if recalled else min(curve["thresholds"]), curve["thresholds"]), block)
    notes = [] if precise else [f"no threshold reaches precision {target_precision} on validation: block at 1.0"]
    return {"block": float(block), "review": float(review), "target_precision": target_precision,
            "target_recall": target_recall, "notes": notes,
            "validation": measures.actions(labels, scores, review=float(review), block=float(block))}


def _with_margin(threshold: float, scores: list[float]) -> float:
    """Halfway down to the next lower score: the same decisions on these scores, more room for new ones."""
    lower = [score for score in scores if score < threshold]
    return (threshold + max(lower)) / 2 if lower else threshold


def train_fusion(workdir: Path, bundle: Path, limits: LoadLimits, draft: int, knn: KnnSearch, target_precision: float,
                 target_recall: float, max_depth: int, seed: int) -> dict[str, Any]:
    """Score the validation split, choose and write the fusion tree and thresholds; returns the manifest part."""
    for name, value in (("target precision", target_precision), ("target recall", target_recall)):
        if not 0.0 < value <= 1.0:
            raise JobError(f"{name} must be in (0, 1], got {value}")
    manifest = bundles.ensure_bundle(bundle)
    scores = score_samples(bundle, read_split(workdir, "validation"), limits, draft, knn, desc="score validation")
    if len(np.unique(scores.labels)) < 2:
        raise JobError(f"the validation split of {workdir} needs images of both classes")
    tree, best, judged = choose(scores, max_depth, seed)
    bundles.replace_component(bundle, FUSION_FILE, lambda target: target.write_text(_tree_json(tree)))
    thresholds = pick_thresholds(scores.labels, best.out_of_fold, target_precision, target_recall)
    manifest["fusion"] = {
        "path": FUSION_FILE, "kind": best.name, "max_depth": max_depth, "seed": seed,
        "candidates": {j.name: {"adult_f1": j.adult_f1, "average_precision": j.average_precision} for j in judged},
        "validation_images": len(scores.labels), "trained": bundles.now(),
    }
    manifest["thresholds"] = thresholds
    bundles.commit(bundle, manifest)
    return {"fusion": manifest["fusion"], "thresholds": thresholds}


def _tree_json(tree: FusionTree) -> str:
    import json

    return json.dumps(tree.to_dict(), indent=2) + "\n"
