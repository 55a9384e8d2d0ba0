"""``summary.json`` (spatial dims, channels, size, targets, class counts, settings, fingerprint) and the one
warning a summary of shapes and spacings can give: a spatial_size that distorts the anatomy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.config import PreprocessConfig
from medctl.data.cache.plan import settings_hash
from medctl.data.readers import axis_names, describe_geometry
from medctl.data.tables import LabelTable, TargetSpec
from medctl.data.transforms import expected_spatial_dims


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


def build_summary(table: LabelTable, manifest: pd.DataFrame, settings: dict, cache: Path) -> dict[str, Any]:
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
