"""The one form every image reader returns, ``Image(array, spacing, origin, direction)``, and the ``Format``
record each reader fills in (``medctl.data.readers.FORMATS`` lists them; the conventions are in that module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medctl.errors import DataError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
DeclaredStorage = tuple[tuple[int, ...], np.dtype, str, int]  # shape, dtype, encoding, bytes after the header


@dataclass
class Image:
    array: np.ndarray  # (C, D, H, W) or (C, H, W), the file's dtype
    spacing: tuple[float, ...]  # per spatial axis, mm
    origin: tuple[float, ...]  # world (LPS) position of voxel 0
    direction: np.ndarray  # (S, S): column a is the world direction of spatial axis a

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def affine(self) -> np.ndarray:
        """(S+1, S+1) voxel index -> LPS world."""
        return affine_from(self.spacing, self.origin, self.direction)


@dataclass
class ImageHeader:
    """What a header tells without decoding pixels (for `medctl check data`)."""

    shape: tuple[int, ...]
    dtype: str


def axis_names(spatial_dims: int) -> tuple[str, ...]:
    """The array's spatial axes in order: ("D", "H", "W") for volumes, ("H", "W") for images."""
    return (
        ("D", "H", "W")[-spatial_dims:]
        if spatial_dims in (2, 3)
        else tuple(f"x{i}" for i in range(spatial_dims))
    )


def describe_geometry(shape: Sequence[int], spacing: Sequence[float] | None = None) -> str:
    """A channel-first shape with its axes named, and the spacing per axis: ``shape (C=1, D=64, H=64, W=16),
    spacing (D 1, H 1, W 1) mm``. Every printed shape goes through this, so the axis order is never a guess
    (NRRD/NIfTI file axes are reversed on reading: D is the file's last axis)."""
    names = ("C", *axis_names(len(shape) - 1))
    text = "shape (" + ", ".join(f"{n}={int(s)}" for n, s in zip(names, shape, strict=True)) + ")"
    if spacing is not None:
        text += (
            ", spacing ("
            + ", ".join(f"{n} {float(s):g}" for n, s in zip(names[1:], spacing, strict=False))
            + ") mm"
        )
    return text


def default_direction(n: int) -> np.ndarray:
    """Geometry of a file that states none: file axis i -> x, j -> y, k -> z, so array axis W -> x,
    H -> y, D -> z (an axial stack in LPS). In array order that is the exchange matrix."""
    return np.eye(n)[::-1].copy()


def affine_from(spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray) -> np.ndarray:
    n = len(spacing)
    affine = np.eye(n + 1)
    affine[:n, :n] = np.asarray(direction, dtype=float) @ np.diag(np.asarray(spacing, dtype=float))
    affine[:n, n] = np.asarray(origin, dtype=float)
    return affine


def in_native_byte_order(image: Image) -> Image:
    """``image`` with its array in this machine's byte order. Big-endian files (Explicit VR Big Endian
    DICOM, big-endian NIfTI) decode to big-endian arrays, which torch refuses; they are swapped in place
    (no second copy of the volume) when the array is writable."""
    array = image.array
    if array.dtype.isnative:
        return image
    native = array.dtype.newbyteorder("=")
    if array.flags.writeable:
        return replace(image, array=array.byteswap(inplace=True).view(native))
    return replace(image, array=array.astype(native))


# ---------------------------------------------------------------------------------------- a format
def undeclared(path: Path) -> DeclaredStorage | None:
    """A format whose header is not checked against the file's size."""
    return None


def no_diagnosis(path: Path) -> str:
    """A format with nothing to add to its library's own message."""
    return ""


@dataclass(frozen=True)
class Format:
    """One image file format: the names it goes by and how to read it. A new reader is one module under
    ``medctl/data/formats/`` that defines ``FORMAT = Format(...)``, plus its line in ``readers.FORMATS``."""

    name: str  # what image_format() answers: "nrrd"
    title: str  # how messages name it: "not a readable NRRD file"
    suffixes: tuple[str, ...]  # lower-case file-name endings, compound ones (".nii.gz") included
    read: Callable[[Sequence[Path]], Image]  # the files of one sample: one, or a series where `series`
    read_header: Callable[[Sequence[Path]], ImageHeader]  # shape and dtype, pixels not decoded
    declared_storage: Callable[[Path], DeclaredStorage | None] = undeclared  # to refuse impossible headers
    diagnose: Callable[[Path], str] = no_diagnosis  # what is wrong with a file its library failed on
    series: bool = False  # one sample may be several files (a DICOM series folder)
    extensionless: bool = False  # a file with no extension is of this format


def unreadable(fmt: Format, path: Path, exc: Exception) -> DataError:
    """A library's exception on ``path`` as one DataError that says what is wrong with the file."""
    what = fmt.diagnose(path)
    if what:
        return DataError(f"{path}: {what}")
    detail = str(exc).replace(str(path), path.name) or type(exc).__name__
    return DataError(f"{path}: not a readable {fmt.title} file ({type(exc).__name__}: {detail})")
