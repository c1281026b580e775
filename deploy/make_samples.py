"""Write the demo's sample images: real photographs from scikit-image's bundled data.

Each is a photograph that ships inside the scikit-image wheel with a licence
that allows redistribution (public domain, CC0 or no known copyright; see
SCENES and deploy/samples/README.md), cropped to the 4:3 centre and resized to
320 x 240. The demo derives exact copies, resized copies and a corrupt file
from these at run time; none are stored here.

    python -m deploy.make_samples [FOLDER]   # default: deploy/samples
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

WIDTH, HEIGHT = 320, 240
JPEG_QUALITY = 85
SAMPLES_DIR = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class Photo:
    """One scikit-image photograph: its loader in skimage.data, what it shows and its licence."""

    loader: str
    shows: str
    licence: str

    def pixels(self) -> np.ndarray:
        from skimage import data

        loaded: Callable[[], np.ndarray] = getattr(data, self.loader)
        return loaded()


SCENES: dict[str, Photo] = {
    "astronaut": Photo("astronaut", "portrait of astronaut Eileen Collins",
                       "NASA photograph, no known copyright (NASA Great Images)"),
    "cat": Photo("chelsea", "Chelsea the cat", "CC0 (photographer Stefan van der Walt)"),
    "coffee": Photo("coffee", "a cup of coffee on a saucer", "CC0 (photographer Rachel Michetti)"),
    "rocket": Photo("rocket", "a SpaceX Falcon 9 on the launch pad",
                    "public domain (released by SpaceX)"),
    "camera": Photo("camera", "a man with a camera on a tripod", "CC0 (photographer Lav Varshney)"),
    "clock": Photo("clock", "a wall clock, motion blurred",
                   "public domain (photographer Stefan van der Walt)"),
    "tissue": Photo("immunohistochemistry", "a stained tissue section under a microscope",
                    "no known copyright restrictions (Center for Microscopy And Molecular Imaging)"),
    "retina": Photo("retina", "a fundus photograph of a healthy eye",
                    "CC0 1.0 (Mikael Häggström, via Wikimedia Commons)"),
    "sign": Photo("text", "a street-corner sign with text",
                  "public domain (Wikipedia, File:Corner.png)"),
}


def render(name: str) -> Image.Image:
    """The photograph's 4:3 centre at WIDTH x HEIGHT, in RGB."""
    image = Image.fromarray(SCENES[name].pixels()).convert("RGB")
    return ImageOps.fit(image, (WIDTH, HEIGHT), Image.Resampling.LANCZOS)


def encode_jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def write_samples(folder: Path = SAMPLES_DIR) -> list[Path]:
    """Write every photograph as `<name>.jpg` into `folder`, replacing older files of the same name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCENES:
        path = folder / f"{name}.jpg"
        path.write_bytes(encode_jpeg(render(name)))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]) if args else SAMPLES_DIR
    for path in write_samples(folder):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
