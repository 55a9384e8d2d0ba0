"""Classification metrics on predictions, all computed with scikit-learn.

Conventions (every function here follows them):

- ``y_true`` holds class indices ``(N,)`` into ``classes`` for binary and multiclass targets, and a 0/1
  indicator matrix ``(N, L)`` for multilabel targets.
- ``probs`` holds one probability column per class: ``(N, K)``. For a binary target the canonical form
  is ``(N, 2)`` = ``[p(classes[0]), p(classes[1])]``; a single column ``(N,)`` or ``(N, 1)`` (what a
  one-logit sigmoid head gives) is read as ``p(classes[1])`` and widened by :func:`class_probs`.
- The prediction is ``argmax(probs)``, ties going to the lower class index (binary: class 1 when
  ``p(classes[1]) > 0.5``); multilabel predictions are ``probs >= threshold``.
- A metric that is undefined on the given samples (AUROC of a class absent from ``y_true``, F1 of a
  class neither present nor predicted) is ``None`` in the returned dicts with a note saying why; macro
  averages are over the classes where it is defined. Nothing here crashes on an absent class.
- Values are plain Python floats / ints / lists, ready for ``json.dumps``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from medctl.errors import DataError

KINDS = ("binary", "multiclass", "multilabel")


# ------------------------------------------------------------------------------------------ inputs
def class_probs(probs: Any, num_classes: int) -> np.ndarray:
    """``probs`` as ``(N, K)`` float64; a binary ``(N,)`` / ``(N, 1)`` p(class 1) becomes ``[1-p, p]``."""
    probs = np.asarray(probs, dtype=np.float64)
    if num_classes == 2 and (probs.ndim == 1 or (probs.ndim == 2 and probs.shape[1] == 1)):
        p1 = probs.reshape(-1)  # (N,)
        probs = np.stack([1.0 - p1, p1], axis=1)  # (N, 2)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise DataError(
            f"predictions have shape {probs.shape} but {num_classes} classes were given; "
            f"pass one probability column per class, (N, {num_classes})"
        )
    if not np.isfinite(probs).all():
        raise DataError("predictions contain NaN or infinite probabilities; check the model outputs")
    return probs


def check_labels(y_true: Any, num_classes: int, n: int) -> np.ndarray:
    """``y_true`` as ``(N,)`` int64 class indices in ``range(num_classes)``."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(
            f"labels have shape {y.shape} but there are {n} predictions; pass one class index per sample"
        )
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise DataError("labels must be integer class indices; map class names to indices first")
    y = y.astype(np.int64)
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise DataError(
            f"label {int(bad[0])} is outside 0..{num_classes - 1}; the target's `classes` list is missing a class"
        )
    return y


def check_multilabel(y_true: Any, probs: Any, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, L)`` 0/1 int labels and ``(N, L)`` float probabilities, or a DataError saying what is wrong."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape or y.shape[1] != num_labels:
        raise DataError(
            f"multilabel labels {y.shape} and predictions {p.shape} must both be (N, {num_labels}), "
            "one column per label"
        )
    if not np.isin(y, (0, 1)).all():
        raise DataError("multilabel labels must be 0/1 indicators, one column per label")
    if not np.isfinite(p).all():
        raise DataError("predictions contain NaN or infinite probabilities; check the model outputs")
    return y.astype(np.int64), p


# ------------------------------------------------------------------------------------- binary parts
def binary_auroc(positive: np.ndarray, score: np.ndarray) -> tuple[float | None, str | None]:
    """AUROC of ``score`` for the 0/1 ``positive`` indicator, or ``(None, reason)`` when undefined."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None, "no positive samples in y_true"
    if n_pos == positive.size:
        return None, "no negative samples in y_true"
    return float(roc_auc_score(positive, score)), None


def one_vs_rest_auroc(y: np.ndarray, probs: np.ndarray) -> tuple[list[float | None], list[str | None]]:
    """Per-class one-vs-rest AUROC ``(K,)`` with a reason for every class where it is undefined."""
    aurocs, notes = [], []
    for k in range(probs.shape[1]):
        value, note = binary_auroc(y == k, probs[:, k])
        aurocs.append(value)
        notes.append(
            note and ("class absent from y_true" if "positive" in note else "only this class in y_true")
        )
    return aurocs, notes


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: the AUROC of p(class 1); otherwise the mean one-vs-rest AUROC over defined classes."""
    if probs.shape[1] == 2:
        return binary_auroc(y == 1, probs[:, 1])[0]
    defined = [a for a in one_vs_rest_auroc(y, probs)[0] if a is not None]
    return float(np.mean(defined)) if defined else None


def _num(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


# --------------------------------------------------------------------------------------- multiclass
def classification_metrics(
    y_true: Any, probs: Any, classes: Sequence[str], kind: str = "multiclass"
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, F1, per-class precision/recall/F1/support/AUROC and the confusion matrix.

    ``y_true`` (N,) class indices; ``probs`` (N, K), or for ``kind="binary"`` (N, 2) = [p0, p1] (a single
    p1 column is accepted). The confusion matrix has rows = true class, columns = predicted class, with
    labels fixed to ``range(K)`` so an absent class still has its row. ``auroc`` is the binary AUROC of
    p(class 1), or the macro one-vs-rest AUROC over classes present in ``y_true``; ``notes`` names every
    class whose AUROC is undefined.
    """
    if kind not in ("binary", "multiclass"):
        raise DataError(
            f"kind {kind!r} is not binary or multiclass; use multilabel_metrics for multilabel targets"
        )
    classes = [str(c) for c in classes]
    num_classes = len(classes)
    if kind == "binary" and num_classes != 2:
        raise DataError(f"a binary target needs exactly 2 classes, got {classes}; use kind='multiclass'")
    if num_classes < 2:
        raise DataError(f"a classification target needs at least 2 classes, got {classes}")
    probs = class_probs(probs, num_classes)  # (N, K)
    y = check_labels(y_true, num_classes, probs.shape[0])  # (N,)
    if y.size == 0:
        raise DataError("no samples to evaluate; the split is empty")
    pred = probs.argmax(axis=1)  # (N,)
    labels = list(range(num_classes))

    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=np.nan
    )
    macro_p, macro_r, macro_f, _ = precision_recall_fscore_support(
        y, pred, labels=labels, average="macro", zero_division=np.nan
    )
    aurocs, auroc_notes = one_vs_rest_auroc(y, probs)
    per_class = {}
    for k, name in enumerate(classes):
        entry = {
            "precision": _num(precision[k]),
            "recall": _num(recall[k]),
            "f1": _num(f1[k]),
            "support": int(support[k]),
            "auroc": aurocs[k],
        }
        if auroc_notes[k]:
            entry["auroc_note"] = auroc_notes[k]
        per_class[name] = entry
    notes = [
        f"AUROC of {name!r} undefined: {note}"
        for name, note in zip(classes, auroc_notes, strict=True)
        if note
    ]
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": handled by the nan average
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, pred)
    return {
        "kind": kind,
        "n": int(y.size),
        "classes": classes,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": _num(macro_f),
        "weighted_f1": _num(f1_score(y, pred, labels=labels, average="weighted", zero_division=np.nan)),
        "macro_precision": _num(macro_p),
        "macro_recall": _num(macro_r),
        "auroc": macro_auroc(y, probs),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "notes": notes,
    }


# --------------------------------------------------------------------------------------- multilabel
def multilabel_metrics(
    y_true: Any, probs: Any, labels: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Per-label AUROC/precision/recall/F1, micro and macro averages, subset accuracy and Hamming loss.

    ``y_true`` (N, L) 0/1, ``probs`` (N, L) independent per-label probabilities; a label is predicted
    when ``prob >= threshold``. ``accuracy`` is the subset (exact-match) accuracy; ``balanced_accuracy``
    the mean over labels of each label's balanced accuracy; ``auroc`` the macro AUROC over labels that
    have both positives and negatives (``micro_auroc`` pools every cell).
    """
    if not 0.0 < threshold < 1.0:
        raise DataError(f"threshold {threshold} must lie strictly between 0 and 1")
    labels = [str(label) for label in labels]
    y, p = check_multilabel(y_true, probs, len(labels))  # (N, L), (N, L)
    if y.shape[0] == 0:
        raise DataError("no samples to evaluate; the split is empty")
    pred = (p >= threshold).astype(np.int64)  # (N, L)

    precision, recall, f1, support = precision_recall_fscore_support(y, pred, zero_division=np.nan)
    per_label, notes, aurocs = {}, [], []
    for j, name in enumerate(labels):
        auroc, note = binary_auroc(y[:, j], p[:, j])
        entry = {
            "precision": _num(precision[j]),
            "recall": _num(recall[j]),
            "f1": _num(f1[j]),
            "support": int(support[j]),
            "auroc": auroc,
            "balanced_accuracy": float(_label_balanced_accuracy(y[:, j], pred[:, j])),
        }
        if note:
            entry["auroc_note"] = note
            notes.append(f"AUROC of {name!r} undefined: {note}")
        else:
            aurocs.append(auroc)
        per_label[name] = entry

    def averaged(average: str) -> tuple[float | None, float | None, float | None]:
        pr, rc, f, _ = precision_recall_fscore_support(y, pred, average=average, zero_division=np.nan)
        return _num(pr), _num(rc), _num(f)

    micro_p, micro_r, micro_f = averaged("micro")
    macro_p, macro_r, macro_f = averaged("macro")
    micro_auroc, _ = binary_auroc(y.ravel(), p.ravel())
    return {
        "kind": "multilabel",
        "n": int(y.shape[0]),
        "classes": labels,
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "subset_accuracy": float(accuracy_score(y, pred)),
        "hamming_loss": float(hamming_loss(y, pred)),
        "balanced_accuracy": float(np.mean([e["balanced_accuracy"] for e in per_label.values()])),
        "macro_f1": macro_f,
        "macro_precision": macro_p,
        "macro_recall": macro_r,
        "micro_f1": micro_f,
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "micro_auroc": micro_auroc,
        "per_class": per_label,
        "confusion_matrix": multilabel_confusion_matrix(y, pred).tolist(),  # (L, 2, 2) [[tn, fp], [fn, tp]]
        "notes": notes,
    }


def _label_balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # a label with one class present: the mean over present classes
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


# ------------------------------------------------------------------------------------ for training
def target_metrics(
    y_true: Any, probs: Any, classes: Sequence[str], kind: str, threshold: float = 0.5
) -> dict[str, Any]:
    """:func:`classification_metrics` or :func:`multilabel_metrics`, by ``kind``."""
    if kind == "multilabel":
        return multilabel_metrics(y_true, probs, classes, threshold)
    return classification_metrics(y_true, probs, classes, kind)
