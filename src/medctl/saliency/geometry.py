"""Voxel grids in world space: the source scan's grid, the cached grid, and resampling between them.

Conventions are those of :mod:`medctl.data.readers` and the cache manifest:

- spatial array axes in C order (D, H, W) or (H, W); world coordinates LPS (mm);
- a manifest row's source geometry is ``spacing`` (per array axis), ``origin`` (world position of voxel
  0), ``direction`` (``(n, n)`` row-major; *column* ``a`` is the unit world vector of axis ``a``) and
  ``orig_shape`` (``(C, *spatial)``), so ``world = origin + direction @ (spacing * index)``;
- ``cache_affine`` (row-major) maps a cached voxel index to the world: ``(n+1, n+1)``, or ``(4, 3)`` for a
  2D slice cut from a volume. It records every preprocessing step (orientation, spacing, pad/crop,
  resize), so a map on the cached grid is placed exactly and can be resampled onto the source grid.

Without a ``cache_affine`` the cached grid is taken as the source's field of view resized to the cached
shape (cell-centred, ``align_corners=False``): spacing ``spacing * orig_shape / shape``, first voxel
centre moved by half the change of voxel size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medctl.errors import DataError


@dataclass(frozen=True)
class Geometry:
    """A voxel grid: its spatial ``shape`` and the affine from voxel index to world.

    ``affine`` is ``(w + 1, n + 1)`` for ``n`` array axes in a ``w``-dimensional world (``w`` = 3 for
    LPS, or 2 for a plain 2D image): ``[x, 1] = affine @ [i, 1]``; column ``a`` (of the first ``n``) is
    one voxel step along axis ``a``.
    """

    shape: tuple[int, ...]
    affine: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.shape)
        rows, cols = np.shape(self.affine)
        if n not in (2, 3) or cols != n + 1 or rows not in (3, 4) or rows - 1 < n:
            raise DataError(
                f"geometry of shape {list(self.shape)} needs an affine of (n+1) columns and 3 or 4 rows "
                f"(voxel index -> world); got {rows}x{cols}"
            )
        if any(s < 1 for s in self.shape) or np.any(np.linalg.norm(self.matrix[:-1, :n], axis=0) == 0):
            raise DataError(
                f"geometry needs a positive shape and non-zero voxel steps; got {list(self.shape)}"
            )

    @staticmethod
    def from_spacing(
        shape: Sequence[int],
        spacing: Sequence[float],
        origin: Sequence[float] | None = None,
        direction: np.ndarray | Sequence[Sequence[float]] | None = None,
    ) -> Geometry:
        """The grid of an image with ``spacing``, ``origin`` and ``direction`` (columns = axes)."""
        n = len(shape)
        if len(spacing) != n or (origin is not None and len(origin) != n):
            raise DataError(f"geometry for a {n}D grid needs {n} spacings and {n} origin values")
        direction = np.eye(n) if direction is None else np.asarray(direction, dtype=np.float64)
        if direction.shape != (n, n):
            raise DataError(f"geometry direction for a {n}D grid must be {n}x{n}, got {direction.shape}")
        if any(s <= 0 for s in spacing):
            raise DataError(f"geometry needs positive spacing; got {list(spacing)}")
        affine = np.eye(n + 1)
        affine[:n, :n] = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
        affine[:n, n] = np.zeros(n) if origin is None else np.asarray(origin, dtype=np.float64)
        return Geometry(tuple(int(s) for s in shape), _tuples(affine))

    @property
    def matrix(self) -> np.ndarray:
        """The affine as an array ``(w + 1, n + 1)``."""
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def space_directions(self) -> np.ndarray:
        """``(n, w)``: row ``a`` is the world step of one voxel along axis ``a`` (NRRD's convention)."""
        n = len(self.shape)
        return self.matrix[:-1, :n].T

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(np.linalg.norm(self.space_directions, axis=1).tolist())

    @property
    def origin(self) -> tuple[float, ...]:
        return tuple(self.matrix[:-1, -1].tolist())

    def resized(self, shape: Sequence[int]) -> Geometry:
        """The same field of view on ``shape`` voxels (cell-centred, ``align_corners=False``)."""
        shape = tuple(int(s) for s in shape)
        n = len(self.shape)
        if len(shape) != n:
            raise DataError(f"cannot resize a {n}D geometry to shape {list(shape)}")
        scale = np.asarray(self.shape, dtype=np.float64) / np.asarray(shape)
        new_to_old = np.eye(n + 1)  # new index j -> old index (j + 0.5) * scale - 0.5
        new_to_old[:n, :n] = np.diag(scale)
        new_to_old[:n, n] = 0.5 * scale - 0.5
        return Geometry(shape, _tuples(self.matrix @ new_to_old))

    def nrrd_header(self) -> dict[str, Any]:
        """pynrrd fields that place an array written with ``index_order="C"`` on this grid.

        NRRD lists axes fastest first, so ``space directions`` rows are the array axes reversed (W, H, D),
        as :func:`medctl.data.readers.write_nrrd` writes them: the file has the source NRRD's layout.
        3D worlds declare LPS, which 3D Slicer reads.
        """
        world = self.matrix.shape[0] - 1
        header: dict[str, Any] = {
            "space directions": self.space_directions[::-1],
            "space origin": np.asarray(self.origin),
            "kinds": ["domain"] * len(self.shape),
        }
        if world == 3:
            header["space"] = "left-posterior-superior"
        else:
            header["space dimension"] = world
        return header


def source_geometry(record: Mapping[str, Any] | None, spatial_dims: int) -> Geometry | None:
    """The source scan's grid from a manifest row (or a sample's ``geometry`` dict); None when unknown.

    Needs ``spacing`` and ``orig_shape`` (its last ``spatial_dims`` entries; a leading channel is
    ignored); a missing ``origin`` is 0 and a missing ``direction`` the identity. A source with another
    number of axes (a volume the 2D slices were cut from) is None: a slice's map has no source grid of
    its own.
    """
    if record is None or len(record) == 0:
        return None
    spacing = _floats(record.get("spacing"))
    orig_shape = _floats(record.get("orig_shape"))
    if len(spacing) != spatial_dims or len(orig_shape) < spatial_dims:
        return None
    n = spatial_dims
    origin = _floats(record.get("origin")) or [0.0] * n
    direction = _floats(record.get("direction"))
    if direction and len(direction) != n * n:
        raise DataError(
            f"geometry direction has {len(direction)} values; a {n}D grid needs {n * n} (row-major)"
        )
    matrix = np.asarray(direction, dtype=np.float64).reshape(n, n) if direction else None
    shape = tuple(int(round(s)) for s in orig_shape[-n:])
    return Geometry.from_spacing(shape, spacing, origin, matrix)


def cache_geometry(
    record: Mapping[str, Any] | None, spatial_shape: Sequence[int], source: Geometry | None
) -> Geometry | None:
    """The cached array's grid: from ``cache_affine`` when recorded, else the source resized, else None."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    n = len(spatial_shape)
    values = _floats(record.get("cache_affine")) if record is not None and len(record) else []
    if values:
        rows = {(n + 1) * (n + 1): n + 1, 4 * (n + 1): 4}.get(len(values))
        if rows is None:
            raise DataError(
                f"cache_affine has {len(values)} values; a {n}D grid needs {(n + 1) ** 2} or {4 * (n + 1)}"
            )
        return Geometry(spatial_shape, _tuples(np.asarray(values).reshape(rows, n + 1)))
    if source is not None and len(source.shape) == n:
        return source.resized(spatial_shape)
    return None


def resample_to_shape(volume: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """Cell-centred linear resampling of ``volume`` ``(*S)`` onto ``shape`` (same field of view)."""
    shape = tuple(int(s) for s in shape)
    if volume.shape == shape:
        return volume.astype(np.float32, copy=False)
    factors = [t / s for t, s in zip(shape, volume.shape, strict=True)]
    out = ndimage.zoom(
        volume.astype(np.float32, copy=False), factors, order=order, grid_mode=True, mode="nearest"
    )
    if out.shape != shape:  # a rounding difference of one voxel: pad with edge values or crop
        pads = [(0, max(0, t - o)) for t, o in zip(shape, out.shape, strict=True)]
        out = np.pad(out, pads, mode="edge")[tuple(slice(0, t) for t in shape)]
    return out


def resample_to_grid(volume: np.ndarray, grid: Geometry, target: Geometry) -> np.ndarray:
    """``volume`` on ``grid`` resampled (linear) onto ``target``, both placed in the same world.

    Each target voxel centre is mapped to ``grid``'s index space; values are interpolated there, the
    edge voxels are extended by one voxel (so the half-voxel border of the field of view is covered),
    and voxels outside ``grid``'s field of view (cropped away in preprocessing) are 0.
    """
    n = len(grid.shape)
    if volume.shape != grid.shape or len(target.shape) != n or grid.matrix.shape != target.matrix.shape:
        raise DataError(f"cannot resample a {volume.shape} map on {grid.shape} onto {target.shape}")
    source, destination = grid.matrix, target.matrix
    # target index -> world -> grid index; least squares handles the (4, 3) affines of slices
    world_to_grid = np.linalg.pinv(source)
    mapping = world_to_grid @ destination  # (n + 1, n + 1)
    padded = np.pad(volume.astype(np.float32, copy=False), 1, mode="edge")  # index + 1
    return ndimage.affine_transform(
        padded,
        mapping[:n, :n],
        offset=mapping[:n, n] + 1.0,
        output_shape=target.shape,
        order=1,
        mode="constant",
        cval=0.0,
    ).astype(np.float32, copy=False)


def _floats(value: Any) -> list[float]:
    """Numbers in a list/tuple/array (nested, or JSON text) as a flat float list; [] for None/NaN/empty."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else None
    flat: list[float] = []
    _flatten(value, flat)
    if not flat or not all(np.isfinite(flat)):
        return []
    return flat


def _flatten(value: Any, out: list[float]) -> None:
    if value is None:
        return
    if isinstance(value, np.ndarray) and value.dtype != object:
        out.extend(value.astype(np.float64).ravel().tolist())
    elif isinstance(value, list | tuple | np.ndarray):
        for item in value:
            _flatten(item, out)
    else:
        out.append(float(value))


def _tuples(matrix: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(matrix, dtype=np.float64))
