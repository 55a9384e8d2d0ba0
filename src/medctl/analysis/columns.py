"""The column names of a predictions file (``val_preds.parquet``, ``<split>_preds.parquet``), written and read.

One target: ``y_true``, ``y_pred``, ``prob_<class>`` (scikit-learn's names; every run since the first has them).
Several targets: one ``<target>_true`` / ``<target>_pred`` pair per target and ``<target>_prob_<class>``.
Runs made before this layout wrote ``<target>_y_true`` / ``<target>_y_pred`` for several targets; readers
go through :func:`truth_column` / :func:`prediction_column`, which accept both, so old run directories still
read (a sweep reusing its finished entries, for one).
"""

from __future__ import annotations

from collections.abc import Iterable

from medctl.errors import DataError


def prefix(target: str, n_targets: int) -> str:
    """What every column of ``target`` but its true/pred pair starts with: nothing for one target."""
    return f"{target}_" if n_targets > 1 else ""


def true_name(target: str, n_targets: int) -> str:
    """The column written for ``target``'s true values: ``y_true`` (one target) or ``<target>_true``."""
    return f"{target}_true" if n_targets > 1 else "y_true"


def pred_name(target: str, n_targets: int) -> str:
    """The column written for ``target``'s predicted values: ``y_pred`` (one target) or ``<target>_pred``."""
    return f"{target}_pred" if n_targets > 1 else "y_pred"


def truth_column(columns: Iterable[str], target: str, n_targets: int, where: str = "predictions") -> str:
    """The column of ``target``'s true values in a predictions file, in today's layout or the earlier one."""
    return _present(
        columns, [true_name(target, n_targets), f"{prefix(target, n_targets)}y_true"], target, where
    )


def prediction_column(columns: Iterable[str], target: str, n_targets: int, where: str = "predictions") -> str:
    """The column of ``target``'s predicted values (class index, 0/1 list or regression value), either layout."""
    return _present(
        columns, [pred_name(target, n_targets), f"{prefix(target, n_targets)}y_pred"], target, where
    )


def _present(columns: Iterable[str], candidates: list[str], target: str, where: str) -> str:
    columns = list(columns)
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"{where}: no column {' or '.join(dict.fromkeys(candidates))} for target `{target}` (it has "
        f"{', '.join(columns)}); re-evaluate the run with `medctl evaluate --overwrite`"
    )
