"""DICOM through pydicom (>= 3.0, whose ``pydicom.pixels`` decodes the pixel data): one single- or multi-frame
file, or a series folder ordered by ImagePositionPatient projected on the slice normal. Files with no
extension are DICOM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medctl.data.image import Format, Image, ImageHeader, default_direction, unreadable
from medctl.errors import DataError

SUFFIXES = (".dcm", ".dicom", ".ima")


def on_file(path: Path, read, *args, **kwargs):
    """``read(*args, **kwargs)`` for one file of a DICOM series: a library's error names that file, not the
    series' first (which may read fine)."""
    try:
        return read(*args, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # the library's word on this slice, translated
        raise unreadable(FORMAT, path, exc) from exc


def read_dicom_header(paths: Sequence[Path]) -> ImageHeader:
    import pydicom

    shapes = []
    for p in paths:
        ds = on_file(p, pydicom.dcmread, str(p), defer_size="1 KB")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DataError(
                f"{p}: DICOM file without pixel data (not an image: {ds.get('Modality', '?')} object)"
            )
        shapes.append((int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns)))
    depth = sum(s[0] for s in shapes)
    return ImageHeader((depth, shapes[0][1], shapes[0][2]), "dicom")


def read_dicom(paths: Sequence[Path]) -> Image:
    """One multi-frame file -> a volume; one single-frame file -> a 2D image; several -> a series."""
    import pydicom

    datasets = [on_file(p, pydicom.dcmread, str(p)) for p in paths]
    for p, ds in zip(paths, datasets, strict=True):
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DataError(
                f"{p}: DICOM file without pixel data (not an image: {ds.get('Modality', '?')} object)"
            )
    if len(datasets) == 1:
        ds = datasets[0]
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return _dicom_multiframe(ds, paths[0])
        pixels = _dicom_pixels(ds)  # (H, W) or (H, W, 3)
        array = _channels_first(pixels, color=int(ds.get("SamplesPerPixel", 1)) > 1, spatial=2)
        row_spacing, col_spacing = _pixel_spacing(ds)  # a lone slice: in-plane geometry only
        return Image(array, (row_spacing, col_spacing), (0.0, 0.0), default_direction(2))
    return _dicom_series(datasets, paths)


def _dicom_pixels(ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    pixels = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = apply_modality_lut(pixels, ds)
        scaling = ds.get("DoseGridScaling")  # RT dose grids store dose / scaling
        if scaling is not None:
            pixels = pixels * float(scaling)
    if pixels.dtype == np.float64:
        pixels = pixels.astype(np.float32)
    return pixels


def _channels_first(pixels: np.ndarray, *, color: bool, spatial: int) -> np.ndarray:
    if color:  # (..., 3) -> (3, ...)
        return np.ascontiguousarray(np.moveaxis(pixels, -1, 0))
    if pixels.ndim != spatial:
        raise DataError(f"DICOM pixel data has shape {pixels.shape}, expected {spatial} dimensions")
    return pixels[None]


def _pixel_spacing(ds) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None:
        shared = _shared_group(ds, "PixelMeasuresSequence")
        spacing = shared.get("PixelSpacing") if shared is not None else None
    if spacing is None:
        return 1.0, 1.0
    return float(spacing[0]), float(spacing[1])  # between rows (H), between columns (W)


def _orientation(ds) -> tuple[np.ndarray, np.ndarray] | None:
    """(row direction, column direction): the world vectors of increasing column and row index."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        shared = _shared_group(ds, "PlaneOrientationSequence")
        iop = shared.get("ImageOrientationPatient") if shared is not None else None
    if iop is None:
        return None
    values = np.asarray([float(v) for v in iop])
    return values[:3], values[3:]


def _shared_group(ds, name: str):
    groups = ds.get("SharedFunctionalGroupsSequence")
    if not groups or name not in groups[0]:
        return None
    sequence = groups[0].get(name)
    return sequence[0] if sequence else None


def _volume_direction(row_dir: np.ndarray, col_dir: np.ndarray) -> np.ndarray:
    normal = np.cross(row_dir, col_dir)
    return np.stack([normal, col_dir, row_dir], axis=1)  # columns for (D, H, W)


def _dicom_multiframe(ds, path: Path) -> Image:
    pixels = _dicom_pixels(ds)  # (F, H, W) or (F, H, W, 3)
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    array = _channels_first(pixels, color=color, spatial=3)
    row_spacing, col_spacing = _pixel_spacing(ds)
    orient = _orientation(ds)
    row_dir, col_dir = orient if orient is not None else (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    direction = _volume_direction(row_dir, col_dir)
    positions = _frame_positions(ds)
    if positions is not None and len(positions) == array.shape[1]:
        along = positions @ direction[:, 0]
        order = np.argsort(along, kind="stable")
        array = array[:, order]
        steps = np.diff(along[order])
        slice_spacing = float(np.median(steps)) if len(steps) else 1.0
        origin = positions[order[0]]
    else:
        slice_spacing = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        ipp = ds.get("ImagePositionPatient")
        origin = np.asarray([float(v) for v in ipp]) if ipp is not None else np.zeros(3)
    if slice_spacing <= 0:
        raise DataError(f"{path}: frames share one position; cannot order them into a volume")
    pixel_rescale = _enhanced_rescale(ds)
    if pixel_rescale is not None and not color:
        slope, intercept = pixel_rescale
        array = (array.astype(np.float32) * slope + intercept).astype(np.float32)
    return Image(array, (slice_spacing, row_spacing, col_spacing), tuple(map(float, origin)), direction)


def _frame_positions(ds) -> np.ndarray | None:
    """Per-frame ImagePositionPatient: enhanced multi-frame groups, or RT dose frame offsets."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if frames:
        positions = []
        for frame in frames:
            plane = frame.get("PlanePositionSequence")
            if not plane or "ImagePositionPatient" not in plane[0]:
                return None
            positions.append([float(v) for v in plane[0].ImagePositionPatient])
        return np.asarray(positions)
    offsets = ds.get("GridFrameOffsetVector")
    ipp = ds.get("ImagePositionPatient")
    orient = _orientation(ds)
    if offsets is not None and ipp is not None and orient is not None:
        normal = np.cross(*orient)
        return (
            np.asarray([float(v) for v in ipp])[None]
            + np.asarray([float(o) for o in offsets])[:, None] * normal
        )
    return None


def _enhanced_rescale(ds) -> tuple[float, float] | None:
    shared = _shared_group(ds, "PixelValueTransformationSequence")
    if shared is None or "RescaleSlope" not in shared:
        return None
    return float(shared.RescaleSlope), float(shared.get("RescaleIntercept", 0.0))


def _dicom_series(datasets: list, paths: Sequence[Path]) -> Image:
    folder = paths[0].parent
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DataError(
            f"{folder}: {len(series)} DICOM series in one folder; point data.source.pattern at one series"
        )
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise DataError(f"{folder}: slices of different sizes {sorted(sizes)} in one series")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise DataError(f"{folder}: a series of multi-frame files; point data.source.pattern at one file")
    orient = _orientation(datasets[0])
    if orient is None or any(ds.get("ImagePositionPatient") is None for ds in datasets):
        raise DataError(
            f"{folder}: slices without ImagePositionPatient/ImageOrientationPatient cannot be ordered"
        )
    row_dir, col_dir = orient
    direction = _volume_direction(row_dir, col_dir)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    along = positions @ direction[:, 0]  # projection on the slice normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if np.any(np.abs(steps) < 1e-4):
        raise DataError(
            f"{folder}: two slices share one position; the folder holds duplicates or several series"
        )
    slices = [on_file(paths[i], _dicom_pixels, datasets[i]) for i in order]  # an error names its slice
    color = int(datasets[0].get("SamplesPerPixel", 1)) > 1
    volume = np.stack(slices, axis=0)  # (D, H, W) or (D, H, W, 3)
    array = _channels_first(volume, color=color, spatial=3)
    row_spacing, col_spacing = _pixel_spacing(datasets[0])
    spacing = (float(np.median(steps)), row_spacing, col_spacing)
    return Image(array, spacing, tuple(map(float, positions[order[0]])), direction)


FORMAT = Format("dicom", "DICOM", SUFFIXES, read_dicom, read_dicom_header, series=True, extensionless=True)
