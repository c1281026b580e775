"""``modstream index build``: the colour-histogram reference index of the training split.

Histograms are computed by Ray tasks exactly as the pipeline computes them
(draft decode, common.features.color_histogram); the hnsw graph is built on the
driver (hnswlib uses every core there) and saved into the bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.features import HISTOGRAM_BINS, color_histogram
from common.fetch import LoadLimits
from common.knn import ReferenceIndex
from common.loaderrors import LoadError
from common.messages import LABELS
from workers.jobs import bundles
from workers.jobs.datasets import Sample, load_image, read_split
from workers.jobs.errors import JobError
from workers.jobs.parallel import map_chunks

KNN_DIR = "knn"


def histogram_chunk(samples: list[Sample], limits: LoadLimits, draft: int) -> list[np.ndarray | None]:
    """Ray task body: the histogram of each image, None where it no longer loads."""
    histograms: list[np.ndarray | None] = []
    for sample in samples:
        try:
            _, image, _ = load_image(sample.uri, limits, draft)
        except LoadError:
            histograms.append(None)
            continue
        histograms.append(color_histogram(image))
    return histograms


def histograms_of(samples: list[Sample], limits: LoadLimits, draft: int, desc: str) -> list[np.ndarray | None]:
    return map_chunks(histogram_chunk, samples, limits, draft, desc=desc)


def reference_id(sample: Sample) -> str:
    """References are keyed by content, so rebuilding or re-adding an image replaces it."""
    return f"md5:{sample.md5}" if sample.md5 else sample.uri


def build_index(workdir: Path, bundle: Path, limits: LoadLimits, draft: int, k: int, ef: int,
                m: int) -> dict[str, Any]:
    """Index the training split into bundle/knn; returns what the manifest records."""
    samples = read_split(workdir, "train")
    histograms = histograms_of(samples, limits, draft, desc="histograms")
    rows = [i for i, histogram in enumerate(histograms) if histogram is not None]
    if not rows:
        raise JobError(f"no training image of {workdir} could be loaded")
    labels = [samples[i].label for i in rows]
    index = ReferenceIndex(HISTOGRAM_BINS, k=k, ef=ef, M=m, max_elements=len(rows))
    index.add(np.stack([histograms[i] for i in rows]), labels, [reference_id(samples[i]) for i in rows])
    manifest = bundles.ensure_bundle(bundle)
    bundles.replace_component(bundle, KNN_DIR, index.save)
    counts = np.bincount(labels, minlength=len(LABELS))
    manifest["knn"] = {"path": KNN_DIR, "dim": HISTOGRAM_BINS, "references": len(index),
                       "per_class": {name: int(counts[i]) for i, name in enumerate(LABELS)},
                       "k": k, "ef": ef, "M": m, "built_from": str(workdir / "splits" / "train.jsonl"),
                       "unreadable": len(samples) - len(rows), "built": bundles.now()}
    bundles.commit(bundle, manifest)
    return manifest["knn"]
