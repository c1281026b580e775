"""Small labelled image sets for the offline-job tests, painted from seeded noise.

Two visually different classes: "normal" scenes are cool (blue, green, grey)
with straight bands, "adult" scenes are warm (pink, orange) with round blobs, so
both colour histograms and a CNN's features separate them. Every image has
smooth low-frequency noise, so its pHash is reliable (natural-looking, not
flat). Builders plant what hygiene must find: exact copies, resized copies,
placeholder files, unreadable files and duplicates across given splits.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COOL = [(40, 90, 160), (50, 140, 90), (110, 120, 130), (30, 60, 110), (70, 160, 170)]
WARM = [(230, 170, 150), (240, 140, 110), (210, 120, 130), (250, 200, 170), (200, 100, 80)]


def scene(rng: np.random.Generator, label: str, size: tuple[int, int] | None = None,
          swap_palette: bool = False) -> Image.Image:
    """One random image of the class ("normal" or "adult"); swap_palette paints it in the other class's
    colours, so only its shapes tell the class (colour histograms are misled)."""
    width, height = size or (int(rng.integers(140, 220)), int(rng.integers(110, 170)))
    palette = WARM if (label == "adult") != swap_palette else COOL
    base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64)
    cells = rng.normal(0.0, 45.0, (5, 6, 3))
    noise = np.asarray(Image.fromarray(np.uint8(np.clip(cells + 128, 0, 255))).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float64) - 128
    image = Image.fromarray(np.uint8(np.clip(base + noise, 0, 255)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        colour = tuple(int(c) for c in np.clip(np.asarray(palette[rng.integers(len(palette))])
                                               + rng.normal(0, 15, 3), 0, 255))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if label == "adult":
            radius = int(rng.integers(height // 8, height // 3))
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        else:
            band = int(rng.integers(height // 12, height // 5))
            draw.rectangle((0, y, width, y + band), fill=colour)
    return image


@dataclass
class Planted:
    """What a builder planted, as absolute paths."""

    root: Path
    originals: dict[str, list[Path]] = field(default_factory=dict)
    exact_copies: list[Path] = field(default_factory=list)
    resized_copies: list[Path] = field(default_factory=list)
    placeholders: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def save(image: Image.Image, path: Path, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=quality)
    return path


def folder_dataset(root: Path, seed: int = 0, normal: int = 60, adult: int = 24, exact: int = 2,
                   resized: int = 2, placeholders: int = 6, unreadable: int = 2, swapped: float = 0.0) -> Planted:
    """adult/ and normal/ folders, imbalanced, with copies, placeholders and broken files planted;
    a share ``swapped`` of the images wears the other class's colours."""
    rng = np.random.default_rng(seed)
    planted = Planted(root)
    for label, count in (("normal", normal), ("adult", adult)):
        planted.originals[label] = [save(scene(rng, label, swap_palette=bool(rng.random() < swapped)),
                                         root / label / f"{label}-{i:03d}.jpg") for i in range(count)]
    for i in range(exact):
        source = planted.originals["normal"][i]
        planted.exact_copies.append(save_bytes(root / "normal" / f"copy-{i}.jpg", source.read_bytes()))
    for i in range(resized):
        source = planted.originals["adult"][i]
        image = Image.open(source)
        planted.resized_copies.append(save(image.resize((image.width * 3 // 4, image.height * 3 // 4)),
                                           root / "adult" / f"resized-{i}.jpg"))
    grey = Image.new("RGB", (120, 90), (200, 200, 200))
    ImageDraw.Draw(grey).text((10, 40), "image not found", fill=(90, 90, 90))
    first = save(grey, root / "normal" / "missing-000.jpg")
    planted.placeholders.append(first)
    for i in range(1, placeholders):
        label = "adult" if i % 2 else "normal"
        planted.placeholders.append(save_bytes(root / label / f"missing-{i:03d}.jpg", first.read_bytes()))
    for i in range(unreadable):
        path = root / "normal" / f"broken-{i}.jpg"
        if i % 2:
            save_bytes(path, b"<html>404</html>")
        else:
            save_bytes(path, planted.originals["normal"][-1].read_bytes()[:300])
        planted.unreadable.append(path)
    return planted


def save_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def manifest_with_leakage(root: Path, seed: int = 1, per_split: int = 8) -> tuple[Path, list[Path]]:
    """A CSV manifest with a split column; some test rows copy (or resize) training images.

    Returns the manifest and the planted leaking test files.
    """
    rng = np.random.default_rng(seed)
    rows = []
    train: list[Path] = []
    for split in ("train", "validation", "test"):
        for label in ("normal", "adult"):
            for i in range(per_split):
                path = save(scene(rng, label), root / "images" / f"{split}-{label}-{i}.jpg")
                rows.append((path.name, label, split))
                if split == "train":
                    train.append(path)
    leaks = [save_bytes(root / "images" / "leak-exact.jpg", train[0].read_bytes())]
    image = Image.open(train[per_split])  # an adult training image
    leaks.append(save(image.resize((image.width // 2, image.height // 2)), root / "images" / "leak-resized.jpg"))
    rows += [("images/leak-exact.jpg", "normal", "test"), ("images/leak-resized.jpg", "adult", "test")]
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "split"])
        writer.writerows((f"images/{name}" if "/" not in name else name, label, split)
                         for name, label, split in rows)
    return manifest, leaks


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """The bytes of ``image`` saved as ``fmt``: test inputs made in memory."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and CRC, for hand-built (hostile) PNGs."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
