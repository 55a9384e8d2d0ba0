"""Train/val/test splits: read from a column, or made once (seeded, stratified, grouped).

Generated splits use iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the Stratification
of Multi-Label Data", ECML-PKDD 2011), applied to *groups* (subjects) rather than rows, so one subject
never spans two splits. A group's "labels" are its class counts (binary/multiclass, one-hot summed) or
its summed multi-hot vectors (multilabel); the algorithm repeatedly takes the rarest label still
unassigned and gives each group carrying it to the split that most lacks that label. With one label per
row this is ordinary stratification; with none it is a grouped split by ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")
INNER_SPLITS = ("inner_train", "inner_val")  # a split carved from train: fit on one part, select on the other
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def normalize_split(value: object) -> str | None:
    """ "Validation"/"dev"/"valid" -> "val", "training" -> "train"; None for anything else."""
    return SPLIT_ALIASES.get(str(value).strip().lower())


def make_splits(
    groups: Sequence[str],
    labels: np.ndarray | None,
    ratios: Sequence[float],
    seed: int,
) -> np.ndarray:
    """Assign each row to "train"/"val"/"test".

    groups: (N,) subject per row (rows of one group always land together).
    labels: (N, L) non-negative label counts per row (one-hot or multi-hot), or None.
    ratios: three non-negative shares summing to 1. Deterministic for a seed and independent of row order.
    """
    groups = np.asarray([str(g) for g in groups])
    n = len(groups)
    labels = np.zeros((n, 0)) if labels is None else np.asarray(labels, dtype=float).reshape(n, -1)
    keys, inverse = np.unique(groups, return_inverse=True)  # sorted: row order does not matter
    group_labels = np.zeros((len(keys), labels.shape[1]))
    np.add.at(group_labels, inverse, labels)
    sizes = np.bincount(inverse, minlength=len(keys)).astype(float)
    folds = iterative_stratification(group_labels, sizes, ratios, np.random.default_rng(seed))
    return np.asarray(SPLITS, dtype=object)[folds[inverse]]


def iterative_stratification(
    labels: np.ndarray, sizes: np.ndarray, ratios: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Sechidis' algorithm on weighted examples: (G, L) label counts, (G,) sizes -> (G,) fold index."""
    ratios = np.asarray(ratios, dtype=float)
    open_folds = ratios > 0
    if not open_folds.any():
        raise ValueError("split ratios are all zero")
    n_groups = len(sizes)
    want_total = ratios * sizes.sum()  # examples each fold still wants
    want_label = ratios[:, None] * labels.sum(axis=0)[None, :]  # (F, L) per-label wants
    fold_of = np.full(n_groups, -1)
    remaining = labels.copy()
    order = rng.permutation(n_groups)  # random tie-breaking among groups, fixed by the seed

    def assign(g: int, scores: np.ndarray) -> None:
        # a fold that already holds its share of examples takes no more while another still has room,
        # so label balance never pulls the split sizes far from the ratios
        roomy = open_folds & (want_total >= sizes[g] / 2)
        allowed = roomy if roomy.any() else open_folds
        candidates = np.flatnonzero(allowed & (scores == scores[allowed].max()))
        if len(candidates) > 1:  # ties: the fold that wants the most examples, then random
            best = want_total[candidates].max()
            candidates = candidates[want_total[candidates] == best]
        fold = int(candidates[rng.integers(len(candidates))]) if len(candidates) > 1 else int(candidates[0])
        fold_of[g] = fold
        want_total[fold] -= sizes[g]
        want_label[fold] -= labels[g]
        remaining[g] = 0

    while True:
        per_label = remaining.sum(axis=0)
        live = np.flatnonzero(per_label > 0)
        if len(live) == 0:
            break
        label = live[np.argmin(per_label[live])]  # the rarest label still unassigned
        for g in order:
            if fold_of[g] == -1 and remaining[g, label] > 0:
                assign(g, want_label[:, label].copy())
    for g in order:  # groups without any label: by the examples each fold still wants
        if fold_of[g] == -1:
            assign(g, want_total.copy())
    return fold_of


def make_inner_split(
    groups: Sequence[str], labels: np.ndarray | None, val_share: float, seed: int
) -> np.ndarray:
    """Assign each training row to "inner_train" or "inner_val", grouped and stratified like
    :func:`make_splits` (one subject never on both sides); ``val_share`` in (0, 1) goes to inner_val."""
    if not 0 < val_share < 1:
        raise ValueError(f"inner val share {val_share}: give a share between 0 and 1, e.g. 0.2")
    outer = make_splits(groups, labels, (1.0 - val_share, val_share, 0.0), seed)
    return np.where(outer == "val", INNER_SPLITS[1], INNER_SPLITS[0]).astype(object)
