"""The 2-D toy distributions (8 Gaussians, checkerboard, moons, rings): sampling in data units, and
``toy_modes``, the support / mode assignment used to score samples."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from cdrl.utils import DataError

TOY_NAMES = ("8gaussians", "checkerboard", "moons", "rings")

# 2-D toys, in data units (everything inside [-1.2, 1.2]^2 with overwhelming probability).
GAUSSIANS_RADIUS = 0.8  # 8 centres on this circle; neighbouring centres are 0.61 apart
GAUSSIANS_STD = 0.05
GAUSSIANS_SUPPORT = 3.5  # support radius in std: a 2-D Gaussian keeps 1 - exp(-3.5^2 / 2) = 99.8%
CHECKER_TOLERANCE = 0.01
MOONS_SCALE = 0.6  # sklearn's moons (x in [-1, 2], y in [-0.5, 1]) centred, times this
MOONS_NOISE = 0.03  # isotropic Gaussian noise, data units
RINGS_RADII = (0.3, 0.6, 0.9)
RINGS_NOISE = 0.025  # radial Gaussian noise, data units
BAND = 3.0  # moons/rings support: within BAND * noise of the curve


def sample_toy(name: str, num_points: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Points of a 2-D toy distribution, in data units (inside about [-1.1, 1.1]^2).

    Points are allocated to the mixture components exactly in proportion to the expected
    shares (then shuffled), so empirical shares match ``toy_modes``'s expected shares.

    Args:
        name: one of ``TOY_NAMES``.
        num_points: n.
        seed: seed of ``numpy.random.default_rng``, or a generator.

    Returns:
        (n, 2) float32 array.
    """
    rng = np.random.default_rng(seed)
    shares = _expected_share(name)
    mode = _allocate(num_points, shares, rng)
    if name == "8gaussians":
        angle = 2 * np.pi * mode / 8
        centres = GAUSSIANS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        points = centres + GAUSSIANS_STD * rng.standard_normal((num_points, 2))
    elif name == "checkerboard":
        corners = _dark_squares()[mode]  # lower-left corners
        points = corners + 0.5 * rng.random((num_points, 2))
    elif name == "moons":
        t = np.pi * rng.random(num_points)
        centres, signs = _moon_geometry()
        radius = MOONS_SCALE
        direction = np.stack([np.cos(t), np.sin(t)], axis=1) * signs[mode][:, None]
        points = centres[mode] + radius * direction
        points = points + MOONS_NOISE * rng.standard_normal((num_points, 2))
    elif name == "rings":
        angle = 2 * np.pi * rng.random(num_points)
        radius = np.asarray(RINGS_RADII)[mode] + RINGS_NOISE * rng.standard_normal(num_points)
        points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    else:
        raise DataError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")
    return points.astype(np.float32)


def toy_modes(name: str, points: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support membership and mode assignment of 2-D points under a toy distribution.

    Support: within 3.5 std of a centre (8gaussians; 3 std would hold only 98.9% of a 2-D
    Gaussian), inside a dark square with a 0.01 tolerance (checkerboard), within 3x the noise of
    the curve (moons, rings). The mode (nearest centre / square / moon / ring) is given for every
    point, also outside the support.

    Args:
        name: one of ``TOY_NAMES``.
        points: (n, 2) points in data units.

    Returns:
        in_support (n,) bool, mode (n,) int64 in [0, M), expected_share (M,) float64 summing to 1.
    """
    if isinstance(points, Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {points.shape}")
    if name == "8gaussians":
        angle = 2 * np.pi * np.arange(8) / 8
        centres = GAUSSIANS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        distance = np.linalg.norm(points[:, None, :] - centres[None], axis=-1)  # (n, 8)
        tolerance = GAUSSIANS_SUPPORT * GAUSSIANS_STD
    elif name == "checkerboard":
        lower = _dark_squares()  # (8, 2)
        nearest = np.clip(points[:, None, :], lower[None], lower[None] + 0.5)
        distance = np.abs(points[:, None, :] - nearest).max(axis=-1)  # (n, 8), Chebyshev
        tolerance = CHECKER_TOLERANCE
    elif name == "moons":
        centres, signs = _moon_geometry()
        distance = np.stack(
            [_arc_distance(points, c, MOONS_SCALE, s) for c, s in zip(centres, signs, strict=True)],
            axis=1,
        )
        tolerance = BAND * MOONS_NOISE
    elif name == "rings":
        radius = np.linalg.norm(points, axis=1)
        distance = np.abs(radius[:, None] - np.asarray(RINGS_RADII)[None])
        tolerance = BAND * RINGS_NOISE
    else:
        raise DataError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")
    distance = np.nan_to_num(distance, nan=np.inf)
    mode = distance.argmin(axis=1).astype(np.int64)
    in_support = distance.min(axis=1) <= tolerance
    return in_support, mode, _expected_share(name)


def _expected_share(name: str) -> np.ndarray:
    if name == "8gaussians":
        return np.full(8, 1 / 8)
    if name == "checkerboard":
        return np.full(8, 1 / 8)
    if name == "moons":
        return np.full(2, 1 / 2)
    if name == "rings":
        radii = np.asarray(RINGS_RADII)  # uniform density along the curves: share ∝ circumference
        return radii / radii.sum()
    raise DataError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")


def _allocate(num_points: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n,) mode indices, counts as close to n * shares as integers allow, in random order."""
    counts = np.floor(num_points * shares).astype(np.int64)
    remainder = num_points * shares - counts
    extra = np.argsort(-remainder, kind="stable")[: num_points - counts.sum()]
    counts[extra] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def _dark_squares() -> np.ndarray:
    """(8, 2) lower-left corners of the dark squares of a 4x4 checkerboard on [-1, 1]^2."""
    cells = [(i, j) for j in range(4) for i in range(4) if (i + j) % 2 == 0]
    return np.asarray(cells, dtype=np.float64) * 0.5 - 1.0


def _moon_geometry() -> tuple[np.ndarray, np.ndarray]:
    """Arc centres (2, 2) and orientations (2,): upper moon (+1) and lower moon (-1)."""
    # sklearn: outer moon (cos t, sin t), inner moon (1 - cos t, 0.5 - sin t), t in [0, pi];
    # centred on (0.5, 0.25) and scaled by MOONS_SCALE.
    centres = (np.asarray([[0.0, 0.0], [1.0, 0.5]]) - np.asarray([0.5, 0.25])) * MOONS_SCALE
    return centres, np.asarray([1.0, -1.0])


def _arc_distance(points: np.ndarray, centre: np.ndarray, radius: float, sign: float) -> np.ndarray:
    """(n,) distance to the half circle around ``centre`` on side ``sign`` (+1 upper, -1 lower)."""
    offset = points - centre
    on_arc = sign * offset[:, 1] >= 0
    to_circle = np.abs(np.linalg.norm(offset, axis=1) - radius)
    ends = np.asarray([[radius, 0.0], [-radius, 0.0]])
    to_ends = np.linalg.norm(offset[:, None, :] - ends[None], axis=-1).min(axis=1)
    return np.where(on_arc, to_circle, to_ends)
