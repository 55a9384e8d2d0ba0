"""The sweep's leaderboard, read back from the entries' own files.

A finished entry's row comes from its ``results.json`` (epochs, training wall time, split manifest
hash) and from ``eval_val/metrics.json`` / ``eval_test/metrics.json`` (the primary target's headline
metrics with 95% bootstrap intervals, as :func:`medctl.evaluate.stage.run_evaluate` wrote them), so the
table holds exactly the entries' own numbers. The p-value of each entry against the leader is the paired
bootstrap on the same test samples (``eval_test/test_preds.parquet``), balanced accuracy. Each row names
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
from medctl.evaluation.leaderboard import leaderboard, leaderboard_row, p_values_vs_leader, write_leaderboard
from medctl.progress import log
from medctl.sweep.entries import SweepEntry

SORT_BY = "val_balanced_accuracy"


def entry_row(entry: SweepEntry, run_dir: Path, split_manifest_hash: str) -> dict[str, Any]:
    """The leaderboard row of a finished entry; a failed row when its split manifest is not the sweep's."""
    results = json.loads((run_dir / "results.json").read_text())
    val = json.loads((run_dir / "eval_val" / "metrics.json").read_text())
    test = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    extra = {
        "mode": entry.kind,
        "architecture": results.get("architecture", ""),
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
        entry.name, entry.checkpoint, status="failed", reason=reason, mode=entry.kind, run_dir=str(run_dir)
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


def build_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    run_dirs: Mapping[str, Path],
    out_dir: Path,
    *,
    n_bootstrap: int,
    seed: int,
    title: str,
) -> tuple[pd.DataFrame, Path, Path]:
    """Rank the rows on validation balanced accuracy, add p-values, write leaderboard.csv and .md."""
    board = add_p_values(leaderboard(rows, sort_by=SORT_BY), run_dirs, n_bootstrap, seed)
    csv_path, md_path = write_leaderboard(board, out_dir, title=title)
    return board, csv_path, md_path
