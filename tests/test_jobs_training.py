"""CNN training pieces without Ray: imbalance handling, augmentation, the sweep and seeded head training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from workers.jobs.augment import augmented_copies
from workers.jobs.errors import JobError
from workers.jobs.train_cnn import sweep_options
from workers.jobs.training import TrainOptions, class_weights, fit_head, resample, views_per_sample


def blobs(count: int, adult_share: float, seed: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clusters (adult shifted by +1 in every dimension), imbalanced."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(count) < adult_share).astype(np.int64)
    return rng.normal(0.0, 0.7, (count, dim)) + labels[:, None], labels


def test_oversampling_adds_augmented_views_of_the_minority_until_balanced() -> None:
    labels = [0] * 9 + [1] * 3
    options = TrainOptions(balance=("oversample",), augment_copies=1)
    views = np.array(views_per_sample(labels, options))
    assert views[np.array(labels) == 0].sum() == views[np.array(labels) == 1].sum() == 18
    assert set(views[:9]) == {2}
    assert views_per_sample(labels, TrainOptions(balance=(), augment_copies=1)) == [2] * 12


def test_samplers_and_class_weights_rebalance() -> None:
    x, y = blobs(300, 0.2, seed=1, dim=2)  # overlapping: Tomek links exist
    kept = resample(x, y, ("undersample",), seed=0)
    assert np.bincount(y[kept]).tolist() == [np.sum(y == 1)] * 2
    cleaned = resample(x, y, ("tomek",), seed=0)
    assert set(cleaned) < set(range(len(y))) and np.sum(y[cleaned] == 1) == np.sum(y == 1)  # majority side only
    weights = class_weights(y, TrainOptions())
    assert weights[1] / weights[0] == pytest.approx(np.sum(y == 0) / np.sum(y == 1))
    assert class_weights(y, TrainOptions(balance=())) is None


def test_options_are_checked() -> None:
    with pytest.raises(JobError, match="--weights"):
        TrainOptions(backbone="mobilenet_v2")
    with pytest.raises(JobError, match="balance"):
        TrainOptions(balance=("smote",))


def test_sweep_starts_with_the_given_options_and_is_seeded() -> None:
    base = TrainOptions()
    sweep = sweep_options(base, 4, seed=3)
    assert sweep[0] == base and len(set(sweep)) == 4
    assert sweep == sweep_options(base, 4, seed=3) and sweep != sweep_options(base, 4, seed=4)


def test_augmentation_is_seeded_and_keeps_shape() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    first, second = augmented_copies(image, 2, seed=7, item=3)
    assert first.shape == image.shape and first.dtype == np.uint8
    assert not np.array_equal(first, second) and not np.array_equal(first, image)
    again = augmented_copies(image, 2, seed=7, item=3)
    assert np.array_equal(again[0], first) and np.array_equal(again[1], second)


def test_head_training_learns_and_repeats_with_the_seed() -> None:
    x, y = blobs(240, 0.3, seed=2)
    val_x, val_y = blobs(80, 0.3, seed=3)
    options = dataclasses.replace(TrainOptions(), epochs=30, learning_rate=1e-2, hidden=8, seed=4)
    first = fit_head(x, y, val_x, val_y, options, class_weights(y, options))
    second = fit_head(x, y, val_x, val_y, options, class_weights(y, options))
    assert first.validation["balanced_accuracy"] > 0.9
    assert [k.shape for k, _ in first.head] == [(16, 8), (8, 2)]
    for (k1, b1), (k2, b2) in zip(first.head, second.head, strict=True):
        assert np.array_equal(k1, k2) and np.array_equal(b1, b2)
