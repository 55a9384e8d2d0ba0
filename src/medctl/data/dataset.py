"""Datasets over a preprocessed cache: ``np.load`` of one ``.npy`` per item, nothing else.

Example::

    cache = ensure_cache(config.data)                    # or preprocess(config.data).cache_dir
    train = CacheDataset(cache, "train", with_mask=False)
    item = train[0]   # {"image": (C, *spatial) float32, "id": str, "<target>": label tensor}
    specs = target_specs(cache)                          # [TargetSpec(name, kind, classes)]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medctl.data.preprocess import read_manifest
from medctl.data.splits import INNER_SPLITS, SPLITS, make_inner_split
from medctl.data.tables import TargetSpec, label_matrix
from medctl.errors import DataError
from medctl.progress import log

__all__ = [
    "CacheDataset",
    "TargetSpec",
    "carve_inner_split",
    "check_cache_fits",
    "read_inner_split",
    "read_summary",
    "split_manifest_hash",
    "target_specs",
]


def read_summary(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's ``summary.json`` (spatial_dims, in_channels, spatial_size, targets, counts, ...)."""
    path = Path(cache_dir) / "summary.json"
    if not path.is_file():
        raise DataError(f"no summary.json in {cache_dir}: run `medctl preprocess -c <config>` first")
    return json.loads(path.read_text())


def target_specs(cache_dir: str | Path) -> list[TargetSpec]:
    return [TargetSpec.from_dict(t) for t in read_summary(cache_dir)["targets"]]


class CacheDataset(Dataset):
    """Items of one split (or all, ``split=None``) of a cache; only samples with status ok.

    Item: ``{"image": FloatTensor (C, *spatial), "id": str, "<target>": LongTensor () for binary and
    multiclass, FloatTensor (L,) for multilabel or FloatTensor () for regression, "mask": FloatTensor (1, *spatial) if with_mask}``.
    ``transform`` receives the item dict and returns it, so MONAI dictionary transforms
    (``RandFlipd(keys=["image", "mask"])``) apply to image and mask alike. ``ids`` keeps only those samples
    of the split, and ``name`` then names the part (``inner_train``, ``inner_val``: feature files and logs).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str | None,
        targets: list[str] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        with_mask: bool = False,
        ids: Sequence[str] | None = None,
        name: str | None = None,
    ):
        if split is not None and split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        self.cache_dir = Path(cache_dir)
        self.summary = read_summary(self.cache_dir)
        all_specs = [TargetSpec.from_dict(t) for t in self.summary["targets"]]
        known = {s.name: s for s in all_specs}
        unknown = [t for t in targets or [] if t not in known]
        if unknown:
            raise DataError(
                f"target {unknown[0]!r} is not in the cache {cache_dir}; it has: {', '.join(known) or 'none'}"
            )
        self.targets: list[TargetSpec] = [known[t] for t in targets] if targets is not None else all_specs
        manifest = read_manifest(self.cache_dir)
        keep = manifest.status == "ok"
        if split is not None:
            keep &= manifest.split == split
        if ids is not None:
            keep &= manifest["id"].astype(str).isin({str(i) for i in ids})
        self.manifest: pd.DataFrame = manifest[keep].reset_index(drop=True)
        self.split = name or split
        self.transform = transform
        self.with_mask = with_mask
        self.ids: list[str] = self.manifest["id"].astype(str).tolist()
        if with_mask and not self.manifest["has_mask"].all():
            missing = self.manifest.loc[~self.manifest["has_mask"].astype(bool), "id"].tolist()
            raise DataError(
                f"{len(missing)} sample(s) of {cache_dir} have no mask (e.g. {missing[0]}); "
                "set data.source.mask_root and rerun `medctl preprocess`, or use with_mask=False"
            )
        self._images = [str(self.cache_dir / "images" / f"{i}.npy") for i in self.ids]
        self._masks = [str(self.cache_dir / "masks" / f"{i}.npy") for i in self.ids]
        self._labels = {spec.name: self._label_tensor(spec) for spec in self.targets}
        self._npy = NpyReader(self._images[0] if self._images else None)

    @property
    def spatial_dims(self) -> int:
        return int(self.summary["spatial_dims"])

    @property
    def in_channels(self) -> int:
        return int(self.summary["in_channels"])

    def labels(self, target: str) -> np.ndarray:
        """(N,) class indices or (N, L) 0/1 labels of one target, in item order (class weights, sampling)."""
        return self._labels[target].numpy()

    def _label_tensor(self, spec: TargetSpec) -> torch.Tensor:
        values = self.manifest[spec.name].tolist()
        if spec.kind == "regression":
            return torch.tensor(np.asarray(values, dtype=np.float64))  # (N,) in the column's units, exactly
        if spec.kind == "multilabel":
            return torch.tensor(
                np.asarray([list(v) for v in values], dtype=np.float32).reshape(-1, len(spec.classes))
            )
        return torch.tensor(np.asarray(values, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.from_numpy(self._npy.read(self._images[index]))  # (C, *spatial)
        item: dict[str, Any] = {
            "image": image.float() if image.dtype != torch.float32 else image,
            "id": self.ids[index],
        }
        for name, labels in self._labels.items():
            item[name] = labels[index]
        if self.with_mask:
            item["mask"] = torch.from_numpy(np.load(self._masks[index])).float()  # (1, *spatial)
        if self.transform is not None:
            item = self.transform(item)
        return item


class NpyReader:
    """``np.load`` for a cache's arrays, which share one shape and dtype: the first file's header is
    parsed once, and each read checks its header bytes against it and reads the data straight after
    (``np.load`` parses every header with ``ast``, ~40% of an item at 32x96x96). Any other file goes
    through ``np.load``."""

    def __init__(self, example: str | None):
        self.header = b""
        if example is None:
            return
        with open(example, "rb") as fh:
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            if not fortran and not dtype.hasobject:
                self.shape, self.dtype, self.count = shape, dtype, int(np.prod(shape))
                length = fh.tell()
                fh.seek(0)
                self.header = fh.read(length)

    def read(self, path: str) -> np.ndarray:
        if self.header:
            with open(path, "rb") as fh:
                if fh.read(len(self.header)) == self.header:
                    array = np.fromfile(fh, dtype=self.dtype, count=self.count)
                    if array.size == self.count:
                        return array.reshape(self.shape)
        return np.load(path, allow_pickle=False)


def split_manifest_hash(cache_dir: str | Path) -> str:
    """A digest of which sample (and which version of its files) is in which split."""
    manifest = read_manifest(cache_dir)
    ok = manifest[manifest.status == "ok"].sort_values("id")
    rows = [f"{i}\t{s}\t{f}" for i, s, f in zip(ok["id"], ok["split"], ok["fingerprint"], strict=True)]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def carve_inner_split(cache_dir: str | Path, val_share: float, seed: int) -> pd.DataFrame:
    """The cache's usable training samples split into ``inner_train`` / ``inner_val`` (columns ``id``,
    ``group``, ``inner_split``): grouped by the manifest's subject, stratified by the first classification
    target, seeded (:func:`medctl.data.splits.make_inner_split`)."""
    manifest = read_manifest(cache_dir)
    train = manifest[(manifest.status == "ok") & (manifest.split == "train")].sort_values("id")
    first = next((s for s in target_specs(cache_dir) if s.kind != "regression"), None)
    labels = label_matrix(train[first.name].tolist(), first) if first is not None and len(train) else None
    groups = train["group"].astype(str).tolist() if "group" in train else train["id"].astype(str).tolist()
    parts = make_inner_split(groups, labels, val_share, seed) if len(train) else []
    return pd.DataFrame({"id": train["id"].astype(str).tolist(), "group": groups, "inner_split": list(parts)})


def read_inner_split(path: str | Path, cache_dir: str | Path) -> dict[str, list[str]]:
    """``{"inner_train": ids, "inner_val": ids}`` from an inner split file (``id``, ``inner_split``); every id
    must be a usable training sample of the cache and both parts non-empty (DataError naming the file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"train.inner_split = {str(path)!r}: no such file; give the inner_split.csv a sweep wrote")
    frame = pd.read_csv(path, dtype=str)
    if not {"id", "inner_split"} <= set(frame.columns) or not set(frame["inner_split"]) <= set(INNER_SPLITS):
        raise DataError(f"{path}: needs columns id and inner_split with values {' / '.join(INNER_SPLITS)}")
    manifest = read_manifest(cache_dir)
    train = set(manifest.loc[(manifest.status == "ok") & (manifest.split == "train"), "id"].astype(str))
    stray = sorted(set(frame["id"]) - train)
    if stray:
        raise DataError(
            f"{path}: {len(stray)} id(s) are not training samples of the cache {cache_dir} (e.g. {stray[0]}); "
            "the inner split was carved from other data: rerun the sweep to carve it again"
        )
    parts = {part: frame.loc[frame["inner_split"] == part, "id"].tolist() for part in INNER_SPLITS}
    for part, ids in parts.items():
        if not ids:
            raise DataError(f"{path}: the {part} part is empty; carve it with a share that leaves both non-empty")
    return parts


def check_cache_fits(
    cache: Path, specs: Sequence[TargetSpec], preprocessing: Mapping[str, Any], checkpoint: Path
) -> None:
    """The cache must have the classifier's input size, channels and targets (same kinds and classes)."""
    summary = read_summary(cache)
    for key, setting in (
        ("spatial_size", "data.preprocess.spatial_size"),
        ("in_channels", "the images' channels"),
    ):
        trained = preprocessing.get(key)
        if trained is not None and summary.get(key) != trained:
            raise DataError(
                f"{cache}: {key} {summary.get(key)} but {checkpoint.name} was trained on {trained}; "
                f"evaluate on data preprocessed like its training data ({setting} = {trained})"
            )
    cached = {t["name"]: TargetSpec.from_dict(t) for t in summary["targets"]}
    for spec in specs:
        have = cached.get(spec.name)
        if have is None:
            raise DataError(
                f"{cache}: no target `{spec.name}`, which {checkpoint.name} predicts; add it to data.targets "
                f"(it has: {', '.join(cached) or 'none'})"
            )
        if (have.kind, have.classes) != (spec.kind, spec.classes):
            raise DataError(
                f"target `{spec.name}`: the classifier predicts {spec.kind} {spec.classes} but the data has "
                f"{have.kind} {have.classes}; set data.targets to the classifier's classes, in its order"
            )
    trained_split = preprocessing.get("split_manifest_hash")
    if trained_split and trained_split != split_manifest_hash(cache):
        log(f"note: the splits of {cache} differ from those {checkpoint.name} was trained with")
