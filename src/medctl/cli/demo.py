"""`medctl demo`: the whole pipeline on the built-in synthetic dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors
from medctl.cli.output import show_table
from medctl.io import format_number


@handle_errors
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the dataset, every run and report.html.")] = Path(
        "runs/demo"
    ),
    size: Annotated[
        str, typer.Option(help="tiny | small | medium (small: < 5 minutes on 2 CPU cores).")
    ] = "small",
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Delete the folder first instead of reusing it.")
    ] = False,
    eeg: Annotated[
        bool, typer.Option("--eeg", help="The EEG pipeline instead: EDF recordings -> spectrograms -> multi-task.")
    ] = False,
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Every stage on a built-in synthetic 3D lesion dataset, on CPU, into report.html.

    Preprocess, pretrain three encoders, sweep a linear probe over them and a random baseline, fine-tune the leader, evaluate on test, saliency scored against the masks, saliency on a 2D classifier whose evidence, a thin rod, is not the brightest thing (where a map can beat the image), then the report.

    Examples:
      medctl demo
      medctl demo --size tiny --out /tmp/demo
      medctl demo --fresh pretrain.epochs=4
      medctl demo --eeg --out runs/demo_eeg
    """
    if eeg:
        _eeg_demo(out if out != Path("runs/demo") else Path("runs/demo_eeg"), size, fresh, config, overrides or [])
        return
    from medctl.demo import STAGES, run_demo

    start = time.perf_counter()

    def announce(index: int, total: int, name: str) -> None:
        console.print(f"[bold cyan][{index}/{total}][/] {name}", highlight=False)

    result = run_demo(
        out, size=size, fresh=fresh, config_file=config, overrides=overrides or [], on_stage=announce
    )

    table = Table(title=f"medctl demo ({size}) in {time.perf_counter() - start:.0f} s")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("")
    for name in STAGES:
        reused = any(r == name or r.startswith(f"{name} ") for r in result.reused)
        table.add_row(name, f"{result.stage_seconds.get(name, 0):.1f}", "reused" if reused else "")
    show_table(table)

    board = Table(title="leaderboard (linear probe)")
    for column in ("entry", "val bal. acc", "test bal. acc", "status"):
        board.add_column(column)
    for row in result.leaderboard:
        board.add_row(
            str(row.get("entry")),
            format_number(row.get("val_balanced_accuracy")),
            format_number(row.get("test_balanced_accuracy")),
            str(row.get("status")),
        )
    show_table(board)
    summary = result.test_metrics
    console.print(
        f"fine-tuned leader on test: balanced accuracy {format_number(summary.get('balanced_accuracy'))}, "
        f"AUROC {format_number(summary.get('auroc'))}"
    )
    from medctl.saliency.scoring import describe

    for method, scores in result.saliency_scores.items():
        console.print(f"saliency {describe(method, scores)}", soft_wrap=True, highlight=False)
    for method, scores in result.distractor_scores.items():
        line = f"saliency, 2D, evidence not the brightest: {describe(method, scores)}"
        console.print(line, soft_wrap=True, highlight=False)
    if result.reused:
        console.print(f"reused from an earlier run: {', '.join(result.reused)} (--fresh starts over)")
    console.print(f"report: [bold]{result.report_html}[/] (and {result.report_md.name})")


def _eeg_demo(out: Path, size: str, fresh: bool, config: Path | None, overrides: list[str]) -> None:
    from medctl.demo_eeg import run_eeg_demo

    start = time.perf_counter()
    result = run_eeg_demo(out, size=size, fresh=fresh, config_file=config, overrides=overrides)
    table = Table(title=f"medctl demo --eeg ({size}) in {time.perf_counter() - start:.0f} s: {result.n_recordings} "
                  f"recordings, {result.n_windows} windows")  # fmt: skip
    for column in ("task", "test metric", "value", "chance", "above chance"):
        table.add_column(column)
    for name, task in result.tasks.items():
        table.add_row(name, task["metric"], format_number(task["value"]), format_number(task["chance"]), "yes" if task["beats_chance"] else "no")
    console.print(table)
    if result.reused:
        console.print(f"reused from an earlier run: {', '.join(result.reused)} (--fresh starts over)")
    console.print(f"report: [bold]{result.report_html}[/] (and {result.report_md.name})")


