"""Synthetic task families whose class evidence differs from the lesion task's, for showing that
pretraining helps on data it was not tuned on (``make_synthetic_dataset(family=...)``).

Every family keeps the lesion task's "scanner" (:func:`medctl.data.synthetic_parts.acquire`: smooth bias
field, per-volume scale and offset, noise) and its smooth organ, so no global statistic gives a class away:

- ``count``: 4 classes, 1 to 4 small bright blobs of one size inside the organ: only how many there are
  differs (the masks hold the blobs);
- ``shape``: 2 classes, one structure that is round or elongated (a prolate ellipsoid of the same volume,
  along a random direction), of a brightness drawn independently of the class, among ``distractors`` (2 when
  0 is asked for) round balls of random brightness: the brightest thing says nothing of the class (the masks
  hold the structure);
- ``texture``: 2 classes, the organ's texture is coarse (about 3 cells per axis) or fine (6 to 12), of the
  same amplitude: only its spatial frequency differs (the masks hold the organ);
- ``rod``: 2 classes, a thin rod (a needle-like ellipsoid along a random direction) absent or present, among
  ``distractors`` (3 when 0 is asked for) round balls brighter than the rod in every sample: the brightest
  thing is never the evidence, and dimming the image does not turn a ball into a rod (the masks hold the rod).

Each sample function takes ``(size, spacing, class_index, rng, distractors=, oriented_bias=)`` and returns
the image and its uint8 mask, as :func:`medctl.data.synthetic.synthetic_sample` does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medctl.data.synthetic_parts import acquire, coordinates, ellipsoid, organ, smooth_noise

COUNT_CLASSES = ["one", "two", "three", "four"]
SHAPE_CLASSES = ["round", "elongated"]
TEXTURE_CLASSES = ["coarse", "fine"]
TEXTURE_CELLS = (3.0, 12.0)  # cells per axis of the organ's texture: coarse, fine (its upper half only)
ELONGATION = 2.5  # long over short radius of the elongated structure (its volume equals the ball's)
SHAPE_DISTRACTORS = 2  # round balls of random brightness when the caller asks for none
ROD_CLASSES = ["absent", "present"]
ROD_RADII = (0.22, 0.035)  # the rod's long and short radius, shares of the smallest extent (32 px: 14 x 2 px)
ROD_DISTRACTORS = 3  # balls brighter than the rod when the caller asks for none


def _base(size: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator, texture_cells: float = 4.0,
          texture_amplitude: float = 0.08, texture_lowest: float = 0.0):  # fmt: skip
    """Coordinates, extent (mm), organ mask/centre/radius and the tissue: organ ~1 with texture, background ~0.15."""
    grids = coordinates(size)
    extent = np.asarray(size) * np.asarray(spacing)
    inside, centre, radius = organ(grids, rng)
    texture = smooth_noise(size, rng, cells=texture_cells, lowest=texture_lowest) * texture_amplitude
    tissue = np.where(inside, 1.0 + texture, 0.15 + 0.3 * texture)
    return grids, extent, inside, centre, radius, tissue


def _place(grids, extent, inside, centre, radius, rng, radii_mm, taken, axis=None, spread=0.65, tries=200):
    """A structure inside the organ, a margin away from everything in ``taken``; its mask. Raises when
    ``tries`` random places all fail (the volume is too small for what it should hold)."""
    for _ in range(tries):
        where = centre + rng.uniform(-spread, spread, len(grids)) * radius
        blob = ellipsoid(grids, extent, where, radii_mm, axis) & inside
        halo = ellipsoid(grids, extent, where, radii_mm * 1.7, axis)
        if blob.sum() >= 2 ** len(grids) and not (halo & taken).any():
            return blob
    raise ValueError(f"no room for one more structure in a volume of {inside.shape}: use a larger size")


def count_sample(
    size: tuple[int, ...], spacing: tuple[float, ...], class_index: int, rng: np.random.Generator, *,
    distractors: int = 0, oriented_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``class_index + 1`` small bright blobs, each kept apart from the others (see the module docstring)."""
    grids, extent, inside, centre, radius, tissue = _base(size, spacing, rng)
    mask = np.zeros(size, dtype=bool)
    radius_mm = rng.uniform(0.09, 0.11) * extent.min()  # one size per volume: only the count differs
    for _ in range(class_index + 1):
        blob = _place(grids, extent, inside, centre, radius, rng, np.array([radius_mm]), mask)
        mask |= blob
        tissue = np.where(blob, tissue + rng.uniform(1.0, 1.4), tissue)
    return acquire(tissue, rng, bias_strength=0.3, oriented_bias=oriented_bias), mask.astype(np.uint8)


def read_count(image: np.ndarray, spacing: tuple[float, ...], *, contrast: float = 1.4) -> int:
    """How many blobs a ``count`` volume shows, read from the image alone (no mask, no model): groups of at least
    6 voxels brighter than ``contrast`` times the median of the organ around them (an 11 mm window).

    The family's reference reader: it shows that the count is in the image at a given size (about 0.8 exact
    and 0.97 within one on 120 volumes of 16x64x64), so a network that reads it at chance has not been handed an
    impossible task.
    """
    steps = np.asarray(spacing, dtype=float)
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 1.0 / steps)  # 1 mm: the noise off
    organ_level = np.percentile(smooth, 93)  # the organ fills ~18% of the volume: this is inside it
    organ = ndimage.binary_fill_holes(ndimage.gaussian_filter(smooth, 4.0 / steps) > 0.55 * organ_level)
    if not organ.any():
        return 0
    filled = np.where(organ, smooth, np.median(smooth[organ]))  # the background cannot lower the median
    # 11 mm across fine axes, 3 slices along thick ones (a blob spans about 3): (3, 11, 11) voxels at (2, 1, 1) mm
    window = [3 if s >= 2 * steps.min() else 2 * int(5.5 / s) + 1 for s in steps]
    around = ndimage.median_filter(filled, size=window)
    bright = ndimage.binary_erosion(organ) & (smooth > contrast * np.maximum(around, 1e-6))
    labels, _ = ndimage.label(bright)
    return int((np.bincount(labels.ravel())[1:] >= 6).sum())


def shape_sample(
    size: tuple[int, ...], spacing: tuple[float, ...], class_index: int, rng: np.random.Generator, *,
    distractors: int = 0, oriented_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A round (class 0) or elongated (class 1) structure of random brightness, among round distractors."""
    grids, extent, inside, centre, radius, tissue = _base(size, spacing, rng)
    dims = len(size)
    r = rng.uniform(0.13, 0.16) * extent.min()  # mm, the ball's radius
    if class_index == 0:
        radii, axis = np.array([r]), None
    else:  # a prolate ellipsoid of the ball's volume: long * short**(dims - 1) = r**dims
        short = r / ELONGATION ** (1.0 / dims)
        radii = np.array([short * ELONGATION, short])
        axis = rng.normal(size=dims)
        axis /= np.linalg.norm(axis)
    structure = _place(
        grids, extent, inside, centre, radius, rng, radii, np.zeros(size, bool), axis, spread=0.3
    )
    tissue = np.where(structure, tissue + rng.uniform(0.8, 2.0), tissue)
    taken = structure.copy()
    for _ in range(distractors or SHAPE_DISTRACTORS):
        ball = _place(grids, extent, inside, centre, radius, rng, np.array([0.6 * r]), taken)
        taken |= ball
        tissue = np.where(ball, tissue + rng.uniform(0.8, 2.6), tissue)
    return acquire(tissue, rng, oriented_bias=oriented_bias, image_top=6.0), structure.astype(np.uint8)


def texture_sample(
    size: tuple[int, ...], spacing: tuple[float, ...], class_index: int, rng: np.random.Generator, *,
    distractors: int = 0, oriented_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The organ's texture coarse (class 0) or fine (class 1), at one amplitude."""
    lowest = 0.5 if class_index else 0.0  # fine: frequencies in the upper half of the band only
    *_, inside, _centre, _radius, tissue = _base(size, spacing, rng, TEXTURE_CELLS[class_index], 0.25, lowest)
    return acquire(tissue, rng, oriented_bias=oriented_bias), inside.astype(np.uint8)


def rod_sample(
    size: tuple[int, ...], spacing: tuple[float, ...], class_index: int, rng: np.random.Generator, *,
    distractors: int = 0, oriented_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """No rod (class 0) or one thin rod (class 1), among round distractors brighter than it in both classes."""
    grids, extent, inside, centre, radius, tissue = _base(size, spacing, rng)
    dims = len(size)
    rod = np.zeros(size, dtype=bool)
    if class_index == 1:
        axis = rng.normal(size=dims)
        radii = np.array(ROD_RADII) * extent.min()
        rod = _place(grids, extent, inside, centre, radius, rng, radii, rod, axis / np.linalg.norm(axis), spread=0.3)
        tissue = np.where(rod, tissue + rng.uniform(1.0, 1.4), tissue)
    taken = rod.copy()
    for _ in range(distractors or ROD_DISTRACTORS):
        ball = _place(grids, extent, inside, centre, radius, rng, np.array([0.06 * extent.min()]), taken)
        taken |= ball
        tissue = np.where(ball, tissue + rng.uniform(2.6, 3.0), tissue)
    return acquire(tissue, rng, oriented_bias=oriented_bias, image_top=8.0), rod.astype(np.uint8)
