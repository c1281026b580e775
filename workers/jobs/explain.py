"""``modstream explain``: a Grad-CAM heatmap of what made the CNN say "adult".

Grad-CAM weighs the last convolutional feature maps by the mean gradient of
P(adult) over each map, keeps the positive part and scales it to [0, 1]: the
regions that push the score up. The talk lists model debugging as an open
question; this is the answer for one image at a time.

Frozen graphs name their last convolution in the manifest (``gradcam_tensor``)
or are searched for their last ReLU; Keras bundles name the backbone layer
(``gradcam_layer``) or the last layer with a 4-d output is used. SavedModels
converted from open_nsfw carry a ``features`` function (the last block's maps)
and a ``head`` function (maps to probabilities) to differentiate through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.bundle import Bundle
from common.cnn import PREPROCESSING
from common.fetch import LoadLimits
from workers.jobs.datasets import load_image
from workers.jobs.errors import JobError

OVERLAY_ALPHA = 0.45
_CONV_OPS = ("Relu6", "Relu")


def gradcam(bundle: Bundle, image: np.ndarray) -> tuple[np.ndarray, float]:
    """(heatmap in [0, 1] of the feature-map size, P(adult)) for one (size, size, 3) uint8 image."""
    spec = bundle.cnn
    batch = PREPROCESSING[spec.preprocessing](image[None])
    if spec.format == "frozen_graph":
        maps, gradients, score = _frozen_graph_gradients(bundle, batch)
    elif spec.format == "keras":
        maps, gradients, score = _keras_gradients(bundle, batch)
    elif spec.format == "saved_model":
        maps, gradients, score = _saved_model_gradients(bundle, batch)
    else:
        raise JobError(f"Grad-CAM supports frozen_graph, keras and saved_model bundles, not {spec.format}")
    weights = gradients.mean(axis=(0, 1))
    heatmap = np.maximum((maps * weights).sum(axis=-1), 0.0)
    peak = heatmap.max()
    return (heatmap / peak if peak > 0 else heatmap), score


def _frozen_graph_gradients(bundle: Bundle, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    import tensorflow as tf

    spec = bundle.cnn
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(spec.path.read_bytes())
    conv = bundle.manifest["cnn"].get("gradcam_tensor") or _last_activation(graph_def)

    def run(images):
        maps, output = tf.compat.v1.import_graph_def(graph_def, input_map={spec.input_tensor: images},
                                                     return_elements=[conv, spec.output_tensor], name="")
        score = output[:, spec.adult_index] if output.shape.rank == 2 else output
        return maps, tf.gradients(score, maps)[0], score

    size = spec.input_size
    wrapped = tf.compat.v1.wrap_function(run, [tf.TensorSpec([None, size, size, 3], tf.float32)])
    maps, gradients, score = wrapped(tf.constant(batch))
    return np.asarray(maps)[0], np.asarray(gradients)[0], float(np.asarray(score)[0])


def _saved_model_gradients(bundle: Bundle, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Maps from the model's ``features`` function, gradient of P(adult) through its ``head``."""
    import tensorflow as tf

    from common.opennsfw import LAST_MAPS

    loaded = tf.saved_model.load(str(bundle.cnn.path))
    if not hasattr(loaded, "features") or not hasattr(loaded, "head"):
        raise JobError("this SavedModel has no features/head functions to explain (convert it with modstream)")
    maps = loaded.features(tf.constant(batch))[LAST_MAPS]
    with tf.GradientTape() as tape:
        tape.watch(maps)
        score = loaded.head(maps)[:, bundle.cnn.adult_index]
    gradients = tape.gradient(score, maps)
    return np.asarray(maps)[0], np.asarray(gradients)[0], float(np.asarray(score)[0])


def _last_activation(graph_def: Any) -> str:
    """The last ReLU in graph order: in a CNN, the output of its last convolution block."""
    for node in reversed(graph_def.node):
        if node.op in _CONV_OPS:
            return f"{node.name}:0"
    raise JobError("no ReLU in the graph: name the last convolution as cnn.gradcam_tensor in the manifest")


def _keras_gradients(bundle: Bundle, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Run the model layer by layer (it is a chain) and take the gradient at the named layer's output."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(bundle.cnn.path, compile=False)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    target = bundle.manifest["cnn"].get("gradcam_layer") or _last_4d_layer(layers)
    x = tf.constant(batch)
    maps = None
    with tf.GradientTape() as tape:
        for layer in layers:
            x = layer(x, training=False)
            if layer.name == target:
                maps = x
                tape.watch(maps)
        score = x[:, bundle.cnn.adult_index] if len(x.shape) == 2 else x
    if maps is None:
        raise JobError(f"the model has no layer named {target!r}")
    gradients = tape.gradient(score, maps)
    return np.asarray(maps)[0], np.asarray(gradients)[0], float(np.asarray(score)[0])


def _last_4d_layer(layers: list[Any]) -> str:
    for layer in reversed(layers):
        if len(layer.output.shape) == 4:
            return layer.name
    raise JobError("no layer with a 4-d output to explain")


def overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """The heatmap in a jet colour map over the image, at the image's size."""
    from matplotlib import colormaps

    rgb = image.convert("RGB")
    upsampled = Image.fromarray(np.uint8(heatmap * 255)).resize(rgb.size, Image.Resampling.BILINEAR)
    coloured = colormaps["jet"](np.asarray(upsampled) / 255.0)[..., :3]
    blended = (1 - OVERLAY_ALPHA) * np.asarray(rgb, dtype=np.float64) + OVERLAY_ALPHA * coloured * 255
    return Image.fromarray(np.uint8(np.clip(blended, 0, 255)))


def explain(image_path: str, bundle: Bundle, out: Path, limits: LoadLimits, draft: int) -> float:
    """Write the overlay PNG for one image; returns P(adult)."""
    _, image, _ = load_image(image_path, limits, draft)
    heatmap, score = gradcam(bundle, bundle.cnn.model_input(image))
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, heatmap).save(out, format="PNG")
    return score
