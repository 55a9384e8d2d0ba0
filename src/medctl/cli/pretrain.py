"""`medctl pretrain`: self-supervised pretraining (byol, mim_contrastive, jepa) -> checkpoints/encoder.ckpt."""

from __future__ import annotations

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
def pretrain_command(
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    resume: ResumeOption = False,
    extend: ExtendOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Pretrain an encoder without labels; finetune takes runs/<name>/checkpoints/encoder.ckpt directly.

    A run.name that already holds a run is refused: --resume continues it (with the same settings;
    --resume --extend pretrain.epochs=N trains a finished run on to N epochs), --overwrite replaces it.

    Example: medctl pretrain -c config/pretrain/byol.toml pretrain.epochs=20 run.name=byol_short
    """
    from medctl.pretrain.run import run_pretrain  # torch loads only when this command runs

    result = run_pretrain(
        resolve_config(config, overrides, ["pretrain"]), command=command_line(), resume=resume, overwrite=overwrite, extend=extend
    )
    console.print(f"[green]✓[/] run {result.run_dir}", soft_wrap=True, highlight=False)
    table = Table(title="pretraining")
    for column in ("epochs", "final loss", "k-NN accuracy", "collapse check", "samples/s", "encoder.ckpt"):
        table.add_column(column, justify="left" if column == "encoder.ckpt" else "right")
    knn = "-" if result.knn_accuracy is None else f"{result.knn_accuracy:.3f}"
    spread, failed = result.monitoring.get("collapse_spread_ratio"), result.monitoring.get("collapse_failed")
    shrunk = result.monitoring.get("collapse_shrunk")
    outcome = "FAILED" if failed else ("shrunk" if shrunk else "ok")
    rank = result.monitoring.get("collapse_rank_ratio")
    rank_text = "" if rank is None else f", rank {rank:.2f}x"
    verdict = "-" if spread is None else f"spread {spread:.2f}x untrained{rank_text}, {outcome}"
    table.add_row(
        str(result.epochs_run),
        f"{result.final_loss:.4f}",
        knn,
        verdict,
        f"{result.samples_per_s:.1f}",
        str(result.encoder_checkpoint),
    )
    show_table(table)
