"""Losses for regression targets and for weighting several tasks against each other.

- :class:`RegressionLoss`: MSE, Huber or L1 between a prediction and a numeric target, both taken to the
  standardised scale ``(y - mean) / std`` of the training split first, so a target in years and one in
  milliseconds weigh alike and the default Huber ``delta`` of 1 means one standard deviation.
- :class:`UncertaintyWeightedLoss`: the homoscedastic-uncertainty weighting of Kendall, Gal & Cipolla,
  "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018:
  ``sum_t exp(-s_t) * L_t + s_t`` with one learned ``s_t = log sigma_t^2`` per task (initialised at 0,
  i.e. weight 1). A task whose loss stays large gets a larger ``s_t`` and so a smaller weight; the ``+ s_t``
  term keeps the weights from collapsing to zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medctl.errors import ConfigError

REGRESSION_LOSSES = ("mse", "huber", "l1")


class RegressionLoss(nn.Module):
    """``prediction`` (B, 1) and ``target`` (B,) in the target's units -> a scalar on the standardised scale."""

    def __init__(self, loss: str = "mse", *, mean: float = 0.0, std: float = 1.0, huber_delta: float = 1.0):
        super().__init__()
        if loss not in REGRESSION_LOSSES:
            raise ConfigError(
                [f"`train.regression_loss` = {loss!r}: use one of {', '.join(REGRESSION_LOSSES)}"]
            )
        if std <= 0:
            raise ConfigError(
                [f"regression scale std = {std}: it must be > 0 (a constant target cannot be learned)"]
            )
        if huber_delta <= 0:
            raise ConfigError([f"`train.huber_delta` = {huber_delta}: it must be > 0"])
        self.loss, self.mean, self.std, self.huber_delta = loss, float(mean), float(std), float(huber_delta)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = (prediction.float().reshape(-1) - self.mean) / self.std  # (B,)
        y = (target.float().reshape(-1) - self.mean) / self.std  # (B,)
        if self.loss == "mse":
            return F.mse_loss(p, y)
        if self.loss == "huber":
            return F.huber_loss(p, y, delta=self.huber_delta)
        return F.l1_loss(p, y)


class UncertaintyWeightedLoss(nn.Module):
    """``forward(logits, batch) -> {"loss", "loss_<target>", "weight_<target>"}`` with learned task weights.

    Same interface as :class:`medctl.training.losses.MultiTargetLoss`; its ``log_vars`` are parameters,
    so the optimizer must include them (fine-tuning adds them to the head group).
    """

    def __init__(self, losses: Mapping[str, nn.Module]):
        super().__init__()
        if not losses:
            raise ConfigError(["`data.targets` is empty: add at least one [[data.targets]] to train a model"])
        self.losses = nn.ModuleDict(dict(losses))
        self.log_vars = nn.Parameter(torch.zeros(len(losses)))  # (T,) s_t = log sigma_t^2

    def forward(
        self, logits: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        parts, total = {}, 0.0
        for i, (name, loss_fn) in enumerate(self.losses.items()):
            value = loss_fn(logits[name], batch[name])
            parts[f"loss_{name}"] = value
            parts[f"weight_{name}"] = torch.exp(-self.log_vars[i]).detach()
            total = total + torch.exp(-self.log_vars[i]) * value + self.log_vars[i]
        return {"loss": total, **parts}
