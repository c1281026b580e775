"""Fusion tree: the original design's rule, sklearn conversion, JSON round trip, thresholds."""

import json

import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from common.fusion import FusionError, FusionTree, Thresholds, applied_thresholds

GRID = [0.0, 0.1, 0.29, 0.3, 0.31, 0.5, 0.69, 0.7, 0.71, 0.9, 1.0]


def test_rule_tree_is_the_rule_on_a_grid() -> None:
    tree = FusionTree.rule_tree(knn_min=0.3, cnn_min=0.7)
    for knn in GRID:
        for cnn in GRID:
            p_adult = tree.predict({"knn": knn, "cnn": cnn})
            if knn >= 0.3 and cnn >= 0.7:
                assert p_adult == max(cnn, 0.5)
                assert Thresholds().decide(p_adult)[1] == "adult"
            else:
                assert p_adult == 0.0


def test_rule_tree_without_knn_falls_back_to_cnn() -> None:
    tree = FusionTree.rule_tree(knn_min=0.3, cnn_min=0.7)
    for cnn in GRID:
        expected = cnn if cnn >= 0.7 else 0.0
        assert tree.predict({"knn": None, "cnn": cnn}) == expected
        assert tree.predict({"cnn": cnn}) == expected
        assert tree.predict({"knn": float("nan"), "cnn": cnn}) == expected
    assert tree.predict({"knn": 0.9}) == 0.0  # no CNN score: the rule cannot hold
    assert tree.features == {"knn", "cnn"}


def test_rule_tree_scores_follow_the_cnn() -> None:
    tree = FusionTree.rule_tree(knn_min=0.5, cnn_min=0.2)
    assert tree.predict({"knn": 0.6, "cnn": 0.3}) == 0.5  # passes: adult, but only worth a review
    assert Thresholds().decide(tree.predict({"knn": 0.6, "cnn": 0.3})) == ("review", "adult")
    assert Thresholds().decide(tree.predict({"knn": 0.6, "cnn": 0.95})) == ("block", "adult")
    assert Thresholds().decide(tree.predict({"knn": 0.4, "cnn": 0.95})) == ("allow", "normal")


def _fitted_toy_tree(with_missing: bool) -> tuple[DecisionTreeClassifier, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.random((400, 2)).astype(np.float32)  # sklearn compares float32 copies anyway
    labels = ((features[:, 0] > 0.4) & (features[:, 1] + 0.2 * rng.standard_normal(400) > 0.5)).astype(int)
    if with_missing:
        features[rng.random(400) < 0.15, 0] = np.nan
    tree = DecisionTreeClassifier(max_depth=5, min_samples_leaf=5, random_state=0).fit(features, labels)
    return tree, features


@pytest.mark.parametrize("with_missing", [False, True])
def test_from_sklearn_matches_predict_proba(with_missing: bool) -> None:
    sklearn_tree, features = _fitted_toy_tree(with_missing)
    tree = FusionTree.from_sklearn(sklearn_tree, ["knn", "cnn"])
    rows = np.concatenate([features, [[np.nan, 0.6], [0.6, np.nan], [np.nan, np.nan]]]).astype(np.float32)
    expected = sklearn_tree.predict_proba(rows)[:, 1]
    for row, p_adult in zip(rows, expected, strict=True):
        signals = {"knn": None if np.isnan(row[0]) else float(row[0]), "cnn": float(row[1])}
        assert tree.predict(signals) == pytest.approx(p_adult, abs=1e-12)


def test_from_sklearn_sends_a_value_equal_to_the_threshold_left_like_sklearn() -> None:
    sklearn_tree = DecisionTreeClassifier().fit([[0.0], [1.0]], [0, 1])  # threshold 0.5: x <= 0.5 is class 0
    tree = FusionTree.from_sklearn(sklearn_tree, ["cnn"])
    assert sklearn_tree.predict_proba([[0.5]])[0, 1] == 0.0
    assert tree.predict({"cnn": 0.5}) == 0.0
    assert tree.predict({"cnn": 0.5000001}) == 1.0


def test_from_sklearn_rejects_other_models() -> None:
    with pytest.raises(FusionError):
        FusionTree.from_sklearn(DecisionTreeClassifier(), ["knn", "cnn"])  # not fitted
    three_classes = DecisionTreeClassifier().fit([[0.0], [1.0], [2.0]], [0, 1, 2])
    with pytest.raises(FusionError):
        FusionTree.from_sklearn(three_classes, ["cnn"])
    sklearn_tree, _ = _fitted_toy_tree(False)
    with pytest.raises(FusionError):
        FusionTree.from_sklearn(sklearn_tree, ["cnn"])


def test_dict_round_trip_through_json() -> None:
    sklearn_tree, features = _fitted_toy_tree(True)
    for tree in (FusionTree.rule_tree(0.4, 0.6), FusionTree.from_sklearn(sklearn_tree, ["knn", "cnn"])):
        restored = FusionTree.from_dict(json.loads(json.dumps(tree.to_dict())))
        assert restored == tree
        for row in features[:50]:
            signals = {"knn": float(row[0]), "cnn": float(row[1])}
            assert restored.predict(signals) == tree.predict(signals)


def test_to_dict_is_a_copy() -> None:
    tree = FusionTree.rule_tree(0.4, 0.6)
    data = tree.to_dict()
    data["left"]["p_adult"] = 1.0
    assert tree.predict({"cnn": 0.1}) == 0.0


@pytest.mark.parametrize(
    "bad_tree",
    [
        {"p_adult": 1.5},
        {"p_adult": "high"},
        {"score_of": "cnn", "low": 0.8, "high": 0.2},
        {"feature": "cnn", "threshold": 0.5, "left": {"p_adult": 0}, "right": {"p_adult": 1}},  # no missing
        {"feature": "cnn", "threshold": 0.5, "missing": "up", "left": {"p_adult": 0}, "right": {"p_adult": 1}},
        {"feature": "", "threshold": 0.5, "missing": "left", "left": {"p_adult": 0}, "right": {"p_adult": 1}},
        {"feature": "cnn", "threshold": float("inf"), "missing": "left", "left": {"p_adult": 0}, "right": {}},
        {"feature": "cnn", "threshold": 0.5, "missing": "left", "left": {"p_adult": 0}, "right": [1]},
        {"p_adult": 0.5, "extra": 1},
    ],
)
def test_malformed_trees_are_rejected(bad_tree: dict) -> None:
    with pytest.raises(FusionError):
        FusionTree.from_dict(bad_tree)


def test_non_numeric_signal_is_an_error_not_a_branch() -> None:
    with pytest.raises(FusionError):
        FusionTree.rule_tree(0.4, 0.6).predict({"cnn": "0.9"})


@pytest.mark.parametrize(
    ("p_adult", "expected"),
    [
        (0.0, ("allow", "normal")),
        (0.4999, ("allow", "normal")),
        (0.5, ("review", "adult")),
        (0.8999, ("review", "adult")),
        (0.9, ("block", "adult")),
        (1.0, ("block", "adult")),
    ],
)
def test_threshold_boundaries(p_adult: float, expected: tuple[str, str]) -> None:
    assert Thresholds().decide(p_adult) == expected


def test_custom_thresholds_and_their_validation() -> None:
    assert Thresholds(block=0.8, review=0.2).decide(0.3) == ("review", "normal")
    assert Thresholds(block=0.7, review=0.7).decide(0.7) == ("block", "adult")
    for block, review in [(0.4, 0.5), (1.1, 0.5), (0.9, -0.1), (float("nan"), 0.5)]:
        with pytest.raises(FusionError):
            Thresholds(block=block, review=review)
    with pytest.raises(FusionError):
        Thresholds().decide(1.2)
    with pytest.raises(FusionError):
        Thresholds().decide(float("nan"))


def test_the_bundles_thresholds_apply_unless_settings_override_them() -> None:
    bundle = {"block": 0.3, "review": 0.1}
    assert applied_thresholds(bundle) == (Thresholds(block=0.3, review=0.1), "bundle")
    assert applied_thresholds(bundle, block=0.95) == (Thresholds(block=0.95, review=0.1), "settings")
    assert applied_thresholds(bundle, review=0.2) == (Thresholds(block=0.3, review=0.2), "settings")
    assert applied_thresholds({}) == (Thresholds(), "default")
    with pytest.raises(FusionError, match="review <= block"):
        applied_thresholds(bundle, review=0.5)  # a mix must still be ordered
