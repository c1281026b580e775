"""Fusion, method 4 of the design (see README): a small decision tree turns the signals into P(adult),
then thresholds turn P(adult) into an action.

The tree is plain JSON-serialisable data, so a model bundle carries no pickles:

- internal node ``{"feature": name, "threshold": t, "left": node, "right": node,
  "missing": "left" | "right"}``: a value < t goes left, a value >= t goes right (so the
  talk's inclusive ``knn >= a`` reads directly); a missing value (None or NaN) follows
  ``missing``, so a tree never fails on a signal that is absent.
- constant leaf ``{"p_adult": p}``.
- score leaf ``{"score_of": name, "low": lo, "high": hi}``: that signal's value clipped to
  [lo, hi] (low and high default to 0 and 1), or lo when the signal is missing. It keeps
  scores informative where a constant would flatten them: the rule tree's "both pass" leaf
  reports how sure the CNN is, not just "yes".
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from common.errors import ModstreamError

Action = Literal["allow", "review", "block"]
Label = Literal["adult", "normal"]
ADULT_MIN = 0.5  # label "adult" from this P(adult) up
MAX_DEPTH = 256
_NODE_KEYS = {"feature", "threshold", "left", "right", "missing"}
_SCORE_KEYS = {"score_of", "low", "high"}


class FusionError(ModstreamError, ValueError):
    """A malformed tree, model or threshold."""


class FusionTree:
    """P(adult) from a mapping of signal name -> value (None when the signal is absent)."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self._root = _validated(root, depth=0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FusionTree) and self._root == other._root

    def __hash__(self) -> int:
        return hash(json.dumps(self._root, sort_keys=True))

    def __repr__(self) -> str:
        return f"FusionTree({self._root!r})"

    @property
    def features(self) -> frozenset[str]:
        """Every signal the tree reads, in nodes or score leaves."""
        found: set[str] = set()
        pending = [self._root]
        while pending:
            node = pending.pop()
            if "feature" in node:
                found.add(node["feature"])
                pending += [node["left"], node["right"]]
            elif "score_of" in node:
                found.add(node["score_of"])
        return frozenset(found)

    def predict(self, signals: Mapping[str, float | None]) -> float:
        node = self._root
        while "feature" in node:
            value = _signal(signals, node["feature"])
            if value is None:
                node = node[node["missing"]]
            else:
                node = node["left"] if value < node["threshold"] else node["right"]
        if "p_adult" in node:
            return node["p_adult"]
        value = _signal(signals, node["score_of"])
        return node["low"] if value is None else min(max(value, node["low"]), node["high"])

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._root)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionTree:
        return cls(data)

    @classmethod
    def rule_tree(cls, knn_min: float, cnn_min: float) -> FusionTree:
        """The talk's rule ``knn >= knn_min and cnn >= cnn_min`` as a tree.

        Passing scores the CNN's probability clipped to [0.5, 1] (label "adult" exactly when
        the rule holds; the action still grades how sure the CNN is); failing scores 0.
        Without a kNN signal (an empty or one-class reference set, as in the default bundle)
        the CNN decides alone with the same threshold. A missing CNN score fails the rule:
        the pipeline always runs the CNN on images that reach fusion.
        """
        for name, value in (("knn_min", knn_min), ("cnn_min", cnn_min)):
            if not 0.0 <= value <= 1.0:
                raise FusionError(f"{name} must be in [0, 1], got {value}")
        return cls(
            {
                "feature": "cnn",
                "threshold": cnn_min,
                "missing": "left",
                "left": {"p_adult": 0.0},
                "right": {
                    "feature": "knn",
                    "threshold": knn_min,
                    "missing": "right",
                    "left": {"p_adult": 0.0},
                    "right": {"score_of": "cnn", "low": ADULT_MIN, "high": 1.0},
                },
            }
        )

    @classmethod
    def from_sklearn(cls, tree: Any, feature_names: Sequence[str]) -> FusionTree:
        """Convert a fitted sklearn DecisionTreeClassifier over classes [0, 1].

        Leaves carry the class-1 fraction (what predict_proba returns). sklearn sends
        x <= t left; x < nextafter(t, inf) is the same test for float64 values. Missing
        values go where sklearn sends them: the side learnt from NaNs in training, else
        the child with more training samples (see _sklearn_threshold for splits on
        missingness alone). sklearn compares float32 copies of the
        features, so values within float32 rounding of a threshold may split differently.
        """
        fitted = getattr(tree, "tree_", None)
        if fitted is None or getattr(tree, "n_outputs_", 1) != 1:
            raise FusionError("need a fitted single-output DecisionTreeClassifier")
        if [int(label) for label in getattr(tree, "classes_", [])] != [0, 1]:
            raise FusionError(f"the tree's classes must be [0, 1], got {list(getattr(tree, 'classes_', []))}")
        if len(feature_names) != tree.n_features_in_:
            raise FusionError(f"{len(feature_names)} feature names for {tree.n_features_in_} features")
        return cls(_sklearn_node(fitted, 0, list(feature_names), depth=0))


@dataclass(frozen=True)
class Thresholds:
    """P(adult) >= block blocks, >= review queues for a human, anything lower is allowed."""

    block: float = 0.9
    review: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.review <= self.block <= 1.0:
            raise FusionError(f"need 0 <= review <= block <= 1, got review={self.review} block={self.block}")

    def decide(self, p_adult: float) -> tuple[Action, Label]:
        if not 0.0 <= p_adult <= 1.0:
            raise FusionError(f"P(adult) must be in [0, 1], got {p_adult}")
        action: Action = "block" if p_adult >= self.block else "review" if p_adult >= self.review else "allow"
        return action, "adult" if p_adult >= ADULT_MIN else "normal"


ThresholdSource = Literal["bundle", "settings", "default"]


def applied_thresholds(bundle: Mapping[str, float], block: float | None = None,
                       review: float | None = None) -> tuple[Thresholds, ThresholdSource]:
    """The thresholds a verdict uses and where they came from.

    The bundle's own (what ``train fusion`` chose and ``eval`` measured) unless
    settings override one of them explicitly; a bundle that names none gets
    modstream's defaults. A mix is checked like any thresholds (review <= block).
    """
    defaults = Thresholds()
    chosen = Thresholds(
        block=block if block is not None else float(bundle.get("block", defaults.block)),
        review=review if review is not None else float(bundle.get("review", defaults.review)),
    )
    if block is not None or review is not None:
        return chosen, "settings"
    return chosen, "bundle" if bundle else "default"


def _signal(signals: Mapping[str, object], name: str) -> float | None:
    """The signal as a float, or None when it is absent, None or NaN."""
    value = signals.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FusionError(f"signal {name!r} must be a number or None, got {value!r}")
    number = float(value)
    return None if math.isnan(number) else number


def _validated(node: Any, depth: int) -> dict[str, Any]:
    """A normalised copy of node (floats as float), or FusionError naming what is wrong."""
    if depth > MAX_DEPTH:
        raise FusionError(f"tree deeper than {MAX_DEPTH}")
    if not isinstance(node, Mapping):
        raise FusionError(f"a tree node must be an object, got {node!r}")
    keys = set(node)
    if "feature" in keys:
        if keys != _NODE_KEYS:
            raise FusionError(f"a split node needs exactly the keys {sorted(_NODE_KEYS)}, got {sorted(keys)}")
        if node["missing"] not in ("left", "right"):
            raise FusionError(f"'missing' must be 'left' or 'right', got {node['missing']!r}")
        return {
            "feature": _feature_name(node["feature"]),
            "threshold": _number(node["threshold"], "threshold"),
            "missing": node["missing"],
            "left": _validated(node["left"], depth + 1),
            "right": _validated(node["right"], depth + 1),
        }
    if keys == {"p_adult"}:
        return {"p_adult": _probability(node["p_adult"], "p_adult")}
    if "score_of" in keys and keys <= _SCORE_KEYS:
        low = _probability(node.get("low", 0.0), "low")
        high = _probability(node.get("high", 1.0), "high")
        if low > high:
            raise FusionError(f"a score leaf needs low <= high, got {low} > {high}")
        return {"score_of": _feature_name(node["score_of"]), "low": low, "high": high}
    raise FusionError(f"not a split node, constant leaf or score leaf: {dict(node)!r}")


def _feature_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise FusionError(f"a feature name must be a non-empty string, got {name!r}")
    return name


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FusionError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _probability(value: Any, what: str) -> float:
    number = _number(value, what)
    if not 0.0 <= number <= 1.0:
        raise FusionError(f"{what} must be in [0, 1], got {value!r}")
    return number


def _sklearn_node(fitted: Any, node: int, feature_names: list[str], depth: int) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise FusionError(f"tree deeper than {MAX_DEPTH}")
    left, right = int(fitted.children_left[node]), int(fitted.children_right[node])
    if left == right:  # sklearn marks leaves with -1 on both sides
        class_weights = fitted.value[node, 0]
        return {"p_adult": float(class_weights[1] / class_weights.sum())}
    return {
        "feature": feature_names[int(fitted.feature[node])],
        "threshold": _sklearn_threshold(float(fitted.threshold[node])),
        "missing": "left" if fitted.missing_go_to_left[node] else "right",
        "left": _sklearn_node(fitted, left, feature_names, depth + 1),
        "right": _sklearn_node(fitted, right, feature_names, depth + 1),
    }


def _sklearn_threshold(threshold: float) -> float:
    """Our threshold for sklearn's "x <= threshold goes left".

    sklearn splits on missingness alone with threshold inf; JSON has no inf, and the
    largest finite float sends every real signal left just the same.
    """
    return min(float(np.nextafter(threshold, np.inf)), sys.float_info.max)
