"""Stratified, seeded train/validation/test splits that keep duplicate groups together.

Why groups: a resized copy of a training image in the test split is leakage,
and it inflates every metric. Hygiene puts exact and near duplicates into one
group; a group goes to one split whole. Why sorted group ids before shuffling:
the split then depends on the seed and the set of images only, not on the
order a folder listing or manifest happened to produce.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from workers.jobs.datasets import SPLITS
from workers.jobs.errors import JobError

DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'70/15/15' or '0.7/0.15/0.15' as fractions of one."""
    try:
        parts = [float(part) for part in text.replace(",", "/").split("/")]
    except ValueError as exc:
        raise JobError(f"split fractions must look like 70/15/15, got {text!r}") from exc
    if len(parts) != len(SPLITS) or any(part < 0 for part in parts) or sum(parts) <= 0 or parts[0] == 0:
        raise JobError(f"need three non-negative train/validation/test shares with train > 0, got {text!r}")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def stratified_group_split(labels: Sequence[int], groups: Sequence[str],
                           fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """A split name per item: per class, shuffled groups go one by one to the split furthest below its share.

    Every member of a group must have the same label (hygiene drops groups with conflicting labels).
    """
    if len(labels) != len(groups):
        raise JobError(f"{len(labels)} labels but {len(groups)} groups")
    members: dict[str, list[int]] = defaultdict(list)
    for item, group in enumerate(groups):
        members[group].append(item)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, items in members.items():
        classes = {labels[item] for item in items}
        if len(classes) != 1:
            raise JobError(f"duplicate group {group} mixes labels {sorted(classes)}")
        by_class[classes.pop()].append(group)
    rng = np.random.default_rng(seed)
    assignment: list[str] = [""] * len(labels)
    targets = np.asarray(fractions, dtype=np.float64)
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        total = sum(len(members[group]) for group in class_groups)
        counts = np.zeros(len(SPLITS))
        for position in rng.permutation(len(class_groups)):
            group = class_groups[position]
            chosen = int(np.argmax(targets * total - counts))
            counts[chosen] += len(members[group])
            for item in members[group]:
                assignment[item] = SPLITS[chosen]
    return assignment
