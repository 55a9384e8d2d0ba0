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

Formats, by file name: NRRD (.nrrd/.nhdr, pynrrd), NIfTI (.nii/.nii.gz, nibabel), DICOM (.dcm/.dicom/
.ima or no extension: one single- or multi-frame file, or a series folder ordered by
ImagePositionPatient projected on the slice normal; pydicom), NumPy (.npy/.npz), PNG/TIFF/JPEG/BMP
(Pillow; a multi-page TIFF is a volume). Problems a user can fix raise DataError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medctl.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
_FORMATS = {
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".npy": "numpy",
    ".npz": "numpy",
    ".png": "pillow",
    ".tif": "pillow",
    ".tiff": "pillow",
    ".jpg": "pillow",
    ".jpeg": "pillow",
    ".bmp": "pillow",
    **{s: "dicom" for s in DICOM_SUFFIXES},
}
GZIP_MAX_RATIO = 1032  # deflate never expands data more than ~1032:1
_FORMAT_NAMES = {"dicom": "DICOM", "nrrd": "NRRD", "nifti": "NIfTI", "numpy": "NumPy", "pillow": "image"}
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


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
    return ("D", "H", "W")[-spatial_dims:] if spatial_dims in (2, 3) else tuple(f"x{i}" for i in range(spatial_dims))


def describe_geometry(shape: Sequence[int], spacing: Sequence[float] | None = None) -> str:
    """A channel-first shape with its axes named, and the spacing per axis: ``shape (C=1, D=64, H=64, W=16),
    spacing (D 1, H 1, W 1) mm``. Every printed shape goes through this, so the axis order is never a guess
    (NRRD/NIfTI file axes are reversed on reading: D is the file's last axis)."""
    names = ("C", *axis_names(len(shape) - 1))
    text = "shape (" + ", ".join(f"{n}={int(s)}" for n, s in zip(names, shape, strict=True)) + ")"
    if spacing is not None:
        text += ", spacing (" + ", ".join(f"{n} {float(s):g}" for n, s in zip(names[1:], spacing, strict=False)) + ") mm"
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


def image_format(name: str | Path) -> str:
    """ "nrrd" | "nifti" | "dicom" | "numpy" | "pillow" from the file name; no extension means DICOM."""
    lower = Path(name).name.lower()
    if lower.endswith(".nii.gz"):
        return "nifti"
    suffix = Path(lower).suffix
    if suffix == "":
        return "dicom"
    if suffix not in _FORMATS:
        known = ", ".join(sorted(_FORMATS))
        raise DataError(
            f"{name}: unknown image format {suffix!r}; medctl reads {known} (and extensionless DICOM)"
        )
    return _FORMATS[suffix]


def read_image(paths: Sequence[str | Path] | str | Path) -> Image:
    """Read one sample: a single file, or several DICOM files of one series."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise DataError("read_image needs at least one file")
    formats = {image_format(p) for p in paths}
    if len(paths) > 1 and formats != {"dicom"}:
        raise DataError(
            f"{paths[0].parent}: several files ({len(paths)}) for one sample are only read as a DICOM series"
        )
    fmt = formats.pop()
    readers = {
        "dicom": read_dicom,
        "nrrd": read_nrrd,
        "nifti": read_nifti,
        "numpy": read_numpy,
        "pillow": read_pillow,
    }
    check_files(paths)
    try:
        image = readers[fmt](paths) if fmt == "dicom" else readers[fmt](paths[0])
    except DataError:
        raise
    except Exception as exc:  # the library's own word on a corrupt file (zlib, struct, pydicom, ...)
        raise unreadable(fmt, paths[0], exc) from exc
    return in_native_byte_order(image)


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


def read_header(paths: Sequence[str | Path] | str | Path) -> ImageHeader:
    """Shape and dtype from the header only (pixels are not decoded; DICOM checks PixelData exists)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    fmt = image_format(paths[0])
    check_files(paths)
    try:
        return _read_header(fmt, paths)
    except DataError:
        raise
    except Exception as exc:  # as in read_image: the library's word, translated
        raise unreadable(fmt, paths[0], exc) from exc


# ------------------------------------------------------------------------------ what went wrong
def check_files(paths: Sequence[Path]) -> None:
    """DataError for what is not a readable file at all: a dangling symlink, a folder, 0 bytes."""
    for path in paths:
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path}: a dangling symlink (to {os.readlink(path)}); fix or remove the link")
        if path.is_dir():
            raise DataError(f"{path}: is a folder, not an image file; point data.source.pattern at files")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes); copy or download it again")


def on_file(path: Path, read, *args, **kwargs):
    """``read(*args, **kwargs)`` for one file of a DICOM series: a library's error names that file, not the
    series' first (which may read fine)."""
    try:
        return read(*args, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # the library's word on this slice, translated
        raise unreadable("dicom", path, exc) from exc


def unreadable(fmt: str, path: Path, exc: Exception) -> DataError:
    """A library's exception on ``path`` as one DataError that says what is wrong with the file."""
    what = _nrrd_problem(path) if fmt == "nrrd" else ""
    if what:
        return DataError(f"{path}: {what}")
    detail = str(exc).replace(str(path), path.name) or type(exc).__name__
    return DataError(f"{path}: not a readable {_FORMAT_NAMES[fmt]} file ({type(exc).__name__}: {detail})")


def _nrrd_problem(path: Path) -> str:
    """"corrupt header ..." or "truncated data (got N of M bytes)" for an NRRD pynrrd could not read;
    "" when neither explains it."""
    import nrrd

    with open(path, "rb") as fh:
        try:
            header = nrrd.read_header(fh)
        except Exception as exc:  # any failure to parse the header is the answer
            return f"corrupt header: not an NRRD file, or a damaged one ({type(exc).__name__} in pynrrd)"
        try:
            dtype = nrrd.reader._determine_datatype(header)
            expected = int(np.prod(header["sizes"])) * dtype.itemsize
        except Exception:  # a header pynrrd reads but cannot size: leave the library's message
            return ""
        if header.get("data file"):
            return ""  # detached data: the library's message names the data file
        got = _payload_bytes(fh, str(header.get("encoding", "raw")))
    if got is not None and got < expected:
        return f"truncated data (got {got} of {expected} bytes); copy or download it again"
    return ""


def _payload_bytes(fh, encoding: str) -> int | None:
    """How many bytes of pixel data the rest of ``fh`` yields (decompressed until the data breaks off)."""
    import bz2
    import zlib

    if encoding == "raw":
        return len(fh.read())
    if encoding in ("gzip", "gz"):
        decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    elif encoding in ("bzip2", "bz2"):
        decompressor = bz2.BZ2Decompressor()
    else:
        return None
    got = 0
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        try:
            got += len(decompressor.decompress(chunk))
        except (zlib.error, OSError, EOFError):
            break
    return got


def _read_header(fmt: str, paths: Sequence[Path]) -> ImageHeader:
    path = paths[0]
    if fmt == "nrrd":
        import nrrd

        header = nrrd.read_header(str(path))
        return ImageHeader(tuple(int(s) for s in reversed(header["sizes"])), str(header["type"]))
    if fmt == "nifti":
        import nibabel as nib

        img = nib.load(str(path))
        return ImageHeader(tuple(reversed(img.shape)), str(img.get_data_dtype()))
    if fmt == "numpy":
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                array = npz[_npz_key(npz, path)]
                return ImageHeader(tuple(array.shape), str(array.dtype))
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return ImageHeader(tuple(array.shape), str(array.dtype))
    if fmt == "pillow":
        from PIL import Image as PILImage

        with PILImage.open(path) as img:
            return ImageHeader((getattr(img, "n_frames", 1), img.height, img.width), img.mode)
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


def declared_size_problem(path: str | Path) -> str | None:
    """Why ``path``'s header cannot be true (it declares more voxels than the file can hold), or None.

    Read from the header alone, before any pixel is allocated: raw data must fit in the file, gzip data
    in ~1032x the file (deflate's limit). NRRD, NIfTI and .npy are checked; other formats, and headers
    that cannot be parsed (:func:`read_image` reports those), return None.
    """
    path = Path(path)
    try:
        declared = _declared_storage(path)
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


def _declared_storage(path: Path) -> tuple[tuple[int, ...], np.dtype, str, int] | None:
    """(shape, dtype, encoding, bytes after the header) from the header; None for unchecked formats."""
    fmt = image_format(path)
    size = path.stat().st_size
    if fmt == "nrrd":
        import nrrd
        import nrrd.reader

        header = nrrd.read_header(str(path))
        if "data file" in header or "datafile" in header:  # detached data: the .nhdr holds no pixels
            return None
        shape = tuple(int(s) for s in reversed(header["sizes"]))
        return (
            shape,
            np.dtype(nrrd.reader._determine_datatype(header)),
            str(header.get("encoding", "raw")),
            size,
        )
    if fmt == "nifti":
        import nibabel as nib

        img = nib.load(str(path))
        if path.name.lower().endswith(".gz"):
            return tuple(reversed(img.shape)), np.dtype(img.get_data_dtype()), "gzip", size
        return (
            tuple(reversed(img.shape)),
            np.dtype(img.get_data_dtype()),
            "raw",
            size - int(img.dataobj.offset),
        )
    if fmt == "numpy" and path.suffix.lower() == ".npy":
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(fh)
            return tuple(shape), np.dtype(dtype), "raw", size - fh.tell()
    return None


# ------------------------------------------------------------------------------------------- NRRD
def read_nrrd(path: Path) -> Image:
    import nrrd

    data, header = nrrd.read(str(path), index_order="C")  # array axes: file axes reversed
    n = data.ndim
    directions = header.get("space directions")
    kinds = header.get("kinds") or ["domain"] * n
    if directions is not None:
        rows = [np.asarray(r, dtype=float) if r is not None else None for r in directions]
        spatial_file_axes = [i for i, r in enumerate(rows) if r is not None and np.all(np.isfinite(r))]
    else:
        rows = None
        spatial_file_axes = [i for i, k in enumerate(kinds) if str(k).lower() in {"domain", "space", "time"}]
    channel_file_axes = [i for i in range(n) if i not in spatial_file_axes]
    if len(channel_file_axes) > 1 or len(spatial_file_axes) not in (2, 3):
        raise DataError(
            f"{path}: NRRD with {len(spatial_file_axes)} spatial and {len(channel_file_axes)} non-spatial axes; "
            "medctl reads 2D/3D images with at most one channel axis"
        )
    # array axis a <-> file axis n-1-a; put the channel axis first, spatial axes slowest first
    spatial_array_axes = [n - 1 - i for i in reversed(spatial_file_axes)]
    channel_array_axes = [n - 1 - i for i in channel_file_axes]
    array = np.transpose(data, channel_array_axes + spatial_array_axes)
    if not channel_array_axes:
        array = array[None]
    if rows is not None:
        vectors = np.stack([rows[i] for i in reversed(spatial_file_axes)], axis=1)  # (space, S)
        spacing = np.linalg.norm(vectors, axis=0)
        spacing = np.where(spacing > 0, spacing, 1.0)
        direction = vectors / spacing
        space = str(header.get("space", "left-posterior-superior")).lower()
        if space in {"right-anterior-superior", "ras"} and direction.shape[0] == 3:
            direction = _LPS_FROM_RAS @ direction
        origin = np.asarray(header.get("space origin", np.zeros(direction.shape[0])), dtype=float)
        if space in {"right-anterior-superior", "ras"} and origin.shape[0] == 3:
            origin = _LPS_FROM_RAS @ origin
        if direction.shape[0] != direction.shape[1]:  # e.g. a 2D image embedded in 3D space
            direction, origin = default_direction(len(spacing)), np.zeros(len(spacing))
    else:
        raw = header.get("spacings")
        spacing = np.array(
            [
                float(raw[i]) if raw is not None and np.isfinite(raw[i]) else 1.0
                for i in reversed(spatial_file_axes)
            ]
        )
        direction, origin = default_direction(len(spacing)), np.zeros(len(spacing))
    return Image(array, tuple(map(float, spacing)), tuple(map(float, origin)), direction)


def write_nrrd(
    path: str | Path,
    array: np.ndarray,
    *,
    spacing: Sequence[float],
    origin: Sequence[float] | None = None,
    direction: np.ndarray | None = None,
    compress: bool = True,
) -> Path:
    """Write a spatial array ``(D, H, W)`` or ``(H, W)`` with LPS geometry, the inverse of :func:`read_nrrd`.

    ``direction`` defaults to :func:`default_direction` (an axial stack: W -> x, H -> y, D -> z).

    Used for synthetic data and for maps written back in the source geometry (3D Slicer opens them).
    """
    import nrrd

    n = array.ndim
    if len(spacing) != n:
        raise ValueError(f"spacing has {len(spacing)} entries for a {n}D array; give one per axis")
    direction = default_direction(n) if direction is None else np.asarray(direction, dtype=float)
    origin = np.zeros(n) if origin is None else np.asarray(origin, dtype=float)
    vectors = direction @ np.diag(np.asarray(spacing, dtype=float))  # (space, S), columns per array axis
    if n not in (2, 3):
        raise ValueError(f"write_nrrd writes 2D or 3D arrays, got {n}D")
    header = {
        "space directions": vectors.T[::-1],  # rows in file axis order (fastest first)
        "space origin": origin,
        "kinds": ["domain"] * n,
        "encoding": "gzip" if compress else "raw",
    }
    if n == 3:
        header["space"] = "left-posterior-superior"
    else:
        header["space dimension"] = 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), np.ascontiguousarray(array), header, index_order="C", compression_level=1)
    return path


# ------------------------------------------------------------------------------------------ NIfTI
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
    linear = _LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    spacing = np.where(spacing > 0, spacing, 1.0)
    direction = (linear / spacing)[:, ::-1]  # columns for (K, J, I)
    origin = _LPS_FROM_RAS @ affine[:3, 3]
    return Image(
        np.ascontiguousarray(array), tuple(map(float, spacing[::-1])), tuple(map(float, origin)), direction
    )


# ------------------------------------------------------------------------------------------ DICOM
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


# ------------------------------------------------------------------------------------------ NumPy
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


# ----------------------------------------------------------------------------------------- Pillow
def read_pillow(path: Path) -> Image:
    """PNG/TIFF/JPEG/BMP: grayscale -> (1, H, W), RGB(A) -> (3, H, W), multi-page TIFF -> (C, D, H, W)."""
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        frames = []
        for index in range(getattr(img, "n_frames", 1)):
            img.seek(index)
            frames.append(_pillow_array(img))
    if len(frames) == 1:
        pixels = frames[0]  # (H, W) or (H, W, 3)
        array = np.moveaxis(pixels, -1, 0) if pixels.ndim == 3 else pixels[None]
        return Image(np.ascontiguousarray(array), (1.0, 1.0), (0.0, 0.0), default_direction(2))
    volume = np.stack(frames, axis=0)  # (D, H, W) or (D, H, W, 3)
    array = np.moveaxis(volume, -1, 0) if volume.ndim == 4 else volume[None]
    return Image(np.ascontiguousarray(array), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), default_direction(3))


def _pillow_array(img) -> np.ndarray:
    if img.mode in ("RGBA", "LA", "P", "CMYK", "YCbCr", "HSV"):
        img = img.convert("RGB" if img.mode != "LA" else "L")
    return np.asarray(img)
