"""`medctl finetune`: a linear probe or fine-tune of an encoder with one head per target."""

from __future__ import annotations

import os

from rich.table import Table

from medctl.cli.common import (
    ConfigOption,
    ExtendOption,
    OverridesArgument,
    OverwriteOption,
    ResumeOption,
    command_line,
    console,
    handle_errors,
    resolve_config,
)
from medctl.cli.output import show_table


@handle_errors
def finetune_command(
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    resume: ResumeOption = False,
    extend: ExtendOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Train a classifier: linear probe on cached embeddings, or fine-tune with model.unfreeze_at_epoch.

    Writes runs/<name>/: checkpoints/best.ckpt (self-contained classifier), val_preds.parquet,
    results.json, class_to_idx.json, metrics.jsonl, tb/, figures/training_curves.png.

    Epochs count from 1: model.unfreeze_at_epoch=3 trains the encoder from the 3rd epoch on. A run.name
    that already holds a run is refused: --resume continues it (same settings; with --extend a larger
    train.epochs), --overwrite replaces it.

    Example: medctl finetune -c config/finetune/linear_probe.toml model.checkpoint=runs/byol_mt3/checkpoints/encoder.ckpt
    """
    from medctl.finetune import run_finetune  # torch and MONAI load only when this command runs

    result = run_finetune(
        resolve_config(config, overrides, ["finetune"]), command=command_line(), resume=resume, overwrite=overwrite, extend=extend
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    how = "heads on cached embeddings" if result.feature_cache else "encoder run every step"
    console.print(
        f"[green]✓[/] {result.mode} ({how}) in {result.wall_time_s:.1f} s: {result.run_dir}", highlight=False
    )
    stopped = ", stopped early" if result.stopped_early else ""
    console.print(
        f"  best epoch {result.best_epoch} of {result.epochs_run}{stopped}", highlight=False
    )
    table = Table(title="validation metrics at the best epoch")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        marker = " (monitored)" if name == result.monitor.removeprefix("val_") else ""
        table.add_row(f"{name}{marker}", f"{value:.4f}")
    show_table(table)
    console.print(f"  classifier: {result.best_checkpoint}", soft_wrap=True, highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]![/] {warning}", highlight=False)
