"""The sweep's leaderboard, read back from the entries' own files.

A finished entry's row comes from its ``results.json`` (epochs, training wall time, split manifest
hash) and from ``eval_val/metrics.json`` / ``eval_test/metrics.json`` (the primary target's headline
metrics with 95% bootstrap intervals, as :func:`medctl.evaluate.stage.run_evaluate` wrote them), so the
table holds exactly the entries' own numbers. Rows are ranked on ``<rank_on>_balanced_accuracy``
(``sweep.rank_on``; each probe picked its epoch on val, so test is the unbiased default, or on an inner val
carved from train under ``sweep.select_on = "inner_val"``, so that val ranks without bias) and say so in
``selected_on`` / ``ranked_on``. The p-value of each entry against the leader is the paired bootstrap on
the same test samples (``eval_test/test_preds.parquet``), balanced accuracy.

With ``sweep.seeds`` the runs of one entry (``<entry>/seed<s>``) become one row: every metric's mean and
``_std`` over the seeds that finished, ``n_seeds``; ``p_vs_leader`` is then a paired t-test across seeds
on the ranking metric, and ``delta_vs_random`` (``_std``) / ``p_vs_random`` compare each entry with the
random baseline seed by seed. ``leaderboard_seeds.csv`` keeps the per-seed rows. Each row names
the encoder the entry built (``architecture``: a sweep may mix widths and position schemes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medctl.data.provenance import Overlap
from medctl.evaluation.bootstrap import headline_metrics
from medctl.evaluation.leaderboard import (
    METRICS,
    SPLITS,
    _number,
    leaderboard,
    leaderboard_row,
    p_values_vs_leader,
    paired_seed_test,
    write_leaderboard,
)
from medctl.io import write_text_atomic
from medctl.progress import log
from medctl.sweep.entries import RANDOM_INIT, SweepEntry

SELECT_BY = (
    "val_balanced_accuracy"  # what picked each probe's epoch (train.monitor on val) and the fine-tunes
)
RANK_METRIC = "balanced_accuracy"


def entry_row(entry: SweepEntry, run_dir: Path, split_manifest_hash: str) -> dict[str, Any]:
    """The leaderboard row of a finished entry; a failed row when its split manifest is not the sweep's."""
    results = json.loads((run_dir / "results.json").read_text())
    val = json.loads((run_dir / "eval_val" / "metrics.json").read_text())
    test = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    extra = {
        "mode": entry.kind,
        "architecture": results.get("architecture", ""),
        "seed": entry.seed,
        "best_epoch": results.get("best_epoch"),
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
        wall_time_s=_wall_time(run_dir),
        **extra,
    )


def _wall_time(run_dir: Path) -> float | None:
    """The entry's training wall time from ``timing.json`` (results.json holds no wall-clock figure)."""
    path = run_dir / "timing.json"
    return json.loads(path.read_text()).get("wall_time_s") if path.exists() else None


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


def primary_test_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(ids, y_true, probs, kind)`` of the primary target from ``eval_test``.

    ``y_true`` is (N,) class indices or (N, L) 0/1; ``probs`` (N, K) / (N, L).
    """
    metrics = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    primary = metrics["primary_target"]
    spec = next(t for t in results["targets"] if t["name"] == primary)
    prefix = f"{primary}_" if len(results["targets"]) > 1 else ""
    frame = pd.read_parquet(run_dir / "eval_test" / "test_preds.parquet")
    y = np.stack([np.asarray(v) for v in frame[f"{prefix}y_true"]])  # (N,) or (N, L)
    probs = np.stack(
        [frame[f"{prefix}prob_{c}"].to_numpy(np.float64) for c in spec["classes"]], axis=1
    )  # (N, K)
    return frame["id"].astype(str).to_numpy(), y, probs, spec["kind"]


def add_p_values(board: pd.DataFrame, run_dirs: Mapping[str, Path], n: int, seed: int) -> pd.DataFrame:
    """``p_vs_leader`` for every ranked entry scored on the leader's test samples (NaN otherwise)."""
    board = board.copy()
    board["p_vs_leader"] = math.nan
    ranked = board[board["rank"].notna()]
    if ranked.empty or n == 0:
        return board
    leader = str(ranked.iloc[0]["entry"])
    ids, y_true, leader_probs, kind = primary_test_predictions(run_dirs[leader])
    order = pd.Index(ids)
    probs_by_entry = {leader: leader_probs}
    for name in ranked["entry"].astype(str):
        if name == leader:
            continue
        other_ids, _, probs, _ = primary_test_predictions(run_dirs[name])
        position = pd.Index(other_ids).get_indexer(order)
        if len(other_ids) != len(ids) or (position < 0).any():
            log(f"sweep: {name} was tested on other samples than the leader {leader}; no p-value")
            continue
        probs_by_entry[name] = probs[position]
    metric = headline_metrics(kind)["balanced_accuracy"]
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
        }
        for split in SPLITS:
            for metric in METRICS:
                values = [_number(r.get(f"{split}_{metric}")) for r in ok]
                values = [v for v in values if math.isfinite(v)]
                row[f"{split}_{metric}"] = float(np.mean(values)) if values else None
                row[f"{split}_{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        summary.append(row)
    return summary


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


def ranking_note(rank_on: str, seeds: Sequence[int], selected_on: str = "val") -> str:
    """What the leaderboard's numbers are: which split picked the epoch, which one ranks, what the p-values test."""
    if selected_on == "inner_val":
        ranked = (
            "Each probe fit on part of the train split and picked its epoch (train.monitor) on the rest, an inner "
            f"val carved once for the sweep (inner_split.csv); ranked on {rank_on} balanced accuracy, a split that "
            "selected nothing" + ("; test stays untouched for the final figure." if rank_on == "val" else ".")
        )
    elif rank_on == "val":
        ranked = (
            "Ranked on val balanced accuracy: the split that also picked each probe's epoch (train.monitor), "
            'so val flatters every entry; sweep.rank_on = "test" (or sweep.select_on = "inner_val") ranks on '
            "samples that selected nothing."
        )
    else:
        ranked = (
            "Each probe picked its epoch on val (train.monitor); ranked on test balanced accuracy, a split that "
            "selected nothing."
        )
    if seeds:
        listed = ", ".join(str(s) for s in seeds)
        return (
            f"{ranked} Values: mean ± std over seeds [{listed}] (the probe's run.seed; a {{seed}} checkpoint is "
            "the pretraining run of that seed). p vs leader / p vs random: paired t-test across seeds on the "
            "ranking metric, two-sided; Δ vs random: mean ± std of the per-seed difference."
        )
    return (
        f"{ranked} Test values with 95% bootstrap intervals; p vs leader: paired bootstrap on the test samples, "
        "two-sided."
    )


def build_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    run_dirs: Mapping[str, Path],
    out_dir: Path,
    *,
    n_bootstrap: int,
    seed: int,
    title: str,
    rank_on: str = "test",
    seeds: Sequence[int] = (),
    selected_on: str = "val",
) -> tuple[pd.DataFrame, Path, Path]:
    """Rank the rows on ``<rank_on>`` balanced accuracy, add p-values, write leaderboard.csv and .md
    (and ``leaderboard_seeds.csv`` with the per-seed rows when there are ``seeds``)."""
    sort_by = f"{rank_on}_{RANK_METRIC}"
    if seeds:
        per_seed = leaderboard(rows, sort_by=sort_by)
        write_text_atomic(out_dir / "leaderboard_seeds.csv", per_seed.to_csv(index=False))
        board = add_seed_tests(leaderboard(seed_summary_rows(rows), sort_by=sort_by), rows, sort_by)
    else:
        board = add_p_values(leaderboard(rows, sort_by=sort_by), run_dirs, n_bootstrap, seed)
    board.insert(board.columns.get_loc("reason") + 1, "selected_on", selected_on)
    board.insert(board.columns.get_loc("selected_on") + 1, "ranked_on", rank_on)
    note = ranking_note(rank_on, seeds, selected_on)
    csv_path, md_path = write_leaderboard(board, out_dir, title=title, note=note)
    return board, csv_path, md_path


def _mean(values: Sequence[Any]) -> float | None:
    finite = [v for v in (_number(x) for x in values) if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None
