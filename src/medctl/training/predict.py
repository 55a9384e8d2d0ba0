"""Predictions of a classifier: logits over a dataset, probabilities per target kind, a predictions table.

Shared by the stages fine-tune (validation every epoch, ``val_preds.parquet``) and evaluate, hence below both.
Probabilities follow :mod:`medctl.analysis.metrics`: binary ``(N, 1)`` = p(classes[1]) from a sigmoid,
multiclass ``(N, K)`` from a softmax, multilabel ``(N, L)`` independent sigmoids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from medctl.analysis.columns import pred_name, true_name
from medctl.analysis.columns import prefix as column_prefix
from medctl.analysis.metrics import class_probs
from medctl.data.dataset import CacheDataset
from medctl.data.tables import TargetSpec
from medctl.progress import progress_bar
from medctl.training.precision import autocast_context


def probabilities(logits: torch.Tensor, kind: str) -> np.ndarray:
    """Logits (N, K) -> probabilities: sigmoid for binary (N, 1) and multilabel (N, L), softmax for multiclass;
    a regression head's output (N, 1) is already the prediction in the target's units and passes through."""
    logits = logits.detach().float().cpu()
    if kind == "regression":
        return logits.numpy().astype(np.float64)
    probs = torch.softmax(logits, dim=1) if kind == "multiclass" else torch.sigmoid(logits)
    return probs.numpy().astype(np.float64)


@torch.no_grad()
def predict_logits(
    classifier: nn.Module,
    dataset: CacheDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Logits ``{target: (N, K)}`` (CPU, float32) of every item of ``dataset`` in order, in eval mode.

    The global torch RNG is left as it was, so validating does not change what training draws next.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = classifier.training
    classifier.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    with (
        torch.random.fork_rng(devices=[]),
        progress_bar(f"predict {dataset.split}", total=len(loader)) as bar,
    ):
        for batch in loader:
            images = batch["image"].to(device, non_blocking=device.type == "cuda")  # (B, C, *spatial)
            with autocast_context(device, precision):
                logits = classifier(images)  # {target: (B, K)}
            for name, value in logits.items():
                chunks.setdefault(name, []).append(value.float().cpu())
            bar.advance(1)
    classifier.train(was_training)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def labels_of(dataset: CacheDataset, specs: Sequence[TargetSpec]) -> dict[str, np.ndarray]:
    """``{target: (N,) class indices or (N, L) 0/1}`` in the dataset's order."""
    labels = {}
    for spec in specs:
        values = dataset.labels(spec.name)
        if spec.kind == "regression":
            labels[spec.name] = values.astype(np.float64)
            continue
        labels[spec.name] = (
            values.astype(np.int64) if spec.kind != "multilabel" else np.rint(values).astype(np.int64)
        )
    return labels


def predictions_frame(
    ids: Sequence[str],
    y_true: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray],
    specs: Sequence[TargetSpec],
    threshold: float = 0.5,
) -> pd.DataFrame:
    """``id``, then per target its true and predicted values and one ``prob_<class>`` column per class.

    One target: ``y_true``, ``y_pred``, ``prob_<class>``; several: ``<target>_true``, ``<target>_pred``,
    ``<target>_prob_<class>`` (:mod:`medctl.analysis.columns`, the layout of
    :func:`medctl.analysis.reports.evaluate_predictions`). Multilabel true/pred values are 0/1 lists.
    """
    columns: dict[str, object] = {"id": [str(i) for i in ids]}
    n = len(specs)
    for spec in specs:
        true, pred, prefix = true_name(spec.name, n), pred_name(spec.name, n), column_prefix(spec.name, n)
        y = np.asarray(y_true[spec.name])
        if spec.kind == "regression":  # true and predicted values, in the target's units
            columns[true] = y.astype(np.float64)
            columns[pred] = np.asarray(probs[spec.name], dtype=np.float64).reshape(len(y), -1)[:, 0]
            continue
        if spec.kind == "multilabel":
            p = np.asarray(probs[spec.name], dtype=np.float64)  # (N, L)
            columns[true] = [row.tolist() for row in y.astype(np.int64)]
            columns[pred] = [row.tolist() for row in (p >= threshold).astype(np.int64)]
        else:
            p = class_probs(probs[spec.name], len(spec.classes))  # (N, K)
            columns[true] = y.astype(np.int64)
            columns[pred] = p.argmax(axis=1).astype(np.int64)
        for k, name in enumerate(spec.classes):
            columns[f"{prefix}prob_{name}"] = p[:, k].astype(np.float32)
    return pd.DataFrame(columns)
