"""The pretraining-leakage audit of a checkpoint against downstream splits (see :mod:`medctl.data.provenance`).

``finetune`` audits ``model.checkpoint`` against its cache's splits (a warning line and
``results.json["pretraining_overlap"]``; ``sweep`` puts the count in its leaderboard); ``check data``
audits every checkpoint a config names (:func:`config_pools`) against the splits it computes.
"""

from __future__ import annotations

from pathlib import Path

from medctl.config import Config
from medctl.data.preprocess import read_manifest
from medctl.data.provenance import (
    Overlap,
    PretrainPool,
    count_overlap,
    pool_from_provenance,
    read_pretrain_ids,
)
from medctl.errors import CheckpointError
from medctl.models.checkpoints import read_provenance
from medctl.progress import log


def checkpoint_pool(checkpoint: str, pretrain_ids: str = "") -> PretrainPool | None:
    """The pool ``checkpoint`` was pretrained on: its medctl provenance, else the ``sweep.pretrain_ids`` file,
    else None (unknown)."""
    pool = pool_from_provenance(read_provenance(checkpoint), f"{Path(checkpoint).name} provenance")
    if pool is None and pretrain_ids:
        pool = read_pretrain_ids(pretrain_ids)
    return pool


def cache_ids_by_split(cache_dir: str | Path) -> dict[str, list[str]]:
    """The ids of the cache's usable samples, per split."""
    manifest = read_manifest(cache_dir)
    ok = manifest[manifest.status == "ok"]
    return {str(split): group["id"].astype(str).tolist() for split, group in ok.groupby("split")}


def audit_checkpoint(checkpoint: str, pretrain_ids: str, cache_dir: str | Path) -> Overlap:
    """Count the cache's val/test participants in ``checkpoint``'s pretraining pool and log the result;
    a warning when any are there."""
    if not checkpoint:
        return Overlap("none")
    overlap = count_overlap(checkpoint_pool(checkpoint, pretrain_ids), cache_ids_by_split(cache_dir))
    line = overlap.describe(f"pretraining audit of {checkpoint}")
    log(f"warning: {line}" if overlap.leaked else line)
    return overlap


def config_pools(config: Config) -> dict[str, PretrainPool | None]:
    """Every checkpoint ``config`` names (``model.checkpoint``, ``sweep.checkpoints``, the
    ``sweep.checkpoint_glob`` files of ``sweep.checkpoint_dir``) with its pool; a missing file is skipped,
    and ``sweep.pretrain_ids`` alone stands for the pool of foreign checkpoints."""
    sweep = config.sweep
    paths = [config.model.checkpoint, *sweep.checkpoints]
    folder = Path(sweep.checkpoint_dir).expanduser() if sweep.checkpoint_dir else None
    if folder is not None and folder.is_dir():
        paths += [str(p) for p in sorted(folder.glob(sweep.checkpoint_glob)) if p.is_file()]
    pools: dict[str, PretrainPool | None] = {}
    for path in dict.fromkeys(p for p in paths if p and Path(p).expanduser().is_file()):
        try:
            pools[path] = checkpoint_pool(path, sweep.pretrain_ids)
        except CheckpointError as exc:  # an unreadable file: its pool is unknown; `check checkpoint` says why
            log(f"pretraining audit: {exc}")
            pools[path] = None
    if not pools and sweep.pretrain_ids:
        pools["sweep.pretrain_ids"] = read_pretrain_ids(sweep.pretrain_ids)
    return pools
