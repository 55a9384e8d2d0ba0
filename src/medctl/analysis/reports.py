"""Evaluate one split's predictions into files: predictions, metrics with CIs, figures and a report.

:func:`evaluate_predictions` writes into ``out_dir``:

- ``<split>_preds.parquet``: ``id``, then per target ``y_true``, ``y_pred``, ``true_label``,
  ``pred_label`` and one ``prob_<class>`` column per class (multilabel: ``y_true`` / ``y_pred`` are
  0/1 lists, labels joined by ``;``). With several targets the pair is ``<target>_true`` /
  ``<target>_pred`` and every other column is prefixed ``<target>_`` (:mod:`medctl.analysis.columns`).
- ``metrics.json``: the split, ``n_samples``, bootstrap settings, and per target every metric of
  :func:`~medctl.analysis.metrics.target_metrics` plus a 95% (``1 - alpha``) percentile interval for
  accuracy, balanced_accuracy, macro_f1 and auroc with the number of usable resamples; ``summary`` holds
  the first (primary) target's headline numbers, ``<metric>`` and ``<metric>_ci``, for leaderboards;
  ``provenance`` what the caller says the numbers come from (checkpoint, training run, data, code; see
  :func:`medctl.evaluate.stage.provenance`). Undefined values are ``null``.
- ``<split>_confusion_<target>.csv`` and ``figures/<split>_confusion_<target>.png`` (multilabel: one
  2x2 matrix per label), ``figures/<split>_roc_<target>.png``;
- ``report.md`` (figures referenced by relative path) and its self-contained ``report.html``.

One split per ``out_dir``: a second call with another split keeps the split-named files but replaces
``metrics.json`` and ``report.md``; give each split its own folder when both are wanted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.analysis.bootstrap import BootstrapResult, bootstrap_many, headline_metrics, interval_cells
from medctl.analysis.columns import pred_name, true_name
from medctl.analysis.columns import prefix as column_prefix
from medctl.analysis.leaderboard import (
    leaderboard,
    leaderboard_markdown,
    leaderboard_row,
    write_leaderboard,
)
from medctl.analysis.markdown import markdown_to_html, write_report
from medctl.analysis.metrics import KINDS, class_probs, target_metrics
from medctl.analysis.plots import plot_confusion_matrix, plot_multilabel_confusion, plot_roc
from medctl.analysis.regression import (
    REGRESSION_HEADLINE,
    plot_regression_scatter,
    regression_metrics,
    regression_report_lines,
)
from medctl.errors import DataError
from medctl.io import (
    MISSING,
    atomic_write,
    format_number,
    markdown_cell,
    markdown_table,
    to_jsonable,
    write_json,
    write_text_atomic,
)
from medctl.progress import log

__all__ = [
    "evaluate_predictions",
    "markdown_to_html",
    "write_report",
    "leaderboard",
    "leaderboard_markdown",
    "leaderboard_row",
    "write_leaderboard",
]

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def _target_fields(target: Any) -> tuple[str, str, list[str]]:
    """``(name, kind, classes)`` from a dict or a ``TargetSpec``-like object."""
    get = target.get if isinstance(target, Mapping) else lambda key: getattr(target, key, None)
    name, kind, classes = get("name"), get("kind"), get("classes")
    if not name or kind not in (*KINDS, "regression") or (not classes and kind != "regression"):
        raise DataError(
            f"target {target!r} needs a name, a kind in {', '.join(KINDS)}, regression and its class list; "
            "read them from the checkpoint's `targets` or the cache's summary.json"
        )
    return str(name), str(kind), [str(c) for c in classes or []]


def _per_target(values: Any, names: list[str], what: str) -> dict[str, Any]:
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise DataError(f"{what} has no entry for target(s) {', '.join(missing)}; key it by target name")
        return {n: values[n] for n in names}
    if len(names) != 1:
        raise DataError(f"{len(names)} targets: pass {what} as a dict keyed by target name")
    return {names[0]: values}


def file_stem(name: str) -> str:
    """A target or class name made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "target"


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_predictions(
    ids: Sequence[Any],
    y_true: Any,
    probs: Any,
    targets: Sequence[Any],
    out_dir: str | Path,
    *,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
    title: str = "",
    alpha: float = 0.05,
    threshold: float = 0.5,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics, CIs, predictions table, confusion matrices, ROC curves and a report for one split.

    ``targets``: dicts (or ``TargetSpec``) with ``name``, ``kind`` and ``classes``. ``y_true`` and
    ``probs``: for one target the arrays themselves, for several a dict keyed by target name. Per
    target ``y_true`` is (N,) class indices or (N, L) 0/1, ``probs`` (N, K) / (N, L) (binary: (N, 2)
    [p0, p1], or (N,) p1). ``provenance`` goes into ``metrics.json`` and the report as given. Returns
    what ``metrics.json`` holds, plus ``files`` (paths written).
    """
    out_dir = Path(out_dir)
    specs = [_target_fields(t) for t in targets]
    if not specs:
        raise DataError("no targets to evaluate; pass the checkpoint's or the cache's target list")
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise DataError(f"target names must be unique, got {names}")
    ids = [str(i) for i in ids]
    truths, predictions = _per_target(y_true, names, "y_true"), _per_target(probs, names, "probs")

    results: dict[str, Any] = {}
    columns: dict[str, Any] = {"id": ids}
    files: dict[str, str] = {}
    for name, kind, classes in specs:
        y = np.asarray(truths[name])
        p = np.asarray(predictions[name], dtype=np.float64)
        if len(y) != len(ids) or len(p) != len(ids):
            raise DataError(
                f"target {name!r}: {len(ids)} ids, {len(y)} labels and {len(p)} predictions; they must match"
            )
        prefix, true, pred = column_prefix(name, len(specs)), true_name(name, len(specs)), pred_name(name, len(specs))
        if kind == "regression":  # MAE, RMSE, R², r with CIs, and a scatter plot (medctl.analysis.regression)
            y, p = y.astype(np.float64), p.reshape(len(ids), -1)[:, :1]  # (N,), (N, 1)
            intervals = bootstrap_many(headline_metrics(kind), y, p, n=n_bootstrap, alpha=alpha, seed=seed)
            scatter = f"figures/{split}_scatter_{file_stem(name)}.png"
            plot_regression_scatter(y, p, out_dir / scatter, title=f"{name} ({split})")
            columns.update({true: y, pred: p[:, 0]})
            files[f"{name}:scatter_png"] = scatter
            results[name] = {
                "kind": kind,
                "classes": [],
                **regression_metrics(y, p),
                "ci": {key: _interval(intervals[key]) for key in REGRESSION_HEADLINE},
                "files": {"scatter_png": scatter},
            }
            continue
        if kind != "multilabel":
            p = class_probs(p, len(classes))  # (N, K)
        metrics = target_metrics(y, p, classes, kind, threshold)
        log(f"{split} {name}: bootstrapping {n_bootstrap} resamples of {len(ids)} samples")
        intervals = bootstrap_many(
            headline_metrics(kind, threshold), y, p, n=n_bootstrap, alpha=alpha, seed=seed
        )
        values = _prediction_columns(y, p, kind, classes, threshold)
        columns.update({true: values.pop("y_true"), pred: values.pop("y_pred")})
        columns.update({f"{prefix}{k}": v for k, v in values.items()})
        target_files = _write_target_files(out_dir, split, name, kind, classes, y, p, metrics)
        files.update({f"{name}:{k}": v for k, v in target_files.items()})
        results[name] = {
            **metrics,
            "ci": {key: _interval(intervals[key]) for key in HEADLINE},
            "files": target_files,
        }

    preds_path = out_dir / f"{split}_preds.parquet"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(preds_path, "wb") as fh:
        pd.DataFrame(columns).to_parquet(fh, index=False)
    files["preds"] = preds_path.name

    primary = names[0]
    summary = {"n": len(ids)}
    for key in REGRESSION_HEADLINE if specs[0][1] == "regression" else HEADLINE:
        summary[key] = results[primary][key]
        summary[f"{key}_ci"] = [results[primary]["ci"][key]["low"], results[primary]["ci"][key]["high"]]
    payload = to_jsonable(
        {
            "split": split,
            "title": title,
            "n_samples": len(ids),
            "n_bootstrap": n_bootstrap,
            "alpha": alpha,
            "seed": seed,
            "primary_target": primary,
            "summary": summary,
            "provenance": dict(provenance or {}),
            "targets": results,
            "files": {
                **files,
                "metrics": "metrics.json",
                "report": "report.md",
                "report_html": "report.html",
            },
        }
    )
    write_json(out_dir / "metrics.json", payload)
    write_report(report_markdown(payload), out_dir)
    return payload


def _interval(result: BootstrapResult) -> dict[str, Any]:
    return {
        "estimate": result.estimate,
        "low": result.low,
        "high": result.high,
        "level": 1 - result.alpha,
        "n_used": result.n_used,
        "n_requested": result.n_requested,
    }


def _prediction_columns(
    y: np.ndarray, p: np.ndarray, kind: str, classes: list[str], threshold: float
) -> dict[str, Any]:
    if kind == "multilabel":
        on = (p >= threshold).astype(np.int64)  # (N, L)
        cols: dict[str, Any] = {
            "y_true": [row.tolist() for row in y.astype(np.int64)],
            "y_pred": [row.tolist() for row in on],
            "true_label": [";".join(c for c, v in zip(classes, row, strict=True) if v) for row in y],
            "pred_label": [";".join(c for c, v in zip(classes, row, strict=True) if v) for row in on],
        }
    else:
        pred = p.argmax(axis=1)  # (N,)
        cols = {
            "y_true": y.astype(np.int64),
            "y_pred": pred.astype(np.int64),
            "true_label": [classes[k] for k in y.astype(np.int64)],
            "pred_label": [classes[k] for k in pred],
        }
    for k, cls in enumerate(classes):
        cols[f"prob_{cls}"] = p[:, k].astype(np.float32)
    return cols


def _write_target_files(
    out_dir: Path,
    split: str,
    name: str,
    kind: str,
    classes: list[str],
    y: np.ndarray,
    p: np.ndarray,
    metrics: dict,
) -> dict[str, str]:
    stem = f"{split}_confusion_{file_stem(name)}"
    csv_path = out_dir / f"{stem}.csv"
    png_path = out_dir / "figures" / f"{stem}.png"
    roc_path = out_dir / "figures" / f"{split}_roc_{file_stem(name)}.png"
    matrix = np.asarray(metrics["confusion_matrix"])
    if kind == "multilabel":  # (L, 2, 2) [[tn, fp], [fn, tp]]
        table = pd.DataFrame(matrix.reshape(len(classes), 4), columns=["tn", "fp", "fn", "tp"])
        table.insert(0, "label", classes)
        write_text_atomic(csv_path, table.to_csv(index=False))
        plot_multilabel_confusion(matrix, classes, png_path, title=f"{name} ({split})")
    else:  # (K, K) rows true, columns predicted
        table = pd.DataFrame(matrix, index=pd.Index(classes, name="true \\ predicted"), columns=classes)
        write_text_atomic(csv_path, table.to_csv())
        plot_confusion_matrix(matrix, classes, png_path, title=f"{name} ({split})")
    plot_roc(y, p, classes, roc_path, multilabel=kind == "multilabel")
    return {
        "confusion_csv": csv_path.name,
        "confusion_png": f"figures/{png_path.name}",
        "roc_png": f"figures/{roc_path.name}",
    }


# -------------------------------------------------------------------------------------------- report
def report_markdown(payload: Mapping[str, Any]) -> str:
    """The markdown of ``report.md`` from a ``metrics.json`` payload (figures by relative path)."""
    level = round(100 * (1 - payload["alpha"]))
    title = payload.get("title") or "Evaluation"
    intervals = (
        f"Intervals: {level}% percentile bootstrap over {payload['n_bootstrap']} resamples (seed {payload['seed']})."
        if payload["n_bootstrap"]
        else "No confidence intervals (n_bootstrap = 0)."
    )
    lines = [f"# {title}: {payload['split']} split", "", f"{payload['n_samples']} samples. {intervals}"]
    for name, result in payload["targets"].items():
        kind = result["kind"]
        if kind == "regression":
            lines += regression_report_lines(name, result, level)
            continue
        lines += ["", f"## Target `{name}` ({kind}: {', '.join(result['classes'])})", ""]
        rows = []
        for key in HEADLINE:
            shown = "subset accuracy" if kind == "multilabel" and key == "accuracy" else key.replace("_", " ")
            rows.append([shown, format_number(result[key]), *interval_cells(result["ci"][key])])
        extra = ["weighted_f1"] if kind != "multilabel" else ["hamming_loss", "micro_f1", "micro_auroc"]
        rows += [[key.replace("_", " "), format_number(result.get(key)), "", ""] for key in extra]
        lines += markdown_table(["metric", "value", f"{level}% CI", "resamples used"], rows, "lrlr")
        heading = "label" if kind == "multilabel" else "class"
        rows = [
            [cls, entry["support"], *(format_number(entry[k]) for k in ("precision", "recall", "f1", "auroc"))]
            for cls, entry in result["per_class"].items()
        ]
        lines += ["", f"### Per {heading}", ""]
        lines += markdown_table([heading, "support", "precision", "recall", "F1", "AUROC"], rows, "lrrrrr")
        files = result["files"]
        lines += ["", f"![confusion matrix, {markdown_cell(name)}]({files['confusion_png']})", ""]
        lines += [f"![ROC curves, {markdown_cell(name)}]({files['roc_png']})"]
        if result.get("notes"):
            lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    lines += ["", f"Predictions: `{payload['files']['preds']}`; all numbers: `metrics.json`.", ""]
    lines += provenance_markdown(payload.get("provenance") or {})
    return "\n".join(lines)


def provenance_markdown(provenance: Mapping[str, Any]) -> list[str]:
    """The report's provenance section: one line per fact, nested values flattened (``training_run.dir``)."""
    if not provenance:
        return []
    rows = []
    for key, value in provenance.items():
        items = value.items() if isinstance(value, Mapping) else [("", value)]
        for sub, item in items:
            name = f"{key}.{sub}" if sub else key
            rows.append([name.replace("_", " "), MISSING if item is None else f"`{item}`"])
    return [
        "## Provenance",
        "",
        *markdown_table(["what", "value"], rows),
        "",
        "The environment (versions, device, command) is in `env.json` beside this report.",
        "",
    ]
