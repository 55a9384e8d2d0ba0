"""`medctl sweep`: one probe / fine-tune recipe over several checkpoints, into a leaderboard."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from medctl.cli.common import (
    ConfigOption,
    OverridesArgument,
    command_line,
    console,
    handle_errors,
    resolve_config,
)
from medctl.cli.output import JsonOption, print_json, show_table
from medctl.config import SWEEP_MODES
from medctl.errors import RunFailure

if TYPE_CHECKING:
    import pandas as pd


Mode = StrEnum("Mode", {mode: mode for mode in SWEEP_MODES})  # --mode's choices: sweep.mode's values


@handle_errors
def sweep_command(
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    all_checkpoints: Annotated[
        bool,
        typer.Option(
            "--all-checkpoints/--listed-only",
            help="Sweep sweep.checkpoints and every sweep.checkpoint_glob file in sweep.checkpoint_dir "
            "(--listed-only: sweep.checkpoints alone).",
        ),
    ] = True,
    mode: Annotated[
        Mode | None,
        typer.Option(
            "--mode", help="One of the sweep.mode values (default sweep.mode).", show_default=False
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", min=1, help="Entries run in parallel (default sweep.jobs).", show_default=False
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            "--overwrite",
            help="Rerun every entry, replacing finished ones (an entry folder holding a run this sweep did "
            "not finish is otherwise a failed row).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Probe (and fine-tune) every checkpoint on one frozen split; leaderboard.csv / leaderboard.md.

    Each entry is a run directory runs/<name>/<entry>/ evaluated on val and test; a rerun skips finished
    entries and retries failed ones.

    Example: medctl sweep -c config/sweep.toml --all-checkpoints --mode both
    """
    from medctl.sweep import run_sweep  # torch and MONAI load only when this command runs

    result = run_sweep(
        resolve_config(config, overrides, ["sweep"]),
        command=command_line(),
        all_checkpoints=all_checkpoints,
        mode=mode.value if mode else None,
        jobs=jobs,
        fresh=fresh,
    )
    all_failed = bool(result.outcomes) and len(result.failed) == len(result.outcomes)
    if as_json:
        print_json(
            {
                "sweep_dir": result.sweep_dir,
                "mode": result.mode,
                "leaderboard": result.leaderboard.to_dict(orient="records"),
                "leaderboard_md": result.leaderboard_md,
                "entries": len(result.outcomes),
                "failed": [o.entry.name for o in result.failed],
                "split_manifest_hash": result.split_manifest_hash,
                "wall_time_s": result.wall_time_s,
            }
        )
        if all_failed:
            raise RunFailure(f"every sweep entry failed ({len(result.failed)}); each reason in {result.leaderboard_md}")
        return
    board = result.leaderboard
    ranked_on = str(board["ranked_on"].iloc[0]) if "ranked_on" in board else "val"
    ranked_by = str(board["ranked_by"].iloc[0]) if "ranked_by" in board else "balanced_accuracy"
    better = str(board["better"].iloc[0]) if "better" in board else "higher"
    print_leaderboard(
        board,
        f"sweep {result.sweep_dir.name} ({result.mode}), ranked on {ranked_on} {metric_label(ranked_by)} "
        f"({better} is better)",
        ranked_by,
    )
    skipped = sum(o.status == "skipped" for o in result.outcomes)
    console.print(
        f"{'[red]✗[/]' if all_failed else '[green]✓[/]'} {len(result.outcomes)} entries ({skipped} already finished, {len(result.failed)} failed) "
        f"in {result.wall_time_s:.1f} s; split manifest {result.split_manifest_hash}",
        highlight=False,
    )
    console.print(f"  {result.leaderboard_md}", soft_wrap=True, highlight=False)
    if all_failed:
        first = result.failed[0]
        raise RunFailure(
            f"every sweep entry failed ({len(result.failed)}); the first, {first.entry.name}: {first.reason} "
            f"(each reason in {result.leaderboard_md})"
        )


def metric_label(key: str) -> str:
    """``balanced_accuracy`` -> ``bal. acc.``, ``age_mae`` -> ``age MAE``: a leaderboard column for a reader."""
    from medctl.analysis.leaderboard import REGRESSION_SHOWN, SHOWN

    for metric, label in (*SHOWN, *REGRESSION_SHOWN, ("accuracy", "accuracy")):
        if key == metric or key.endswith(f"_{metric}"):
            return f"{key.removesuffix(metric).replace('_', ' ')}{label}"
    return key


def print_leaderboard(board: pd.DataFrame, title: str, ranked_by: str = "balanced_accuracy") -> None:
    """The ranked entries as a rich table (val and test of the ranking metric ``ranked_by``, then the primary
    target's other test headline metrics); failed entries below it, one line each with the reason."""
    import pandas as pd

    from medctl.analysis.leaderboard import format_duration, format_metric, format_p, shown_metrics

    seeded = "n_seeds" in board.columns
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("entry", no_wrap=True)
    table.add_column("mode")
    table.add_column("architecture")
    tests = [ranked_by] + [metric for metric, _ in shown_metrics(board) if metric != ranked_by]
    columns = [
        f"val {metric_label(ranked_by)}",
        *(f"test {metric_label(metric)}" for metric in tests),
        "epochs",
        "time",
        "p vs leader",
    ]
    columns += ["seeds", "Δ vs random", "p vs random"] if seeded else []
    for column in columns:
        table.add_column(column, justify="right")
    failed = []
    for _, row in board.iterrows():
        if row["status"] != "ok":
            failed.append(row)
            continue
        rank = "—" if pd.isna(row["rank"]) else str(int(row["rank"]))
        architecture = row.get("architecture")
        cells = [rank, str(row["entry"]), str(row.get("mode", "")), "—" if pd.isna(architecture) else str(architecture)]
        cells.append(
            format_metric({"v": row.get(f"val_{ranked_by}"), "v_std": row.get(f"val_{ranked_by}_std")}, "v")
        )
        for metric in tests:
            cells.append(format_metric(row, f"test_{metric}"))
        epochs = row.get("epochs")
        cells += ["—" if pd.isna(epochs) else str(round(epochs)), format_duration(row.get("wall_time_s"))]
        cells.append("leader" if rank == "1" else format_p(row.get("p_vs_leader")))
        if seeded:
            delta = {"d": row.get("delta_vs_random"), "d_std": row.get("delta_vs_random_std")}
            cells += [str(row.get("n_seeds")), format_metric(delta, "d"), format_p(row.get("p_vs_random"))]
        table.add_row(*cells)
    show_table(table)
    for row in failed:
        console.print(
            f"[red]✗[/] {row['entry']} failed: {row.get('reason', '')}", highlight=False, soft_wrap=True
        )
