"""What ``fit`` monitors each epoch: the validation logits' loss and the headline metrics of every target."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medctl.analysis.bootstrap import headline_metrics
from medctl.analysis.metrics import class_probs
from medctl.data.dataset import (
    CacheDataset,
)
from medctl.data.tables import TargetSpec
from medctl.training.predict import labels_of, probabilities

VAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss")


@dataclass
class Validation:
    """``fit``'s ``evaluate``: the mode's validation logits, their loss and metrics; the probabilities of the
    latest epoch are kept for :class:`BestExport`."""

    logits: Callable[[], dict[str, torch.Tensor]]
    loss_fn: nn.Module
    specs: Sequence[TargetSpec]
    labels: dict[str, np.ndarray]  # {target: (N_val,) or (N_val, K)}, as the predictions frame reads them
    targets: dict[str, torch.Tensor]  # the same on device, as the loss reads them
    device: torch.device
    probs: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        val_set: CacheDataset,
        specs: Sequence[TargetSpec],
        logits: Callable[[], dict[str, torch.Tensor]],
        loss_fn: nn.Module,
        device: torch.device,
    ) -> Validation:
        targets = {s.name: torch.as_tensor(val_set.labels(s.name)).to(device) for s in specs}
        return cls(logits, loss_fn, specs, labels_of(val_set, specs), targets, device)

    def __call__(self, epoch: int) -> dict[str, float]:
        logits = self.logits()
        with torch.no_grad():
            loss = float(self.loss_fn({k: v.to(self.device) for k, v in logits.items()}, self.targets)["loss"])
        metrics, self.probs = validation_metrics(logits, self.labels, self.specs, loss)
        return metrics


def validation_metrics(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, np.ndarray],
    specs: Sequence[TargetSpec],
    loss: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The monitored dict (means over targets, plus ``<target>_<metric>`` with several) and the probabilities."""
    probs = {s.name: probabilities(logits[s.name], s.kind) for s in specs}
    per_target = {s.name: epoch_metrics(labels[s.name], probs[s.name], s) for s in specs}
    if len(specs) == 1:
        metrics = dict(per_target[specs[0].name])
    else:
        metrics = {}
        for key in VAL_METRICS[:-1]:  # means over the classification targets
            values = [m[key] for m in per_target.values() if key in m and math.isfinite(m[key])]
            if values or any(s.kind != "regression" for s in specs):
                metrics[key] = float(np.mean(values)) if values else float("nan")
        for name, values in per_target.items():
            metrics |= {f"{name}_{key}": value for key, value in values.items()}
    metrics["loss"] = loss
    return metrics, probs


def epoch_metrics(y_true: np.ndarray, probs: np.ndarray, spec: TargetSpec) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and AUROC of one target (``nan`` where undefined).

    The vectorised forms from :mod:`medctl.analysis.bootstrap` on one "resample" that holds every
    sample once: the values of :func:`medctl.analysis.metrics.target_metrics` (scikit-learn) at a
    fraction of the cost, which matters when a probe validates every few milliseconds.
    """
    p = probs if spec.kind in ("multilabel", "regression") else class_probs(probs, len(spec.classes))  # (N, K)
    once = np.ones((1, len(y_true)))  # (1, N) draw counts
    return {
        name: float(metric.batched(y_true, p, once)[0])
        for name, metric in headline_metrics(spec.kind).items()
    }
