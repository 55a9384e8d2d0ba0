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

This module is the recipe; its steps live in :mod:`medctl.data.cache` (plan, pool, sample, journal, manifest,
summary, memory), and what differs between images and EEG recordings in :mod:`medctl.data.modality`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medctl.config import DataConfig
from medctl.data.cache.journal import JOURNAL, append_journal, read_journal
from medctl.data.cache.manifest import (
    build_manifest,
    enforce_consistency,
    read_manifest,
    write_errors,
    write_manifest,
)
from medctl.data.cache.memory import memory_budget, worker_memory_bytes
from medctl.data.cache.plan import earlier_outcomes, plan_tasks, settings_for, settings_hash
from medctl.data.cache.pool import MIN_SAMPLES_PER_WORKER, run_tasks, worker_count
from medctl.data.cache.pool import (
    init_worker as _init_worker,  # the names tests/test_preprocess_resume.py uses
)
from medctl.data.cache.pool import pool_context as _pool_context
from medctl.data.cache.sample import SampleOutcome, SampleTask, failure_line, process_sample
from medctl.data.cache.summary import aspect_warning, build_summary, class_counts
from medctl.data.locator import Resolution, check_template, listing_prefix, resolve
from medctl.data.modality import modality_for
from medctl.data.tables import load_table
from medctl.errors import DataError, RunFailure, StorageUnavailable
from medctl.io import write_json
from medctl.progress import log
from medctl.storage import Listing, list_files

__all__ = [
    "JOURNAL", "MIN_SAMPLES_PER_WORKER", "PreprocessResult", "SampleOutcome", "SampleTask", "_init_worker",
    "_pool_context", "aspect_warning", "cache_dir_for", "class_counts", "ensure_cache", "memory_budget", "missing_ids",
    "preprocess", "process_sample", "read_manifest", "worker_count", "worker_memory_bytes",
]  # fmt: skip
STRICT_ADVICE = "; rerun without --strict to record and skip bad files"


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

    # 1. list the sources once, and plan: what is cached and unchanged, what failed without a file, what to do
    try:
        images, masks = _locate(data, ids)
    except StorageUnavailable as exc:
        return _still_unreachable(cache, data, exc)
    journal = cache / JOURNAL
    earlier = {**earlier_outcomes(previous, cache), **read_journal(journal, cache)}
    modality = modality_for(data)
    tasks, outcomes, carried = plan_tasks(data, modality, cache, ids, images, masks, earlier)
    modality.check_plan(data.preprocess, tasks, outcomes, images)
    n_workers, sizing = worker_count(workers or data.preprocess.workers, tasks, data.preprocess.memory_gb)
    log(f"preprocess: {len(ids)} samples, {len(tasks)} to process, {carried} cached; cache {cache}")
    if journal.is_file():
        log(
            f"preprocess: resuming an interrupted run: {carried} samples done, only the {len(tasks)} missing run"
        )
    log(f"preprocess: {sizing}")

    # 2. process the samples, each journalled as it finishes; the manifest keeps whatever finished
    new: dict[str, SampleOutcome] = {}
    outage: SampleOutcome | None = None
    try:
        if strict:
            _raise_first_failure(outcomes.values())
        outage = _process_journalled(tasks, n_workers, journal, new, strict=strict)
    finally:  # also on Ctrl-C or --strict: what finished is kept in the manifest
        outcomes.update(new)
        manifest = build_manifest(table, outcomes, images, masks, cache)
        manifest = enforce_consistency(manifest, cache)
        write_manifest(cache, manifest)
        write_errors(cache, manifest, data.source.root)
        journal.unlink(missing_ok=True)  # the manifest now holds everything the journal did
    modality.check_cache(manifest)

    # 3. the summary, and what the run says: refused when storage or every sample failed it
    missing = [t.id for t in tasks if t.id not in new] if outage is not None else []
    incomplete = ""
    if outage is not None:
        incomplete = (
            f"{len(missing)} of {len(ids)} samples could not be fetched from {outage.unreachable}: "
            f"{outage.error}; rerun `medctl preprocess` to fetch the rest"
        )
    summary = build_summary(table, manifest, settings, cache)
    split_of = dict(zip(table.frame["id"], table.frame["split"], strict=True))
    summary.update(
        missing=missing, missing_splits=dict(Counter(split_of[i] for i in missing)), incomplete=incomplete
    )
    write_json(cache / "summary.json", summary)
    _refuse_unusable(manifest, cache, incomplete, data.allow_incomplete)
    n_failed = int((manifest.drop_duplicates("source_id").status == "failed").sum())
    n_new = sum(1 for o in new.values() if o.ok)
    first = manifest[manifest.status == "ok"].iloc[0]
    warning = aspect_warning(first["source_id"], first["orig_shape"], first["spacing"], data.preprocess)
    if warning:
        log(f"warning: {warning}")
    log(f"preprocess: {n_new} new, {carried} cached, {n_failed} failed")
    if incomplete:
        log(f"preprocess: {incomplete} (data.allow_incomplete = true: going on without them)")
    return PreprocessResult(cache, manifest, n_new, carried, n_failed, summary, missing, incomplete)


def _process_journalled(
    tasks: list[SampleTask], workers: int, journal: Path, new: dict[str, SampleOutcome], *, strict: bool
) -> SampleOutcome | None:
    """Process ``tasks`` into ``new``, journalling each finished sample (fsync'd); the outcome that found
    storage unreachable, where the run stopped (None when every task ran)."""
    fingerprints = {t.id: t.fingerprint for t in tasks}
    with open(journal, "a", encoding="utf-8") as journal_fh:
        for outcome in run_tasks(tasks, workers, process_sample):
            if outcome.unreachable:  # storage went away: stop, keep what finished
                return outcome
            append_journal(journal_fh, outcome, fingerprints[outcome.id])
            new[outcome.id] = outcome
            if strict and not outcome.ok:
                raise DataError(failure_line(outcome) + STRICT_ADVICE)
    return None


def _refuse_unusable(manifest: pd.DataFrame, cache: Path, incomplete: str, allow_incomplete: bool) -> None:
    """RunFailure for a cache storage left incomplete (unless allowed, and something is there), DataError for
    one in which no sample could be preprocessed."""
    if incomplete and not allow_incomplete:
        raise RunFailure(incomplete)
    if not (manifest.status == "ok").any():
        if incomplete:  # data.allow_incomplete, but nothing was fetched to go on with
            raise RunFailure(incomplete)
        first = manifest[manifest.status == "failed"].iloc[0]
        raise DataError(
            f"no sample could be preprocessed; first failure: {first['id']}: {first['stage']}: {first['error']} "
            f"(all in {cache / 'data_errors.csv'})"
        )


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


def _raise_first_failure(outcomes: Iterable[SampleOutcome]) -> None:
    for outcome in outcomes:
        if not outcome.ok:
            raise DataError(failure_line(outcome) + STRICT_ADVICE)
