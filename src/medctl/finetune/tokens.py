"""The attentive probe's token cache: each split's patch tokens computed once, kept on disk as float16.

V-JEPA 2 evaluates a frozen encoder with an attentive pooler over its patch tokens, so a probe needs
every token, not one pooled embedding: at [64, 384, 384] a ViT-L gives 18,432 x 1024 tokens per volume,
38 MB in float16. :func:`plan_token_cache` measures that once (one forward pass of an empty volume),
logs the size of the train and val tokens, and says whether they fit under ``train.feature_cache_max_gb``
and the free disk; when they do not, the frozen encoder runs every epoch instead.

A split's tokens live beside the embedding cache, under the same key (:mod:`medctl.finetune.features`)::

    <data cache>/features/<key>_<split>.tokens.npy    (N, T, D) float16, read with np.load(mmap_mode="r")
    <data cache>/features/<key>_<split>.tokens.json   {"format", "kind", "version", "ids", "shape", "encoder", ...}

The array is written through a memory map into a temporary file, flushed, fsynced and moved into place;
the JSON, written after it, says the array is complete and which samples its rows are. Training reads
rows from the memory map, so the page cache, not the process, holds what does not fit in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medctl import __version__
from medctl.data.dataset import CacheDataset
from medctl.errors import RunFailure
from medctl.finetune.features import feature_path
from medctl.io import dumps_json, fsync_dir, temp_path, write_text_atomic
from medctl.models.classifier import Classifier
from medctl.progress import log, progress_bar
from medctl.training.distributed import barrier, is_rank0
from medctl.training.precision import autocast_context

FORMAT = 1
GB = 1e9  # the config's GB are decimal, like the sizes printed


@dataclass
class Tokens:
    """One split's tokens, row ``i`` belonging to ``ids[i]`` (the dataset's order)."""

    ids: list[str]
    tokens: np.ndarray  # (N, T, D) float16, memory-mapped read-only
    path: Path
    reused: bool  # read from disk rather than computed by this run


# ------------------------------------------------------------------------------------------ sizing
@contextmanager
def frozen_tokens(classifier: Classifier) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """``classifier.head_inputs`` ((B, C, *spatial) -> tokens (B, T, D)) with the encoder in eval mode,
    no gradients and the global RNG left as it was."""
    was_training = classifier.encoder.training
    classifier.encoder.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield classifier.head_inputs
    finally:
        classifier.encoder.train(was_training)


def token_shape(
    classifier: Classifier,
    in_channels: int,
    spatial_size: Sequence[int],
    device: torch.device,
    precision: str,
) -> tuple[int, int]:
    """``(T, D)``: tokens per sample and their width, from one forward pass of an all-zero input."""
    x = torch.zeros(1, in_channels, *spatial_size, device=device)  # (1, C, *spatial)
    with frozen_tokens(classifier) as tokens_of, autocast_context(device, precision):
        shape = tokens_of(x).shape  # (1, T, D)
    return int(shape[1]), int(shape[2])


def plan_token_cache(
    classifier: Classifier,
    datasets: Sequence[CacheDataset],
    *,
    in_channels: int,
    spatial_size: Sequence[int],
    max_gb: float,
    device: torch.device,
    precision: str,
) -> tuple[int, int] | None:
    """Log what caching the tokens of ``datasets`` would take; their ``(T, D)`` when it fits the cap and
    the free disk, None when the encoder has to run every epoch instead."""
    n_tokens, width = token_shape(classifier, in_channels, spatial_size, device, precision)
    per_sample = n_tokens * width * 2  # float16 bytes
    total = per_sample * sum(len(d) for d in datasets)
    counts = " + ".join(f"{len(d)} {d.split}" for d in datasets)
    log(
        f"tokens: {counts} samples x {n_tokens:,} tokens x {width} = {total / GB:.3g} GB float16 "
        f"({per_sample / 1e6:.3g} MB per sample), cap train.feature_cache_max_gb = {max_gb:g}"
    )
    folder = feature_path(datasets[0].cache_dir, "x", "x").parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if total > max_gb * GB:
        log(
            f"tokens: {total / GB:.3g} GB exceeds train.feature_cache_max_gb = {max_gb:g}: the frozen encoder runs "
            "every epoch instead (raise the cap to cache them)"
        )
        return None
    if total > free:
        log(
            f"tokens: {total / GB:.3g} GB exceeds the {free / GB:.3g} GB free in {folder}: the frozen encoder runs every epoch instead"
        )
        return None
    return n_tokens, width


# ----------------------------------------------------------------------------------------- caching
def token_paths(cache_dir: str | Path, key: str, split: str) -> tuple[Path, Path]:
    """The ``(array, metadata)`` files of one split's tokens."""
    base = feature_path(cache_dir, key, split)
    return base.with_name(f"{base.stem}.tokens.npy"), base.with_name(f"{base.stem}.tokens.json")


def write_tokens(
    classifier: Classifier,
    dataset: CacheDataset,
    path: Path,
    *,
    shape: tuple[int, int],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
) -> None:
    """Every item's tokens, batch by batch, into a float16 ``.npy`` written through a memory map."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    tmp = temp_path(path)  # medctl.io's contract; a memory map needs the file name, not a handle
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.float16, shape=(len(dataset), *shape)
    )  # (N, T, D)
    row = 0
    try:
        with (
            frozen_tokens(classifier) as tokens_of,
            progress_bar(f"tokens {dataset.split}", total=len(loader)) as bar,
        ):
            for batch in loader:
                images = batch["image"].to(device, non_blocking=device.type == "cuda")  # (B, C, *spatial)
                with autocast_context(device, precision):
                    tokens = tokens_of(images).half()  # (B, T, D)
                if not torch.isfinite(tokens).all():
                    raise RunFailure(
                        f"{dataset.split} tokens overflow float16; set train.feature_cache = false to run the encoder every epoch"
                    )
                out[row : row + len(tokens)] = tokens.cpu().numpy()
                row += len(tokens)
                bar.advance(1)
        out.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def split_tokens(
    classifier: Classifier,
    dataset: CacheDataset,
    *,
    key: str,
    shape: tuple[int, int],
    encoder_info: Mapping[str, Any],
    data_fingerprint: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
) -> Tokens:
    """The tokens of ``dataset``'s split: memory-mapped from the cache, or computed (rank 0) and saved."""
    split = dataset.split or "all"
    array_path, meta_path = token_paths(dataset.cache_dir, key, split)
    tokens = read_tokens(array_path, meta_path, dataset.ids, shape) if is_rank0() else None
    reused = tokens is not None
    if is_rank0() and tokens is None:  # rank 0 computes and writes; the others read it after the barrier
        meta_path.unlink(missing_ok=True)
        write_tokens(
            classifier, dataset, array_path, shape=shape, batch_size=batch_size, num_workers=num_workers,
            device=device, precision=precision,
        )  # fmt: skip
        meta = {
            "format": FORMAT,
            "kind": "tokens",
            "version": __version__,
            "ids": list(dataset.ids),
            "shape": [len(dataset), *shape],
            "encoder": json.loads(json.dumps(dict(encoder_info), default=str)),
            "data_fingerprint": data_fingerprint,
            "split": split,
        }
        write_text_atomic(meta_path, dumps_json(meta, indent=None) + "\n")
        tokens = read_tokens(array_path, meta_path, dataset.ids, shape)
    barrier()
    if tokens is None:
        tokens = read_tokens(array_path, meta_path, dataset.ids, shape)
        reused = tokens is not None
    if tokens is None:
        raise RunFailure(f"{array_path}: the {split} tokens written by rank 0 are not readable here; rerun")
    log(
        f"tokens: {split} {tuple(tokens.shape)} float16 {'reused from' if reused else 'computed, cached in'} {array_path}"
    )
    return Tokens(list(dataset.ids), tokens, array_path, reused)


def read_tokens(
    array_path: Path, meta_path: Path, ids: list[str], shape: tuple[int, int]
) -> np.ndarray | None:
    """The memory-mapped tokens when both files are complete and hold exactly ``ids`` in order; else None."""
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log(f"tokens: {array_path} is unreadable ({type(exc).__name__}); computing them again")
        return None
    expected = (len(ids), *shape)
    if meta.get("ids") != list(ids) or tuple(tokens.shape) != expected or tokens.dtype != np.float16:
        log(f"tokens: {array_path} does not match this split's samples; computing them again")
        return None
    return tokens


# ---------------------------------------------------------------------------------------- training
class TokenRows(Dataset):
    """Rows of cached tokens with their labels: item ``i`` is ``(tokens (T, D) float32, label_1, ...)``."""

    def __init__(self, tokens: np.ndarray, labels: Sequence[torch.Tensor]):
        if any(len(label) != len(tokens) for label in labels):
            raise ValueError(
                f"{len(tokens)} token rows but labels of lengths {[len(label) for label in labels]}"
            )
        self.tokens, self.labels = tokens, list(labels)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        row = torch.from_numpy(np.asarray(self.tokens[index], dtype=np.float32))  # (T, D)
        return (row, *(label[index] for label in self.labels))


def cached_logits(
    heads: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    inputs: torch.Tensor | np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``heads`` over cached inputs, ``batch_size`` rows at a time: embeddings (N, D) or tokens (N, T, D).

    Returns ``{target: (N, K)}`` float32 on ``device``; the caller sets eval mode and autocast.
    """
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(inputs), max(1, batch_size)):
        rows = inputs[start : start + batch_size]
        rows = torch.as_tensor(np.asarray(rows, dtype=np.float32)) if isinstance(rows, np.ndarray) else rows
        for name, value in heads(rows.to(device)).items():
            chunks.setdefault(name, []).append(value.float())
    return {name: torch.cat(values) for name, values in chunks.items()}
