"""`medctl check ...`: one look at what will go wrong before a long run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors, resolve_config
from medctl.runs import environment_info

app = typer.Typer(help="Check a config, the environment, a bucket, a dataset or a checkpoint.", no_args_is_help=True)


@app.command("config")
@handle_errors
def check_config(config: ConfigOption = None, overrides: OverridesArgument = None) -> None:
    """Validate a config: every problem at once; exit 0 when valid, 2 otherwise.

    Example: medctl check config -c config/finetune/linear_probe.toml
    """
    resolved = resolve_config(config, overrides)
    targets = ", ".join(t.name for t in resolved.data.targets) or "none"
    console.print(f"[green]✓[/] {config or 'defaults'} is valid (encoder {resolved.model.encoder}, targets {targets})")


@app.command("env")
@handle_errors
def check_env(root: Path = typer.Option(Path("runs"), help="Run root whose free disk is reported.")) -> None:
    """Versions, devices (CUDA / MPS / CPU, bf16) and free disk in the run root."""
    info = environment_info(root)
    table = Table(title="medctl environment", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)
