"""``manifest.parquet`` (one row per cached array, or per failed id) and ``data_errors.csv``, from the samples'
outcomes: split, group and targets from the table, source key and fingerprint, cached shape and the source
geometry (``orig_shape``, ``spacing``, ``origin``, ``direction`` row-major, ``cache_affine``)."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from medctl.data.cache.sample import SampleOutcome
from medctl.data.locator import Resolution
from medctl.data.modality import EEG_COLUMNS
from medctl.data.tables import LabelTable
from medctl.errors import DataError
from medctl.io import write_bytes_atomic, write_text_atomic
from medctl.storage import FileInfo, Listing, is_remote, join_url

ERROR_COLUMNS = ["id", "key", "stage", "error"]


GEOMETRY_COLUMNS = [
    "id", "slice_index", "shape", "orig_shape", "spacing", "origin", "direction", "cache_affine", "has_mask", "dtype",
]  # fmt: skip


def build_manifest(
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


def sample_fingerprint(image: Iterable[FileInfo], mask: Iterable[FileInfo]) -> str:
    """Digest of every source file's key + fingerprint: changes when any image or mask file changes."""
    parts = [f"image:{f.key}:{f.fingerprint}" for f in image] + [
        f"mask:{f.key}:{f.fingerprint}" for f in mask
    ]
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:20]


def _describe_keys(keys: tuple[str, ...]) -> str:
    if not keys:
        return ""
    if len(keys) == 1:
        return keys[0]
    folder = keys[0].rsplit("/", 1)[0] + "/" if "/" in keys[0] else ""
    return f"{folder}* ({len(keys)} DICOM files)"


def enforce_consistency(manifest: pd.DataFrame, cache: Path) -> pd.DataFrame:
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
