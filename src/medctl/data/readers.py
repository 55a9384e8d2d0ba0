"""Read medical images into one form: ``Image(array, spacing, origin, direction)``.

Conventions (every reader, every cache row, every map written back):
- ``array`` is channel-first ``(C, D, H, W)`` for volumes and ``(C, H, W)`` for 2D images, in the
  file's own dtype. Spatial axes are in C order, slowest first: D is the slice axis (NRRD/NIfTI third
  index, the DICOM stacking direction), H the image rows, W the columns. A 4th NIfTI axis (time,
  echoes) and NRRD "list"/"vector" axes become channels (``data.preprocess.volume_index`` keeps one).
- ``spacing[a]`` is the physical step along array axis ``a`` (mm); ``origin`` the world position of
  voxel 0; ``direction[:, a]`` the unit world vector of axis ``a``. World coordinates are LPS (the
  DICOM/ITK/NRRD convention; NIfTI's RAS is converted), so
  ``world = origin + direction @ (spacing * index)``.

Formats, by file name, one module each under ``medctl/data/formats/`` and one line each in
:data:`FORMATS`: NRRD (.nrrd/.nhdr, pynrrd), NIfTI (.nii/.nii.gz, nibabel), DICOM (.dcm/.dicom/.ima or no
extension: one single- or multi-frame file, or a series folder ordered by ImagePositionPatient projected on
the slice normal; pydicom >= 3.0 for pydicom.pixels), NumPy (.npy/.npz), PNG/TIFF/JPEG/BMP (Pillow; a
multi-page TIFF is a volume). Problems a user can fix raise DataError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medctl.data.formats import dicom, nifti, npy, nrrd, pillow
from medctl.data.formats.nrrd import write_nrrd
from medctl.data.image import (
    Format,
    Image,
    ImageHeader,
    affine_from,
    axis_names,
    default_direction,
    describe_geometry,
    in_native_byte_order,
    unreadable,
)
from medctl.errors import DataError

__all__ = [
    "DICOM_SUFFIXES", "FORMATS", "Format", "Image", "ImageHeader", "affine_from", "axis_names", "declared_size_problem",
    "default_direction", "describe_geometry", "format_of", "image_format", "read_header", "read_image", "write_nrrd",
]  # fmt: skip

FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        nrrd.FORMAT,
        nifti.FORMAT,
        dicom.FORMAT,
        npy.FORMAT,
        pillow.FORMAT,
    )
}
DICOM_SUFFIXES = set(dicom.SUFFIXES)
GZIP_MAX_RATIO = 1032  # deflate never expands data more than ~1032:1


def format_of(name: str | Path) -> Format:
    """The :data:`FORMATS` entry for a file name: by its (compound) suffix; no extension picks the format
    that reads extensionless files (DICOM)."""
    lower = Path(name).name.lower()
    for fmt in FORMATS.values():  # compound endings first: ".nii.gz" is not ".gz"
        if any(s.count(".") > 1 and lower.endswith(s) for s in fmt.suffixes):
            return fmt
    suffix = Path(lower).suffix
    extensionless = next(fmt for fmt in FORMATS.values() if fmt.extensionless)
    if suffix == "":
        return extensionless
    by_suffix = {s: fmt for fmt in FORMATS.values() for s in fmt.suffixes}
    if suffix not in by_suffix:
        known = ", ".join(sorted(by_suffix))
        raise DataError(
            f"{name}: unknown image format {suffix!r}; medctl reads {known} (and extensionless {extensionless.title})"
        )
    return by_suffix[suffix]


def image_format(name: str | Path) -> str:
    """ "nrrd" | "nifti" | "dicom" | "numpy" | "pillow" (a :data:`FORMATS` key) from the file name."""
    return format_of(name).name


def read_image(paths: Sequence[str | Path] | str | Path) -> Image:
    """Read one sample: a single file, or several files of one series (DICOM)."""
    paths = _as_paths(paths)
    if not paths:
        raise DataError("read_image needs at least one file")
    formats = {format_of(p).name for p in paths}
    fmt = FORMATS[next(iter(formats))]
    if len(paths) > 1 and (len(formats) > 1 or not fmt.series):
        raise DataError(
            f"{paths[0].parent}: several files ({len(paths)}) for one sample are only read as a DICOM series"
        )
    check_files(paths)
    try:
        image = fmt.read(paths)
    except DataError:
        raise
    except Exception as exc:  # the library's own word on a corrupt file (zlib, struct, pydicom, ...)
        raise unreadable(fmt, paths[0], exc) from exc
    return in_native_byte_order(image)


def read_header(paths: Sequence[str | Path] | str | Path) -> ImageHeader:
    """Shape and dtype from the header only (pixels are not decoded; DICOM checks PixelData exists)."""
    paths = _as_paths(paths)
    fmt = format_of(paths[0])
    check_files(paths)
    try:
        return fmt.read_header(paths)
    except DataError:
        raise
    except Exception as exc:  # as in read_image: the library's word, translated
        raise unreadable(fmt, paths[0], exc) from exc


def _as_paths(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def check_files(paths: Sequence[Path]) -> None:
    """DataError for what is not a readable file at all: a dangling symlink, a folder, 0 bytes."""
    for path in paths:
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a dangling symlink (to {os.readlink(path)}); fix or remove the link")
        if path.is_dir():
            raise DataError(f"{path}: is a folder, not an image file; point data.source.pattern at files")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes); copy or download it again")


def declared_size_problem(path: str | Path) -> str | None:
    """Why ``path``'s header cannot be true (it declares more voxels than the file can hold), or None.

    Read from the header alone, before any pixel is allocated: raw data must fit in the file, gzip data
    in ~1032x the file (deflate's limit). NRRD, NIfTI and .npy are checked; other formats, and headers
    that cannot be parsed (:func:`read_image` reports those), return None.
    """
    path = Path(path)
    try:
        declared = format_of(path).declared_storage(path)
    except Exception:  # an unparsable header is read_image's to report, in its words
        return None
    if declared is None:
        return None
    shape, dtype, encoding, room = declared
    wanted = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    limit = {"raw": room, "gzip": room * GZIP_MAX_RATIO, "gz": room * GZIP_MAX_RATIO}.get(encoding)
    if limit is None or wanted <= limit:
        return None
    return (
        f"{path.name}: the header declares {'x'.join(map(str, shape))} {dtype.name} "
        f"({wanted / 2**20:.1f} MiB) but the {encoding} file can hold at most {limit / 2**20:.1f} MiB: "
        "the file is truncated or its header is wrong"
    )
