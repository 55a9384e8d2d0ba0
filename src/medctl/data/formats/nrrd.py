"""NRRD (``.nrrd`` with its pixels, ``.nhdr`` with detached ones) through pynrrd.

File axes are read reversed (ITK-style, C order), so the file's last axis is D; "list"/"vector" axes
become channels. A ``space`` of RAS is converted to LPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medctl.data.image import LPS_FROM_RAS, DeclaredStorage, Format, Image, ImageHeader, default_direction
from medctl.errors import DataError


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
            direction = LPS_FROM_RAS @ direction
        origin = np.asarray(header.get("space origin", np.zeros(direction.shape[0])), dtype=float)
        if space in {"right-anterior-superior", "ras"} and origin.shape[0] == 3:
            origin = LPS_FROM_RAS @ origin
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


def read_nrrd_header(paths: Sequence[Path]) -> ImageHeader:
    import nrrd

    header = nrrd.read_header(str(paths[0]))
    return ImageHeader(tuple(int(s) for s in reversed(header["sizes"])), str(header["type"]))


def nrrd_storage(path: Path) -> DeclaredStorage | None:
    import nrrd
    import nrrd.reader

    size = path.stat().st_size
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


def nrrd_problem(path: Path) -> str:
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


FORMAT = Format(
    "nrrd",
    "NRRD",
    (".nrrd", ".nhdr"),
    read=lambda paths: read_nrrd(paths[0]),
    read_header=read_nrrd_header,
    declared_storage=nrrd_storage,
    diagnose=nrrd_problem,
)
