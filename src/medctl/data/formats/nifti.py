"""NIfTI (``.nii``, ``.nii.gz``) through nibabel: a 4th axis (time, echoes) becomes channels, RAS becomes LPS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medctl.data.image import LPS_FROM_RAS, DeclaredStorage, Format, Image, ImageHeader
from medctl.errors import DataError


def read_nifti(path: Path) -> Image:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)  # (I, J, K[, T]), scaled by slope/intercept when the header says so
    if data.ndim == 5 and data.shape[3] == 1:  # (I, J, K, 1, C): NIfTI's vector intent
        data = data[:, :, :, 0, :]
    if data.ndim not in (3, 4):
        raise DataError(
            f"{path}: NIfTI with {data.ndim} dimensions; medctl reads 3D volumes and 4D (as channels)"
        )
    if data.ndim == 3:
        data = data[..., None]
    array = np.transpose(data, (3, 2, 1, 0))  # (C, K, J, I) = (C, D, H, W)
    affine = np.asarray(img.affine, dtype=float)
    linear = LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    spacing = np.where(spacing > 0, spacing, 1.0)
    direction = (linear / spacing)[:, ::-1]  # columns for (K, J, I)
    origin = LPS_FROM_RAS @ affine[:3, 3]
    return Image(
        np.ascontiguousarray(array), tuple(map(float, spacing[::-1])), tuple(map(float, origin)), direction
    )


def read_nifti_header(paths: Sequence[Path]) -> ImageHeader:
    import nibabel as nib

    img = nib.load(str(paths[0]))
    return ImageHeader(tuple(reversed(img.shape)), str(img.get_data_dtype()))


def nifti_storage(path: Path) -> DeclaredStorage | None:
    import nibabel as nib

    size = path.stat().st_size
    img = nib.load(str(path))
    if path.name.lower().endswith(".gz"):
        return tuple(reversed(img.shape)), np.dtype(img.get_data_dtype()), "gzip", size
    return (
        tuple(reversed(img.shape)),
        np.dtype(img.get_data_dtype()),
        "raw",
        size - int(img.dataobj.offset),
    )


FORMAT = Format(
    "nifti",
    "NIfTI",
    (".nii", ".nii.gz"),
    read=lambda paths: read_nifti(paths[0]),
    read_header=read_nifti_header,
    declared_storage=nifti_storage,
)
