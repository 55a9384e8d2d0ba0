"""What a checkpoint (``encoder.ckpt``, ``best.ckpt``) and a run's ``results.json`` record of the preprocessed
cache its model was trained on: one record for pretrain and finetune, read back by evaluate and saliency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medctl.data.dataset import read_summary, split_manifest_hash

GEOMETRY_CONVENTION = (
    "the cache manifest keeps each sample's source geometry (orig_shape, spacing, origin, direction row-major) "
    "and cache_affine (cached voxel index -> LPS world, row-major 4x4) to map results back onto the source scan"
)


def data_fingerprint(cache_dir: str | Path) -> str:
    """The cache's settings fingerprint joined with its split-manifest hash."""
    return f"{read_summary(cache_dir)['fingerprint']}-{split_manifest_hash(cache_dir)}"


def preprocessing_info(cache_dir: str | Path) -> dict[str, Any]:
    """What a checkpoint (``encoder.ckpt``, ``best.ckpt``) and ``results.json`` record of the cache the model
    was trained on: what evaluate and saliency check a cache against (``spatial_size``, ``in_channels``,
    ``split_manifest_hash``, ``settings.preprocess``) and what maps results back onto a source scan."""
    summary = read_summary(cache_dir)
    size = summary.get("spatial_size")
    return {
        "settings": summary["settings"],
        "spatial_dims": int(summary["spatial_dims"]),
        "in_channels": int(summary["in_channels"]),
        "spatial_size": [int(s) for s in size] if size else size,  # None: the samples have different sizes
        "cache_fingerprint": summary["fingerprint"],
        "data_fingerprint": data_fingerprint(cache_dir),
        "split_manifest_hash": split_manifest_hash(cache_dir),
        "geometry": GEOMETRY_CONVENTION,
    }
