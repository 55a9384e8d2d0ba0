"""`medctl check ...`: one look at what will go wrong before a long run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors, resolve_config
from medctl.cli.output import JsonOption, print_json, show_table
from medctl.config import load_config
from medctl.errors import CheckpointError, UserError
from medctl.runs import dependency_versions, environment_info
from medctl.storage import redact_secrets

app = typer.Typer(help="Check a config, the environment, a bucket, a dataset or a checkpoint.", no_args_is_help=True)


@app.command("config")
@handle_errors
def check_config(config: ConfigOption = None, overrides: OverridesArgument = None, as_json: JsonOption = False) -> None:
    """Validate a config: every problem at once; exit 0 when valid, 2 otherwise.

    Beyond each key: registry names (encoder, method, loss, head, attribution) with the closest name,
    and the settings of every stage the config sets up ([pretrain], [model]/[train], [sweep],
    [saliency]) checked by building its modules on the meta device.

    Example: medctl check config -c config/finetune/linear_probe.toml
    """
    from medctl.preflight import registry_problems, stages_of, validate_config  # torch loads only here

    resolved = load_config(config, overrides or [], name_checks=registry_problems)
    stages = sorted(stages_of(resolved))
    validate_config(resolved, stages, str(config) if config else "config")
    if as_json:
        names = [t.name for t in resolved.data.targets]
        print_json({"valid": True, "config": config, "stages": stages, "encoder": resolved.model.encoder, "targets": names})
        return
    targets = ", ".join(t.name for t in resolved.data.targets) or "none"
    console.print(
        f"[green]✓[/] {config or 'defaults'} is valid for {', '.join(stages)} "
        f"(encoder {resolved.model.encoder}, targets {targets})",
        highlight=False,
    )


@app.command("env")
@handle_errors
def check_env(
    root: Path = typer.Option(Path("runs"), help="Run root whose free disk is reported."), as_json: JsonOption = False
) -> None:
    """Versions, devices (CUDA / MPS / CPU, bf16), free disk in the run root, and every dependency against
    the lower bound pyproject.toml declares; exit 2 when one is missing or older."""
    info = environment_info(root)
    dependencies = dependency_versions()
    if as_json:
        print_json({"environment": info, "dependencies": [dataclasses.asdict(d) | {"ok": d.ok} for d in dependencies]})
        if not all(d.ok for d in dependencies):
            raise typer.Exit(2)
        return
    table = Table(title="medctl environment", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    show_table(table)
    listed = ", ".join(f"{d.name} {d.installed or 'missing'} ({d.bound})" for d in dependencies)
    stale = [d for d in dependencies if not d.ok]
    if stale:
        console.print(f"[red]✗[/] dependencies: {listed}", highlight=False, soft_wrap=True)
        shown = ", ".join(f"{d.name} {d.installed or 'not installed'} (needs {d.bound})" for d in stale)
        raise UserError(f"{shown}; run `uv sync` (or pip install -U medctl) to get the declared versions")
    console.print(
        f"[green]✓[/] dependencies: all {len(dependencies)} meet the lower bounds in pyproject.toml: {listed}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("checkpoint")
@handle_errors
def check_checkpoint_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint file (.pt, .pth, .ckpt) to read and load into model.encoder."),
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    as_json: JsonOption = False,
) -> None:
    """The encoder a checkpoint holds (family, size, heads, positions, entry, prefix, channels), its load into
    model.encoder ("auto": that one): keys loaded, missing, mis-shaped; one forward pass.

    Example: medctl check checkpoint -c my.toml --ckpt ckpts/best_checkpoint_multi_domain.pt
    """
    from medctl.data.readers import describe_geometry
    from medctl.models.checks import check_checkpoint  # torch and MONAI load only when this command runs

    resolved = resolve_config(config, overrides)
    report = check_checkpoint(ckpt, resolved.model, resolved.data.preprocess.spatial_size, resolved.run.device)
    if as_json:
        print_json(dataclasses.asdict(report) | {"ok": report.ok})
        if report.refused:
            raise typer.Exit(2)
        return
    console.print(f"[bold]{report.path}[/] into [bold]{report.description}[/] ({report.parameters:,} parameters)", highlight=False)
    for line in report.architecture.lines() if report.architecture else []:
        console.print(f"  {line}", highlight=False, markup=False)
    for line in report.load.lines():
        console.print(f"  {line}", highlight=False, markup=False)
    for note in report.notes:
        console.print(f"  [yellow]note:[/] {note}", highlight=False)
    if report.refused:
        raise CheckpointError(report.refused)
    console.print(
        f"[green]✓[/] loaded {report.load.share()}; input "
        f"(B={report.input_shape[0]}, {describe_geometry(report.input_shape[1:]).removeprefix('shape (')} -> "
        f"features {list(report.feature_shape)}, embedding {list(report.embedding_shape)} "
        f"in {report.seconds * 1000:.0f} ms on {report.device}",
        highlight=False,
    )


@app.command("bucket")
@handle_errors
def check_bucket_command(
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    ids: int = typer.Option(5, "--ids", min=1, help="How many sample ids to resolve to keys."),
    as_json: JsonOption = False,
) -> None:
    """Endpoint, credentials (never shown), listing, keys for N ids, one volume read; exit 2 on a ✗.

    Example: medctl check bucket -c my.toml --ids 5
    """
    from medctl.data.checks import check_bucket  # pandas, s3fs and the readers load only when this runs

    rows = check_bucket(resolve_config(config, overrides).data, n_ids=ids)
    _print_rows(rows, as_json)
    if not all(row.ok for row in rows):
        raise typer.Exit(2)


@app.command("data")
@handle_errors
def check_data_command(
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    reads: int = typer.Option(50, "--reads", min=0, help="Headers to read, spread over the table."),
    as_json: JsonOption = False,
) -> None:
    """Columns, class values, duplicate ids, splits and leakage, missing/unreadable files, class counts, and
    how many val/test participants each configured checkpoint was pretrained on.

    Example: medctl check data -c my.toml
    """
    from medctl.cli.preprocess import print_class_counts
    from medctl.data.checks import check_data
    from medctl.finetune.leakage import config_pools

    resolved = resolve_config(config, overrides)
    report = check_data(resolved.data, max_reads=reads, pools=config_pools(resolved))
    if as_json:
        warnings = [redact_secrets(w) for w in report.warnings]
        _print_rows(report.rows, as_json, counts=report.counts, warnings=warnings, n_samples=report.n_samples)
        if not report.ok:
            raise typer.Exit(2)
        return
    _print_rows(report.rows)
    print_class_counts(report.counts)
    for warning in report.warnings:
        console.print("[yellow]warning:[/] ", end="", highlight=False)
        console.print(redact_secrets(warning), highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(2)


def _print_rows(rows, as_json: bool = False, **extra) -> None:
    """One ✓/✗ line per check; with ``as_json`` one document: ``ok``, ``rows`` and ``extra``."""
    if as_json:
        listed = [{"name": r.name, "ok": r.ok, "detail": redact_secrets(r.detail)} for r in rows]
        print_json({"ok": all(r.ok for r in rows), "rows": listed, **extra})
        return
    for row in rows:
        mark = "[green]✓[/]" if row.ok else "[red]✗[/]"
        console.print(f"{mark} [bold]{row.name}[/]: ", end="", highlight=False)
        console.print(redact_secrets(row.detail), highlight=False, markup=False, soft_wrap=True)
