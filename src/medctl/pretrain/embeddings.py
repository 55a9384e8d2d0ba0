"""What the pretraining monitor measures on embeddings: fixed subsets, collapse statistics and the online k-NN.

- collapse: the per-dimension standard deviation of the L2-normalised embeddings, mean and min; spread out
  unit vectors in D dimensions have a std near ``1 / sqrt(D)`` per dimension, a collapsed encoder drives it
  to 0 (:mod:`medctl.pretrain.monitoring` compares it with the encoder before pretraining). Beside it, the
  effective rank of the mean-centred embeddings (RankMe, Garrido et al., ICML 2023: the exponential of the
  entropy of the normalised singular values), which sees a dimensional collapse the spread misses. An untrained
  encoder's embeddings share one large mean direction (99.7% of their energy for ``mt3`` on the count family),
  so the spread of unit vectors measures the angles around it, not how many directions vary: BYOL on ``mt3``
  at batch 8 kept a spread of 0.37-5.7x its untrained encoder's while its rank fell from 66-71 to 2.6-3.7, on
  every seed (benchmarks/RESULTS.md, issue 29). Centring first keeps that mean out of the rank.
- k-NN: each val embedding takes the majority label of its ``k = min(5, N_train)`` nearest train
  embeddings by cosine similarity (Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", CVPR 2018); the accuracy, per binary/multiclass target, beside the majority-class chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from medctl.data.tables import TargetSpec


@dataclass
class Embeddings:
    """Embeddings of some items of a dataset, with their labels (binary/multiclass targets only)."""

    vectors: np.ndarray  # (N, D) float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # target -> (N,) class indices
    ids: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- embeddings
def fixed_subset(n: int, limit: int, seed: int) -> list[int]:
    """At most ``limit`` of ``range(n)``, drawn once with ``seed`` (sorted), so every epoch sees the same items."""
    if n <= limit:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def stack_items(dataset: Any, indices: Sequence[int]) -> dict[str, Any]:
    """Items ``indices`` of a map-style dataset collated by hand (no DataLoader, so no RNG is drawn)."""
    items = [dataset[i] for i in indices]
    batch: dict[str, Any] = {"ids": [item["id"] for item in items]}
    for key in items[0]:
        if isinstance(items[0][key], torch.Tensor):
            batch[key] = torch.stack([item[key] for item in items])
    return batch


@torch.no_grad()
def embed_items(
    embed: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    indices: Sequence[int],
    targets: Sequence[TargetSpec],
    *,
    batch_size: int,
    device: torch.device,
) -> Embeddings:
    """``embed`` (B, C, *S) -> (B, D) over ``dataset[indices]`` in batches; labels of class targets kept."""
    vectors, ids = [], []
    labels: dict[str, list[np.ndarray]] = {t.name: [] for t in targets if t.kind != "multilabel"}
    for start in range(0, len(indices), batch_size):
        batch = stack_items(dataset, indices[start : start + batch_size])
        vectors.append(embed(batch["image"].to(device)).float().cpu().numpy())  # (b, D)
        ids += batch["ids"]
        for name in labels:
            labels[name].append(batch[name].numpy().reshape(-1))
    dim = vectors[0].shape[1] if vectors else 0
    return Embeddings(
        np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        {name: np.concatenate(parts) for name, parts in labels.items() if parts},
        ids,
    )


# --------------------------------------------------------------------------------------- collapse
def collapse_stats(vectors: np.ndarray) -> dict[str, float]:
    """Per-dimension std of L2-normalised embeddings (N, D): its mean and min, and 1/sqrt(D) for scale; the
    effective rank of the centred embeddings (:func:`effective_rank`)."""
    if len(vectors) < 2:
        raise ValueError("the collapse check needs at least 2 embeddings")
    unit = F.normalize(torch.as_tensor(vectors, dtype=torch.float64), dim=1)  # (N, D)
    std = unit.std(dim=0)  # (D,)
    return {
        "embed_std_mean": float(std.mean()),
        "embed_std_min": float(std.min()),
        "embed_std_reference": 1.0 / math.sqrt(unit.shape[1]),
        "embed_rank": effective_rank(vectors),
    }


def effective_rank(vectors: np.ndarray) -> float:
    """RankMe of the mean-centred embeddings (N, D): ``exp(-sum p log p)`` over the singular values ``s`` as
    shares ``p = s / sum(s)``; from 1 (one direction varies) to ``min(N - 1, D)`` (all vary alike); 0 when
    nothing varies. (RankMe adds 1e-7 to each share; here zero shares are left out, the same to 1e-5.)"""
    data = torch.as_tensor(vectors, dtype=torch.float64)  # (N, D)
    singular = torch.linalg.svdvals(data - data.mean(dim=0))  # (min(N, D),)
    if float(singular.sum()) <= 1e-12 * max(1.0, float(data.abs().max())):
        return 0.0
    shares = singular / singular.sum()
    shares = shares[shares > 0]
    return float(torch.exp(-(shares * shares.log()).sum()))


def std_ratio(stats: dict[str, float], reference: dict[str, float]) -> float:
    """Mean per-dimension std now over the same before pretraining (inf when the reference is 0)."""
    before = reference.get("embed_std_mean", 0.0)
    return stats["embed_std_mean"] / before if before > 0 else math.inf


def rank_ratio(stats: dict[str, float], reference: dict[str, float]) -> float:
    """Effective rank now over the same before pretraining (inf when the reference has none: a run calibrated
    before the rank was measured, or an untrained encoder whose embeddings did not vary)."""
    before = reference.get("embed_rank", 0.0)
    return stats.get("embed_rank", 0.0) / before if before > 0 else math.inf


# -------------------------------------------------------------------------------------------- k-NN
def knn_accuracy(
    train_vectors: np.ndarray,
    train_labels: np.ndarray,
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    k: int = 5,
) -> float:
    """Accuracy of a cosine k-NN vote (``k = min(k, N_train)``) of the queries against the train embeddings."""
    if len(train_vectors) == 0 or len(query_vectors) == 0:
        raise ValueError("k-NN needs train and query embeddings")
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_vectors)), metric="cosine", algorithm="brute")
    knn.fit(train_vectors, train_labels)
    return float((knn.predict(query_vectors) == query_labels).mean())


def knn_metrics(train: Embeddings, val: Embeddings, k: int = 5) -> dict[str, float]:
    """``knn_accuracy`` (mean over class targets) and ``knn_accuracy_<target>`` when there are several."""
    names = [name for name in train.labels if name in val.labels]
    if not names or len(train.vectors) == 0 or len(val.vectors) == 0:
        return {}
    per_target = {
        name: knn_accuracy(train.vectors, train.labels[name], val.vectors, val.labels[name], k)
        for name in names
    }
    chance = [majority_share(val.labels[name]) for name in names]
    out = {"knn_accuracy": float(np.mean(list(per_target.values()))), "knn_chance": float(np.mean(chance))}
    out["knn_n"] = float(len(val.vectors))  # the votes, for the collapse verdict's exact test against chance
    if len(per_target) > 1:
        out |= {f"knn_accuracy_{name}": value for name, value in per_target.items()}
    return out


def majority_share(labels: np.ndarray) -> float:
    """The accuracy of always answering the most frequent class: a k-NN vote's chance level."""
    return float(np.bincount(np.asarray(labels, dtype=np.int64)).max() / len(labels))
