"""`medctl check bucket` and `medctl check data`: one look at what will go wrong before a long run.

Each check is a :class:`CheckRow` (name, ok, detail in plain words). Credentials are reported as
present or absent and where botocore found them, never their values.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from medctl.config import DataConfig
from medctl.data.locator import Resolution, check_template, listing_prefix, resolve
from medctl.data.preprocess import class_counts, memory_budget, worker_memory_bytes
from medctl.data.readers import declared_size_problem, read_header, read_image
from medctl.data.tables import (
    TargetSpec,
    apply_filter,
    assign_splits,
    check_columns,
    encode_target,
    find_leaks,
    label_matrix,
    read_groups,
    read_ids,
    read_table,
)
from medctl.errors import DataError, MedctlError
from medctl.storage import credentials_source, endpoint_for, is_remote, list_files, local_copy


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
            f"cannot reach {endpoint or url.geturl()} ({exc.strerror or exc}); check {origin}",
        )
    return CheckRow("endpoint", True, f"{endpoint or url.geturl()} reachable (from {origin})")


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
    spacing = ", ".join(f"{s:g}" for s in image.spacing)
    return CheckRow(
        "read",
        True,
        f"{id_}: shape {tuple(values.shape)}, dtype {values.dtype}, spacing ({spacing}) mm, intensity [{low:g}, {high:g}]",
    )


# -------------------------------------------------------------------------------------------- data
def check_data(data: DataConfig, *, max_reads: int = 50) -> DataReport:
    """Columns, filter, ids, class values, splits, leakage, files present and readable (headers of up
    to ``max_reads`` samples, spread over the table), and class counts per split."""
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
            lambda out: f"{out[1].kind}, classes: {', '.join(out[1].classes)}",
        )  # fmt: skip
        if encoded is not None:
            values, spec = encoded
            labels[spec.name] = values
            specs.append(spec)
    groups = _step(rows, "groups", lambda: read_groups(frame, data, ids), lambda g: f"{len(set(g))} subjects")
    counts: dict[str, Any] = {}
    if groups is not None and (not data.targets or len(specs) == len(data.targets)):
        first = label_matrix(labels[specs[0].name], specs[0]) if specs else None
        splits = _step(
            rows, "splits", lambda: assign_splits(frame, data, ids, groups, first), _describe_splits
        )
        if splits is not None:
            rows.extend(_split_rows(splits, groups, data))
            table = pd.DataFrame({"id": ids, "split": splits, **labels})
            counts = class_counts(table, specs)
    rows.extend(_file_rows(ids, data, max_reads))
    return DataReport(rows, counts, len(ids))


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
    rows.append(
        CheckRow(
            "empty splits",
            False,
            f"no sample in split(s) {', '.join(empty)}; every stage needs train and val",
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


def _file_rows(ids: list[str], data: DataConfig, max_reads: int) -> list[CheckRow]:
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
    for index in picks:
        id_ = found[index]
        try:
            files = [listing.files[k] for k in resolution.matches[id_]]
            paths = [
                local_copy(
                    f,
                    download_dir=data.download_dir,
                    endpoint_url=source.endpoint_url,
                    retries=source.retries,
                )
                for f in files
            ]
            problem = declared_size_problem(paths[0]) if len(paths) == 1 else None
            if problem:
                raise DataError(problem)
            sizes[id_] = read_header(paths).shape
        except Exception as exc:  # an unreadable file is the finding; report it and go on
            unreadable.append(f"{id_}: {type(exc).__name__}: {exc}")
    checked = f"{len(picks)} of {len(found)} headers read"
    rows.append(
        CheckRow("readable", False, f"{len(unreadable)} unreadable ({unreadable[0]}); {checked}")
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
