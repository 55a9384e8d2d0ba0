"""Read EEG recordings into one form: an MNE ``Raw`` with channel names and a sampling rate.

Formats, by file name (``data.modality = "eeg"``):

- through MNE-Python: EDF (``.edf``), BDF (``.bdf``), BrainVision (``.vhdr``, with its ``.eeg`` and
  ``.vmrk`` beside it), EEGLAB (``.set``, with its ``.fdt`` if it has one), FIF (``.fif``, ``.fif.gz``);
- plain arrays, which state neither rate nor channel names (``data.eeg.sfreq``, ``data.eeg.array_channels``):
  NumPy ``.npy`` of shape ``(channels, samples)``, MATLAB ``.mat`` with the array in ``data.eeg.variable``
  (v5 files through scipy.io; v7.3 HDF5 files are refused with the fix), ``.csv`` with one column per
  channel (the header names them) and one row per sample.

BrainVision and EEGLAB keep their samples in side files that the header names (``DataFile=`` / ``MarkerFile=``
in a ``.vhdr``, the ``data`` field of a ``.set``): :func:`fetch_recording` brings them from a bucket next to the
header's local copy, and a missing one is a DataError naming it.

Problems a user can fix raise DataError naming the file, so the preprocessor records and skips them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medctl.config import EEGConfig
from medctl.errors import DataError
from medctl.storage import FileInfo, is_remote, local_copy, sibling_copy

_MNE_FORMATS = {".edf": "EDF", ".bdf": "BDF", ".vhdr": "BrainVision", ".set": "EEGLAB", ".fif": "FIF"}
_ARRAY_FORMATS = {".npy": "NumPy", ".mat": "MATLAB", ".csv": "CSV"}


@dataclass
class RecordingHeader:
    """What a header tells without reading samples (for `medctl check data`)."""

    channels: list[str]
    sfreq: float
    n_samples: int


@dataclass(frozen=True)
class SideFile:
    """A file a recording's header names: the first of ``names`` found beside the header is the one."""

    what: str  # what the header calls it: "DataFile", "MarkerFile", "its .fdt data file"
    names: tuple[str, ...]  # as named, then the fallback the reader tries (the header's stem)
    required: bool  # MNE reads a BrainVision file without its markers, never without its samples


def side_files(header: Path) -> list[SideFile]:
    """What a local BrainVision ``.vhdr`` or EEGLAB ``.set`` needs beside it; nothing for other formats.

    BrainVision: ``DataFile`` (required) and ``MarkerFile`` (optional; else ``<stem>.vmrk``, as MNE falls back)
    from ``[Common Infos]``. EEGLAB: the ``.fdt`` its ``data`` field names (else ``<stem>.fdt``), none when the
    samples are inside the ``.set``.
    """
    suffix = header.suffix.lower()
    if suffix == ".vhdr":
        named = _brainvision_common_infos(header)
        sides = []
        if named.get("datafile"):
            sides.append(SideFile("DataFile", (named["datafile"],), True))
        if named.get("markerfile"):
            sides.append(SideFile("MarkerFile", _names(named["markerfile"], f"{header.stem}.vmrk"), False))
        return sides
    if suffix == ".set":
        data = _eeglab_data_field(header)
        return [SideFile("its .fdt data file", _names(data, f"{header.stem}.fdt"), True)] if data else []
    return []


def _names(*names: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _brainvision_common_infos(header: Path) -> dict[str, str]:
    """``{lowercased key: value}`` of a ``.vhdr``'s ``[Common Infos]`` section (the file names it holds)."""
    raw = header.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # Codepage=ANSI headers
        text = raw.decode("latin-1")
    section, found = "", {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
        elif section == "common infos" and "=" in line and not line.startswith(";"):
            key, value = line.split("=", 1)
            found[key.strip().lower()] = value.strip()
    return found


def _eeglab_data_field(header: Path) -> str:
    """The ``.fdt`` file name an EEGLAB ``.set`` keeps its samples in; "" when they are inside it (or when scipy
    cannot read the file, a MATLAB v7.3 one: MNE then says what is wrong)."""
    from scipy.io import loadmat, whosmat

    try:
        variables = {name: kind for name, _, kind in whosmat(str(header))}
        if variables.get("data") == "char":  # the fields at the top level (EEGLAB's own "-v7" files, eeglabio's)
            data = loadmat(str(header), variable_names=["data"], squeeze_me=True)["data"]
        elif "EEG" in variables:  # one EEG struct
            eeg = loadmat(str(header), variable_names=["EEG"], squeeze_me=True, struct_as_record=False)["EEG"]
            data = getattr(eeg, "data", None)
        else:
            return ""
    except (NotImplementedError, ValueError, OSError):
        return ""
    return str(data).strip() if isinstance(data, str) else ""


def fetch_recording(info: FileInfo, *, download_dir: str | Path, endpoint_url: str = "", retries: int = 3) -> Path:
    """A local path to the recording ``info`` (a download when it is in a bucket) with every side file its header
    names beside it (:func:`side_files`). A required one that is missing is a DataError naming it; an outage
    while fetching any is StorageUnavailable, as for the recording itself."""
    path = local_copy(info, download_dir=download_dir, endpoint_url=endpoint_url, retries=retries)
    for side in side_files(path):
        found = None
        for name in side.names:
            found = sibling_copy(info, name, path, endpoint_url=endpoint_url, retries=retries)
            if found is not None:
                break
        if found is None and side.required:
            folder = info.url.rsplit("/", 1)[0] if is_remote(info.url) else str(Path(info.url).parent)
            raise DataError(
                f"{info.url}: the header names {side.what} {side.names[0]!r}, which is not in {folder}/; put it "
                "beside the header (or correct the name in the header)"
            )
    return path


def recording_format(name: str | Path) -> str:
    """The suffix that picks the reader (``.fif.gz`` reads as ``.fif``); DataError for anything else."""
    lower = Path(name).name.lower().removesuffix(".gz")
    suffix = Path(lower).suffix
    if suffix not in _MNE_FORMATS and suffix not in _ARRAY_FORMATS:
        known = ", ".join(sorted(_MNE_FORMATS | _ARRAY_FORMATS))
        raise DataError(
            f'{name}: unknown EEG format {suffix!r}; with data.modality = "eeg" medctl reads {known}'
        )
    return suffix


def read_recording(path: str | Path, eeg: EEGConfig, *, preload: bool = True):
    """One recording as an ``mne.io.Raw`` (samples loaded unless ``preload=False``)."""
    import mne

    path = Path(path)
    suffix = recording_format(path)
    what = _MNE_FORMATS.get(suffix) or _ARRAY_FORMATS[suffix]
    try:
        if suffix in _ARRAY_FORMATS:
            data, channels, sfreq = _read_array(path, suffix, eeg)
            info = mne.create_info(channels, sfreq, ch_types="eeg", verbose="error")
            return mne.io.RawArray(data, info, verbose="error")  # data (C, N)
        readers = {
            ".edf": mne.io.read_raw_edf,
            ".bdf": mne.io.read_raw_bdf,
            ".vhdr": mne.io.read_raw_brainvision,
            ".set": mne.io.read_raw_eeglab,
            ".fif": mne.io.read_raw_fif,
        }
        if suffix in (".edf", ".bdf"):
            check_edf_length(path, bytes_per_sample=3 if suffix == ".bdf" else 2)
        raw = readers[suffix](str(path), preload=preload, verbose="error")
    except DataError:
        raise
    except Exception as exc:  # the library's word on a truncated or fake file
        detail = str(exc).replace(str(path), path.name).replace("\n", " ") or type(exc).__name__
        raise DataError(f"{path}: not a readable {what} file ({type(exc).__name__}: {detail})") from exc
    if raw.n_times == 0 or not raw.ch_names:
        raise DataError(f"{path}: the {what} file holds no samples")
    return raw


def read_recording_header(path: str | Path, eeg: EEGConfig) -> RecordingHeader:
    """Channels, rate and length; MNE formats read only their header."""
    raw = read_recording(path, eeg, preload=Path(path).suffix.lower() in _ARRAY_FORMATS)
    return RecordingHeader(list(raw.ch_names), float(raw.info["sfreq"]), int(raw.n_times))


def recording_rate(path: str | Path, eeg: EEGConfig) -> float:
    """The sampling rate a recording will be read at, from its header (arrays: ``data.eeg.sfreq``)."""
    if recording_format(path) in _ARRAY_FORMATS:
        return float(eeg.sfreq)
    return read_recording_header(path, eeg).sfreq


def check_one_rate(rates: dict[str, float], eeg: EEGConfig) -> None:
    """DataError when recordings (name -> Hz) kept at their own rate (``resample_hz = 0``) have several rates:
    the rows of their spectrograms would mean different frequencies. Names the files of each rate."""
    if eeg.resample_hz or len(set(rates.values())) < 2:
        return
    by_rate: dict[float, list[str]] = {}
    for name, rate in rates.items():
        by_rate.setdefault(rate, []).append(name)
    ordered = sorted(by_rate.items(), key=lambda item: -len(item[1]))  # the most common rate first

    def files(names: list[str]) -> str:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{len(names)} file{'s' if len(names) > 1 else ''}: {shown}"

    listed = "; ".join(f"{rate:g} Hz ({files(names)})" for rate, names in ordered)
    raise DataError(
        f"data.eeg.resample_hz = 0 keeps each recording's own rate, but the recordings have {len(ordered)} rates: "
        f"{listed}; their spectrogram rows would mean different frequencies: set data.eeg.resample_hz "
        f"(e.g. {ordered[0][0]:g}) to bring them to one rate"
    )


def check_edf_length(path: Path, *, bytes_per_sample: int) -> None:
    """A truncated EDF/BDF (fewer data records than its header states) is an error, not a shorter recording.

    MNE reads such a file "inferring from the file size" with only a warning; a cut-off download or an
    unfinished copy would then silently become a shorter recording.
    """
    with open(path, "rb") as fh:
        fixed = fh.read(256)
        n_signals = int(fixed[252:256].decode("ascii").strip())
        fh.seek(
            256 + n_signals * 216
        )  # label .. physical/digital range .. prefiltering: 216 bytes per signal
        samples = [int(fh.read(8).decode("ascii").strip()) for _ in range(n_signals)]
        header_bytes, n_records = int(fixed[184:192].decode("ascii")), int(fixed[236:244].decode("ascii"))
        size = fh.seek(0, 2)
    if n_records < 0:  # -1: still being recorded; the file size decides
        return
    expected = header_bytes + n_records * sum(samples) * bytes_per_sample
    if size < expected:
        raise DataError(
            f"{path}: truncated: the header states {n_records} data records ({expected} bytes) but the file "
            f"has {size} bytes; copy or export it again"
        )


# ---------------------------------------------------------------------------------------- arrays
def _read_array(path: Path, suffix: str, eeg: EEGConfig) -> tuple[np.ndarray, list[str], float]:
    """(C, N) float64 samples, channel names and the rate of a .npy/.mat/.csv recording."""
    if not eeg.sfreq:
        raise DataError(
            f"{path}: {_ARRAY_FORMATS[suffix]} recordings do not state their sampling rate; set data.eeg.sfreq (Hz)"
        )
    if suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(path)
        data = frame.to_numpy(dtype=np.float64).T  # rows are samples: (N, C) -> (C, N)
        channels = [str(c).strip() for c in frame.columns]
    else:
        data = np.load(path, allow_pickle=False) if suffix == ".npy" else _mat_variable(path, eeg.variable)
        data = np.asarray(data, dtype=np.float64)
        if data.ndim != 2:
            raise DataError(
                f"{path}: a recording is a (channels, samples) array; this one has shape {data.shape}"
            )
        channels = list(eeg.array_channels) or [f"ch{i}" for i in range(data.shape[0])]
    if len(channels) != data.shape[0]:
        raise DataError(
            f"{path}: {data.shape[0]} channels but data.eeg.array_channels names {len(channels)}; "
            "give one name per row of the array"
        )
    if not np.isfinite(data).all():
        raise DataError(f"{path}: the recording holds NaN or infinite samples")
    return data, channels, float(eeg.sfreq)


def _mat_variable(path: Path, variable: str) -> np.ndarray:
    from scipy.io import loadmat

    if not variable:
        raise DataError(
            f"{path}: set data.eeg.variable to the name of the (channels, samples) array in .mat files"
        )
    try:
        content = loadmat(str(path))
    except NotImplementedError as exc:  # MATLAB v7.3 files are HDF5
        raise DataError(f"{path}: a MATLAB v7.3 (HDF5) file; save it with `save(..., '-v7')`") from exc
    if variable not in content:
        names = ", ".join(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: no variable {variable!r} (data.eeg.variable); the file has: {names}")
    return content[variable]
