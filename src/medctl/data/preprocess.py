"""Raw files + labels table -> a preprocessed cache that training reads without decoding anything.

Cache layout, under ``<data.cache_dir>/<settings hash>/`` (:func:`cache_dir_for`):

- ``images/<id>.npy``: float32 (or float16) channel-first ``(C, D, H, W)`` / ``(C, H, W)``
- ``masks/<id>.npy``: uint8 ``(1, *spatial)`` label map, when a mask exists for the id
- ``manifest.parquet``: one row per id (and per slice when cutting slices), with its status (ok | failed),
  split, group, targets (class index; 0/1 list for multilabel), source key + fingerprint, cached shape,
  and the source geometry (``orig_shape``, ``spacing``, ``origin``, ``direction`` row-major) plus
  ``cache_affine`` (cached voxel -> LPS world, row-major) to map results back onto the source
- ``summary.json``: spatial_dims, in_channels, spatial_size, targets, counts, settings, fingerprint
- ``data_errors.csv``: id, key (``s3://bucket/key`` for remote sources), stage, error for every bad sample
- ``journal.jsonl``: while a run is under way, one line per finished sample (fsync'd as it lands); a
  run killed with ``kill -9`` leaves it behind, and the next run resumes from it instead of redoing work

The hash covers the preprocessing settings, the table's bytes, the targets, split settings and the
source, so changing any of them builds a new cache beside the old one. Within one cache, a rerun
compares each sample's source fingerprint (size + mtime, or the S3 ETag) with the manifest and skips
unchanged samples without reading them; failed samples with unchanged files stay failed without a
retry (replace the file to retry) unless they failed while downloading. Bad files are recorded and
skipped (``strict=True``: the first one raises DataError). Every file is written atomically.

Storage outages are not bad data: a sample whose files could not be fetched because the endpoint was
unreachable (after the retries) stops the run; what finished is kept, the missing ids go into
``summary.json`` (``missing``, ``incomplete``: the one-line reason) and the run raises RunFailure with that
line. Every stage that reads the cache refuses it while it is incomplete, unless
``data.allow_incomplete = true``. The next run fetches only the missing samples.

Memory: a worker holds one decoded source plus one float32 channel (:mod:`medctl.data.transforms`);
the worker count is capped so that ``workers x (3 x largest volume as float32 + 1 GiB)`` fits in
``data.preprocess.memory_gb`` (default: the memory available now). Workers die with their parent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.config import DataConfig, EEGConfig, PreprocessConfig
from medctl.data.eeg import (
    check_one_rate,
    fetch_recording,
    read_recording,
    read_recording_header,
    recording_rate,
)
from medctl.data.locator import Resolution, check_template, listing_prefix, resolve
from medctl.data.readers import axis_names, declared_size_problem, describe_geometry, read_header, read_image
from medctl.data.spectrogram import check_finite, prepare_signal, recording_windows
from medctl.data.tables import LabelTable, TargetSpec, load_table
from medctl.data.transforms import expected_spatial_dims, preprocess_image, validate_image
from medctl.devices import available_memory
from medctl.errors import DataError, RunFailure, StorageUnavailable
from medctl.io import (
    atomic_write,
    dumps_json,
    process_alive,
    write_bytes_atomic,
    write_json,
    write_text_atomic,
)
from medctl.progress import log, progress_bar
from medctl.storage import FileInfo, Listing, is_remote, join_url, list_files, local_copy, redact_secrets

CACHE_FORMAT = 1
MIN_SAMPLES_PER_WORKER = 8  # a process pool costs seconds to start; small batches run inline
JOURNAL = "journal.jsonl"
HEADER_PROBES = 8  # headers read to size the workers: those of the samples with the most bytes
WORKER_BASE_BYTES = 2**30  # a worker's interpreter, torch and MONAI, on top of its volume
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
    missing: list[str] = field(default_factory=list)  # ids not fetched: storage unreachable
    incomplete: str = ""  # the one line saying so ("" when complete)


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
    unreachable: str = ""  # the endpoint, when the files could not be fetched (an outage, not bad data)

    @property
    def ok(self) -> bool:
        return not self.error


# ----------------------------------------------------------------------------------------- hashing
def settings_for(data: DataConfig, table_sha256: str) -> dict[str, Any]:
    """Everything the cache content depends on (not workers, batch size or credentials)."""
    not_content = {"workers", "memory_gb"} | ({"volume_index"} if data.preprocess.volume_index < 0 else set())
    preprocess = data.preprocess.model_dump(mode="json", exclude=not_content)  # old caches keep their hash
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
    """The cache for ``data``, preprocessing first when it has not been built yet or is incomplete.

    An incomplete cache (samples not fetched during an outage) raises RunFailure with the preprocess
    line unless ``data.allow_incomplete``.
    """
    cache = cache_dir_for(data)
    if not (cache / "summary.json").is_file() or missing_ids(cache):
        cache = preprocess(data, workers=workers).cache_dir
    return cache


def missing_ids(cache: Path) -> list[str]:
    """Ids the cache lacks because storage was unreachable when it was built ([] when complete)."""
    path = Path(cache) / "summary.json"
    return list(json.loads(path.read_text()).get("missing", [])) if path.is_file() else []


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

    try:
        images, masks = _locate(data, ids)
    except StorageUnavailable as exc:
        return _still_unreachable(cache, data, exc)
    journal = cache / JOURNAL
    earlier = {**_previous_outcomes(previous, cache), **read_journal(journal, cache)}
    tasks, outcomes, carried = _plan(data, cache, ids, images, masks, earlier)
    if data.modality == "eeg":
        check_one_rate(_recording_rates(tasks, outcomes, images, data.eeg), data.eeg)  # before any sample is read
    if data.modality == "image" and tasks:
        check_output_fits(data.preprocess, data.preprocess.memory_gb)
    n_workers, sizing = worker_count(workers or data.preprocess.workers, tasks, data.preprocess.memory_gb)
    log(f"preprocess: {len(ids)} samples, {len(tasks)} to process, {carried} cached; cache {cache}")
    if journal.is_file():
        log(
            f"preprocess: resuming an interrupted run: {carried} samples done, only the {len(tasks)} missing run"
        )
    log(f"preprocess: {sizing}")
    new: dict[str, SampleOutcome] = {}
    outage: SampleOutcome | None = None
    try:
        if strict:
            _raise_first_failure(outcomes.values())
        with open(journal, "a", encoding="utf-8") as journal_fh:
            fingerprints = {t.id: t.fingerprint for t in tasks}
            for outcome in _run(tasks, n_workers):
                if outcome.unreachable:  # storage went away: stop, keep what finished
                    outage = outcome
                    break
                _journal(journal_fh, outcome, fingerprints[outcome.id])
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
        write_errors(cache, manifest, data.source.root)
        journal.unlink(missing_ok=True)  # the manifest now holds everything the journal did
    if data.modality == "eeg":  # recordings in a bucket, whose headers were not read before the run
        ok = manifest[manifest.status == "ok"].drop_duplicates("source_id")
        check_one_rate(dict(zip(ok.source_key, ok.sfreq.astype(float), strict=True)), data.eeg)
    missing = [t.id for t in tasks if t.id not in new] if outage is not None else []
    incomplete = ""
    if outage is not None:
        incomplete = (
            f"{len(missing)} of {len(ids)} samples could not be fetched from {outage.unreachable}: "
            f"{outage.error}; rerun `medctl preprocess` to fetch the rest"
        )
    summary = _summary(table, manifest, settings, cache)
    split_of = dict(zip(table.frame["id"], table.frame["split"], strict=True))
    summary.update(
        missing=missing, missing_splits=dict(Counter(split_of[i] for i in missing)), incomplete=incomplete
    )
    write_json(cache / "summary.json", summary)
    if incomplete and not data.allow_incomplete:
        raise RunFailure(incomplete)
    n_failed = int((manifest.drop_duplicates("source_id").status == "failed").sum())
    if not (manifest.status == "ok").any():
        if incomplete:  # data.allow_incomplete, but nothing was fetched to go on with
            raise RunFailure(incomplete)
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
    if incomplete:
        log(f"preprocess: {incomplete} (data.allow_incomplete = true: going on without them)")
    return PreprocessResult(cache, manifest, n_new, carried, n_failed, summary, missing, incomplete)


def _still_unreachable(cache: Path, data: DataConfig, exc: StorageUnavailable) -> PreprocessResult:
    """Listing failed in an outage. A cache left incomplete by the last outage is refused with that
    run's line (or, with ``data.allow_incomplete``, used as it is); anything else is this outage."""
    summary_path = cache / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if not summary.get("incomplete"):
        raise exc
    if not data.allow_incomplete:
        raise RunFailure(summary["incomplete"]) from exc
    log(f"preprocess: {summary['incomplete']} (data.allow_incomplete = true: going on without them)")
    manifest = read_manifest(cache)
    n_ok = int((manifest.drop_duplicates("source_id").status == "ok").sum())
    n_failed = int((manifest.drop_duplicates("source_id").status == "failed").sum())
    return PreprocessResult(
        cache, manifest, 0, n_ok, n_failed, summary, summary["missing"], summary["incomplete"]
    )


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
    earlier: dict[str, tuple[str, SampleOutcome]],
) -> tuple[list[SampleTask], dict[str, SampleOutcome], int]:
    """Split ids into work to do, failures known without reading (no file), and unchanged cached ones
    (``earlier``: source id -> (fingerprint, outcome) from the manifest and an interrupted run's journal)."""
    listing, resolution = images
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


def _recording_rates(
    tasks: list[SampleTask], outcomes: dict[str, SampleOutcome], images: tuple[Listing, Resolution], eeg: EEGConfig
) -> dict[str, float]:
    """Key -> sampling rate of every recording: cached ones from their rows, local ones from their header.
    Recordings in a bucket are not fetched for this (the manifest check after the run covers them), and an
    unreadable header is left to the worker that records it."""
    if eeg.resample_hz:
        return {}
    _, resolution = images
    rates = {resolution.matches[o.id][0]: float(o.rows[0]["sfreq"]) for o in outcomes.values() if o.ok and o.rows}
    for task in tasks:
        info = task.image[0]
        if is_remote(info.url):
            continue
        try:
            rates[info.key] = recording_rate(info.url, eeg)
        except DataError:
            continue
    return rates


def _previous_outcomes(previous: pd.DataFrame | None, cache: Path) -> dict[str, tuple[str, SampleOutcome]]:
    """Earlier results whose files are all still there: source id -> (fingerprint, outcome)."""
    if previous is None:
        return {}
    found: dict[str, tuple[str, SampleOutcome]] = {}
    for source_id, rows in previous.groupby("source_id", sort=False):
        records = rows.to_dict("records")
        first = records[0]
        if first["status"] == "ok":
            if not _arrays_present(cache, records):
                continue
            outcome = SampleOutcome(str(source_id), [_geometry_of(r) for r in records])
        else:
            outcome = SampleOutcome(
                str(source_id), [], str(first["stage"]), str(first["error"]), str(first["source_key"])
            )
        found[str(source_id)] = (str(first["fingerprint"]), outcome)
    return found


def _arrays_present(cache: Path, rows: list[dict[str, Any]]) -> bool:
    present = all((cache / "images" / f"{r['id']}.npy").is_file() for r in rows)
    return present and all((cache / "masks" / f"{r['id']}.npy").is_file() for r in rows if r["has_mask"])


# -------------------------------------------------------------------------------------- journal
def _journal(fh, outcome: SampleOutcome, fingerprint: str) -> None:
    """Append one finished sample (its arrays are already in place) and fsync: crash-consistent."""
    record = {
        "fingerprint": fingerprint,
        **{k: getattr(outcome, k) for k in ("id", "rows", "stage", "error", "key")},
    }
    fh.write(dumps_json(record, indent=None) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def read_journal(path: Path, cache: Path) -> dict[str, tuple[str, SampleOutcome]]:
    """An interrupted run's finished samples: source id -> (fingerprint, outcome). A torn last line
    (the kill came mid-write) and samples whose arrays are gone are left out, so they run again."""
    if not path.is_file():
        return {}
    found: dict[str, tuple[str, SampleOutcome]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        outcome = SampleOutcome(record["id"], record["rows"], record["stage"], record["error"], record["key"])
        if outcome.ok and not _arrays_present(cache, outcome.rows):
            continue
        found[outcome.id] = (record["fingerprint"], outcome)
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


def worker_count(requested: int, tasks: list[SampleTask], memory_gb: float) -> tuple[int, str]:
    """Workers to start, and the line that says why: no more than requested, than the cores, than
    tasks // MIN_SAMPLES_PER_WORKER, and than fit in memory at :func:`worker_memory_bytes` each."""
    if not tasks:
        return 1, "nothing to process"
    cores, by_tasks = os.cpu_count() or 1, max(1, len(tasks) // MIN_SAMPLES_PER_WORKER)
    need, shown = largest_sample(tasks)
    budget = memory_budget(memory_gb)
    by_memory = max(1, int(budget // need) - 1)  # the parent works too while the pool starts (see _run)
    workers = max(1, min(requested, cores, by_tasks, by_memory))
    where = "data.preprocess.memory_gb" if memory_gb else "available now"
    limits = [
        (cores, f"{cores} CPU core(s)"),
        (by_tasks, f"{len(tasks)} sample(s) to process, one worker per {MIN_SAMPLES_PER_WORKER}"),
        (by_memory, f"memory for {by_memory}"),
    ]
    why = [text for limit, text in limits if limit < requested]
    asked = f"asked {requested}" + (f"; fewer: {', '.join(why)}" if why else "")
    line = (
        f"{workers} worker(s) ({asked}); largest {shown} needs ~{need / 2**30:.1f} GB "
        f"per worker, {budget / 2**30:.1f} GB {where}"
    )
    if need > budget:
        line += "; it may not fit even alone: free memory or raise data.preprocess.memory_gb"
    return workers, line


def check_output_fits(settings: PreprocessConfig, memory_gb: float) -> None:
    """DataError before any sample is read when one cached volume of ``spatial_size`` cannot be made in the
    memory there is: the float32 output, the intensity step's copy and the cast (3x), plus the interpreter."""
    if settings.slices or not settings.spatial_size:
        return
    voxels = int(np.prod(settings.spatial_size, dtype=np.float64))
    need, budget = worker_memory_bytes(voxels), memory_budget(memory_gb)
    if need <= budget:
        return
    where = "data.preprocess.memory_gb" if memory_gb else "available now"
    raise DataError(
        f"data.preprocess.spatial_size {list(settings.spatial_size)} makes each cached volume {voxels:,} voxels "
        f"({4 * voxels / 2**30:.1f} GiB as float32; ~{need / 2**30:.1f} GiB while it is made), more than the "
        f"{budget / 2**30:.1f} GiB {where}: lower data.preprocess.spatial_size"
    )


def worker_memory_bytes(voxels: int) -> int:
    """The bound one worker stays under: 3x the source volume as float32, plus the interpreter."""
    return 3 * 4 * int(voxels) + WORKER_BASE_BYTES


def memory_budget(memory_gb: float) -> int:
    """``memory_gb`` in bytes, or (0) the memory available now (:func:`medctl.devices.available_memory`)."""
    return int(memory_gb * 2**30) if memory_gb else available_memory()


def largest_sample(tasks: list[SampleTask]) -> tuple[int, str]:
    """(bytes a worker needs for it, "volume DxHxW" / "recording C ch x N samples") for the largest sample,
    from the headers of the HEADER_PROBES samples with the most bytes. Remote files are not fetched for this:
    their size stands in (as int16 at 2:1 gzip)."""
    biggest = sorted(tasks, key=lambda t: -sum(f.size for f in t.image))[:HEADER_PROBES]
    best, shown = 0, "sample ?"
    for task in biggest:
        files = task.image
        if any(is_remote(f.url) for f in files):
            size = sum(f.size for f in files)
            need, label = worker_memory_bytes(size), f"sample ~{size / 2**20:.0f} MB object"
        elif task.eeg is not None:
            try:
                header = read_recording_header(files[0].url, EEGConfig.model_validate(task.eeg))
            except DataError:  # an unreadable header is reported by the worker that reads the file
                continue
            need = eeg_memory_bytes(len(header.channels), header.n_samples, task.eeg)
            label = f"recording {len(header.channels)} ch x {header.n_samples} samples"
        else:
            paths = [Path(f.url) for f in files]
            try:
                if len(paths) == 1 and declared_size_problem(paths[0]):
                    continue  # an impossible header is the worker's recorded skip, not a size
                header = read_header(paths)
            except Exception:  # an unreadable header is reported by the worker that reads the file
                continue
            voxels = int(np.prod(header.shape, dtype=np.int64))
            need, label = worker_memory_bytes(voxels), "volume " + "x".join(map(str, header.shape))
        if need > best:
            best, shown = need, label
    return best or WORKER_BASE_BYTES, shown


def eeg_memory_bytes(channels: int, samples: int, eeg: dict[str, Any]) -> int:
    """A worker on one recording: float64 samples, the filter's copy and the overlapping windows
    (``window_s / hop_s`` copies), plus the interpreter."""
    overlap = max(1.0, eeg["window_s"] / eeg["hop_s"])
    return int(8 * channels * samples * (2 + overlap)) + WORKER_BASE_BYTES


def _run(tasks: list[SampleTask], workers: int) -> Iterable[SampleOutcome]:
    """Process tasks inline (1 worker) or in a forkserver process pool, with a progress bar.

    The pool takes seconds to start (a fresh interpreter imports torch and MONAI), so the parent
    processes samples itself until a worker answers a ping: the start-up no longer costs throughput.
    Then the pool is fed 2 tasks per worker at a time, so breaking out of the loop leaves little to cancel.
    """
    if not tasks:
        return
    queue = list(reversed(tasks))  # pop() takes them in order
    with progress_bar("preprocess", total=len(tasks)) as bar, ExitStack() as stack:
        if workers == 1:
            while queue:
                outcome = process_sample(queue.pop())
                bar.advance(1)
                yield outcome
            return
        pool = stack.enter_context(
            ProcessPoolExecutor(
                workers, mp_context=_pool_context(), initializer=_init_worker, initargs=(os.getpid(),)
            )
        )
        pings = [pool.submit(os.getpid) for _ in range(workers)]  # start the workers in the background
        while queue and not any(p.done() for p in pings):  # meanwhile the parent works itself
            outcome = process_sample(queue.pop())
            bar.advance(1)
            yield outcome
        pending: set[Future] = set()
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    pending.add(pool.submit(process_sample, queue.pop()))
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


def _init_worker(parent_pid: int) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["MEDCTL_NO_PROGRESS"] = "1"
    _die_with(parent_pid)


def _die_with(parent_pid: int) -> None:
    """End this worker when ``parent_pid`` (the medctl process) dies, even by SIGKILL: the kernel's
    parent-death signal where Linux offers it (our parent is the forkserver, which exits with medctl),
    and a thread that checks on medctl every half second everywhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), daemon=True, name="medctl-parent-watch"
    ).start()


def _watch_parent(parent_pid: int) -> None:
    while process_alive(parent_pid):
        time.sleep(0.5)
    os._exit(1)


# ----------------------------------------------------------------------------------- one sample
def process_sample(task: SampleTask) -> SampleOutcome:
    """Fetch, read, validate, transform and write one sample; any failure becomes a record."""
    settings = PreprocessConfig.model_validate(task.settings)
    stage, key = "fetch", task.image[0].key
    downloads: dict[str, str] = {}  # local copy -> source URL, so messages name the source
    try:
        image_paths = [_local(f, task, downloads) for f in task.image]
        mask_paths = [_local(f, task, downloads) for f in task.mask]
        stage = "read"
        if task.eeg is not None:  # an EEG recording -> spectrogram windows, one cached array and row each
            eeg = EEGConfig.model_validate(task.eeg)
            raw = read_recording(image_paths[0], eeg)
            stage = "validate"
            check_finite(raw, eeg, key)
            stage = "transform"
            windows = recording_windows(prepare_signal(raw, eeg, key), eeg, task.id, settings.dtype, key)
            stage = "write"
            for window in windows:
                save_npy_atomic(Path(task.cache_dir) / "images" / f"{window.row['id']}.npy", window.array)
            return SampleOutcome(task.id, [w.row for w in windows])
        if len(image_paths) == 1:
            problem = declared_size_problem(image_paths[0])  # before any pixel is allocated
            if problem:
                raise DataError(problem)
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
    except StorageUnavailable as exc:  # an outage: not this file's fault, and not recorded as one
        return SampleOutcome(task.id, [], "fetch", exc.reason, key, unreachable=exc.endpoint)
    except Exception as exc:  # a bad file is a record in data_errors.csv, never a crash of the run
        message = re.sub(r"\s*\n\s*", " ", redact_secrets(str(exc) or type(exc).__name__))  # one line (pydicom indents)
        for local, url in downloads.items():
            message = message.replace(local, url)
        if not isinstance(exc, DataError):
            message = f"{type(exc).__name__}: {message}"
        return SampleOutcome(task.id, [], stage, message, key)
    return SampleOutcome(task.id, rows)


def _local(info: FileInfo, task: SampleTask, downloads: dict[str, str]) -> Path:
    fetch = fetch_recording if task.eeg is not None else local_copy  # a recording brings the files its header names
    path = fetch(info, download_dir=task.download_dir, endpoint_url=task.endpoint_url, retries=task.retries)
    if is_remote(info.url):
        downloads[str(path)] = info.url
    return path


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
    """``np.save`` through :func:`medctl.io.atomic_write`."""
    with atomic_write(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


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
    """Samples whose channel count or dimensionality differs from the majority are failures too: one row
    each (not one per window or slice), naming the channels an EEG recording lacks."""
    ok = manifest.status == "ok"
    if not ok.any():
        return manifest
    signature = manifest.loc[ok, "shape"].map(lambda s: (s[0], len(s) - 1))
    common, _ = Counter(signature).most_common(1)[0]
    odd = signature[signature != common]
    usual = manifest.loc[signature[signature == common].index[0]]
    extra = []
    for _, rows in manifest.loc[odd.index].groupby("source_id", sort=False):
        for id_ in rows["id"]:
            (cache / "images" / f"{id_}.npy").unlink(missing_ok=True)
            (cache / "masks" / f"{id_}.npy").unlink(missing_ok=True)
        first = rows.index[0]
        channels, dims = signature[first]
        manifest.loc[first, ["status", "stage", "id", "slice_index"]] = ["failed", "validate", rows.at[first, "source_id"], -1]
        manifest.at[first, "error"] = _odd_one_out(channels, dims, common, manifest.loc[first], usual)
        extra += list(rows.index[1:])
    return manifest.drop(index=extra).reset_index(drop=True)


def _odd_one_out(channels: int, dims: int, common: tuple[int, int], row: pd.Series, usual: pd.Series) -> str:
    """Why a sample unlike the majority is left out; for EEG, the channels it lacks or adds."""
    named = all(isinstance(r["channels"], (list, np.ndarray)) for r in (row, usual))
    if named and dims == common[1]:
        have, want = list(row["channels"]), list(usual["channels"])
        lacks = [c for c in want if c not in have]
        adds = [c for c in have if c not in want]
        diff = "; ".join(
            part for part in (f"lacks {', '.join(lacks)}" if lacks else "", f"adds {', '.join(adds)}" if adds else "") if part
        )
        return (
            f"{channels} channel(s) where most recordings have {common[0]}: {diff}; set data.eeg.channels to the "
            "channels every recording has, or leave this recording out"
        )
    return f"{channels} channel(s), {dims}D; most samples have {common[0]} channel(s), {common[1]}D: convert this file"


def read_manifest(cache_dir: str | Path) -> pd.DataFrame:
    path = Path(cache_dir) / "manifest.parquet"
    if not path.is_file():
        raise DataError(f"no manifest.parquet in {cache_dir}: run `medctl preprocess -c <config>` first")
    return pd.read_parquet(path)


def write_manifest(cache: Path, manifest: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    write_bytes_atomic(cache / "manifest.parquet", buffer.getvalue())


def write_errors(cache: Path, manifest: pd.DataFrame, root: str = "") -> None:
    """``data_errors.csv``; the key is the source URL (``s3://bucket/key``) when ``root`` is remote."""
    failed = manifest[manifest.status == "failed"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(ERROR_COLUMNS)
    for row in failed.itertuples():
        key = join_url(root, row.source_key) if is_remote(root) and row.source_key else row.source_key
        writer.writerow([row.source_id, key, row.stage, row.error])
    write_text_atomic(cache / "data_errors.csv", buffer.getvalue())


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
