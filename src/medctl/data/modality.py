"""What kind of sample a dataset holds, as one object the preprocess path asks instead of switching on it.

``data.modality`` picks one (:func:`modality_for`): ``"image"`` (:class:`ImageModality`: a volume or slice ->
one cached array per sample, or per slice) or ``"eeg"`` (:class:`EEGModality`: a recording -> spectrogram
windows, one cached array each). Each answers the same questions: what its settings add to the cache's hash,
how its files are fetched, what to check before and after a run, what a worker needs in memory for one
sample, how one sample becomes cached arrays and manifest rows, and what a header says for `check data`.

A modality travels inside each picklable ``SampleTask`` to the pool's workers, so it holds plain settings only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from medctl.config import DataConfig, EEGConfig, PreprocessConfig
from medctl.data.cache.memory import WORKER_BASE_BYTES, check_output_fits, worker_memory_bytes
from medctl.data.eeg import (
    check_one_rate,
    fetch_recording,
    read_recording,
    read_recording_header,
    recording_rate,
)
from medctl.data.readers import declared_size_problem, read_header, read_image
from medctl.data.spectrogram import check_finite, prepare_signal, recording_windows
from medctl.data.transforms import preprocess_image, validate_image
from medctl.errors import DataError
from medctl.io import atomic_write
from medctl.storage import FileInfo, Listing, is_remote, local_copy

if TYPE_CHECKING:
    import pandas as pd

    from medctl.data.cache.sample import SampleOutcome, SampleTask
    from medctl.data.locator import Resolution

EEG_COLUMNS = ["channels", "sfreq", "window_start_s"]  # EEG windows only (medctl.data.spectrogram)


@dataclass
class Where:
    """Where in one sample's work it is: the step a failure is recorded under, and the key it names."""

    stage: str  # fetch | read | validate | transform | write
    key: str


class Modality(Protocol):
    name: str

    def cache_key(self) -> dict[str, Any]:
        """What this modality's settings add to the cache's settings (and so to its hash)."""

    def fetch(self, info: FileInfo, *, download_dir: str, endpoint_url: str, retries: int) -> Path:
        """A local path to one source file, with what it needs beside it."""

    def check_plan(
        self,
        preprocess: PreprocessConfig,
        tasks: list[SampleTask],
        outcomes: dict[str, SampleOutcome],
        images: tuple[Listing, Resolution],
    ) -> None:
        """DataError before any sample is read, for a run that cannot succeed."""

    def check_cache(self, manifest: pd.DataFrame) -> None:
        """DataError for what only the finished manifest shows."""

    def memory_need(self, files: list[FileInfo]) -> tuple[int, str] | None:
        """(bytes a worker needs for this local sample, what it is), from its header; None when unreadable."""

    def process(
        self, task: SampleTask, settings: PreprocessConfig, images: list[Path], masks: list[Path], where: Where
    ) -> list[dict[str, Any]]:
        """Read, validate, transform and write one sample: its manifest rows (``where`` follows the steps)."""

    def header_shape(self, paths: list[Path]) -> tuple[int, ...] | None:
        """The shape a header declares (DataError when unreadable); None where a sample has no voxel shape."""


def modality_for(data: DataConfig) -> Modality:
    """The modality ``data.modality`` names, with its settings."""
    return EEGModality(data.eeg) if data.modality == "eeg" else ImageModality()


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` through :func:`medctl.io.atomic_write`."""
    with atomic_write(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


# ------------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class ImageModality:
    """Volumes and 2D images, read by :mod:`medctl.data.readers`; one cached array per sample or slice."""

    name: str = "image"

    def cache_key(self) -> dict[str, Any]:
        return {}  # image caches predate modalities: their hash stays what it was

    def fetch(self, info: FileInfo, *, download_dir: str, endpoint_url: str, retries: int) -> Path:
        return local_copy(info, download_dir=download_dir, endpoint_url=endpoint_url, retries=retries)

    def check_plan(self, preprocess, tasks, outcomes, images) -> None:
        if tasks:
            check_output_fits(preprocess, preprocess.memory_gb)

    def check_cache(self, manifest) -> None:
        return None

    def memory_need(self, files: list[FileInfo]) -> tuple[int, str] | None:
        paths = [Path(f.url) for f in files]
        try:
            if len(paths) == 1 and declared_size_problem(paths[0]):
                return None  # an impossible header is the worker's recorded skip, not a size
            header = read_header(paths)
        except Exception:  # an unreadable header is reported by the worker that reads the file
            return None
        voxels = int(np.prod(header.shape, dtype=np.int64))
        return worker_memory_bytes(voxels), "volume " + "x".join(map(str, header.shape))

    def process(self, task, settings, images, masks, where) -> list[dict[str, Any]]:
        if len(images) == 1:
            problem = declared_size_problem(images[0])  # before any pixel is allocated
            if problem:
                raise DataError(problem)
        image = read_image(images)
        mask = None
        if masks:
            where.key = task.mask[0].key
            mask = read_image(masks)
            where.key = task.image[0].key
        where.stage = "validate"
        validate_image(image, settings)
        where.stage = "transform"
        processed = preprocess_image(image, mask, settings)
        where.stage = "write"
        return [_write_image(task, image, p, sliced=bool(settings.slices)) for p in processed]

    def header_shape(self, paths: list[Path]) -> tuple[int, ...] | None:
        problem = declared_size_problem(paths[0]) if len(paths) == 1 else None
        if problem:
            raise DataError(problem)
        return read_header(paths).shape


def _write_image(task: SampleTask, image, processed, *, sliced: bool) -> dict[str, Any]:
    cache = Path(task.cache_dir)
    id_ = f"{task.id}_s{processed.slice_index}" if sliced else task.id
    save_npy_atomic(cache / "images" / f"{id_}.npy", processed.array)
    if processed.mask is not None:
        save_npy_atomic(cache / "masks" / f"{id_}.npy", processed.mask)
    return {
        "id": id_,
        "slice_index": processed.slice_index,
        "shape": list(processed.array.shape),
        "orig_shape": list(image.array.shape),
        "spacing": list(image.spacing),
        "origin": list(image.origin),
        "direction": np.asarray(image.direction, dtype=float).ravel().tolist(),
        "cache_affine": np.asarray(processed.affine, dtype=float).ravel().tolist(),
        "has_mask": processed.mask is not None,
        "dtype": str(processed.array.dtype),
        **dict.fromkeys(EEG_COLUMNS),
    }


# --------------------------------------------------------------------------------------------- EEG
@dataclass(frozen=True)
class EEGModality:
    """Recordings read by :mod:`medctl.data.eeg`, cut into spectrogram windows (:mod:`medctl.data.spectrogram`)."""

    eeg: EEGConfig
    name: str = "eeg"

    def cache_key(self) -> dict[str, Any]:
        return {"modality": "eeg", "eeg": self.eeg.model_dump(mode="json")}

    def fetch(self, info: FileInfo, *, download_dir: str, endpoint_url: str, retries: int) -> Path:
        # a recording brings the side files its header names
        return fetch_recording(info, download_dir=download_dir, endpoint_url=endpoint_url, retries=retries)

    def check_plan(self, preprocess, tasks, outcomes, images) -> None:
        check_one_rate(self._recording_rates(tasks, outcomes, images), self.eeg)  # before any sample is read

    def check_cache(self, manifest) -> None:
        """Recordings in a bucket, whose headers were not read before the run, kept at one rate."""
        ok = manifest[manifest.status == "ok"].drop_duplicates("source_id")
        check_one_rate(dict(zip(ok.source_key, ok.sfreq.astype(float), strict=True)), self.eeg)

    def memory_need(self, files: list[FileInfo]) -> tuple[int, str] | None:
        try:
            header = read_recording_header(files[0].url, self.eeg)
        except DataError:  # an unreadable header is reported by the worker that reads the file
            return None
        need = eeg_memory_bytes(len(header.channels), header.n_samples, self.eeg)
        return need, f"recording {len(header.channels)} ch x {header.n_samples} samples"

    def process(self, task, settings, images, masks, where) -> list[dict[str, Any]]:
        raw = read_recording(images[0], self.eeg)
        where.stage = "validate"
        check_finite(raw, self.eeg, where.key)
        where.stage = "transform"
        windows = recording_windows(prepare_signal(raw, self.eeg, where.key), self.eeg, task.id, settings.dtype, where.key)
        where.stage = "write"
        for window in windows:
            save_npy_atomic(Path(task.cache_dir) / "images" / f"{window.row['id']}.npy", window.array)
        return [w.row for w in windows]

    def header_shape(self, paths: list[Path]) -> tuple[int, ...] | None:
        read_recording_header(paths[0], self.eeg)
        return None

    def _recording_rates(self, tasks, outcomes, images) -> dict[str, float]:
        """Key -> sampling rate of every recording: cached ones from their rows, local ones from their header.
        Recordings in a bucket are not fetched for this (the manifest check after the run covers them), and an
        unreadable header is left to the worker that records it."""
        if self.eeg.resample_hz:
            return {}
        _, resolution = images
        rates = {resolution.matches[o.id][0]: float(o.rows[0]["sfreq"]) for o in outcomes.values() if o.ok and o.rows}
        for task in tasks:
            info = task.image[0]
            if is_remote(info.url):
                continue
            try:
                rates[info.key] = recording_rate(info.url, self.eeg)
            except DataError:
                continue
        return rates


def eeg_memory_bytes(channels: int, samples: int, eeg: EEGConfig) -> int:
    """A worker on one recording: float64 samples, the filter's copy and the overlapping windows
    (``window_s / hop_s`` copies), plus the interpreter."""
    overlap = max(1.0, eeg.window_s / eeg.hop_s)
    return int(8 * channels * samples * (2 + overlap)) + WORKER_BASE_BYTES
