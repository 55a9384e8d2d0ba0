"""Figures for reports: confusion matrices, training curves, ROC curves (matplotlib, Agg, PNG files).

Every function draws into its own ``matplotlib.figure.Figure`` (rendered by Agg when saved) and writes
``path`` (parent folders made). pyplot is never used: no window, no global figure state, no change to
the user's backend, so these run headless on servers, in workers and in tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from medctl.errors import DataError
from medctl.io import atomic_write

DPI = 120


def save_figure(fig: Figure, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path`` (through :func:`medctl.io.atomic_write`): every plot medctl writes."""
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_confusion_matrix(
    cm: Any, classes: Sequence[str], path: str | Path, normalize: bool = False, title: str = ""
) -> Path:
    """A (K, K) confusion matrix (rows true, columns predicted) as a heat map with counts in the cells.

    ``normalize=True`` divides each row by its support (rows of absent classes stay 0) and prints the
    share with the count underneath.
    """
    counts = np.asarray(cm, dtype=np.float64)  # (K, K)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(classes):
        raise DataError(f"confusion matrix of shape {counts.shape} does not match {len(classes)} classes")
    support = counts.sum(axis=1, keepdims=True)  # (K, 1)
    shown = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0) if normalize else counts
    k = len(classes)
    size = max(3.5, 0.6 * k + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(float(shown.max()), 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    labels = [_short(str(c)) for c in classes]
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    threshold = (1.0 if normalize else max(float(shown.max()), 1.0)) / 2
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
            colour = "white" if shown[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    return save_figure(fig, path)


def plot_multilabel_confusion(mcm: Any, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One 2x2 matrix ``[[tn, fp], [fn, tp]]`` per label (scikit-learn's multilabel_confusion_matrix)."""
    mats = np.asarray(mcm, dtype=np.int64)  # (L, 2, 2)
    if mats.ndim != 3 or mats.shape[1:] != (2, 2) or mats.shape[0] != len(labels):
        raise DataError(f"multilabel confusion of shape {mats.shape} does not match {len(labels)} labels")
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[len(labels) :]:
        ax.axis("off")
    for ax, label, mat in zip(axes.ravel(), labels, mats, strict=False):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(int(mat.max()), 1))
        for i in range(2):
            for j in range(2):
                colour = "white" if mat[i, j] > mat.max() / 2 else "black"
                ax.text(j, i, str(mat[i, j]), ha="center", va="center", color=colour)
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["0", "1"], yticklabels=["0", "1"])
        ax.set_title(_short(str(label)), fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.suptitle(title or "confusion per label")
    fig.tight_layout()
    return save_figure(fig, path)


def _epoch_row(row: dict[str, Any], position: int) -> dict[str, Any]:
    """``{"phase": "val", "loss": x}`` -> ``{"val_loss": x}``; the epoch defaults to the row's 1-based position."""
    phase = row.get("phase")
    if phase is None:
        return {"epoch": position, **row}
    skip = {"phase", "epoch", "step", "time"}
    return {
        "epoch": row.get("epoch", position),
        **{f"{phase}_{k}": v for k, v in row.items() if k not in skip},
    }


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(float(row["epoch"]))
            ys.append(float(value))
    return xs, ys


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, keys: Sequence[str]) -> Path:
    """One panel per key, train and val per epoch, from ``metrics.jsonl``-style rows.

    A row is a dict with a 1-based ``epoch`` (else its position, counted from 1, is used) and values under ``train_<key>`` /
    ``val_<key>``, ``train/<key>`` / ``val/<key>``, or a bare ``<key>`` (``fit``'s history records);
    a row with a ``phase`` (``metrics.jsonl``: ``{"phase": "val", "epoch": 3, "loss": ...}``) counts as
    ``<phase>_<key>``, and per-step rows (phase ``train_step``) are left out. Missing or non-finite
    values are skipped, so rows that log only some keys (an epoch without validation) mix freely.
    """
    history = [_epoch_row(row, i) for i, row in enumerate(history, start=1) if row.get("phase") != "train_step"]
    if not keys:
        raise DataError("plot_training_curves needs at least one key, e.g. ['loss', 'balanced_accuracy']")
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        drawn = 0
        for label, candidates in (
            ("train", (f"train_{key}", f"train/{key}")),
            ("val", (f"val_{key}", f"val/{key}")),
            (key, (key,)),
        ):
            for candidate in candidates:
                xs, ys = _series(history, candidate)
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, label=label)
                    drawn += 1
                    break
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no values for {key!r}", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(
    y_true: Any, probs: Any, classes: Sequence[str], path: str | Path, multilabel: bool = False
) -> Path:
    """One-vs-rest ROC curve per class (binary: the curve of class 1 only), with each AUROC in the legend.

    ``y_true`` (N,) class indices with ``probs`` (N, K), or with ``multilabel=True`` (N, L) 0/1 with
    ``probs`` (N, L). Classes without both positives and negatives have no curve and say so.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if not multilabel and p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)  # (N, 2)
    if multilabel:
        columns = [(str(name), y[:, j], p[:, j]) for j, name in enumerate(classes)]
    elif len(classes) == 2:
        columns = [(str(classes[1]), y == 1, p[:, 1])]
    else:
        columns = [(str(name), y == k, p[:, k]) for k, name in enumerate(classes)]
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for name, positive, score in columns:
        positive = np.asarray(positive).astype(bool)
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{_short(name)}: undefined (one class only)")
            continue
        fpr, tpr, _ = roc_curve(positive, score)
        ax.plot(fpr, tpr, label=f"{_short(name)}: {auc(fpr, tpr):.3f}")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("ROC (AUROC in legend)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
