"""What every synthetic task family shares: smooth noise, ellipsoids in millimetres, and the "scanner"
(a smooth multiplicative bias field, an optional fixed-direction intensity ramp, a per-volume scale and
offset, Gaussian noise, the stored sample type)."""

from __future__ import annotations

import numpy as np

ORIENTED_AXIS = -2  # the ramp of ``oriented_bias`` rises along H (rows): a receive coil on one side


def smooth_noise(
    size: tuple[int, ...], rng: np.random.Generator, cells: float, terms: int = 6, lowest: float = 0.0
) -> np.ndarray:
    """Zero-mean, unit-variance noise varying over about ``cells`` cells per axis (random plane waves); with
    ``lowest`` > 0 every wave's frequency per axis is at least that share of the highest (a band, no smooth part)."""
    field = np.zeros(size, dtype=np.complex64)
    for _ in range(terms):
        wave = np.exp(1j * rng.uniform(0, 2 * np.pi)).astype(np.complex64)
        for axis, n in enumerate(size):  # exp(i 2pi f.x) is a product of one factor per axis
            shape = [1] * len(size)
            shape[axis] = n
            if lowest > 0:
                freq = rng.choice([-1.0, 1.0]) * rng.uniform(lowest * cells / 2, cells / 2)
            else:
                freq = rng.uniform(-cells / 2, cells / 2)
            wave = wave * np.exp(2j * np.pi * freq * np.linspace(0, 1, n, dtype=np.float32)).reshape(shape)
        field += wave
    real = field.real
    return (real - real.mean()) / (real.std() + 1e-6)


def coordinates(size: tuple[int, ...]) -> list[np.ndarray]:
    """Normalised voxel coordinates in [-1, 1], one array of ``size`` per axis."""
    return np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij")


def ellipsoid(
    grids: list[np.ndarray],
    extent: np.ndarray,
    centre: np.ndarray,
    radii_mm: np.ndarray,
    axis: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean ellipsoid at ``centre`` (normalised coordinates): ``radii_mm[0]`` along the unit vector ``axis``
    (None: a ball of radius ``radii_mm[0]``), ``radii_mm[1]`` across it."""
    offsets = np.stack(
        [(g - c) * (e / 2) for g, c, e in zip(grids, centre, extent, strict=True)]
    )  # (dims, *S) mm
    if axis is None:
        return (offsets**2).sum(axis=0) <= radii_mm[0] ** 2
    along = np.tensordot(axis, offsets, axes=1)  # (*S) mm along the axis
    across2 = (offsets**2).sum(axis=0) - along**2
    return (along / radii_mm[0]) ** 2 + across2 / radii_mm[1] ** 2 <= 1.0


def organ(grids: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A centred ellipsoidal organ: its mask, centre and radii (normalised coordinates)."""
    dims = len(grids)
    radius = rng.uniform(0.65, 0.8, dims)
    centre = rng.uniform(-0.08, 0.08, dims)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius, strict=True)) <= 1.0
    return inside, centre, radius


def acquire(
    tissue: np.ndarray,
    rng: np.random.Generator,
    *,
    bias_strength: float = 0.15,
    oriented_bias: float = 0.0,
    image_top: float = 3.0,
) -> np.ndarray:
    """The tissue as a scanner stores it: int16 volumes (x1000) or 2D images in [0, 1] (/ ``image_top``).

    A smooth multiplicative bias field ``exp(bias_strength * noise)``, with ``oriented_bias`` > 0 times a ramp
    ``exp(oriented_bias * y)`` along :data:`ORIENTED_AXIS` (y in [-1, 1], the same direction in every
    sample: what gives rotations away), a per-volume scale and offset, and Gaussian noise.
    """
    size = tissue.shape
    bias = np.exp(bias_strength * smooth_noise(size, rng, cells=2))  # smooth multiplicative field
    if oriented_bias > 0:
        ramp = np.linspace(-1.0, 1.0, size[ORIENTED_AXIS]).reshape(-1, *([1] * (-ORIENTED_AXIS - 1)))
        bias = bias * np.exp(oriented_bias * ramp)
    scale, offset = rng.uniform(0.6, 1.4), rng.uniform(-0.1, 0.1)
    image = (tissue * bias * scale + offset + rng.normal(0.0, 0.06, size)).astype(np.float32)
    if len(size) == 3:
        return np.clip(image * 1000.0, -32768, 32767).astype(np.int16)
    return np.clip(image / image_top, 0.0, 1.0)
