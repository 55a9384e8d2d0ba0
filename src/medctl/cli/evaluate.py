"""`medctl evaluate`: metrics with confidence intervals, confusion matrices and a report for a classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, command_line, console, handle_errors
from medctl.cli.output import JsonOption, print_json, show_table


@handle_errors
def evaluate_command(
    ckpt: Annotated[
        Path, typer.Option("--ckpt", help="Classifier checkpoint from `medctl finetune` (best.ckpt).")
    ],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: train, val or test.")] = "test",
    config: ConfigOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: <run dir>/eval_<split>/).", show_default=False),
    ] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(
            "--bootstrap",
            min=0,
            help="Bootstrap resamples for the CIs (default train.bootstrap).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier evaluation in the output folder.")
    ] = False,
    overrides: OverridesArgument = None,
    as_json: JsonOption = False,
) -> None:
    """Predict a split with a trained classifier; metrics.json with 95% CIs, confusion matrices, ROC, report.md.

    The checkpoint alone suffices (its config says where the data is); -c or key=value overrides
    point the data elsewhere.

    Example: medctl evaluate --ckpt runs/oct_ft/checkpoints/best.ckpt --split test
    """
    from medctl.evaluate import run_evaluate  # torch and MONAI load only when this command runs

    result = run_evaluate(
        ckpt,
        split=split,
        out_dir=out,
        n_bootstrap=bootstrap,
        config_file=config,
        overrides=overrides or [],
        overwrite=overwrite,
        command=command_line(),
    )
    metrics = result.metrics
    if as_json:
        print_json({"out_dir": result.out_dir, "n_samples": result.n_samples, "metrics": metrics})
        return
    for name, target in metrics["targets"].items():
        table = Table(title=f"{name} ({target['kind']}) on {result.n_samples} {split} samples")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column(f"{round(100 * (1 - metrics['alpha']))}% CI", justify="right")
        for key in target["ci"]:  # accuracy .. auroc, or mae .. pearson_r for a regression target
            ci = target["ci"][key]
            interval = "—" if ci["low"] is None else f"[{ci['low']:.3f}, {ci['high']:.3f}]"
            value = "—" if target[key] is None else f"{target[key]:.3f}"
            table.add_row(key.replace("_", " "), value, interval)
        show_table(table)
    console.print(
        f"[green]✓[/] {result.out_dir}: {result.preds_path.name}, metrics.json, report.md, env.json",
        soft_wrap=True,
        highlight=False,
    )
    origin = metrics["provenance"]
    console.print(
        f"  checkpoint sha256 {origin['checkpoint_sha256'][:12]}, cache {origin['cache_fingerprint']}, "
        f"splits {origin['split_manifest_hash']}, git {(origin['git_sha'] or 'unknown')[:12]}",
        soft_wrap=True,
        highlight=False,
    )
