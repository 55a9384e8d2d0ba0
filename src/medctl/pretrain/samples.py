"""What pretraining trains on: the cache's input size, ``pretrain.subset`` of the train split, a batch size the
method can use, and the ids it saw (the pool a checkpoint's provenance records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from medctl.data.dataset import CacheDataset
from medctl.errors import ConfigError, DataError
from medctl.pretrain import min_batch_problem
from medctl.progress import log


def summary_input_size(summary: dict[str, Any], cache: Path) -> tuple[int, ...]:
    size = summary.get("spatial_size")
    if not size:
        raise DataError(
            f"{cache}: its samples have different sizes; pretraining needs one input size: "
            "set data.preprocess.spatial_size, e.g. [32, 64, 64]"
        )
    return tuple(int(s) for s in size)


def select_subset(dataset: CacheDataset, subset: str, *, seed: int) -> Dataset:
    """The items of ``dataset`` that ``pretrain.subset`` keeps (all when it is "")."""
    if not subset:
        return dataset
    key, sep, value = subset.partition(":")
    if not sep or not key or not value:
        raise ConfigError(
            [f'`pretrain.subset` = "{subset}": use "fraction:0.5" or "<column>:<value>"'], "pretrain"
        )
    n = len(dataset)
    if key == "fraction":
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ConfigError(
                [f'`pretrain.subset` = "{subset}": the fraction must be in (0, 1], e.g. "fraction:0.5"'],
                "pretrain",
            )
        keep = max(1, round(share * n))
        indices = sorted(np.random.default_rng(seed).choice(n, size=keep, replace=False).tolist())
    else:
        manifest = dataset.manifest
        if key not in manifest.columns:
            known = ", ".join(
                c for c in manifest.columns if c not in ("fingerprint", "cache_affine", "direction")
            )
            raise ConfigError(
                [
                    f'`pretrain.subset` = "{subset}": no column `{key}` in the cache manifest; use one of: {known}'
                ],
                "pretrain",
            )
        wanted = value
        spec = next((t for t in dataset.targets if t.name == key and t.kind != "multilabel"), None)
        if spec is not None and value in spec.classes:
            wanted = str(spec.classes.index(value))  # target columns hold class indices
        indices = [i for i, cell in enumerate(manifest[key].astype(str)) if cell == wanted]
    if not indices:
        raise ConfigError(
            [f'`pretrain.subset` = "{subset}" keeps none of the {n} training samples'], "pretrain"
        )
    log(f"pretrain.subset {subset}: {len(indices)} of {n} training samples")
    return Subset(dataset, indices)


def check_batch_size(method: str, batch_size: int, n_train: int) -> int:
    if n_train == 0:
        raise DataError(
            "the train split is empty: pretraining needs training samples (check data.split_column)"
        )
    too_small = min_batch_problem(method, batch_size)
    if too_small:
        raise ConfigError([too_small], "data.batch_size")
    if n_train < batch_size:
        raise ConfigError(
            [f"`data.batch_size` = {batch_size} is larger than the {n_train} training samples; lower it"],
            "data.batch_size",
        )
    return batch_size


def trained_ids(dataset: Dataset) -> list[str]:
    """The sample ids a (possibly subset) train split holds: the pretraining pool."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.ids[i] for i in dataset.indices]
    return list(dataset.ids)
