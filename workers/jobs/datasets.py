"""Labelled image datasets: reading them, loading their images, and the split
manifests every later job reads.

A dataset is a folder per class (``adult/``, ``normal/``), optionally under
split folders (``train/``, ``validation/``, ``test/``), or a CSV / JSONL
manifest with a ``path`` or ``uri`` column, a ``label`` column and an optional
``split`` column. Labels become integer ids here and only here, through
``common.messages.LABEL_IDS`` (normal = 0, adult = 1): string labels that drift
between steps are a classic source of silent errors.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from common.decode import decode_image
from common.fetch import LoadLimits, fetch_bytes
from common.messages import LABEL_IDS, LABELS
from workers.jobs.errors import JobError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "dev": "validation", "test": "test", "testing": "test"}
SPLITS_DIR = "splits"


@dataclass(frozen=True)
class Sample:
    """One labelled image: an absolute local path or a URI, and its label id."""

    uri: str
    label: int
    split: str | None = None
    md5: str | None = None
    group: str | None = None

    @property
    def label_name(self) -> str:
        return LABELS[self.label]


def label_id(value: Any, where: str) -> int:
    """The integer id of a label given by name ("adult") or id (1)."""
    text = str(value).strip().lower()
    if text in LABEL_IDS:
        return LABEL_IDS[text]  # type: ignore[index]
    if text.isdigit() and int(text) < len(LABELS):
        return int(text)
    raise JobError(f"{where}: unknown label {value!r}; known: {', '.join(LABELS)} (or their ids)")


def split_name(value: Any, where: str) -> str | None:
    text = str(value or "").strip().lower()
    if not text:
        return None
    if text not in SPLIT_ALIASES:
        raise JobError(f"{where}: unknown split {value!r}; known: {', '.join(SPLITS)}")
    return SPLIT_ALIASES[text]


def read_dataset(path: str | Path) -> list[Sample]:
    """Every labelled image of a folder-per-class dataset or a CSV / JSONL manifest, in a stable order."""
    path = Path(path)
    if path.is_dir():
        samples = _read_folders(path)
    elif path.suffix.lower() == ".csv":
        samples = _read_rows(path, _csv_rows(path))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        samples = _read_rows(path, _jsonl_rows(path))
    else:
        raise JobError(f"{path}: not a folder, .csv or .jsonl dataset")
    if not samples:
        raise JobError(f"{path}: no labelled images found (expected {'/'.join(LABELS)} folders or rows)")
    given = {sample.split is not None for sample in samples}
    if len(given) > 1:
        raise JobError(f"{path}: some images have a split and others do not; give all or none")
    return samples


def _read_folders(root: Path) -> list[Sample]:
    """class/ folders, or split/class/ folders; hidden files are skipped, every other file counts."""
    layouts = [(None, root)] + [(split_name(child.name, str(child)), child) for child in sorted(root.iterdir())
                                if child.is_dir() and child.name.lower() in SPLIT_ALIASES]
    samples = []
    for split, folder in layouts:
        for name in LABELS:
            class_dir = folder / name
            if class_dir.is_dir():
                samples += [Sample(str(file.resolve()), LABEL_IDS[name], split)
                            for file in sorted(class_dir.rglob("*"))
                            if file.is_file() and not file.name.startswith(".")]
    return samples


def _csv_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(newline="") as file:
        yield from enumerate(csv.DictReader(file), start=2)


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JobError(f"{path}:{number}: not JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise JobError(f"{path}:{number}: expected a JSON object")
                yield number, row


def _read_rows(manifest: Path, rows: Iterable[tuple[int, dict[str, Any]]]) -> list[Sample]:
    samples = []
    for number, row in rows:
        where = f"{manifest}:{number}"
        location = row.get("uri") or row.get("path")
        if not location:
            raise JobError(f"{where}: needs a 'path' or 'uri'")
        samples.append(Sample(_absolute(str(location), manifest.parent), label_id(row.get("label"), where),
                              split_name(row.get("split"), where)))
    return samples


def _absolute(location: str, base: Path) -> str:
    """URIs stay as they are; relative paths are relative to the manifest's folder."""
    if "://" in location:
        return location
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def read_bytes(uri: str, limits: LoadLimits) -> bytes:
    """The image's bytes through the pipeline's guarded fetch (size caps, refused addresses).

    A plain path comes from the operator's own dataset, so its folder is a file root
    for this read; file:// URIs in a manifest need limits.file_roots like any event's.
    """
    if "://" in uri:
        return fetch_bytes(uri, limits)
    path = Path(uri).resolve()  # the operator's own links (datasets often are) are followed
    return fetch_bytes(path.as_uri(), replace(limits, file_roots=(*limits.file_roots, str(path.parent))))


def load_image(uri: str, limits: LoadLimits, draft: int) -> tuple[bytes, Image.Image, tuple[int, int]]:
    """Bytes, the decoded RGB image as the pipeline decodes it (draft), and the stored size.

    Raises common.loaderrors.LoadError for anything unreadable.
    """
    data = read_bytes(uri, limits)
    image = decode_image(data, limits, draft_to=(draft, draft))
    with Image.open(io.BytesIO(data)) as header:  # decode_image has already vetted these bytes
        size = header.size
    return data, image, size


def write_split(workdir: Path, split: str, samples: Sequence[Sample]) -> Path:
    """One JSONL manifest per split: what every later job reads, so all use the same split."""
    folder = workdir / SPLITS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{split}.jsonl"
    with target.open("w") as file:
        for sample in samples:
            row = {**asdict(sample), "split": split, "label": sample.label_name}
            file.write(json.dumps(row, sort_keys=True) + "\n")
    return target


def read_split(workdir: str | Path, split: str) -> list[Sample]:
    """A split written by ``modstream data check``."""
    path = Path(workdir) / SPLITS_DIR / f"{split}.jsonl"
    if not path.exists():
        raise JobError(f"{path} does not exist: run 'modstream data check DATASET --out {workdir}' first")
    return [Sample(row["uri"], label_id(row["label"], f"{path}:{number}"), split, row.get("md5"), row.get("group"))
            for number, row in _jsonl_rows(path)]


def is_workdir(path: str | Path) -> bool:
    """Whether path is a prepared dataset (the output of ``modstream data check``)."""
    return (Path(path) / SPLITS_DIR / "test.jsonl").exists()
