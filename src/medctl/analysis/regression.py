"""Metrics, intervals, a scatter plot and a report section for regression targets (``kind = "regression"``).

Conventions shared with the classification side: ``y_true`` is ``(N,)`` float in the target's own units
(age in years) and the "probs" slot holds the prediction, ``(N,)`` or ``(N, 1)``, in the same units (the
model de-standardises its output itself, see :class:`medctl.models.heads.Standardized`).

Metrics: MAE, RMSE, R² and Pearson r (scikit-learn / SciPy); each has a vectorised ``batched`` form for the
bootstrap (weighted by how often each sample was drawn) so that ``medctl evaluate`` and every validation
epoch cost the same as for classifiers. Lower is better for MAE and RMSE, higher for R² and r.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medctl.analysis.bootstrap import Metric, interval_cells
from medctl.io import format_number, markdown_table

REGRESSION_HEADLINE = ("mae", "rmse", "r2", "pearson_r")


def _flat(pred: Any) -> np.ndarray:
    return np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)[:, 0]


# ------------------------------------------------------------------------------------- point values
def _s_mae(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import mean_absolute_error

    return float(mean_absolute_error(y, _flat(pred)))


def _s_rmse(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import mean_squared_error

    return float(np.sqrt(mean_squared_error(y, _flat(pred))))


def _s_r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    from sklearn.metrics import r2_score

    if len(y) < 2 or np.ptp(y) == 0:
        return None  # undefined for a constant truth
    return float(r2_score(y, _flat(pred)))


def _s_pearson(y: np.ndarray, pred: np.ndarray) -> float | None:
    from scipy.stats import pearsonr

    p = _flat(pred)
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return None  # undefined for a constant truth or prediction
    return float(pearsonr(y, p).statistic)


# ------------------------------------------------------------------------------ weighted resamples
def _weighted(
    y: np.ndarray, pred: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-normalised draw weights (B, N), truth (N,), prediction (N,)."""
    w = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return w, np.asarray(y, dtype=np.float64), _flat(pred)


def _b_mae(y: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    w, y, p = _weighted(y, pred, counts)
    return w @ np.abs(y - p)


def _b_rmse(y: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    w, y, p = _weighted(y, pred, counts)
    return np.sqrt(w @ (y - p) ** 2)


def _b_r2(y: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    w, y, p = _weighted(y, pred, counts)
    mean = w @ y  # (B,)
    total = w @ y**2 - mean**2  # weighted variance of the truth
    residual = w @ (y - p) ** 2
    out = np.full(len(w), np.nan)
    np.divide(residual, total, out=out, where=total > 1e-12 * max(1.0, float(np.abs(y).max()) ** 2))
    return 1.0 - out


def _b_pearson(y: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> np.ndarray:
    w, y, p = _weighted(y, pred, counts)
    my, mp = w @ y, w @ p
    cov = w @ (y * p) - my * mp
    var = (w @ y**2 - my**2) * (w @ p**2 - mp**2)
    out = np.full(len(w), np.nan)
    np.divide(cov, np.sqrt(np.maximum(var, 0)), out=out, where=var > 1e-24)
    return out


REGRESSION_METRICS = {
    "mae": Metric("mae", _s_mae, _b_mae),
    "rmse": Metric("rmse", _s_rmse, _b_rmse),
    "r2": Metric("r2", _s_r2, _b_r2),
    "pearson_r": Metric("pearson_r", _s_pearson, _b_pearson),
}


def regression_metrics(y_true: Any, pred: Any) -> dict[str, Any]:
    """MAE, RMSE, R², Pearson r (``None`` where undefined), the truth's mean and MAE of predicting it."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values: dict[str, Any] = {name: metric.score(y, pred) for name, metric in REGRESSION_METRICS.items()}
    values["n"] = int(len(y))
    values["y_mean"] = float(y.mean()) if len(y) else None
    values["mae_of_mean"] = float(np.abs(y - y.mean()).mean()) if len(y) else None
    return values


# -------------------------------------------------------------------------------------- figure, report
def plot_regression_scatter(y_true: Any, pred: Any, path: str | Path, *, title: str = "") -> Path:
    """Predicted against true values with the identity line; MAE and r in the title."""
    from matplotlib.figure import Figure

    from medctl.analysis.plots import save_figure

    y, p = np.asarray(y_true, dtype=np.float64).reshape(-1), _flat(pred)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.scatter(y, p, s=12, alpha=0.7)
    low, high = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="y = x")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    r = _s_pearson(y, p)
    ax.set_title(f"{title}\nMAE {_s_mae(y, p):.3g}, r {format_number(r)}".strip())
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def regression_report_lines(name: str, result: dict[str, Any], level: int) -> list[str]:
    """The markdown section of one regression target in ``report.md``."""

    rows = [
        [key.replace("_", " "), format_number(result[key]), *interval_cells(result["ci"][key])]
        for key in REGRESSION_HEADLINE
    ]
    rows.append([f"MAE of predicting the mean ({format_number(result['y_mean'])})", format_number(result["mae_of_mean"]), "", ""])
    lines = ["", f"## Target `{name}` (regression)", ""]
    lines += markdown_table(["metric", "value", f"{level}% CI", "resamples used"], rows, "lrlr")
    lines += ["", f"![predicted vs true, {name}]({result['files']['scatter_png']})"]
    return lines
