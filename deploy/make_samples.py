"""Generate the demo's sample images: small, natural-looking, licence-free scenes.

Every image is painted from seeded numpy noise and simple shapes, so the set is
reproducible and owes nothing to anyone. The demo derives exact copies,
resized copies and a corrupt file from these at run time; none are stored here.

    python -m deploy.make_samples [FOLDER]   # default: deploy/samples
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

WIDTH, HEIGHT = 320, 240
JPEG_QUALITY = 85
SAMPLES_DIR = Path(__file__).parent / "samples"

Colour = tuple[int, int, int]
Canvas = np.ndarray  # float64 (HEIGHT, WIDTH, 3), values 0-255
Scene = Callable[[np.random.Generator], Canvas]

_ROWS, _COLUMNS = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)


def _rgb(colour: Colour) -> np.ndarray:
    return np.asarray(colour, dtype=np.float64)


def _vertical_gradient(top: Colour, bottom: Colour) -> Canvas:
    weight = (_ROWS / (HEIGHT - 1))[..., None]
    return _rgb(top) * (1 - weight) + _rgb(bottom) * weight


def _smooth_noise(rng: np.random.Generator, cells: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in [-1, 1] at canvas size: a few octaves of upsampled random grids."""
    total = np.zeros((HEIGHT, WIDTH))
    for octave in range(octaves):
        grid_size = cells * 2**octave
        grid = rng.uniform(-1, 1, (grid_size * HEIGHT // WIDTH + 2, grid_size + 2)).astype(np.float32)
        upsampled = Image.fromarray(grid, mode="F").resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        total += np.asarray(upsampled, dtype=np.float64) / 2**octave
    return np.clip(total / 1.75, -1, 1)


def _ridge(rng: np.random.Generator, base: float, amplitude: float, cells: int) -> np.ndarray:
    """A 1-D horizon line (row per column) for hills, dunes and skylines."""
    line = _smooth_noise(rng, cells, octaves=4)[HEIGHT // 2]
    return base + amplitude * line


def _below(line: np.ndarray) -> np.ndarray:
    """Mask of the pixels under a horizon line, softened over two pixels."""
    return np.clip((_ROWS - line[None, :]) / 2 + 0.5, 0, 1)[..., None]


def _disc(centre_x: float, centre_y: float, radius_x: float, radius_y: float) -> np.ndarray:
    distance = np.hypot((_COLUMNS - centre_x) / radius_x, (_ROWS - centre_y) / radius_y)
    return np.clip((1 - distance) * max(radius_x, radius_y) / 2, 0, 1)[..., None]


def _paint(canvas: Canvas, mask: np.ndarray, colour: Canvas | Colour) -> Canvas:
    fill = _rgb(colour) if isinstance(colour, tuple) else colour
    return canvas * (1 - mask) + fill * mask


def _textured(colour: Colour, noise: np.ndarray, strength: float) -> Canvas:
    return _rgb(colour) * (1 + strength * noise[..., None])


def beach_day(rng: np.random.Generator) -> Canvas:
    canvas = _vertical_gradient((70, 130, 200), (190, 220, 240))
    canvas = _paint(canvas, _disc(250, 45, 22, 22), (255, 245, 210))
    sea = _textured((30, 90, 140), _smooth_noise(rng, 3) * 0.5 + np.sin(_ROWS * 0.9) * 0.3, 0.25)
    canvas = _paint(canvas, _below(np.full(WIDTH, 110.0)), sea)
    shore = 250 - 0.45 * _COLUMNS[0] + 6 * _smooth_noise(rng, 4)[0]
    return _paint(canvas, _below(shore), _textured((225, 200, 150), _smooth_noise(rng, 12), 0.12))


def beach_sunset(rng: np.random.Generator) -> Canvas:
    canvas = _vertical_gradient((80, 40, 110), (250, 150, 60))
    canvas = _paint(canvas, _disc(110, 140, 30, 30), (255, 220, 120))
    sea = _textured((40, 30, 60), _smooth_noise(rng, 4) * 0.6 + np.sin(_ROWS * 1.3) * 0.3, 0.3)
    canvas = _paint(canvas, _below(np.full(WIDTH, 150.0)), sea)
    glitter = np.clip(1 - np.abs(_COLUMNS - 110) / 25, 0, 1) * (_ROWS > 150) * (np.sin(_ROWS * 2.1) > 0.3)
    return _paint(canvas, glitter[..., None] * 0.7, (255, 200, 110))


def mountains(rng: np.random.Generator) -> Canvas:
    canvas = _vertical_gradient((110, 160, 220), (220, 230, 240))
    layers = [(60, 70, (120, 130, 150)), (120, 45, (80, 100, 90)), (175, 30, (45, 70, 40))]
    for index, (base, amplitude, colour) in enumerate(layers):
        line = _ridge(rng, base, amplitude, cells=3 + 2 * index)
        layer = _textured(colour, _smooth_noise(rng, 10), 0.15)
        if index == 0:
            snow = np.clip((line.min() + 30 - _ROWS) / 6, 0, 1)[..., None]
            layer = _paint(layer, snow, (240, 240, 245))
        canvas = _paint(canvas, _below(line), layer)
    return canvas


def green_hills(rng: np.random.Generator) -> Canvas:
    clouds = np.clip(_smooth_noise(rng, 3), 0, 1)[..., None]
    canvas = _paint(_vertical_gradient((90, 150, 230), (170, 205, 240)), clouds, (250, 250, 250))
    for base, phase, colour in [(120, 0.0, (110, 170, 70)), (170, 2.0, (70, 140, 50))]:
        line = base + 25 * np.sin(_COLUMNS[0] / 45 + phase) + 8 * _smooth_noise(rng, 5)[0]
        canvas = _paint(canvas, _below(line), _textured(colour, _smooth_noise(rng, 16), 0.18))
    return canvas


def portrait(
    rng: np.random.Generator,
    centre_x: float,
    skin: Colour,
    hair: Colour,
    shirt: Colour | None,
    background: tuple[Colour, Colour],
) -> Canvas:
    """A head-and-shoulders figure of smooth skin-toned shapes in soft side light;
    bare shoulders when `shirt` is None, so the classifier sees both kinds."""
    canvas = _vertical_gradient(*background) * (1 + 0.08 * _smooth_noise(rng, 2)[..., None])
    light = 1 + 0.25 * np.clip((_COLUMNS - centre_x) / 80, -1, 1)[..., None]
    skin_shaded = _rgb(skin) * light
    shoulders = skin_shaded if shirt is None else _textured(shirt, _smooth_noise(rng, 12), 0.15) * light
    canvas = _paint(canvas, _disc(centre_x, 250, 110, 70), shoulders)
    canvas = _paint(canvas, _disc(centre_x, 175, 22, 40), skin_shaded)  # neck
    canvas = _paint(canvas, _disc(centre_x, 80, 58, 68), _textured(hair, _smooth_noise(rng, 20), 0.3))
    canvas = _paint(canvas, _disc(centre_x, 105, 44, 58), skin_shaded)  # face
    for eye_x in (centre_x - 17, centre_x + 17):
        canvas = _paint(canvas, _disc(eye_x, 98, 7, 4), (60, 45, 40))
    return _paint(canvas, _disc(centre_x, 138, 14, 5), (170, 90, 90))


def portrait_left(rng: np.random.Generator) -> Canvas:
    backdrop = ((180, 190, 200), (120, 130, 145))
    blue_shirt = (40, 70, 120)
    return portrait(rng, 120, skin=(225, 180, 150), hair=(50, 35, 25), shirt=blue_shirt, background=backdrop)


def portrait_right(rng: np.random.Generator) -> Canvas:
    backdrop = ((230, 200, 150), (190, 140, 90))
    return portrait(rng, 205, skin=(180, 125, 95), hair=(25, 20, 20), shirt=None, background=backdrop)


def grass_field(rng: np.random.Generator) -> Canvas:
    canvas = _vertical_gradient((140, 180, 225), (200, 220, 235))
    horizon = _ridge(rng, 80, 14, cells=2)
    blades = _smooth_noise(rng, 40) * 0.6 + np.sin(_COLUMNS * 1.7 + 4 * _smooth_noise(rng, 6)) * 0.4
    mowing_bands = 0.8 + 0.25 * (np.sin((_COLUMNS + 2.5 * _ROWS) / 30) > 0)
    grass = _textured((80, 140, 50), blades, 0.3) * mowing_bands[..., None]
    canvas = _paint(canvas, _below(horizon), grass)
    canvas = _paint(canvas, _disc(235, 120, 5, 40), (70, 50, 35))  # a lone tree: trunk, then crown
    return _paint(canvas, _disc(235, 70, 45, 38), _textured((40, 90, 35), _smooth_noise(rng, 20), 0.35))


def wheat_field(rng: np.random.Generator) -> Canvas:
    canvas = _vertical_gradient((40, 100, 190), (150, 190, 230))
    horizon = 150 - 0.35 * _COLUMNS[0] + 5 * _smooth_noise(rng, 3)[0]
    wheat = _textured((215, 175, 80), _smooth_noise(rng, 24) + 0.3 * np.sin(_ROWS * 1.1), 0.2)
    canvas = _paint(canvas, _below(horizon), wheat)
    return _paint(canvas, _disc(60, 40, 60, 18) * 0.8, (245, 245, 250))  # one cloud


def city(rng: np.random.Generator, sky: tuple[Colour, Colour], night: bool) -> Canvas:
    """A skyline of blocks with a grid of windows, lit at night."""
    canvas = _vertical_gradient(*sky)
    left = 0
    while left < WIDTH:
        width = int(rng.integers(30, 70))
        top = int(rng.integers(40, 170))
        shade = int(rng.integers(30, 60)) if night else int(rng.integers(110, 200))
        block = np.zeros((HEIGHT, WIDTH, 1))
        block[top:, left : left + width - 3] = 1.0
        canvas = _paint(canvas, block, (shade, shade, shade + 10))
        in_window = ((_ROWS - top) % 12 < 6) & ((_COLUMNS - left) % 10 < 5) & (top + 4 < _ROWS)
        if night:  # about two windows in three are lit, chosen per window, not per pixel
            lit_table = rng.random((HEIGHT // 12 + 1, WIDTH // 10 + 1)) < 0.65
            window_row = np.clip((_ROWS - top) // 12, 0, None).astype(int)
            window_column = np.clip((_COLUMNS - left) // 10, 0, None).astype(int)
            in_window &= lit_table[window_row, window_column]
        window_colour = (250, 210, 120) if night else (90, 110, 130)
        canvas = _paint(canvas, (in_window & (block[..., 0] > 0))[..., None] * 0.85, window_colour)
        left += width
    return canvas


def city_dusk(rng: np.random.Generator) -> Canvas:
    return city(rng, ((20, 25, 60), (200, 110, 80)), night=True)


def city_day(rng: np.random.Generator) -> Canvas:
    return city(rng, ((120, 170, 230), (210, 225, 240)), night=False)


def forest(rng: np.random.Generator) -> Canvas:
    canvas = _textured((50, 90, 45), _smooth_noise(rng, 8), 0.5)
    for _ in range(7):
        x = float(rng.uniform(0, WIDTH))
        width = float(rng.uniform(6, 16))
        trunk = np.clip(width / 2 - np.abs(_COLUMNS - x - 0.05 * _ROWS), 0, 1)[..., None]
        canvas = _paint(canvas, trunk, _textured((70, 50, 35), _smooth_noise(rng, 30), 0.3))
    floor = _ridge(rng, 200, 8, cells=3)
    return _paint(canvas, _below(floor), _textured((90, 70, 40), _smooth_noise(rng, 20), 0.3))


def desert(rng: np.random.Generator) -> Canvas:
    canvas = _vertical_gradient((150, 190, 230), (240, 225, 200))
    for base, colour in [(110, (225, 170, 110)), (150, (210, 145, 85)), (195, (235, 185, 120))]:
        line = _ridge(rng, base, 30, cells=2)
        shading = np.clip((_ROWS - line[None, :]) / 40, 0, 1)
        dune = _textured(colour, 0.6 * shading - 0.3 + 0.15 * _smooth_noise(rng, 30), 0.3)
        canvas = _paint(canvas, _below(line), dune)
    return canvas


SCENES: dict[str, Scene] = {
    "beach-01": beach_day,
    "beach-02": beach_sunset,
    "mountains-01": mountains,
    "hills-01": green_hills,
    "portrait-01": portrait_left,
    "portrait-02": portrait_right,
    "field-01": grass_field,
    "field-02": wheat_field,
    "city-01": city_dusk,
    "city-02": city_day,
    "forest-01": forest,
    "desert-01": desert,
}


def render(name: str) -> Image.Image:
    """Paint one scene, seeded by its position in SCENES: append new scenes so the others keep theirs."""
    seed = list(SCENES).index(name)
    canvas = SCENES[name](np.random.default_rng(seed))
    grain = np.random.default_rng(1000 + seed).normal(0, 3, canvas.shape)
    pixels = np.clip(np.rint(canvas + grain), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB").filter(ImageFilter.SMOOTH)


def encode_jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def write_samples(folder: Path = SAMPLES_DIR) -> list[Path]:
    """Write every scene as `<name>.jpg` into `folder`, replacing older files of the same name."""
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
