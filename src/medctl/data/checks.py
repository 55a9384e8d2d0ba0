"""`medctl check bucket` and `medctl check data`: one look at what will go wrong before a long run.

Each check is a :class:`CheckRow` (name, ok, detail in plain words). Credentials are reported as
present or absent and where botocore found them, never their values.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from medctl.config import DataConfig
from medctl.data.cache.memory import memory_budget, worker_memory_bytes
from medctl.data.cache.summary import aspect_warning, class_counts
from medctl.data.locator import Resolution, check_template, listing_prefix, resolve
from medctl.data.modality import modality_for
from medctl.data.provenance import PretrainPool, count_overlap
from medctl.data.readers import describe_geometry, read_image
from medctl.data.tables import (
    TargetSpec,
    apply_filter,
    assign_splits,
    check_columns,
    encode_target,
    find_leaks,
    read_groups,
    read_ids,
    read_table,
    stratification_labels,
)
from medctl.errors import DataError, MedctlError
from medctl.storage import credentials_source, endpoint_for, is_remote, list_files, local_copy, redact_secrets


@dataclass
class CheckRow:
    name: str
    ok: bool
    detail: str


@dataclass
class DataReport:
    rows: list[CheckRow]
    counts: dict[str, Any] = field(default_factory=dict)  # class_counts(): samples and classes per split
    n_samples: int = 0
    warnings: list[str] = field(default_factory=list)  # worth a look, not an error (exit 0)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)


# ------------------------------------------------------------------------------------------ bucket
def check_bucket(data: DataConfig, *, n_ids: int = 5) -> list[CheckRow]:
    """Endpoint, credentials, listing, keys for ``n_ids`` ids, one volume read; stops at the first ✗."""
    source = data.source
    rows: list[CheckRow] = []
    remote = is_remote(source.root)
    rows.append(_endpoint_row(source.root, source.endpoint_url))
    if remote:
        method = credentials_source()
        rows.append(
            CheckRow("credentials", True, f"found ({method}); values are never shown")
            if method
            else CheckRow(
                "credentials",
                False,
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            )
        )
    else:
        rows.append(CheckRow("credentials", True, "not needed for a local folder"))
    if not rows[-1].ok or not rows[0].ok:
        return rows
    try:
        check_template(source.pattern, data.id_column)
        listing = list_files(
            source.root,
            endpoint_url=source.endpoint_url,
            retries=source.retries,
            prefix=listing_prefix(source.pattern),
        )
    except MedctlError as exc:
        return [*rows, CheckRow("listing", False, str(exc))]
    rows.append(
        CheckRow(
            "listing", True, f"{len(listing.files)} files under {source.root}{listing_prefix(source.pattern)}"
        )
    )
    if not listing.files:
        rows[-1] = CheckRow("listing", False, f"no files under {source.root}{listing_prefix(source.pattern)}")
        return rows
    try:
        frame, _ = read_table(data)
        check_columns(frame, data)
        ids = read_ids(apply_filter(frame, data.filter, data.table), data)
    except DataError as exc:
        return [*rows, CheckRow("table", False, str(exc))]
    sample = ids[:n_ids]
    resolution = resolve(sample, listing, source.pattern)
    problems = [f"{i}: {resolution.problem(i)}" for i in sample if resolution.problem(i)]
    if problems:
        return [
            *rows,
            CheckRow(
                "keys", False, problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
            ),
        ]
    first = sample[0]
    example = resolution.matches[first]
    shown = (
        example[0] if len(example) == 1 else f"{len(example)} DICOM files in {example[0].rsplit('/', 1)[0]}/"
    )
    rows.append(CheckRow("keys", True, f"{len(sample)}/{len(sample)} ids matched (e.g. {first} -> {shown})"))
    rows.append(_read_row(first, [listing.files[k] for k in example], data))
    return rows


def _endpoint_row(root: str, endpoint_url: str) -> CheckRow:
    if not is_remote(root):
        folder = Path(root).expanduser()
        if not root or not folder.is_dir():
            return CheckRow(
                "endpoint", False, f"data.source.root {root!r} is not a local folder or s3:// URL"
            )
        return CheckRow("endpoint", True, f"local folder {folder} (no endpoint needed)")
    endpoint = endpoint_for(endpoint_url)
    shown = redact_secrets(endpoint or "https://s3.amazonaws.com")
    origin = (
        "data.source.endpoint_url" if endpoint_url else ("S3_ENDPOINT_URL" if endpoint else "AWS default")
    )
    url = urlparse(endpoint or "https://s3.amazonaws.com")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as exc:
        return CheckRow(
            "endpoint",
            False,
            f"cannot reach {shown} ({exc.strerror or exc}); check {origin}",
        )
    return CheckRow("endpoint", True, f"{shown} reachable (from {origin})")


def _read_row(id_: str, files: list, data: DataConfig) -> CheckRow:
    try:
        paths = [
            local_copy(
                f,
                download_dir=data.download_dir,
                endpoint_url=data.source.endpoint_url,
                retries=data.source.retries,
            )
            for f in files
        ]
        image = read_image(paths)
    except Exception as exc:  # any reader failure is this check's answer, shown in plain words
        return CheckRow("read", False, f"{id_}: {type(exc).__name__}: {exc}")
    values = image.array
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))
    return CheckRow(
        "read",
        True,
        f"{id_}: {describe_geometry(values.shape, image.spacing)}, dtype {values.dtype}, "
        f"intensity [{low:g}, {high:g}]",
    )


# -------------------------------------------------------------------------------------------- data
def check_data(
    data: DataConfig, *, max_reads: int = 50, pools: Mapping[str, PretrainPool | None] | None = None
) -> DataReport:
    """Columns, filter, ids, class values, splits, leakage, files present and readable (headers of up
    to ``max_reads`` samples, spread over the table), and class counts per split.

    ``pools`` (checkpoint -> its pretraining pool, None when unknown) adds one row per checkpoint: how
    many val/test participants it was pretrained on (a ✗ when any).
    """
    rows: list[CheckRow] = []
    try:
        raw, _ = read_table(data)
    except DataError as exc:
        return DataReport([CheckRow("table", False, str(exc))])
    rows.append(CheckRow("table", True, f"{data.table}: {len(raw)} rows, {len(raw.columns)} columns"))
    if (
        _step(
            rows, "columns", lambda: check_columns(raw, data), lambda _: "every configured column is present"
        )
        is None
    ):
        return DataReport(rows)
    frame = _step(
        rows, "filter", lambda: apply_filter(raw, data.filter, data.table),
        lambda kept: f"{len(kept)} of {len(raw)} rows kept" if data.filter else "no filter",
    )  # fmt: skip
    if frame is None:
        return DataReport(rows)
    ids = _step(rows, "ids", lambda: read_ids(frame, data), lambda ids: f"{len(ids)} unique ids")
    if ids is None:
        ids = frame[data.id_column].astype(str).tolist()
    labels: dict[str, list] = {}
    specs: list[TargetSpec] = []
    for i, target in enumerate(data.targets):
        encoded = _step(
            rows, f"target {target.name}", lambda i=i, t=target: encode_target(frame, t, i, ids),
            lambda out: f"{out[1].kind}, classes: {', '.join(out[1].classes)}" if out[1].classes else out[1].kind,
        )  # fmt: skip
        if encoded is not None:
            values, spec = encoded
            labels[spec.name] = values
            specs.append(spec)
    groups = _step(rows, "groups", lambda: read_groups(frame, data, ids), lambda g: f"{len(set(g))} subjects")
    counts: dict[str, Any] = {}
    if groups is not None and (not data.targets or len(specs) == len(data.targets)):
        first = stratification_labels(labels, specs)
        splits = _step(
            rows, "splits", lambda: assign_splits(frame, data, ids, groups, first), _describe_splits
        )
        if splits is not None:
            rows.extend(_split_rows(splits, groups, data))
            rows.extend(_pretraining_rows(ids, splits, pools or {}))
            table = pd.DataFrame({"id": ids, "split": splits, **labels})
            counts = class_counts(table, specs)
    warnings: list[str] = []
    rows.extend(_file_rows(ids, data, max_reads, warnings))
    return DataReport(rows, counts, len(ids), warnings)


def _step(rows: list[CheckRow], name: str, fn, describe):
    """Run one check: append a ✓ row (and return the value, True for None) or a ✗ row (return None)."""
    try:
        value = fn()
    except DataError as exc:
        rows.append(CheckRow(name, False, str(exc)))
        return None
    rows.append(CheckRow(name, True, describe(value)))
    return True if value is None else value


def _describe_splits(splits: list[str]) -> str:
    sizes = pd.Series(splits).value_counts()
    return ", ".join(f"{s} {int(sizes.get(s, 0))}" for s in ("train", "val", "test"))


def _split_rows(splits: list[str], groups: list[str], data: DataConfig) -> list[CheckRow]:
    rows = []
    present = set(splits)
    wanted = [
        s
        for s, r in zip(("train", "val", "test"), data.split_ratios, strict=True)
        if r > 0 or data.split_column
    ]
    empty = [s for s in wanted if s not in present]
    if data.split_column:
        fix = f"mark some rows {' / '.join(repr(s) for s in empty)} in the `{data.split_column}` column"
    else:
        fix = "give each split a share in data.split_ratios, e.g. [0.7, 0.15, 0.15]"
    rows.append(
        CheckRow(
            "empty splits",
            False,
            f"no sample in split(s) {', '.join(empty)}; finetune and sweep need train and val (pretrain only "
            f"train): {fix}",
        )
        if empty
        else CheckRow("empty splits", True, "none")
    )
    if not data.group_column:
        rows.append(CheckRow("leakage", True, "not checked: set data.group_column to the subject column"))
        return rows
    leaks = find_leaks(splits, groups)
    if leaks:
        shown = "; ".join(f"{g} in {'+'.join(s)}" for g, s in list(leaks.items())[:3])
        rows.append(
            CheckRow(
                "leakage", False, f"{len(leaks)} subject(s) span splits ({shown}); fix data.split_column"
            )
        )
    else:
        rows.append(CheckRow("leakage", True, f"no subject spans two splits ({data.group_column})"))
    return rows


def _pretraining_rows(
    ids: list[str], splits: list[str], pools: Mapping[str, PretrainPool | None]
) -> list[CheckRow]:
    by_split: dict[str, list[str]] = {}
    for id_, split in zip(ids, splits, strict=True):
        by_split.setdefault(split, []).append(id_)
    rows = []
    for name, pool in pools.items():
        overlap = count_overlap(pool, by_split)
        rows.append(CheckRow("pretraining leakage", not overlap.leaked, overlap.describe(name)))
    return rows


def _file_rows(ids: list[str], data: DataConfig, max_reads: int, warnings: list[str]) -> list[CheckRow]:
    """Files present and readable (headers); the first readable sample is decoded whole, so its spacing
    can say whether data.preprocess.spatial_size distorts its physical aspect ratio (``warnings``)."""
    source = data.source
    try:
        check_template(source.pattern, data.id_column)
        listing = list_files(
            source.root,
            endpoint_url=source.endpoint_url,
            retries=source.retries,
            prefix=listing_prefix(source.pattern),
        )
    except MedctlError as exc:
        return [CheckRow("files", False, str(exc))]
    resolution = resolve(ids, listing, source.pattern)
    rows = [_files_row(ids, resolution)]
    found = [i for i in ids if i in resolution.matches]
    if not found:
        return rows
    picks = sorted({int(round(x)) for x in np.linspace(0, len(found) - 1, min(max_reads, len(found)))})
    unreadable = []
    sizes: dict[str, tuple[int, ...]] = {}  # id -> declared shape
    modality = modality_for(data)
    for index in picks:
        id_ = found[index]
        try:
            files = [listing.files[k] for k in resolution.matches[id_]]
            paths = [
                modality.fetch(
                    f,
                    download_dir=data.download_dir,
                    endpoint_url=source.endpoint_url,
                    retries=source.retries,
                )
                for f in files
            ]
            shape = modality.header_shape(paths)  # DataError for an unreadable file
            if shape is None:  # a recording: no voxels to size or distort
                continue
            sizes[id_] = shape
            if index == picks[0]:  # one whole decode: the spacing says whether spatial_size distorts
                image = read_image(paths)
                warning = aspect_warning(id_, image.array.shape, image.spacing, data.preprocess)
                warnings.extend([warning] if warning else [])
        except Exception as exc:  # an unreadable file is the finding; report it and go on
            said = str(exc) if isinstance(exc, MedctlError) else f"{type(exc).__name__}: {exc}"
            unreadable.append(f"{id_}: {said}")
    checked = f"{len(picks)} of {len(found)} headers read"
    rows.append(
        CheckRow("readable", False, f"{len(unreadable)} unreadable ({checked}):\n    " + "\n    ".join(unreadable))
        if unreadable
        else CheckRow("readable", True, checked)
    )
    if sizes:
        rows.append(_memory_row(sizes, data.preprocess.memory_gb))
    return rows


def _memory_row(sizes: dict[str, tuple[int, ...]], memory_gb: float) -> CheckRow:
    """Does one preprocess worker fit the largest declared volume in the memory cap?"""
    budget = memory_budget(memory_gb)
    where = "in data.preprocess.memory_gb" if memory_gb else "available now"
    needs = {id_: worker_memory_bytes(int(np.prod(shape, dtype=np.int64))) for id_, shape in sizes.items()}
    largest = max(needs, key=needs.get)
    shown = (
        f"{largest}: {'x'.join(map(str, sizes[largest]))} needs ~{needs[largest] / 2**30:.1f} GB per worker"
    )
    too_big = [id_ for id_, need in needs.items() if need > budget]
    if too_big:
        return CheckRow(
            "memory", False,
            f"{len(too_big)} header(s) beyond the memory cap (e.g. {shown}, {budget / 2**30:.1f} GB {where}): "
            "raise data.preprocess.memory_gb or free memory",
        )  # fmt: skip
    return CheckRow("memory", True, f"largest header {shown}; {budget / 2**30:.1f} GB {where}")


def _files_row(ids: list[str], resolution: Resolution) -> CheckRow:
    bad = [i for i in ids if resolution.problem(i)]
    if not bad:
        return CheckRow("files", True, f"{len(ids)} ids matched under {resolution.root}")
    return CheckRow(
        "files", False,
        f"{len(resolution.missing)} missing, {len(resolution.ambiguous)} ambiguous of {len(ids)} ids "
        f"(e.g. {bad[0]}: {resolution.problem(bad[0])})",
    )  # fmt: skip
