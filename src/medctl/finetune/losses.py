"""The fine-tune's loss: one per target from the training split (class counts, regression scales), weighted
over the targets (:mod:`medctl.training.losses`, :mod:`medctl.training.multitask`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from medctl.config import DataConfig, TrainConfig
from medctl.data.dataset import (
    CacheDataset,
)
from medctl.data.tables import TargetSpec
from medctl.errors import ConfigError, DataError
from medctl.training.losses import LossSettings, MultiTargetLoss, build_target_loss, label_counts
from medctl.training.multitask import RegressionLoss, UncertaintyWeightedLoss


def scale_regression_heads(
    classifier: nn.Module, specs: Sequence[TargetSpec], data: DataConfig, train_set: CacheDataset
) -> dict[str, tuple[float, float]]:
    """Each regression head set to predict in its target's units (:func:`regression_scales`); returns the
    scales, which the loss reads too."""
    scales = regression_scales(specs, data, train_set)
    for name, (mean, std) in scales.items():
        classifier.heads[name].set_scale(mean, std)
    return scales


def regression_scales(
    specs: Sequence[TargetSpec], data: DataConfig, train_set: CacheDataset
) -> dict[str, tuple[float, float]]:
    """``{target: (mean, std)}`` of each regression target's training values ((0, 1) when not standardised)."""
    standardize = {t.name: t.standardize for t in data.targets}
    scales = {}
    for spec in specs:
        if spec.kind != "regression":
            continue
        values = np.asarray(train_set.labels(spec.name), dtype=np.float64)
        std = float(values.std()) if len(values) else 0.0
        if standardize.get(spec.name, True):
            if std == 0:
                raise DataError(
                    f"target `{spec.name}`: every training value is {values[0] if len(values) else '?'}; "
                    "a constant cannot be learned (check the column, or the split)"
                )
            scales[spec.name] = (float(values.mean()), std)
        else:
            scales[spec.name] = (0.0, 1.0)
    return scales


def build_loss(
    train: TrainConfig,
    data: DataConfig,
    specs: Sequence[TargetSpec],
    train_set: CacheDataset,
    scales: Mapping[str, tuple[float, float]] | None = None,
) -> MultiTargetLoss | UncertaintyWeightedLoss:
    """One loss per target (classification: from its training class counts; regression: on the standardised
    scale), weighted by ``train.task_weights`` (a table, or learned "uncertainty") over ``data.targets[].weight``."""
    losses: dict[str, nn.Module] = {}
    settings = LossSettings.of(train)
    for spec in specs:
        if spec.kind == "regression":
            mean, std = (scales or {}).get(spec.name, (0.0, 1.0))
            losses[spec.name] = RegressionLoss(train.regression_loss, mean=mean, std=std, huber_delta=train.huber_delta)
            continue
        counts = label_counts(train_set.labels(spec.name), spec.kind, len(spec.classes))
        losses[spec.name] = build_target_loss(spec.kind, settings, counts, target=spec.name)
    if train.task_weights == "uncertainty":
        return UncertaintyWeightedLoss(losses)
    unknown = sorted(set(train.task_weights) - set(losses))
    if unknown:
        raise ConfigError(
            [f"`train.task_weights` names {', '.join(unknown)}, not a target; targets are {', '.join(losses)}"]
        )
    weights = {t.name: t.weight for t in data.targets if t.name in losses} | dict(train.task_weights)
    return MultiTargetLoss(losses, weights)


def learned_loss_state(loss_fn: nn.Module) -> dict[str, nn.Module]:
    """What of the loss ``last.ckpt`` must hold for ``--resume``: the learned task weights (``log_vars`` of
    ``train.task_weights = "uncertainty"``) live in the loss, not the model; fixed weights have nothing to keep."""
    return {"task_weights": loss_fn} if isinstance(loss_fn, UncertaintyWeightedLoss) else {}
