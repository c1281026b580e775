"""Building a model bundle step by step (index, CNN, fusion, metrics).

A new bundle starts as a copy of the default one, so it loads in the pipeline
after every step. Each step swaps in one component and rewrites the manifest
last. The bundle id is ``trained-`` plus a digest of the component files: the
id stamped on verdicts changes exactly when what decides them changes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.bundle import MANIFEST, default_bundle, load_bundle
from workers.jobs.errors import JobError

ID_PREFIX = "trained-"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def ensure_bundle(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at path, creating it from the default bundle when path is new or empty."""
    if (path / MANIFEST).exists():
        return dict(load_bundle(path).manifest)
    if path.exists() and any(path.iterdir()):
        raise JobError(f"{path} is neither a bundle nor empty: refusing to write a bundle into it")
    base = default_bundle()
    path.mkdir(parents=True, exist_ok=True)
    for child in base.path.iterdir():
        if child.name != MANIFEST:
            (shutil.copytree if child.is_dir() else shutil.copyfile)(child, path / child.name)
    manifest = {**base.manifest, "created": now(), "base": base.id, "metrics": {}, "training": {}}
    commit(path, manifest)
    return manifest


def replace_component(bundle: Path, relative: str, write: Callable[[Path], None]) -> None:
    """Have write(target) build a component at a staging path, then swap it in for bundle/relative."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=bundle))
    try:
        built = staging / Path(relative).name
        write(built)
        target = bundle / relative
        old = staging / "old"
        if target.exists():
            target.rename(old)
        target.parent.mkdir(parents=True, exist_ok=True)
        built.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def component_digest(bundle: Path, manifest: dict[str, Any]) -> str:
    """SHA-256 over the files of the CNN, the reference index and the fusion tree."""
    digest = hashlib.sha256()
    for section in ("cnn", "knn", "fusion"):
        root = bundle / manifest[section]["path"]
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for file in files:
            if file.is_file():
                digest.update(str(file.relative_to(bundle)).encode() + b"\0")
                digest.update(file.read_bytes())
    return digest.hexdigest()


def commit(bundle: Path, manifest: dict[str, Any]) -> str:
    """Write the manifest atomically with a fresh id; returns the id.

    A new id means new components, so metrics measured on the old ones are dropped.
    """
    bundle_id = ID_PREFIX + component_digest(bundle, manifest)[:12]
    if manifest.get("id") != bundle_id:
        manifest["metrics"] = {}
    manifest["id"] = bundle_id
    manifest["updated"] = now()
    handle, temporary = tempfile.mkstemp(prefix=".manifest-", dir=bundle)
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, bundle / MANIFEST)
    load_bundle(bundle)  # fails loudly if a component the manifest names is missing
    return manifest["id"]
