"""Raw files + labels table -> a preprocessed cache that training reads without decoding anything.

Cache layout, under ``<data.cache_dir>/<settings hash>/`` (:func:`cache_dir_for`):

- ``images/<id>.npy``: float32 (or float16) channel-first ``(C, D, H, W)`` / ``(C, H, W)``
- ``masks/<id>.npy``: uint8 ``(1, *spatial)`` label map, when a mask exists for the id
- ``manifest.parquet``: one row per id (and per slice when cutting slices), with its status (ok | failed),
  split, group, targets (class index; 0/1 list for multilabel), source key + fingerprint, cached shape,
  and the source geometry (``orig_shape``, ``spacing``, ``origin``, ``direction`` row-major) plus
  ``cache_affine`` (cached voxel -> LPS world, row-major) to map results back onto the source
- ``summary.json``: spatial_dims, in_channels, spatial_size, targets, counts, settings, fingerprint
- ``data_errors.csv``: id, key, stage, error for every sample that could not be used

The hash covers the preprocessing settings, the table's bytes, the targets, split settings and the
source, so changing any of them builds a new cache beside the old one. Within one cache, a rerun
compares each sample's source fingerprint (size + mtime, or the S3 ETag) with the manifest and skips
unchanged samples without reading them; failed samples with unchanged files stay failed without a
retry (replace the file to retry) unless they failed while downloading. Bad files are recorded and
skipped (``strict=True``: the first one raises DataError). Every file is written atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.config import DataConfig, EEGConfig, PreprocessConfig
from medctl.data.eeg import read_recording
from medctl.data.locator import Resolution, check_template, listing_prefix, resolve
from medctl.data.readers import axis_names, describe_geometry, read_image
from medctl.data.spectrogram import prepare_signal, recording_windows
from medctl.data.tables import LabelTable, TargetSpec, load_table
from medctl.data.transforms import expected_spatial_dims, preprocess_image, validate_image
from medctl.errors import DataError
from medctl.progress import log, progress_bar
from medctl.runs import write_text_atomic
from medctl.storage import FileInfo, Listing, list_files, local_copy, redact_secrets

CACHE_FORMAT = 1
MIN_SAMPLES_PER_WORKER = 8  # a process pool costs seconds to start; small batches run inline
ERROR_COLUMNS = ["id", "key", "stage", "error"]
GEOMETRY_COLUMNS = [
    "id", "slice_index", "shape", "orig_shape", "spacing", "origin", "direction", "cache_affine", "has_mask", "dtype",
]  # fmt: skip
EEG_COLUMNS = ["channels", "sfreq", "window_start_s"]  # EEG windows only (medctl.data.spectrogram)


@dataclass
class PreprocessResult:
    cache_dir: Path
    manifest: pd.DataFrame
    n_new: int  # samples decoded and written by this run
    n_cached: int  # samples reused from an earlier run, untouched
    n_failed: int  # samples recorded in data_errors.csv
    summary: dict = field(default_factory=dict)


@dataclass
class SampleTask:
    """Everything a worker needs for one sample (picklable; no config object, no filesystem)."""

    id: str
    image: list[FileInfo]
    mask: list[FileInfo]
    fingerprint: str
    cache_dir: str
    settings: dict[str, Any]
    download_dir: str
    endpoint_url: str
    retries: int
    eeg: dict[str, Any] | None = None  # data.eeg when data.modality = "eeg": recordings -> spectrogram windows


@dataclass
class SampleOutcome:
    id: str
    rows: list[dict[str, Any]]  # one per cached array (several when cutting slices)
    stage: str = ""  # where it failed: fetch | read | validate | transform | write
    error: str = ""
    key: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


# ----------------------------------------------------------------------------------------- hashing
def settings_for(data: DataConfig, table_sha256: str) -> dict[str, Any]:
    """Everything the cache content depends on (not workers, batch size or credentials)."""
    preprocess = data.preprocess.model_dump(mode="json", exclude={"workers"})
    return {
        "format": CACHE_FORMAT,
        "table": data.table,
        "table_sha256": table_sha256,
        "id_column": data.id_column,
        "filter": data.filter,
        "split_column": data.split_column,
        "split_ratios": data.split_ratios,
        "split_seed": data.split_seed,
        "group_column": data.group_column,
        "targets": [t.model_dump(mode="json", exclude={"weight"}) for t in data.targets],
        "source": {
            "root": data.source.root,
            "pattern": data.source.pattern,
            "mask_root": data.source.mask_root,
            "mask_pattern": data.source.mask_pattern,
        },
        "preprocess": preprocess,
        **({"modality": "eeg", "eeg": data.eeg.model_dump(mode="json")} if data.modality == "eeg" else {}),
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir_for(data: DataConfig) -> Path:
    """``<data.cache_dir>/<settings hash>`` (reads the table, since its content is part of the hash)."""
    from medctl.data.tables import read_table

    _, sha = read_table(data)
    return Path(data.cache_dir).expanduser() / settings_hash(settings_for(data, sha))


def ensure_cache(data: DataConfig, *, workers: int | None = None) -> Path:
    """The cache for ``data``, preprocessing first when it has not been built yet."""
    cache = cache_dir_for(data)
    if not (cache / "summary.json").is_file():
        cache = preprocess(data, workers=workers).cache_dir
    return cache


# -------------------------------------------------------------------------------------- preprocess
def preprocess(data: DataConfig, *, strict: bool = False, workers: int | None = None) -> PreprocessResult:
    """Build or update the cache for ``data``; see the module docstring for what lands where."""
    check_template(data.source.pattern, data.id_column)
    if data.source.mask_pattern:
        check_template(data.source.mask_pattern, data.id_column, "data.source.mask_pattern")
    table = load_table(data)
    settings = settings_for(data, table.sha256)
    cache = Path(data.cache_dir).expanduser() / settings_hash(settings)
    (cache / "images").mkdir(parents=True, exist_ok=True)
    previous = read_manifest(cache) if (cache / "manifest.parquet").is_file() else None
    ids = table.frame["id"].tolist()

    images, masks = _locate(data, ids)
    tasks, outcomes, carried = _plan(data, cache, ids, images, masks, previous)
    n_workers = _worker_count(workers or data.preprocess.workers, len(tasks))
    log(f"preprocess: {len(ids)} samples, {len(tasks)} to process, {carried} cached; cache {cache}")
    new: dict[str, SampleOutcome] = {}
    try:
        if strict:
            _raise_first_failure(outcomes.values())
        for outcome in _run(tasks, n_workers):
            new[outcome.id] = outcome
            if strict and not outcome.ok:
                raise DataError(
                    _failure_line(outcome) + "; rerun without --strict to record and skip bad files"
                )
    finally:  # also on Ctrl-C or --strict: what finished is kept in the manifest
        outcomes.update(new)
        manifest = _manifest(table, outcomes, images, masks, cache)
        manifest = _enforce_consistency(manifest, cache)
        write_manifest(cache, manifest)
        write_errors(cache, manifest)
    summary = _summary(table, manifest, settings, cache)
    write_text_atomic(cache / "summary.json", json.dumps(summary, indent=2) + "\n")
    n_failed = int((manifest.drop_duplicates("source_id").status == "failed").sum())
    if not (manifest.status == "ok").any():
        first = manifest[manifest.status == "failed"].iloc[0]
        raise DataError(
            f"no sample could be preprocessed; first failure: {first['id']}: {first['stage']}: {first['error']} "
            f"(all in {cache / 'data_errors.csv'})"
        )
    n_new = sum(1 for o in new.values() if o.ok)
    first = manifest[manifest.status == "ok"].iloc[0]
    warning = aspect_warning(first["source_id"], first["orig_shape"], first["spacing"], data.preprocess)
    if warning:
        log(f"warning: {warning}")
    log(f"preprocess: {n_new} new, {carried} cached, {n_failed} failed")
    return PreprocessResult(cache, manifest, n_new, carried, n_failed, summary)


def _locate(
    data: DataConfig, ids: list[str]
) -> tuple[tuple[Listing, Resolution], tuple[Listing, Resolution] | None]:
    """List the image root (and mask root) ONCE and match every id against it."""
    source = data.source
    listing = list_files(
        source.root,
        endpoint_url=source.endpoint_url,
        retries=source.retries,
        prefix=listing_prefix(source.pattern),
    )
    images = (listing, resolve(ids, listing, source.pattern))
    if not source.mask_root:
        return images, None
    pattern = source.mask_pattern or source.pattern
    mask_listing = list_files(
        source.mask_root,
        endpoint_url=source.endpoint_url,
        retries=source.retries,
        prefix=listing_prefix(pattern),
    )
    return images, (mask_listing, resolve(ids, mask_listing, pattern))


def _plan(
    data: DataConfig,
    cache: Path,
    ids: list[str],
    images: tuple[Listing, Resolution],
    masks: tuple[Listing, Resolution] | None,
    previous: pd.DataFrame | None,
) -> tuple[list[SampleTask], dict[str, SampleOutcome], int]:
    """Split ids into work to do, failures known without reading (no file), and unchanged cached ones."""
    listing, resolution = images
    earlier = _previous_outcomes(previous, cache)
    tasks, outcomes, carried = [], {}, 0
    settings = data.preprocess.model_dump(mode="json")
    for id_ in ids:
        problem = resolution.problem(id_)
        if problem:
            outcomes[id_] = SampleOutcome(id_, [], "locate", problem, resolution.tried(id_))
            continue
        image_files = [listing.files[k] for k in resolution.matches[id_]]
        mask_files: list[FileInfo] = []
        if masks is not None:
            mask_listing, mask_resolution = masks
            if id_ in mask_resolution.ambiguous:
                outcomes[id_] = SampleOutcome(id_, [], "locate", "mask: " + str(mask_resolution.problem(id_)))
                continue
            mask_files = [mask_listing.files[k] for k in mask_resolution.matches.get(id_, ())]
        fingerprint = sample_fingerprint(image_files, mask_files)
        before = earlier.get(id_)
        if before is not None and before[0] == fingerprint:
            outcome = before[1]
            if outcome.ok or outcome.stage != "fetch":  # unchanged: reuse, or stay failed without a retry
                outcomes[id_] = outcome
                carried += outcome.ok
                continue
        tasks.append(
            SampleTask(
                id_,
                image_files,
                mask_files,
                fingerprint,
                str(cache),
                settings,
                str(Path(data.download_dir).expanduser()),
                data.source.endpoint_url,
                data.source.retries,
                data.eeg.model_dump(mode="json") if data.modality == "eeg" else None,
            )
        )
    return tasks, outcomes, carried


def _previous_outcomes(previous: pd.DataFrame | None, cache: Path) -> dict[str, tuple[str, SampleOutcome]]:
    """Earlier results whose files are all still there: source id -> (fingerprint, outcome)."""
    if previous is None:
        return {}
    found: dict[str, tuple[str, SampleOutcome]] = {}
    for source_id, rows in previous.groupby("source_id", sort=False):
        records = rows.to_dict("records")
        first = records[0]
        if first["status"] == "ok":
            present = all((cache / "images" / f"{r['id']}.npy").is_file() for r in records)
            present &= all((cache / "masks" / f"{r['id']}.npy").is_file() for r in records if r["has_mask"])
            if not present:
                continue
            outcome = SampleOutcome(str(source_id), [_geometry_of(r) for r in records])
        else:
            outcome = SampleOutcome(
                str(source_id), [], str(first["stage"]), str(first["error"]), str(first["source_key"])
            )
        found[str(source_id)] = (str(first["fingerprint"]), outcome)
    return found


def _geometry_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(row.get(k)) for k in GEOMETRY_COLUMNS + EEG_COLUMNS}


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def sample_fingerprint(image: Iterable[FileInfo], mask: Iterable[FileInfo]) -> str:
    """Digest of every source file's key + fingerprint: changes when any image or mask file changes."""
    parts = [f"image:{f.key}:{f.fingerprint}" for f in image] + [
        f"mask:{f.key}:{f.fingerprint}" for f in mask
    ]
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:20]


def _worker_count(requested: int, n_tasks: int) -> int:
    return max(1, min(requested, n_tasks // MIN_SAMPLES_PER_WORKER, os.cpu_count() or 1))


def _run(tasks: list[SampleTask], workers: int) -> Iterable[SampleOutcome]:
    """Process tasks inline (1 worker) or in a spawn-started process pool, with a progress bar."""
    if not tasks:
        return
    with progress_bar("preprocess", total=len(tasks)) as bar:
        if workers == 1:
            for task in tasks:
                outcome = process_sample(task)
                bar.advance(1)
                yield outcome
            return
        with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker) as pool:
            pending: set[Future] = {pool.submit(process_sample, t) for t in tasks}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        bar.advance(1)
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()


def _pool_context() -> multiprocessing.context.BaseContext:
    """A forkserver that imported the readers and MONAI once (forking a threaded torch process can
    deadlock, and spawning re-imports torch in every worker); spawn where forkserver does not exist."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["medctl.data.preprocess", "medctl.data.transforms", "monai.transforms"])
    return context


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["MEDCTL_NO_PROGRESS"] = "1"


# ----------------------------------------------------------------------------------- one sample
def process_sample(task: SampleTask) -> SampleOutcome:
    """Fetch, read, validate, transform and write one sample; any failure becomes a record."""
    settings = PreprocessConfig.model_validate(task.settings)
    stage, key = "fetch", task.image[0].key
    try:
        image_paths = [_local(f, task) for f in task.image]
        mask_paths = [_local(f, task) for f in task.mask]
        stage = "read"
        if task.eeg is not None:  # an EEG recording -> spectrogram windows, one cached array and row each
            eeg = EEGConfig.model_validate(task.eeg)
            raw = read_recording(image_paths[0], eeg)
            stage = "transform"
            windows = recording_windows(prepare_signal(raw, eeg, key), eeg, task.id, settings.dtype, key)
            stage = "write"
            for window in windows:
                save_npy_atomic(Path(task.cache_dir) / "images" / f"{window.row['id']}.npy", window.array)
            return SampleOutcome(task.id, [w.row for w in windows])
        image = read_image(image_paths)
        mask = None
        if mask_paths:
            key = task.mask[0].key
            mask = read_image(mask_paths)
            key = task.image[0].key
        stage = "validate"
        validate_image(image, settings)
        stage = "transform"
        processed = preprocess_image(image, mask, settings)
        stage = "write"
        rows = [_write(task, image, p, sliced=bool(settings.slices)) for p in processed]
    except Exception as exc:  # a bad file is a record in data_errors.csv, never a crash of the run
        message = redact_secrets(str(exc) or type(exc).__name__).replace("\n", " ")
        if not isinstance(exc, DataError):
            message = f"{type(exc).__name__}: {message}"
        return SampleOutcome(task.id, [], stage, message, key)
    return SampleOutcome(task.id, rows)


def _local(info: FileInfo, task: SampleTask) -> Path:
    return local_copy(
        info, download_dir=task.download_dir, endpoint_url=task.endpoint_url, retries=task.retries
    )


def _write(task: SampleTask, image, processed, *, sliced: bool) -> dict[str, Any]:
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


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temp file in the same folder, fsync, ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- manifest
def _manifest(
    table: LabelTable,
    outcomes: dict[str, SampleOutcome],
    images: tuple[Listing, Resolution],
    masks: tuple[Listing, Resolution] | None,
    cache: Path,
) -> pd.DataFrame:
    """One row per cached array (or per failed id), in table order, with split, group and targets."""
    _, resolution = images
    mask_resolution = masks[1] if masks is not None else None
    rows = []
    for record in table.frame.to_dict("records"):
        id_ = record["id"]
        keys = resolution.matches.get(id_, ())
        mask_keys = mask_resolution.matches.get(id_, ()) if mask_resolution is not None else ()
        base = {
            "source_id": id_,
            "source_key": _describe_keys(keys),
            "mask_key": _describe_keys(mask_keys),
            "n_files": len(keys),
            "split": record["split"],
            "group": record["group"],
            **{spec.name: record[spec.name] for spec in table.specs},
        }
        outcome = outcomes.get(id_)
        if outcome is None:  # interrupted before this sample ran
            continue
        fingerprint = _fingerprint_of(outcome, images, masks)
        if outcome.ok:
            for geometry in outcome.rows:
                rows.append(
                    {**base, **geometry, "fingerprint": fingerprint, "status": "ok", "stage": "", "error": ""}
                )
        else:
            empty = dict.fromkeys(GEOMETRY_COLUMNS + EEG_COLUMNS)
            empty.update(id=id_, slice_index=-1, has_mask=False)
            rows.append(
                {
                    **base,
                    **empty,
                    "fingerprint": fingerprint,
                    "status": "failed",
                    "stage": outcome.stage,
                    "error": outcome.error,
                    "source_key": base["source_key"] or outcome.key,
                }
            )
    columns = [
        "id", "source_id", "slice_index", "split", "group", "status", "stage", "error", "source_key", "mask_key",
        "n_files", "fingerprint", "shape", "orig_shape", "spacing", "origin", "direction", "cache_affine",
        "has_mask", "dtype", *EEG_COLUMNS, *[s.name for s in table.specs],
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _fingerprint_of(outcome: SampleOutcome, images, masks) -> str:
    listing, resolution = images
    keys = resolution.matches.get(outcome.id)
    if not keys:
        return ""
    mask_files = []
    if masks is not None:
        mask_listing, mask_resolution = masks
        mask_files = [mask_listing.files[k] for k in mask_resolution.matches.get(outcome.id, ())]
    return sample_fingerprint([listing.files[k] for k in keys], mask_files)


def _describe_keys(keys: tuple[str, ...]) -> str:
    if not keys:
        return ""
    if len(keys) == 1:
        return keys[0]
    folder = keys[0].rsplit("/", 1)[0] + "/" if "/" in keys[0] else ""
    return f"{folder}* ({len(keys)} DICOM files)"


def _enforce_consistency(manifest: pd.DataFrame, cache: Path) -> pd.DataFrame:
    """Samples whose channel count or dimensionality differs from the majority are failures too."""
    ok = manifest.status == "ok"
    if not ok.any():
        return manifest
    signature = manifest.loc[ok, "shape"].map(lambda s: (s[0], len(s) - 1))
    common, _ = Counter(signature).most_common(1)[0]
    odd = signature[signature != common]
    for index in odd.index:
        channels, dims = signature[index]
        id_ = manifest.at[index, "id"]
        manifest.loc[index, ["status", "stage"]] = ["failed", "validate"]
        manifest.at[index, "error"] = (
            f"{channels} channel(s), {dims}D; most samples have {common[0]} channel(s), {common[1]}D: convert this file"
        )
        (cache / "images" / f"{id_}.npy").unlink(missing_ok=True)
        (cache / "masks" / f"{id_}.npy").unlink(missing_ok=True)
    return manifest


def read_manifest(cache_dir: str | Path) -> pd.DataFrame:
    path = Path(cache_dir) / "manifest.parquet"
    if not path.is_file():
        raise DataError(f"no manifest.parquet in {cache_dir}: run `medctl preprocess -c <config>` first")
    return pd.read_parquet(path)


def write_manifest(cache: Path, manifest: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    _write_bytes_atomic(cache / "manifest.parquet", buffer.getvalue())


def write_errors(cache: Path, manifest: pd.DataFrame) -> None:
    failed = manifest[manifest.status == "failed"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(ERROR_COLUMNS)
    for row in failed.itertuples():
        writer.writerow([row.source_id, row.source_key, row.stage, row.error])
    write_text_atomic(cache / "data_errors.csv", buffer.getvalue())


def _write_bytes_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- summary
def aspect_warning(
    sample_id: str, shape: Sequence[int], spacing: Sequence[float], settings: PreprocessConfig
) -> str | None:
    """A line when ``settings.spatial_size`` makes the voxels of a sample of ``shape`` (C, *S) and
    ``spacing`` more than 2x more anisotropic than they are: the array the model sees then distorts the
    anatomy's physical aspect ratio (typically the axes in the wrong order: NRRD/NIfTI file axes are read
    reversed, ITK-style, so a file written from a numpy (16, 64, 64) array reads as (64, 64, 16)).
    Making anisotropic voxels closer to cubes, or keeping them, never warns."""
    size = list(settings.spatial_size)
    spatial = [int(s) for s in list(shape)[1:]]
    if not size or settings.slices or len(size) != len(spatial) or len(spacing) != len(spatial):
        return None
    extent = np.asarray(spatial, dtype=float) * np.asarray(spacing, dtype=float)  # mm per axis
    source = np.asarray(spacing, dtype=float)
    if settings.spacing:
        source = np.asarray(settings.spacing, dtype=float)  # resampled to this spacing before resizing
    voxels = extent / np.asarray(size, dtype=float)  # mm per output voxel
    factor = (voxels.max() / voxels.min()) / (source.max() / source.min())
    if factor <= 2:
        return None
    order = np.argsort(extent, kind="stable")
    kept = [0] * len(size)
    for axis, value in zip(order, sorted(size), strict=True):
        kept[axis] = value
    names = axis_names(len(size))
    shown = ", ".join(f"{n} {v:.3g}" for n, v in zip(names, voxels, strict=True))
    return (
        f"data.preprocess.spatial_size {size} resizes {sample_id} ({describe_geometry(shape, spacing)}) into "
        f"voxels of ({shown}) mm: its physical aspect ratio is distorted {factor:.0f}x; the same sizes in the "
        f"order of its axes are {kept}. NRRD/NIfTI axes are the file's reversed (D is the file's last axis): "
        "check the order"
    )


def _summary(table: LabelTable, manifest: pd.DataFrame, settings: dict, cache: Path) -> dict[str, Any]:
    ok = manifest[manifest.status == "ok"]
    shapes = {tuple(s) for s in ok["shape"]} if len(ok) else set()
    first = next(iter(shapes)) if shapes else ()
    return {
        "spatial_dims": len(first) - 1
        if first
        else expected_spatial_dims(PreprocessConfig(**settings["preprocess"])),
        "in_channels": int(first[0]) if first else 0,
        "spatial_size": list(first[1:]) if len(shapes) == 1 else None,
        "targets": [spec.to_dict() for spec in table.specs],
        "counts": class_counts(ok, table.specs, n_failed=int((manifest.status == "failed").sum())),
        "settings": settings,
        "fingerprint": settings_hash(settings),
        "has_masks": bool(ok["has_mask"].any()) if len(ok) else False,
        "dtype": settings["preprocess"]["dtype"],
        "cache_dir": str(cache),
    }


def class_counts(frame: pd.DataFrame, specs: list[TargetSpec], *, n_failed: int = 0) -> dict[str, Any]:
    """Samples per split, and per target the count of each class (multilabel: positives) per split."""
    counts: dict[str, Any] = {
        "total": int(len(frame)),
        "failed": n_failed,
        "splits": {s: int((frame.split == s).sum()) for s in ("train", "val", "test")},
        "classes": {},
    }
    for spec in specs:
        per_split = {}
        for split in ("train", "val", "test"):
            values = frame.loc[frame.split == split, spec.name]
            if spec.kind == "regression":  # no classes: how many values, and their range
                numbers = np.asarray(values, dtype=float)
                per_split[split] = {
                    "n": int(len(numbers)),
                    "mean": round(float(numbers.mean()), 3) if len(numbers) else None,
                    "min": float(numbers.min()) if len(numbers) else None,
                    "max": float(numbers.max()) if len(numbers) else None,
                }
            elif spec.kind == "multilabel":
                totals = (
                    np.sum([np.asarray(v) for v in values], axis=0)
                    if len(values)
                    else np.zeros(len(spec.classes))
                )
                per_split[split] = {c: int(n) for c, n in zip(spec.classes, totals, strict=True)}
            else:
                per_split[split] = {c: int((values == i).sum()) for i, c in enumerate(spec.classes)}
        counts["classes"][spec.name] = per_split
    return counts


# -------------------------------------------------------------------------------------- failures
def _failure_line(outcome: SampleOutcome) -> str:
    where = f" ({outcome.key})" if outcome.key else ""
    return f"{outcome.id}{where}: {outcome.stage}: {outcome.error}"


def _raise_first_failure(outcomes: Iterable[SampleOutcome]) -> None:
    for outcome in outcomes:
        if not outcome.ok:
            raise DataError(_failure_line(outcome) + "; rerun without --strict to record and skip bad files")
