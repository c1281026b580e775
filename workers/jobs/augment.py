"""Image augmentation for training: the original design's box crop, brightness and
saturation (chosen for its failure cases), plus flips and small rotations.

Stateless random ops with explicit seeds: the same (seed, image, copy) gives the
same augmented image on any worker, so a run is reproducible with --seed even
when Ray spreads feature extraction over machines.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Augmentation:
    min_crop_area: float = 0.6  # box crop keeps at least this share of the image, same aspect ratio
    brightness: float = 0.2  # +- on a 0..1 scale
    saturation: tuple[float, float] = (0.6, 1.5)
    flip: bool = True
    max_rotation_deg: float = 15.0


def augment(image: Any, seed: Any, settings: Augmentation = Augmentation()) -> Any:
    """One augmented copy of a (h, w, 3) uint8 image tensor; seed is an int32 tensor of shape (2,)."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    pixels = tf.image.convert_image_dtype(image, tf.float32)

    scale = tf.sqrt(tf.random.stateless_uniform([], seeds[0], settings.min_crop_area, 1.0))
    corner = tf.random.stateless_uniform([2], seeds[1], 0.0, 1.0) * (1.0 - scale)
    box = tf.concat([corner, corner + scale], axis=0)[None, :]  # y1, x1, y2, x2 (normalised)
    pixels = tf.image.crop_and_resize(pixels[None], box, [0], tf.stack([height, width]))[0]

    pixels = tf.image.stateless_random_brightness(pixels, settings.brightness, seeds[2])
    low, high = settings.saturation
    pixels = tf.image.stateless_random_saturation(pixels, low, high, seeds[3])
    if settings.flip:
        pixels = tf.image.stateless_random_flip_left_right(pixels, seeds[4])
    if settings.max_rotation_deg > 0:
        limit = math.radians(settings.max_rotation_deg)
        angle = tf.random.stateless_uniform([], seeds[5], -limit, limit)
        pixels = _rotate(pixels, angle)
    return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 1.0) * 255.0), tf.uint8)


def _rotate(pixels: Any, angle: Any) -> Any:
    """Rotate about the centre, filling the corners by reflection (no black wedges to learn from)."""
    import tensorflow as tf

    height = tf.cast(tf.shape(pixels)[0], tf.float32)
    width = tf.cast(tf.shape(pixels)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Maps each output pixel (x, y) to the input pixel it samples.
    x_offset = (width - 1) / 2 - (cos * (width - 1) / 2 - sin * (height - 1) / 2)
    y_offset = (height - 1) / 2 - (sin * (width - 1) / 2 + cos * (height - 1) / 2)
    transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[None]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[None], transforms=transform, output_shape=tf.shape(pixels)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0]


@functools.cache
def _compiled(settings: Augmentation) -> Any:
    import tensorflow as tf

    return tf.function(lambda image, seed: augment(image, seed, settings), reduce_retracing=True)


def augmented_copies(image: Any, copies: int, seed: int, item: int,
                     settings: Augmentation = Augmentation()) -> list[Any]:
    """copies augmented versions of one uint8 numpy image, seeded by (seed, item, copy)."""
    import numpy as np

    run = _compiled(settings)
    return [np.asarray(run(image, np.array([seed * 1_000_003 + item, copy], np.int64))) for copy in range(copies)]
