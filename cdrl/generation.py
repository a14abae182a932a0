"""Seeded, batched use of a pipeline: ``generate_samples`` (guided or unconditional samples),
``complete`` (inpainting) and its masks, and the pictures and folders they are written to.

Sample k draws all its noise from its own CPU generator seeded ``seed + k`` (EDM's
StackedRandomGenerator), so a sample does not depend on the batch size or the device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from cdrl.images import to_uint8_images

if TYPE_CHECKING:
    from cdrl.pipeline import CDRLPipeline

MaskPreset = Literal["center", "left_half", "right_half", "top_half", "bottom_half", "random_boxes"]
MASK_PRESETS: tuple[str, ...] = MaskPreset.__args__
PANEL_TILE = 64  # panel tiles are upscaled (nearest) to at least this many pixels a side
HOLE_VALUE = 128  # the repainted region in the "masked input" tile (uint8 grey)
SEPARATOR_VALUE = 64  # the lines between panel tiles
SEPARATOR_WIDTH = 2
MASK_CONVENTION = "mask 1 / white = repaint, 0 / black = keep"


def generate_samples(
    pipe: CDRLPipeline,
    labels: Sequence[int] | None,
    seeds: Sequence[int],
    *,
    guidance_scale: float = 1.0,
    num_langevin_steps: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Sample ``pipe`` in batches, sample k from its own CPU generator seeded ``seeds[k]``.

    Args:
        pipe: a ``CDRLPipeline`` (its own per-step progress bar is turned off).
        labels: one class label per sample, or None for unconditional samples.
        seeds: one seed per sample.
        guidance_scale: classifier-free guidance, diffusers' meaning (1 = off).
        num_langevin_steps: K per level (default: the trained value).
        batch_size: samples per pipeline call.
        progress: show a progress bar over batches when there is more than one.

    Returns:
        (n, c, h, w) float32 CPU samples in [-1, 1].
    """
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels for {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    starts = range(0, len(seeds), batch_size)
    chunks = []
    for start in tqdm(
        starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2
    ):
        batch_seeds = seeds[start : start + batch_size]
        # CPU generators: sample k's noise is the same on every device and in every batch.
        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch_seeds]
        kwargs = {"batch_size": len(batch_seeds)}
        if labels is not None:
            kwargs = {
                "class_labels": list(labels[start : start + batch_size]),
                "guidance_scale": guidance_scale,
            }
        out = pipe(
            generator=generators, num_langevin_steps=num_langevin_steps, output_type="pt", **kwargs
        )
        chunks.append(out.images.float().cpu() * 2 - 1)  # diffusers' [0, 1] -> [-1, 1]
    return torch.cat(chunks)


def write_folder(
    images: Tensor, folder: Path, records: list[dict[str, Any]], info: dict[str, Any]
) -> None:
    """Write ``000000.png ...`` and ``manifest.json`` (``info``, then one record per sample)."""
    folder.mkdir(parents=True, exist_ok=True)
    for array, record in zip(to_uint8_images(images), records, strict=True):
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(
            folder / record["file"]
        )
    manifest = {**info, "samples": records}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------- inpainting


def preset_mask(
    name: MaskPreset, size: int, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A square inpainting mask, 1 = repaint, 0 = keep.

    Args:
        name: ``center`` (the middle half of each side), ``left_half``, ``right_half``,
            ``top_half``, ``bottom_half``, or ``random_boxes`` (1 to 3 boxes with sides between a
            quarter and a half of the image, drawn from ``rng``).
        size: the side in pixels.
        rng: the generator of ``random_boxes`` (default: seed 0).

    Returns:
        (size, size) float32 array of 0 / 1.
    """
    mask = np.zeros((size, size), dtype=np.float32)
    half, quarter = size // 2, size // 4
    if name == "center":
        mask[quarter : size - quarter, quarter : size - quarter] = 1
    elif name == "left_half":
        mask[:, :half] = 1
    elif name == "right_half":
        mask[:, half:] = 1
    elif name == "top_half":
        mask[:half, :] = 1
    elif name == "bottom_half":
        mask[half:, :] = 1
    elif name == "random_boxes":
        rng = rng if rng is not None else np.random.default_rng(0)
        low, high = max(1, quarter), max(1, half)
        for _ in range(int(rng.integers(1, 4))):
            height, width = rng.integers(low, high + 1, size=2)
            top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
            mask[top : top + height, left : left + width] = 1
    else:
        raise ValueError(f"unknown mask preset {name!r}; choose one of {', '.join(MASK_PRESETS)}")
    return mask


def complete(
    pipeline,
    known: Tensor,
    repaint: Tensor,
    *,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    class_label: int | None = None,
    guidance_scale: float = 1.0,
    resample: int = 0,
) -> Tensor:
    """Sample ``num_samples`` completions of each image with a ``CDRLPipeline``.

    Completion j of image i is sample k = i * num_samples + j; it draws all its noise from
    ``torch.Generator().manual_seed(seed + k)``, so it does not depend on ``batch_size``.

    Args:
        pipeline: a ``CDRLPipeline`` of an image model.
        known: (n, c, s, s) images in [0, 1] at the model's resolution.
        repaint: (n, 1, s, s) masks, 1 = repaint, 0 = keep.
        num_samples: completions per image.
        seed: the seed of sample 0.
        batch_size: samples per pipeline call.
        class_label: condition a class-conditional model on this class (None: unconditional).
        guidance_scale: classifier-free guidance with ``class_label`` (1 = plain conditional).
        resample: RePaint resampling passes per level (see ``cdrl.sampling.sample``).

    Returns:
        (n, num_samples, c, s, s) completions in [0, 1]; the kept pixels equal ``known`` exactly.
    """
    n = known.shape[0]
    known_all = known.float().repeat_interleave(num_samples, 0)
    repaint_all = repaint.float().round().repeat_interleave(num_samples, 0)
    chunks = []
    for start in range(0, n * num_samples, batch_size):
        stop = min(start + batch_size, n * num_samples)
        generators = [torch.Generator().manual_seed(seed + k) for k in range(start, stop)]
        labels = None if class_label is None else [class_label] * (stop - start)
        result = pipeline(
            image=known_all[start:stop],
            mask_image=repaint_all[start:stop],
            class_labels=labels,
            guidance_scale=guidance_scale,
            resample=resample,
            generator=generators,
            output_type="pt",
        )
        chunks.append(torch.as_tensor(result.images).float().cpu())
    out = torch.cat(chunks)
    # The pipeline keeps known pixels in [-1, 1]; paste them again to undo the float round trip.
    out = repaint_all * out + (1 - repaint_all) * known_all
    return out.reshape(n, num_samples, *known.shape[1:])


def unit_to_uint8(x: Tensor | np.ndarray) -> np.ndarray:
    """(c, h, w) in [0, 1] -> (h, w, c) uint8 (``cdrl.images.to_uint8_images``)."""
    return to_uint8_images(torch.as_tensor(x)[None] * 2 - 1)[0]


def to_pil(array: np.ndarray) -> Image.Image:
    """An (h, w, c) uint8 array as a PIL image (greyscale when c is 1)."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def panel(known: Tensor, repaint: Tensor, completions: Tensor) -> np.ndarray:
    """The side-by-side picture: input | mask (white = repaint) | masked input | completions.

    Args:
        known: (c, s, s) in [0, 1].
        repaint: (1, s, s) 0 / 1.
        completions: (m, c, s, s) in [0, 1].

    Returns:
        (H, W, c) uint8, every tile upscaled (nearest) to at least ``PANEL_TILE`` pixels a side.
    """
    channels, size = known.shape[0], known.shape[-1]
    mask = repaint.expand(channels, -1, -1)
    masked = known * (1 - mask) + mask * (HOLE_VALUE / 255)
    tiles = [known, mask, masked, *completions]
    scale = max(1, math.ceil(PANEL_TILE / size))
    tiles = [unit_to_uint8(tile).repeat(scale, axis=0).repeat(scale, axis=1) for tile in tiles]
    side = size * scale
    separator = np.full((side, SEPARATOR_WIDTH, channels), SEPARATOR_VALUE, dtype=np.uint8)
    row = [tiles[0]]
    for tile in tiles[1:]:
        row += [separator, tile]
    return np.concatenate(row, axis=1)
