"""The sweep leaderboard: entries ranked on a validation metric, test numbers with CIs, failures last.

A row is a plain dict (build it with :func:`leaderboard_row` from two :func:`evaluate_predictions`
summaries, or by hand):

- ``entry`` (name shown), ``checkpoint`` (path or "" for random init), ``status`` ("ok" or anything
  else, e.g. "failed"), ``reason`` (why it failed), ``epochs``, ``wall_time_s``, ``p_vs_leader``;
- per split and metric ``<split>_<metric>`` (float) with its interval either as
  ``<split>_<metric>_ci`` = ``[low, high]`` or as ``<split>_<metric>_low`` / ``_high``, for split in
  val, test and metric in accuracy, balanced_accuracy, macro_f1, auroc (a regression target: mae, rmse, r2,
  pearson_r). Other ``<split>_...`` keys (another task's ``test_age_mae``) are metric columns too, and any
  other key is kept as a column.

``p_vs_leader`` is the paired bootstrap p-value that an entry and the leader differ on the same test
samples (:func:`p_values_vs_leader`); the leader is rank 1 after sorting. A row that summarises several
seeds carries ``<split>_<metric>_std`` (shown as ``mean ± std``) and may carry ``n_seeds``,
``delta_vs_random`` (``_std``) and ``p_vs_random`` (:func:`paired_seed_test`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from medctl.analysis.bootstrap import Metric, MetricFn, paired_bootstrap_pvalue
from medctl.analysis.proportions import p_cell, sign_test_counts
from medctl.analysis.ranking import higher_is_better
from medctl.errors import DataError
from medctl.io import MISSING, format_number, markdown_table, write_text_atomic

SPLITS = ("val", "test")
CLASSIFICATION_METRICS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")
REGRESSION_METRICS = ("mae", "rmse", "r2", "pearson_r")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
SHOWN = (("balanced_accuracy", "bal. acc."), ("macro_f1", "macro-F1"), ("auroc", "AUROC"))
REGRESSION_SHOWN = (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²"), ("pearson_r", "r"))
FRONT = ["rank", "entry", "checkpoint", "status", "reason"]
BACK = ["epochs", "wall_time_s", "p_vs_leader"]


def leaderboard_row(
    entry: str,
    checkpoint: str = "",
    *,
    val: Mapping[str, Any] | None = None,
    test: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    wall_time_s: float | None = None,
    status: str = "ok",
    reason: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One row from the ``summary`` dicts that :func:`evaluate_predictions` returns for val and test."""
    row: dict[str, Any] = {
        "entry": entry,
        "checkpoint": checkpoint,
        "status": status,
        "reason": reason,
        "epochs": epochs,
        "wall_time_s": wall_time_s,
        **extra,
    }
    for split, summary in (("val", val), ("test", test)):
        for metric in METRICS:
            if summary and metric in summary:
                row[f"{split}_{metric}"] = summary[metric]
                row[f"{split}_{metric}_ci"] = summary.get(f"{metric}_ci")
    return row


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    if not row.get("entry"):
        raise DataError(f"leaderboard row without an `entry` name: {dict(row)}")
    flat: dict[str, Any] = {"status": "ok", "reason": "", "checkpoint": ""}
    for key, value in row.items():
        if key.endswith("_ci"):
            low, high = value if isinstance(value, Sequence) and len(value) == 2 else (None, None)
            flat[f"{key[:-3]}_low"], flat[f"{key[:-3]}_high"] = _number(low), _number(high)
        else:
            flat[key] = value
    return flat


def leaderboard(rows: Sequence[Mapping[str, Any]], sort_by: str = "val_balanced_accuracy") -> pd.DataFrame:
    """Rows ranked by ``sort_by`` (higher first unless it is a loss or an error such as ``test_age_mae``:
    :func:`medctl.analysis.ranking.higher_is_better`); failed rows last, unranked.

    Entries that succeeded but lack a value for ``sort_by`` come after the ranked ones. ``rank`` is
    1..k over the ranked entries (nullable Int64, empty for the rest); CIs become ``_low``/``_high``.
    """
    frame = pd.DataFrame([_flatten(r) for r in rows])
    if frame.empty:
        return pd.DataFrame(columns=FRONT + BACK)
    ok = frame["status"].astype(str).eq("ok")
    if sort_by not in frame.columns:
        if ok.any():
            known = ", ".join(
                c for c in frame.columns if c.startswith(SPLITS) and not c.endswith(("_low", "_high"))
            )
            raise DataError(f"leaderboard sort_by {sort_by!r} is not a column; known: {known or 'none'}")
        frame[sort_by] = math.nan
    value = frame[sort_by].map(_number)
    ranked = ok & value.notna()
    frame["_group"] = np.where(ranked, 0, np.where(ok, 1, 2))  # ranked, ok without a value, failed
    frame["_key"] = -value if higher_is_better(sort_by) else value
    frame = frame.sort_values(["_group", "_key"], kind="mergesort").reset_index(drop=True)
    is_ranked = frame["_group"].eq(0)
    frame["rank"] = pd.array(is_ranked.cumsum().where(is_ranked), dtype="Int64")
    for column in BACK:
        if column not in frame.columns:
            frame[column] = None
    primary = [f"{split}_{metric}{suffix}" for split in SPLITS for metric in METRICS for suffix in ("", "_std", "_low", "_high")]
    tasks = [c for split in SPLITS for c in frame.columns if c.startswith(f"{split}_") and c not in primary]
    metric_columns = [c for c in primary if c in frame.columns] + tasks
    rest = [c for c in frame.columns if c not in {*FRONT, *BACK, *metric_columns, "_group", "_key"}]
    return frame[FRONT + metric_columns + BACK + rest].reset_index(drop=True)


def p_values_vs_leader(
    y_true: Any,
    probs_by_entry: Mapping[str, Any],
    leader: str,
    metric: Metric | MetricFn,
    n: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap p-value of every entry against ``leader`` on the same samples (leader excluded)."""
    if leader not in probs_by_entry:
        raise DataError(f"leader {leader!r} has no predictions; known entries: {', '.join(probs_by_entry)}")
    return {
        entry: paired_bootstrap_pvalue(metric, y_true, probs, probs_by_entry[leader], n=n, seed=seed)
        for entry, probs in probs_by_entry.items()
        if entry != leader
    }


def paired_seed_test(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, float]:
    """Paired two-sided t-test of ``a - b`` over the seeds both have: ``{"mean", "std", "p", "n"}``.

    The pairs are runs that share a seed (the same probe seed and, for pretrained checkpoints, the same
    pretraining seed index). NaN p below two pairs. A constant difference leaves the t statistic undefined
    (no spread): p = 1 when it is 0, else the exact two-sided sign test, ``2 * 0.5 ** n`` (0.25 for 3 seeds),
    since equal differences on a small test split are often one sample's worth each and say no more than
    "every seed moved the same way".
    """
    common = sorted(set(a) & set(b))
    diffs = np.array([a[s] - b[s] for s in common], dtype=np.float64)  # (n,)
    n = len(diffs)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "p": math.nan, "n": 0}
    mean = float(diffs.mean())
    std = float(diffs.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        p = math.nan
    elif std <= 1e-12:  # equal up to rounding: metrics from counts differ by 1e-17, not by a real spread
        p = 1.0 if mean == 0 else sign_test_counts(n, 0)
    else:
        t = mean / (std / math.sqrt(n))
        p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return {"mean": mean, "std": std, "p": p, "n": n}


# ------------------------------------------------------------------------------------------ markdown
def format_ci(value: Any, low: Any = None, high: Any = None) -> str:
    """``0.812 [0.75, 0.87]``; the value alone without an interval; an em dash when missing."""
    value, low, high = _number(value), _number(low), _number(high)
    if math.isnan(value) or math.isnan(low) or math.isnan(high):
        return format_number(value)
    return f"{format_number(value)} [{format_number(low, 2)}, {format_number(high, 2)}]"


def format_metric(row: Mapping[str, Any], key: str) -> str:
    """``key`` of a leaderboard row: ``mean ± std`` over seeds when the row has ``<key>_std``, else with its CI."""
    std = _number(row.get(f"{key}_std"))
    value = _number(row.get(key))
    if not math.isnan(std) and not math.isnan(value):
        return f"{format_number(value)} ± {format_number(std)}"
    return format_ci(row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high"))


def format_duration(seconds: Any) -> str:
    seconds = _number(seconds)
    if math.isnan(seconds):
        return MISSING
    if seconds < 60:
        return f"{format_number(seconds, 1)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def format_p(p: Any) -> str:
    return p_cell(_number(p))


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def shown_metrics(df: pd.DataFrame) -> tuple[tuple[str, str], ...]:
    """The primary target's headline columns (without the split) and labels: balanced accuracy, macro-F1 and
    AUROC; MAE, RMSE, R² and r when the board holds a regression target's columns instead."""
    regression = "test_mae" in df.columns and "test_balanced_accuracy" not in df.columns
    return REGRESSION_SHOWN if regression else SHOWN


def leaderboard_markdown(df: pd.DataFrame, shown: Sequence[tuple[str, str]] | None = None) -> str:
    """A pipe table: rank, entry, checkpoint, architecture (when rows name one), status, then per split the
    ``shown`` metrics (``(column without the split, label)``; default :func:`shown_metrics`) as
    ``0.812 [0.75, 0.87]`` (``0.812 ± 0.031`` over seeds), epochs, wall time, p vs leader; with seeds the seed
    count, Δ vs random and p vs random; the pretraining overlap when audited. Failed rows show their reason."""
    shown = shown_metrics(df) if shown is None else shown
    architecture = "architecture" in df.columns and df["architecture"].fillna("").astype(str).str.len().gt(0).any()
    seeded = "n_seeds" in df.columns
    audited = "pretrain_overlap" in df.columns  # val/test participants in the pretraining pool
    gridded = "chosen_head" in df.columns and df["chosen_head"].map(lambda v: isinstance(v, str) and v.strip("— ·") != "").any()
    header = ["rank", "entry", "checkpoint", *(["architecture"] if architecture else []), "status"]
    header += ["head lr / wd"] if gridded else []  # train.grid: the point each entry selected
    header += [f"{split} {label}" for split in SPLITS for _, label in shown]
    header += ["epochs", "wall time", "p vs leader"]
    header += ["seeds", "Δ vs random", "p vs random"] if seeded else []
    header += ["pretrain overlap"] if audited else []
    text_columns = {"entry", "checkpoint", "architecture", "status", "head lr / wd"}
    align = "".join("l" if column in text_columns else "r" for column in header)
    rows = []
    for _, row in df.iterrows():
        ok = str(row.get("status", "ok")) == "ok"
        rank = row.get("rank")
        is_leader = ok and not pd.isna(rank) and int(rank) == 1
        status = "ok" if ok else f"{row.get('status')}: {row.get('reason') or 'no reason recorded'}"
        cells = [
            MISSING if pd.isna(rank) else str(int(rank)),
            row["entry"],
            row.get("checkpoint") or f"{MISSING} (random init)",
            *([_text(row.get("architecture")) or MISSING] if architecture else []),
            status,
        ]
        if gridded:
            chosen = row.get("chosen_head")
            cells.append(chosen if isinstance(chosen, str) and chosen else MISSING)
        for split in SPLITS:
            for metric, _ in shown:
                cells.append(format_metric(row, f"{split}_{metric}"))
        epochs = _number(row.get("epochs"))
        cells.append(MISSING if math.isnan(epochs) else str(round(epochs)))
        cells.append(format_duration(row.get("wall_time_s")))
        cells.append("leader" if is_leader else format_p(row.get("p_vs_leader")))
        if seeded:
            delta = {"delta": row.get("delta_vs_random"), "delta_std": row.get("delta_vs_random_std")}
            cells += [
                str(row.get("seeds") or MISSING),
                format_metric(delta, "delta"),
                format_p(row.get("p_vs_random")),
            ]
        if audited:
            overlap = row.get("pretrain_overlap")
            cells.append(overlap if isinstance(overlap, str) and overlap else MISSING)
        rows.append(cells)
    return "\n".join(markdown_table(header, rows, align)) + "\n"


def write_leaderboard(
    df: pd.DataFrame,
    out_dir: str | Path,
    title: str = "Leaderboard",
    note: str = "",
    shown: Sequence[tuple[str, str]] | None = None,
) -> tuple[Path, Path]:
    """``leaderboard.csv`` (every column) and ``leaderboard.md`` (the formatted table of the ``shown`` metrics,
    see :func:`leaderboard_markdown`, under ``note``)."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "leaderboard.csv", out_dir / "leaderboard.md"
    write_text_atomic(csv_path, df.to_csv(index=False))
    note = note or (
        "Ranked on validation; test values with 95% bootstrap intervals; p vs leader: paired bootstrap "
        "on the test samples, two-sided."
    )
    write_text_atomic(md_path, f"# {title}\n\n{note}\n\n{leaderboard_markdown(df, shown)}")
    return csv_path, md_path
