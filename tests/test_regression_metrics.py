"""Regression metrics (point and bootstrap forms), losses and task weighting against reference formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from medctl.analysis.bootstrap import draw_counts, headline_metrics, resample_indices
from medctl.analysis.regression import regression_metrics
from medctl.training.early_stopping import EarlyStopping, lower_is_better
from medctl.training.multitask import RegressionLoss, UncertaintyWeightedLoss


def sklearn_values(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "mae": mean_absolute_error(y, p),
        "rmse": np.sqrt(mean_squared_error(y, p)),
        "r2": r2_score(y, p),
        "pearson_r": pearsonr(y, p).statistic,
    }


def test_point_and_resampled_metrics_equal_sklearn_on_the_drawn_samples(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(20, 80, 40)
    p = y + rng.normal(0, 8, 40)
    values = regression_metrics(y, p[:, None])
    for key, expected in sklearn_values(y, p).items():
        assert values[key] == pytest.approx(expected, rel=1e-9)
    assert values["mae_of_mean"] == pytest.approx(np.abs(y - y.mean()).mean())
    metrics = headline_metrics("regression")
    (indices,) = list(resample_indices(len(y), 5, seed=3))  # (5, N) one batch of draws
    counts = draw_counts(indices)  # (5, N)
    for key, metric in metrics.items():
        batched = metric.batched(y, p[:, None], counts)
        for row, idx in enumerate(indices):
            assert batched[row] == pytest.approx(sklearn_values(y[idx], p[idx])[key], rel=1e-9), key


def test_undefined_values_are_none_not_errors():
    constant = regression_metrics(np.full(5, 3.0), np.arange(5.0))
    assert constant["r2"] is None and constant["pearson_r"] is None and constant["mae"] == pytest.approx(1.4)


@pytest.mark.parametrize("name", ["mse", "huber", "l1"])
def test_regression_loss_is_taken_on_the_standardised_scale(name):
    pred, target = (
        torch.tensor([[50.0], [30.0], [71.0]]),
        torch.tensor([40.0, 33.0, 60.0], dtype=torch.float64),
    )
    mean, std = 45.0, 10.0
    a, b = (pred.reshape(-1) - mean) / std, (target.float() - mean) / std
    diff = (a - b).abs()
    reference = {
        "mse": (diff**2).mean(),
        "l1": diff.mean(),
        "huber": torch.where(diff < 0.5, 0.5 * diff**2, 0.5 * (diff - 0.25)).mean(),  # delta 0.5
    }[name]
    loss = RegressionLoss(name, mean=mean, std=std, huber_delta=0.5)(pred, target)
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)


def test_uncertainty_weighting_follows_kendall_et_al():
    losses = {"a": RegressionLoss("mse"), "b": RegressionLoss("l1")}
    weighted = UncertaintyWeightedLoss(losses)
    with torch.no_grad():
        weighted.log_vars.copy_(torch.tensor([0.5, -1.0]))
    logits = {"a": torch.tensor([[1.0], [2.0]]), "b": torch.tensor([[0.0], [4.0]])}
    batch = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0, 1.0])}
    out = weighted(logits, batch)
    la, lb = 2.5, 2.0
    assert float(out["loss"].detach()) == pytest.approx(
        np.exp(-0.5) * la + 0.5 + np.exp(1.0) * lb - 1.0, rel=1e-6
    )
    assert float(out["weight_b"]) == pytest.approx(np.e, rel=1e-6)


def test_errors_are_minimised_and_scores_maximised():
    assert lower_is_better("val_age_mae") and lower_is_better("rmse") and lower_is_better("val_loss")
    assert (
        not lower_is_better("val_age_r2")
        and not lower_is_better("auroc")
        and not lower_is_better("age_pearson_r")
    )
    stopper = EarlyStopping("val_age_mae", patience=2)
    assert stopper.mode == "min" and stopper.update(10.0) and stopper.update(8.0) and not stopper.update(9.0)
