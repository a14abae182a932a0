"""Small helpers shared across the package (one copy of each)."""

from __future__ import annotations

import math
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def expand_as(values: Tensor, like: Tensor) -> Tensor:
    """(b,) -> (b, 1, ..., 1) so it broadcasts against ``like`` (b, ...)."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def randn_like(
    x: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
) -> Tensor:
    """Standard normal noise shaped like ``x``.

    With a list of generators (one per sample, as EDM's StackedRandomGenerator), sample i draws only from
    generator i, so a sample does not depend on the batch it was drawn in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack(
            [
                torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
                for g in generator
            ]
        )
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_int_list(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (EDM's seed syntax)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)-(\d+)", part)
        out.extend(range(int(match[1]), int(match[2]) + 1) if match else [int(part)])
    return out


def to_uint8_images(x: Tensor) -> np.ndarray:
    """(b, c, h, w) in [-1, 1] -> (b, h, w, c) uint8."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """(b, h, w, c) uint8 -> one (H, W, c) uint8 grid, ``nrow`` images per row (default isqrt(b))."""
    b, h, w, c = images.shape
    nrow = nrow or max(1, math.isqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8
    )
    for i in range(b):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = images[i]
    return grid


def save_grid(x: Tensor, path: str | Path, *, nrow: int | None = None, upscale: int = 1) -> None:
    """Save (b, c, h, w) images in [-1, 1] as a PNG grid, atomically (write a temp file, then rename)."""
    from PIL import Image

    grid = make_grid(to_uint8_images(x), nrow=nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def save_scatter(points: Tensor, path: str | Path, *, size: int = 256, extent: float = 1.5) -> None:
    """Save (n, 2) points as a PNG scatter on [-extent, extent]^2, atomically (no plotting library needed)."""
    from PIL import Image

    pixels = (
        ((points.detach().cpu().float().clamp(-extent, extent) / extent + 1) / 2 * (size - 1))
        .round()
        .long()
    )
    canvas = np.full((size, size), 255, dtype=np.uint8)
    canvas[(size - 1 - pixels[:, 1]).numpy(), pixels[:, 0].numpy()] = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)


def git_sha(cwd: str | Path | None = None) -> str:
    """The current commit, with '-dirty' when the tree has changes; 'unknown' outside a git checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
