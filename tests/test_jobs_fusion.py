"""Fusion training: candidate choice on complementary signals, and thresholds from targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.fusion import FusionTree
from workers.jobs import measures
from workers.jobs.scoring import Scores, fuse
from workers.jobs.train_fusion import choose, majority_tree, pick_thresholds


def complementary(count: int, seed: int) -> Scores:
    """A quarter adult; half the adults show in colour only (kNN), half in shape only (CNN).

    Normal images stay below 0.55 on both signals, so each signal alone misses half the adults
    and a vote at 0.5 flags normals, while "either signal above ~0.57" separates the classes.
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(count) < 0.25).astype(np.int64)
    knn = rng.uniform(0.0, 0.55, count)
    cnn = rng.uniform(0.0, 0.55, count)
    adult = np.flatnonzero(labels)
    colour, shape = adult[: len(adult) // 2], adult[len(adult) // 2:]
    knn[colour] = rng.uniform(0.6, 1.0, len(colour))
    cnn[shape] = rng.uniform(0.6, 1.0, len(shape))
    return Scores([f"img-{i}" for i in range(count)], labels, knn, cnn, 0)


def test_fused_tree_beats_each_signal_when_they_complement() -> None:
    validation, test = complementary(300, seed=1), complementary(400, seed=2)
    tree, best, judged = choose(validation, max_depth=3, seed=0)
    by_name = {j.name: j for j in judged}
    assert set(by_name) == {"cnn", "knn", "majority", "rule", "tree"}
    assert best.name == "tree"
    assert best.adult_f1 >= max(by_name["cnn"].adult_f1, by_name["knn"].adult_f1) + 0.2

    fused_f1 = measures.adult_f1(test.labels, fuse(tree, test.knn, test.cnn))
    single_f1 = max(measures.adult_f1(test.labels, test.cnn), measures.adult_f1(test.labels, test.knn))
    assert fused_f1 >= single_f1 + 0.2 and fused_f1 > 0.9
    restored = FusionTree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert np.array_equal(fuse(restored, test.knn, test.cnn), fuse(tree, test.knn, test.cnn))


def test_a_signal_that_already_separates_is_kept_alone() -> None:
    scores = complementary(200, seed=3)
    scores = Scores(scores.uris, scores.labels, np.full(len(scores.labels), np.nan),
                    np.where(scores.labels == 1, 0.9, 0.1), 0)  # no kNN signal, a perfect CNN
    _, best, _ = choose(scores, max_depth=3, seed=0)
    assert best.name == "cnn" and best.adult_f1 == 1.0


def test_majority_vote_splits_ties_and_lets_the_cnn_decide_alone() -> None:
    tree = majority_tree()
    assert [tree.predict({"knn": k, "cnn": c}) for k, c in ((0.9, 0.9), (0.9, 0.1), (0.1, 0.9), (0.1, 0.1))] == \
        [1.0, 0.5, 0.5, 0.0]
    assert tree.predict({"knn": None, "cnn": 0.9}) == 1.0 and tree.predict({"knn": None, "cnn": 0.2}) == 0.0


def test_thresholds_meet_the_targets_with_a_margin() -> None:
    labels = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0])
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.65, 0.6, 0.4, 0.3, 0.2, 0.1])
    chosen = pick_thresholds(labels, scores, target_precision=1.0, target_recall=1.0)
    # precision 1 holds down to 0.7 (next lower score 0.65); recall 1 needs 0.6 (next lower 0.4)
    assert chosen["block"] == pytest.approx(0.675) and chosen["review"] == pytest.approx(0.5)
    assert chosen["validation"]["adult_blocked"] == pytest.approx(0.8)
    assert chosen["validation"]["adult_caught"] == 1.0 and chosen["validation"]["normal_blocked"] == 0.0

    unreachable = pick_thresholds(np.array([1, 0]), np.array([0.5, 0.5]), target_precision=0.9, target_recall=0.5)
    assert unreachable["block"] == 1.0 and unreachable["notes"]
