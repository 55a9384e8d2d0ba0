"""The sweep's leaderboard, read back from the entries' own files.

A finished entry's row comes from its ``results.json`` (epochs, training wall time, split manifest
hash) and from ``eval_val/metrics.json`` / ``eval_test/metrics.json`` (every target's headline metrics
with 95% bootstrap intervals, as :func:`medctl.evaluate.stage.run_evaluate` wrote them: the primary, first
target's as ``<split>_<metric>``, every other target's as ``<split>_<target>_<metric>``), so the table holds
exactly the entries' own numbers.

Rows are ranked on one metric of one target (:class:`RankMetric`, from ``sweep.rank_by``, else
``train.monitor``: the metric that picked each probe's epoch; a loss, which evaluate does not report, gives the
primary target's balanced accuracy, or MAE for a regression target) on the ``sweep.rank_on`` split (each probe
picked its epoch on val, so test is the unbiased default, or on an inner val carved from train under
``sweep.select_on = "inner_val"``, so that val ranks without bias), in that metric's direction (errors and losses:
lower is better; :mod:`medctl.analysis.ranking`). The rows say so in ``selected_on`` / ``ranked_on`` /
``ranked_by`` / ``better``. The p-value of each entry against the leader is the paired bootstrap on the same
test samples (``eval_test/test_preds.parquet``), on the ranking metric.

With ``sweep.seeds`` the runs of one entry (``<entry>/seed<s>``) become one row: every metric's mean and
``_std`` over the seeds that finished, ``n_seeds``; ``p_vs_leader`` is then a paired t-test across seeds
on the ranking metric, and ``delta_vs_random`` (``_std``; entry minus baseline, so negative is better for an
error) / ``p_vs_random`` compare each entry with the random baseline seed by seed on the same metric.
``leaderboard_seeds.csv`` keeps the per-seed rows. Each row names the encoder the entry built
(``architecture``: a sweep may mix widths and position schemes).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.analysis.bootstrap import headline_metrics
from medctl.analysis.columns import prediction_column, truth_column
from medctl.analysis.columns import prefix as column_prefix
from medctl.analysis.leaderboard import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    REGRESSION_SHOWN,
    SHOWN,
    SPLITS,
    _number,
    leaderboard,
    leaderboard_row,
    p_values_vs_leader,
    paired_seed_test,
    write_leaderboard,
)
from medctl.analysis.ranking import direction, higher_is_better
from medctl.data.provenance import Overlap
from medctl.errors import ConfigError
from medctl.io import write_text_atomic
from medctl.progress import log
from medctl.sweep.entries import RANDOM_INIT, SweepEntry

SELECTED_ON = "val"  # the split that picked each probe's epoch (train.monitor) and the entries to fine-tune
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1",
          "auroc": "AUROC", "mae": "MAE", "rmse": "RMSE", "r2": "R²", "pearson_r": "Pearson r"}  # fmt: skip


# ----------------------------------------------------------------------------------- the ranking metric
@dataclass(frozen=True)
class RankMetric:
    """What the leaderboard ranks on: one headline metric of one target, better higher or lower.

    ``key`` is its column without the split: ``balanced_accuracy`` / ``mae`` for the primary (first) target,
    ``<target>_<metric>`` for another (``age_mae``), so the column is ``<split>_<key>`` (``test_age_mae``).
    """

    target: str
    metric: str  # a headline metric of the target's kind: balanced_accuracy, macro_f1, auroc, accuracy | mae, ...
    primary: bool  # the first target, whose columns carry no target prefix
    source: str = "default"  # sweep.rank_by | train.monitor | default (the monitor is a loss, not evaluated)
    n_targets: int = 1

    @property
    def key(self) -> str:
        return self.metric if self.primary else f"{self.target}_{self.metric}"

    def column(self, split: str) -> str:
        return f"{split}_{self.key}"

    @property
    def monitored_key(self) -> str:
        """Its name in a run's monitored metrics (``results.json`` ``metrics``), where with several targets
        a bare name is the mean over targets and each target's own value is ``<target>_<metric>``."""
        return f"{self.target}_{self.metric}" if self.n_targets > 1 else self.metric

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.metric)

    @property
    def label(self) -> str:
        """``balanced accuracy`` with one target, ``age MAE`` with several."""
        return f"{self.target} {LABELS[self.metric]}" if self.n_targets > 1 else LABELS[self.metric]


DEFAULT_RANK = RankMetric("", "balanced_accuracy", primary=True)


def target_metrics(kind: str) -> tuple[str, ...]:
    """The headline metrics ``medctl evaluate`` puts intervals on for a target of ``kind``."""
    return REGRESSION_METRICS if kind == "regression" else CLASSIFICATION_METRICS


def rank_metric(rank_by: str, monitor: str, targets: Sequence[tuple[str, str]]) -> RankMetric:
    """The metric a sweep ranks on, from ``sweep.rank_by`` or else ``train.monitor`` (``val_``/``test_`` prefixes
    dropped): ``<metric>`` names the primary (first) target's, ``<target>_<metric>`` any target's. A monitor that
    evaluate does not report (a loss) gives the primary target's balanced accuracy (a regression target: MAE).
    ``targets``: ``(name, kind)`` in ``data.targets`` order. A ``rank_by`` that names no metric is a ConfigError."""
    if not targets:
        return DEFAULT_RANK
    choices: dict[str, tuple[str, str]] = {}
    for i, (name, kind) in enumerate(targets):
        for metric in target_metrics(kind):
            choices[f"{name}_{metric}"] = (name, metric)
            if i == 0:
                choices[metric] = (name, metric)
    if rank_by:
        wanted, source = rank_by.removeprefix("val_").removeprefix("test_"), "sweep.rank_by"
        if wanted not in choices:
            close = difflib.get_close_matches(wanted, list(choices), n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(
                [f"`sweep.rank_by` = {rank_by!r} is not a metric `medctl evaluate` reports for these targets; "
                 f"{hint}use one of: {', '.join(choices)}"],
                "sweep.rank_by",
            )  # fmt: skip
    else:
        wanted, source = monitor.removeprefix("val_").removeprefix("train_"), "train.monitor"
        if wanted not in choices:  # a loss: evaluate reports none, so the primary target's headline ranks
            wanted, source = ("mae" if targets[0][1] == "regression" else "balanced_accuracy"), "default"
    target, metric = choices[wanted]
    return RankMetric(target, metric, primary=target == targets[0][0], source=source, n_targets=len(targets))


def shown_columns(targets: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(column without the split, label)`` of every target's headline metrics, for leaderboard.md: one
    target as before (``bal. acc.``), several each under its name (``age MAE``)."""
    shown = []
    for i, (name, kind) in enumerate(targets):
        for metric, label in REGRESSION_SHOWN if kind == "regression" else SHOWN:
            shown.append((metric if i == 0 else f"{name}_{metric}", f"{name} {label}" if len(targets) > 1 else label))
    return shown


@dataclass(frozen=True)
class EntryRecord:
    """What a finished entry wrote, read once: ``results.json``, ``eval_val`` / ``eval_test`` ``metrics.json``
    and the training wall time of ``timing.json`` (results.json holds no wall-clock figure)."""

    run_dir: Path
    results: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]
    wall_time_s: float | None

    @classmethod
    def read(cls, run_dir: Path) -> EntryRecord:
        timing = run_dir / "timing.json"
        return cls(
            run_dir,
            json.loads((run_dir / "results.json").read_text()),
            json.loads((run_dir / "eval_val" / "metrics.json").read_text()),
            json.loads((run_dir / "eval_test" / "metrics.json").read_text()),
            json.loads(timing.read_text()).get("wall_time_s") if timing.exists() else None,
        )


def entry_row(entry: SweepEntry, record: EntryRecord, split_manifest_hash: str) -> dict[str, Any]:
    """The leaderboard row of a finished entry; a failed row when its split manifest is not the sweep's."""
    results, val, test, run_dir = record.results, record.val, record.test, record.run_dir
    extra = {
        "mode": entry.kind,
        "architecture": results.get("architecture", ""),
        "seed": entry.seed,
        "best_epoch": results.get("best_epoch"),
        **chosen_head(results.get("selected")),
        "n_val": val.get("n_samples"),
        "n_test": test.get("n_samples"),
        "split_manifest_hash": results.get("split_manifest_hash"),
        "run_dir": str(run_dir),
        # val/test participants in the checkpoint's pretraining pool ("unknown" without provenance)
        "pretrain_overlap": Overlap.from_dict(results["pretraining_overlap"]).cell()
        if "pretraining_overlap" in results
        else "",
    }
    if results.get("split_manifest_hash") != split_manifest_hash:
        return failed_row(
            entry,
            run_dir,
            f"its split manifest {results.get('split_manifest_hash')} is not the sweep's {split_manifest_hash}; "
            "rerun the sweep with --fresh",
        )
    return leaderboard_row(
        entry.name,
        entry.checkpoint,
        val=val["summary"],
        test=test["summary"],
        epochs=results.get("epochs_run"),
        wall_time_s=record.wall_time_s,
        **extra,
        **task_columns(results.get("targets") or [], {"val": val, "test": test}),
    )


def chosen_head(selected: Mapping[str, Any] | None) -> dict[str, Any]:
    """The grid point a ``train.grid`` run selected (``results.json["selected"]``): its lr_head, weight_decay
    and the cell the board shows, ``"0.001 / 0"``; empty without a grid."""
    if not selected:
        return {}
    lr, decay = selected["lr_head"], selected["weight_decay"]
    return {"lr_head": lr, "weight_decay": decay, "chosen_head": f"{lr:g} / {decay:g}"}


def task_columns(targets: Sequence[Mapping[str, Any]], evaluated: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``<split>_<target>_<metric>`` and its ``_ci`` for every target but the primary (first) one, from the
    ``metrics.json`` of each split (its ``targets`` section)."""
    columns: dict[str, Any] = {}
    for spec in targets[1:]:
        name = spec["name"]
        for split, payload in evaluated.items():
            result = (payload.get("targets") or {}).get(name) or {}
            for metric in target_metrics(spec["kind"]):
                if metric in result:
                    ci = (result.get("ci") or {}).get(metric) or {}
                    columns[f"{split}_{name}_{metric}"] = result[metric]
                    columns[f"{split}_{name}_{metric}_ci"] = [ci.get("low"), ci.get("high")]
    return columns


def failed_row(entry: SweepEntry, run_dir: Path, reason: str) -> dict[str, Any]:
    return leaderboard_row(
        entry.name,
        entry.checkpoint,
        status="failed",
        reason=reason,
        mode=entry.kind,
        seed=entry.seed,
        run_dir=str(run_dir),
    )


def test_predictions(record: EntryRecord, target: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(ids, y_true, probs, kind)`` of ``target`` (default: the primary one) from ``eval_test``.

    ``y_true`` is (N,) class indices, (N, L) 0/1 or (N,) values; ``probs`` (N, K) / (N, L), or a regression
    target's predictions (N, 1). Reads either predictions layout (:mod:`medctl.analysis.columns`).
    """
    target = target or record.test["primary_target"]
    spec = next(t for t in record.results["targets"] if t["name"] == target)
    n_targets = len(record.results["targets"])
    path = record.run_dir / "eval_test" / "test_preds.parquet"
    frame = pd.read_parquet(path)
    y = np.stack([np.asarray(v) for v in frame[truth_column(frame.columns, target, n_targets, str(path))]])
    if spec["kind"] == "regression":
        predicted = frame[prediction_column(frame.columns, target, n_targets, str(path))]
        probs = predicted.to_numpy(np.float64)[:, None]  # (N, 1)
    else:
        prefix = column_prefix(target, n_targets)
        probs = np.stack(
            [frame[f"{prefix}prob_{c}"].to_numpy(np.float64) for c in spec["classes"]], axis=1
        )  # (N, K)
    return frame["id"].astype(str).to_numpy(), y, probs, spec["kind"]


def add_p_values(
    board: pd.DataFrame, records: Mapping[str, EntryRecord], n: int, seed: int, rank: RankMetric = DEFAULT_RANK
) -> pd.DataFrame:
    """``p_vs_leader`` for every ranked entry scored on the leader's test samples (NaN otherwise), paired
    bootstrap on the ranking metric of its target."""
    board = board.copy()
    board["p_vs_leader"] = math.nan
    ranked = board[board["rank"].notna()]
    if ranked.empty or n == 0:
        return board
    leader = str(ranked.iloc[0]["entry"])
    ids, y_true, leader_probs, kind = test_predictions(records[leader], rank.target)
    order = pd.Index(ids)
    probs_by_entry = {leader: leader_probs}
    for name in ranked["entry"].astype(str):
        if name == leader:
            continue
        other_ids, _, probs, _ = test_predictions(records[name], rank.target)
        position = pd.Index(other_ids).get_indexer(order)
        if len(other_ids) != len(ids) or (position < 0).any():
            log(f"sweep: {name} was tested on other samples than the leader {leader}; no p-value")
            continue
        probs_by_entry[name] = probs[position]
    metric = headline_metrics(kind)[rank.metric]
    p_values = p_values_vs_leader(y_true, probs_by_entry, leader, metric, n=n, seed=seed)
    board["p_vs_leader"] = board["entry"].map(lambda name: p_values.get(str(name), math.nan))
    return board


# ------------------------------------------------------------------------------------------- seeds
def seed_summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per entry from its per-seed rows (``<entry>/seed<s>``): metric means and ``_std`` over the
    seeds that finished; an entry none of whose seeds finished is a failed row with every seed's reason."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["entry"]).split("/")[0], []).append(row)
    summary = []
    for base, members in groups.items():
        ok = [r for r in members if r.get("status", "ok") == "ok"]
        failed = [r for r in members if r.get("status", "ok") != "ok"]
        checkpoints = list(dict.fromkeys(str(r.get("checkpoint") or "") for r in members))
        row: dict[str, Any] = {
            "entry": base,
            "checkpoint": ", ".join(checkpoints) if any(checkpoints) else "",
            "status": "ok" if ok else "failed",
            "reason": "; ".join(f"seed {r.get('seed')}: {r.get('reason')}" for r in failed),
            "mode": members[0].get("mode"),
            "n_seeds": len(ok),
            "seeds": " ".join(str(r.get("seed")) for r in ok),
            "epochs": _mean([r.get("epochs") for r in ok]),
            "wall_time_s": float(np.nansum([_number(r.get("wall_time_s")) for r in ok])) if ok else None,
            "split_manifest_hash": members[0].get("split_manifest_hash"),
            "chosen_head": " · ".join(str(r.get("chosen_head") or "—") for r in ok),  # each seed's own
        }
        for key in metric_keys(members):
            values = [_number(r.get(key)) for r in ok]
            values = [v for v in values if math.isfinite(v)]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        summary.append(row)
    return summary


def metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every ``<split>_...`` metric of the rows (every target's), in first-seen order, without the intervals."""
    keys = (k for row in rows for k in row if k.startswith(tuple(f"{s}_" for s in SPLITS)))
    return [k for k in dict.fromkeys(keys) if not k.endswith(("_ci", "_low", "_high", "_std"))]


def per_seed_values(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[int, float]]:
    """``{entry: {seed: value of key}}`` over the finished per-seed rows."""
    values: dict[str, dict[int, float]] = {}
    for row in rows:
        value = _number(row.get(key))
        if row.get("status", "ok") == "ok" and row.get("seed") is not None and math.isfinite(value):
            values.setdefault(str(row["entry"]).split("/")[0], {})[int(row["seed"])] = value
    return values


def add_seed_tests(board: pd.DataFrame, rows: Sequence[Mapping[str, Any]], sort_by: str) -> pd.DataFrame:
    """``p_vs_leader`` (paired t-test across seeds on ``sort_by``), ``delta_vs_random`` (mean, ``_std``) and
    ``p_vs_random`` against the random baseline of the same kind (``random_init`` / ``random_init_ft``)."""
    board = board.copy()
    values = per_seed_values(rows, sort_by)
    ranked = board[board["rank"].notna()]
    leader = None if ranked.empty else str(ranked.iloc[0]["entry"])
    columns: dict[str, list[float]] = {
        "p_vs_leader": [],
        "delta_vs_random": [],
        "delta_vs_random_std": [],
        "p_vs_random": [],
    }
    for name in board["entry"].astype(str):
        mine = values.get(name, {})
        p_leader = math.nan
        if leader is not None and name != leader and mine:
            p_leader = paired_seed_test(mine, values.get(leader, {}))["p"]
        reference = f"{RANDOM_INIT}_ft" if name.endswith("_ft") else RANDOM_INIT
        versus = (
            paired_seed_test(mine, values[reference])
            if reference in values and name != reference and mine
            else {"mean": math.nan, "std": math.nan, "p": math.nan}
        )
        columns["p_vs_leader"].append(p_leader)
        columns["delta_vs_random"].append(versus["mean"])
        columns["delta_vs_random_std"].append(versus["std"])
        columns["p_vs_random"].append(versus["p"])
    for column, column_values in columns.items():
        board[column] = column_values
    return board


def ranking_note(
    rank_on: str,
    seeds: Sequence[int],
    rank: RankMetric = DEFAULT_RANK,
    monitor: str = "",
    selected_on: str = "val",
) -> str:
    """What the leaderboard's numbers are: which split picked the epoch, which metric ranks on which split and in
    which direction, why that metric, what the p-values test."""
    metric = f"{rank.label} ({direction(rank.metric)})"
    if selected_on == "inner_val":
        ranked = (
            "Each probe fit on part of the train split and picked its epoch (train.monitor) on the rest, an inner "
            f"val carved once for the sweep (inner_split.csv); ranked on {rank_on} {metric}, a split that "
            "selected nothing" + ("; test stays untouched for the final figure." if rank_on == "val" else ".")
        )
    elif rank_on == "val":
        ranked = (
            f"Ranked on val {metric}: the split that also picked each probe's epoch (train.monitor), "
            'so val flatters every entry; sweep.rank_on = "test" (or sweep.select_on = "inner_val") ranks on '
            "samples that selected nothing."
        )
    else:
        ranked = (
            f"Each probe picked its epoch on val (train.monitor); ranked on test {metric}, a split that "
            "selected nothing."
        )
    why = {
        "sweep.rank_by": f"Ranking metric: sweep.rank_by = {rank.key!r}.",
        "train.monitor": f"Ranking metric: train.monitor = {monitor!r}, the metric that picked each epoch "
        "(sweep.rank_by can name another).",
        "default": f"Ranking metric: the primary target's headline, since train.monitor = {monitor!r} is not a "
        "metric `medctl evaluate` reports (sweep.rank_by can name another).",
    }[rank.source]
    why = f"{why} " if monitor or rank.source == "sweep.rank_by" else ""  # a caller that did not say what monitored
    if seeds:
        listed = ", ".join(str(s) for s in seeds)
        sign = " (negative is better)" if not rank.higher_is_better else ""
        return (
            f"{ranked} {why}Values: mean ± std over seeds [{listed}] (the probe's run.seed; a {{seed}} checkpoint "
            "is the pretraining run of that seed). p vs leader / p vs random: paired t-test across seeds on the "
            f"ranking metric, two-sided; Δ vs random: mean ± std of the per-seed difference, entry minus random{sign}."
        )
    return (
        f"{ranked} {why}Test values with 95% bootstrap intervals; p vs leader: paired bootstrap on the test "
        "samples, on the ranking metric, two-sided."
    )


def build_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    records: Mapping[str, EntryRecord],
    out_dir: Path,
    *,
    n_bootstrap: int,
    seed: int,
    title: str,
    rank_on: str = "test",
    seeds: Sequence[int] = (),
    rank: RankMetric = DEFAULT_RANK,
    targets: Sequence[tuple[str, str]] = (),
    monitor: str = "",
    selected_on: str = "val",
) -> tuple[pd.DataFrame, Path, Path]:
    """Rank the rows on ``rank`` (its column on ``rank_on``, in its direction), add p-values on the same metric,
    write leaderboard.csv and .md with every one of ``targets``' headline metrics (``(name, kind)``) (and
    ``leaderboard_seeds.csv`` with the per-seed rows when there are ``seeds``)."""
    sort_by = rank.column(rank_on)
    if seeds:
        per_seed = leaderboard(rows, sort_by=sort_by)
        write_text_atomic(out_dir / "leaderboard_seeds.csv", per_seed.to_csv(index=False))
        board = add_seed_tests(leaderboard(seed_summary_rows(rows), sort_by=sort_by), rows, sort_by)
    else:
        board = add_p_values(leaderboard(rows, sort_by=sort_by), records, n_bootstrap, seed, rank)
    board.insert(board.columns.get_loc("reason") + 1, "selected_on", selected_on)
    board.insert(board.columns.get_loc("selected_on") + 1, "ranked_on", rank_on)
    board.insert(board.columns.get_loc("ranked_on") + 1, "ranked_by", rank.key)
    board.insert(board.columns.get_loc("ranked_by") + 1, "better", "higher" if rank.higher_is_better else "lower")
    csv_path, md_path = write_leaderboard(
        board,
        out_dir,
        title=title,
        note=ranking_note(rank_on, seeds, rank, monitor, selected_on),
        shown=shown_columns(targets) if targets else None,
    )
    return board, csv_path, md_path


def _mean(values: Sequence[Any]) -> float | None:
    finite = [v for v in (_number(x) for x in values) if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None
