"""Image files in and out.

In: files as floats in [0, 1], whatever their bit depth and mode: 8- and 16-bit greyscale (16-bit is
scaled by 65535), 1-bit, float, RGB, RGBA and LA (alpha dropped), palette (grey or colour). Pillow's
``convert("L")`` clips a 16-bit image's values at 255, so a folder of 16-bit PNGs read that way is pure
white; these functions read the samples themselves.

Out: the one conversion of model images ([-1, 1]) to uint8, grids (torchvision's ``make_grid``) and the
2-D scatter plot (matplotlib), each written all at once (``atomic_write``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdrl.utils import atomic_write

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


# ---------------------------------------------------------------- out


def to_uint8(x: Tensor) -> Tensor:
    """(b, c, h, w) in [-1, 1] -> (b, c, h, w) uint8 on the CPU: the one rounding every writer uses."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_uint8_images(x: Tensor) -> np.ndarray:
    """(b, c, h, w) in [-1, 1] -> (b, h, w, c) uint8 array (``to_uint8``, channels last)."""
    return to_uint8(x).permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """(b, h, w, c) uint8 -> one (H, W, c) uint8 grid, ``nrow`` images per row (default isqrt(b)), by
    torchvision's ``make_grid`` (black padding); greyscale stays one channel."""
    from torchvision.utils import make_grid as tv_make_grid

    channels = images.shape[-1]
    nrow = nrow or max(1, math.isqrt(len(images)))
    grid = tv_make_grid(
        torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2),
        nrow=nrow,
        padding=padding,
        pad_value=0,
    )
    return grid[:channels].permute(1, 2, 0).numpy()


def save_grid(x: Tensor, path: str | Path, *, nrow: int | None = None, upscale: int = 1) -> None:
    """Save (b, c, h, w) images in [-1, 1] as a PNG grid, all at once (``atomic_write``); ``upscale``
    enlarges it by nearest-neighbour (8x8 digits are too small to look at)."""
    grid = make_grid(to_uint8_images(x), nrow=nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def save_scatter(points: Tensor, path: str | Path, *, size: int = 256, extent: float = 1.5) -> None:
    """Save (n, 2) points as a PNG scatter plot on [-extent, extent]^2 (matplotlib), all at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = points.detach().cpu().float().numpy()
    dpi = 100
    fig, ax = plt.subplots(figsize=(size / dpi, size / dpi), dpi=dpi)
    try:
        ax.scatter(xy[:, 0], xy[:, 1], s=1, c="black", linewidths=0)
        ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])
        fig.subplots_adjust(0, 0, 1, 1)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
