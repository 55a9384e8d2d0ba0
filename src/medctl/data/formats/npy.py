"""NumPy arrays (``.npy``, ``.npz``): 2D/3D arrays get a channel axis; an ``.npz`` may carry the geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medctl.data.image import DeclaredStorage, Format, Image, ImageHeader, default_direction
from medctl.errors import DataError


def read_numpy(path: Path) -> Image:
    """``.npy``/``.npz``: 2D/3D arrays get a channel axis; 4D is ``(C, D, H, W)``.

    An ``.npz`` holds the image as ``image`` (else its only array) and may hold ``spacing``, ``origin``
    and ``direction`` in the same conventions as :class:`Image`.
    """
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            array = np.asarray(npz[_npz_key(npz, path)])
            extra = {
                k: np.asarray(npz[k], dtype=float) for k in ("spacing", "origin", "direction") if k in npz
            }
    else:
        array, extra = np.load(path, allow_pickle=False), {}
    if array.ndim in (2, 3):
        array = array[None]
    elif array.ndim != 4:
        raise DataError(f"{path}: array of shape {array.shape}; expected (H, W), (D, H, W) or (C, D, H, W)")
    n = array.ndim - 1
    spacing = tuple(map(float, extra.get("spacing", np.ones(n))))
    origin = tuple(map(float, extra.get("origin", np.zeros(n))))
    direction = extra.get("direction", default_direction(n)).reshape(n, n)
    if len(spacing) != n or len(origin) != n:
        raise DataError(f"{path}: spacing/origin have {len(spacing)}/{len(origin)} entries for a {n}D image")
    return Image(array, spacing, origin, direction)


def _npz_key(npz, path: Path) -> str:
    if "image" in npz.files:
        return "image"
    arrays = [k for k in npz.files if k not in ("spacing", "origin", "direction")]
    if len(arrays) != 1:
        raise DataError(f"{path}: .npz with arrays {npz.files}; name the image array 'image'")
    return arrays[0]


def read_numpy_header(paths: Sequence[Path]) -> ImageHeader:
    path = paths[0]
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            array = npz[_npz_key(npz, path)]
            return ImageHeader(tuple(array.shape), str(array.dtype))
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return ImageHeader(tuple(array.shape), str(array.dtype))


def npy_storage(path: Path) -> DeclaredStorage | None:
    """A ``.npy``'s declared array; an ``.npz`` (a zip) is not checked."""
    size = path.stat().st_size
    if path.suffix.lower() != ".npy":
        return None
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(fh)
        return tuple(shape), np.dtype(dtype), "raw", size - fh.tell()


FORMAT = Format(
    "numpy",
    "NumPy",
    (".npy", ".npz"),
    read=lambda paths: read_numpy(paths[0]),
    read_header=read_numpy_header,
    declared_storage=npy_storage,
)
