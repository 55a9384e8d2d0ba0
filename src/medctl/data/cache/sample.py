"""One sample's work, as a worker does it: fetch its files, let its modality turn them into cached arrays, and
turn any failure into a record (``data_errors.csv``) rather than a crash of the run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medctl.config import PreprocessConfig
from medctl.data.modality import ImageModality, Modality, Where
from medctl.errors import DataError, StorageUnavailable
from medctl.storage import FileInfo, is_remote, redact_secrets


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
    modality: Modality = field(default_factory=ImageModality)  # data.modality, with its settings


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


def process_sample(task: SampleTask) -> SampleOutcome:
    """Fetch, read, validate, transform and write one sample; any failure becomes a record."""
    settings = PreprocessConfig.model_validate(task.settings)
    where = Where("fetch", task.image[0].key)
    downloads: dict[str, str] = {}  # local copy -> source URL, so messages name the source
    try:
        image_paths = [_local(f, task, downloads) for f in task.image]
        mask_paths = [_local(f, task, downloads) for f in task.mask]
        where.stage = "read"
        rows = task.modality.process(task, settings, image_paths, mask_paths, where)
    except StorageUnavailable as exc:  # an outage: not this file's fault, and not recorded as one
        return SampleOutcome(task.id, [], "fetch", exc.reason, where.key, unreachable=exc.endpoint)
    except Exception as exc:  # a bad file is a record in data_errors.csv, never a crash of the run
        message = re.sub(r"\s*\n\s*", " ", redact_secrets(str(exc) or type(exc).__name__))  # one line (pydicom indents)
        for local, url in downloads.items():
            message = message.replace(local, url)
        if not isinstance(exc, DataError):
            message = f"{type(exc).__name__}: {message}"
        return SampleOutcome(task.id, [], where.stage, message, where.key)
    return SampleOutcome(task.id, rows)


def _local(info: FileInfo, task: SampleTask, downloads: dict[str, str]) -> Path:
    fetch = task.modality.fetch
    path = fetch(info, download_dir=task.download_dir, endpoint_url=task.endpoint_url, retries=task.retries)
    if is_remote(info.url):
        downloads[str(path)] = info.url
    return path


def failure_line(outcome: SampleOutcome) -> str:
    """``<id> (<key>): <stage>: <error>``, the line --strict raises and data_errors.csv holds."""
    where = f" ({outcome.key})" if outcome.key else ""
    return f"{outcome.id}{where}: {outcome.stage}: {outcome.error}"
