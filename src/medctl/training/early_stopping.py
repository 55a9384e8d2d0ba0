"""Early stopping on one named validation metric."""

from __future__ import annotations

import math
from typing import Any

from medctl.analysis.ranking import LOWER_IS_BETTER, lower_is_better  # the sweep ranks the same way

__all__ = ["LOWER_IS_BETTER", "EarlyStopping", "lower_is_better"]


class EarlyStopping:
    """Track the best value of ``monitor``; ``should_stop`` after ``patience`` epochs without improvement.

    ``mode`` is "max" or "min"; left out, a loss or an error (``mae``, ``rmse``, ``mse``, e.g. ``val_age_mae``)
    is minimised and any other metric maximised. ``patience=0`` never stops (the best epoch is still tracked). A NaN never improves.
    """

    def __init__(self, monitor: str, mode: str | None = None, patience: int = 0, min_delta: float = 0.0):
        if mode is None:
            mode = "min" if lower_is_better(monitor) else "max"
        if mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max' (got {mode!r})")
        if patience < 0 or min_delta < 0:
            raise ValueError(
                f"patience and min_delta must be >= 0 (got {patience}, {min_delta}); see train.patience"
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record this epoch's value; True when it is the best so far."""
        value = float(value)
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["monitor"] != self.monitor or state["mode"] != self.mode:
            raise ValueError(
                f"the resumed run monitored {state['monitor']} ({state['mode']}), this one {self.monitor} "
                f"({self.mode}); resume with the same train.monitor"
            )
        self.best = state["best"]
        self.bad_epochs = int(state["bad_epochs"])
