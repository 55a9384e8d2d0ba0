"""The plan of a preprocess run: what the cache's content depends on (its settings and their hash), and which
samples are work to do, which failed before any reading (no file), and which are cached and unchanged (from
the manifest and an interrupted run's journal)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.config import DataConfig
from medctl.data.cache.journal import arrays_present
from medctl.data.cache.manifest import GEOMETRY_COLUMNS, sample_fingerprint
from medctl.data.cache.sample import SampleOutcome, SampleTask
from medctl.data.locator import Resolution
from medctl.data.modality import EEG_COLUMNS, Modality, modality_for
from medctl.storage import FileInfo, Listing

CACHE_FORMAT = 1


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
        **modality_for(data).cache_key(),
    }


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_tasks(
    data: DataConfig,
    modality: Modality,
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
                modality,
            )
        )
    return tasks, outcomes, carried


def earlier_outcomes(previous: pd.DataFrame | None, cache: Path) -> dict[str, tuple[str, SampleOutcome]]:
    """Earlier results whose files are all still there: source id -> (fingerprint, outcome)."""
    if previous is None:
        return {}
    found: dict[str, tuple[str, SampleOutcome]] = {}
    for source_id, rows in previous.groupby("source_id", sort=False):
        records = rows.to_dict("records")
        first = records[0]
        if first["status"] == "ok":
            if not arrays_present(cache, records):
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
