"""Which way a metric is better, and an order of entries by one metric: shared by early stopping, the sweep's
leaderboard and its choice of what to fine-tune.

Lower is better for losses and errors (``loss``, ``val_loss``, ``mae``, ``rmse``, ``mse``, and any name ending in
``_<error>``, e.g. ``test_age_mae``); higher for every other metric (balanced accuracy, AUROC, F1, R², Pearson r).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LOWER_IS_BETTER = ("mae", "rmse", "mse")  # error metrics of regression targets; losses too


def lower_is_better(metric: str) -> bool:
    """True for losses and errors (``loss``, ``val_age_mae``), False for scores (``auroc``, ``val_age_r2``)."""
    name = metric.lower()
    return "loss" in name or name in LOWER_IS_BETTER or name.endswith(tuple(f"_{m}" for m in LOWER_IS_BETTER))


def higher_is_better(metric: str) -> bool:
    return not lower_is_better(metric)


def direction(metric: str) -> str:
    """``"lower is better"`` or ``"higher is better"``: what a leaderboard says beside its ranking metric."""
    return "lower is better" if lower_is_better(metric) else "higher is better"


def best_first(values: Mapping[str, float], metric: str) -> list[str]:
    """The keys of ``values`` (values of ``metric``), best first; NaN last; ties keep their order."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    return sorted(
        values, key=lambda k: (math.isnan(values[k]), sign * values[k] if not math.isnan(values[k]) else 0)
    )
