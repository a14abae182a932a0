"""Reading image files as floats in [0, 1], whatever their bit depth and mode: 8- and 16-bit greyscale
(16-bit is scaled by 65535), 1-bit, float, RGB, RGBA and LA (alpha dropped), palette (grey or colour).

Pillow's ``convert("L")`` clips a 16-bit image's values at 255, so a folder of 16-bit PNGs read that way
is pure white; these functions read the samples themselves.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # one channel, no palette
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits per sample


def image_array(image: Image.Image, channels: int) -> tuple[np.ndarray, bool]:
    """A loaded PIL image as (channels, h, w) float32 in [0, 1], and whether colour was dropped."""
    if image.mode in GREY_MODES:
        grey = grey_array(image)
        return np.repeat(grey[None], channels, axis=0), False
    converted = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(converted, dtype=np.float32).reshape(image.height, image.width, -1) / 255.0
    grey = image.mode in ("LA", "La") or (image.mode == "P" and is_grey_palette(image))
    return np.ascontiguousarray(array.transpose(2, 0, 1)), channels == 1 and not grey


def grey_array(image: Image.Image) -> np.ndarray:
    """(h, w) float32 in [0, 1] of a single-channel image (8-bit, 16-bit, 1-bit or float)."""
    array = np.asarray(image, dtype=np.float32)
    if image.mode == "L":
        array = array / 255.0
    elif image.mode.startswith("I"):
        array = array / 65535.0  # PNG's 16-bit greyscale opens as I or I;16
    return np.clip(array, 0.0, 1.0)


def is_grey_palette(image: Image.Image) -> bool:
    """Whether a palette image shows only opaque greys."""
    rgba = np.asarray(image.convert("RGBA"))
    return bool((rgba[..., 3] == 255).all() and (rgba[..., :3] == rgba[..., :1]).all())
