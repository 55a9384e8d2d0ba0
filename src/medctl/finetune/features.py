"""The linear probe's embedding cache: each split's embeddings computed once, kept on disk, reused.

A frozen encoder maps a split to the same embeddings every epoch, so the probe computes them once and
trains its head on the tensors. They live under ``<data cache>/features/<key>_<split>.pt`` where the key
hashes

- the encoder: registry name and build args, and either the checkpoint file (resolved path, size,
  mtime) with ``checkpoint_key`` or, for a random initialisation (or a partial load, whose missing
  weights are random), the seed;
- the data: the cache's settings fingerprint and the hash of its split manifest (ids, source
  fingerprints, splits), so a changed file or split gives a new key.

A file holds tensors and plain values only (``torch.load(weights_only=True)``)::

    {"medctl": {"format": 1, "kind": "features", "version"}, "ids": [str], "embeddings": (N, D) float32,
     "encoder": {...}, "data_fingerprint": str, "split": str}
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medctl import __version__
from medctl.data.dataset import CacheDataset
from medctl.progress import log, progress_bar
from medctl.training.distributed import barrier, is_rank0
from medctl.training.precision import autocast_context
from medctl.training.state import atomic_torch_save

FORMAT = 1


@dataclass
class Features:
    """One split's embeddings, row ``i`` belonging to ``ids[i]`` (the dataset's order)."""

    ids: list[str]
    embeddings: torch.Tensor  # (N, D) float32 on the CPU
    path: Path
    reused: bool  # read from disk rather than computed by this run


# ----------------------------------------------------------------------------------------- keys
def encoder_fingerprint(
    *,
    name: str,
    args: Mapping[str, Any],
    checkpoint: str,
    checkpoint_key: str,
    allow_partial: bool,
    seed: int,
) -> dict[str, Any]:
    """What the frozen encoder's weights depend on (a JSON-able dict; hashed into the feature key)."""
    source: dict[str, Any] = {"encoder": name, "args": dict(args)}
    if checkpoint:
        path = Path(checkpoint).expanduser().resolve()
        stat = path.stat()
        source |= {
            "checkpoint": str(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "key": checkpoint_key,
        }
    if not checkpoint or allow_partial:
        source["seed"] = seed  # random weights: the initialisation seed decides them
    return source


def feature_key(encoder: Mapping[str, Any], data: str) -> str:
    text = json.dumps({"encoder": encoder, "data": data, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def feature_path(cache_dir: str | Path, key: str, split: str) -> Path:
    return Path(cache_dir) / "features" / f"{key}_{split}.pt"


# ------------------------------------------------------------------------------------- computing
@torch.no_grad()
def embed_dataset(
    encoder: nn.Module,
    dataset: CacheDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """Pooled embeddings ``(N, D)`` of every item of ``dataset`` in order, with the encoder in eval mode.

    The global torch RNG is left as it was (the DataLoader draws a seed from it), so computing features
    does not change what the training run draws afterwards.
    """
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    was_training = encoder.training
    encoder.eval()
    chunks = []
    with torch.random.fork_rng(devices=[]), progress_bar(f"embed {dataset.split}", total=len(loader)) as bar:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=device.type == "cuda")  # (B, C, *spatial)
            with autocast_context(device, precision):
                z = encoder(images)  # (B, D)
            chunks.append(z.float().cpu())
            bar.advance(1)
    encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def split_features(
    encoder: nn.Module,
    dataset: CacheDataset,
    *,
    key: str,
    encoder_info: Mapping[str, Any],
    data_fingerprint: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
) -> Features:
    """The embeddings of ``dataset``'s split: read from the feature cache, or computed (rank 0) and saved."""
    split = dataset.split or "all"
    path = feature_path(dataset.cache_dir, key, split)

    def compute() -> torch.Tensor:
        return embed_dataset(
            encoder,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
        )

    embeddings = _read(path, dataset.ids) if is_rank0() else None
    reused = embeddings is not None
    if is_rank0() and embeddings is None:  # rank 0 computes and writes; the others read it after the barrier
        embeddings = compute()
        payload = {
            "medctl": {"format": FORMAT, "kind": "features", "version": __version__},
            "ids": list(dataset.ids),
            "embeddings": embeddings,
            "encoder": json.loads(json.dumps(dict(encoder_info), default=str)),
            "data_fingerprint": data_fingerprint,
            "split": split,
        }
        atomic_torch_save(payload, path)
    barrier()
    if embeddings is None:
        embeddings = _read(path, dataset.ids)
        reused = embeddings is not None
    if embeddings is None:  # rank 0's file is not readable here: compute rather than fail
        embeddings = compute()
    log(
        f"features: {split} embeddings {tuple(embeddings.shape)} {'reused from' if reused else 'computed, cached in'} {path}"
    )
    return Features(list(dataset.ids), embeddings, path, reused=reused)


def _read(path: Path, ids: list[str]) -> torch.Tensor | None:
    """The cached embeddings when the file is readable and holds exactly ``ids`` in order; else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        log(f"features: {path} is unreadable ({type(exc).__name__}); computing the embeddings again")
        return None
    embeddings = payload.get("embeddings") if isinstance(payload, dict) else None
    if (
        not isinstance(embeddings, torch.Tensor)
        or payload.get("ids") != list(ids)
        or len(embeddings) != len(ids)
    ):
        log(f"features: {path} does not match this split's samples; computing the embeddings again")
        return None
    return embeddings.float()
