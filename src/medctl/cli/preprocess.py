"""`medctl preprocess`: raw files + labels table -> the preprocessed cache."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors, resolve_config
from medctl.cli.output import show_table


@handle_errors
def preprocess_command(
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first bad file instead of skipping it.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, help="Worker processes (default data.preprocess.workers)."),
    ] = None,
) -> None:
    """Build the cache once: arrays, manifest.parquet, summary.json, data_errors.csv; reruns skip what is done.

    Example: medctl preprocess -c config/finetune/oct_vjepa2.toml --workers 8
    """
    from medctl.data.preprocess import preprocess  # torch and MONAI load only when this command runs

    result = preprocess(resolve_config(config, overrides, ["preprocess"]).data, strict=strict, workers=workers)
    console.print(f"[green]✓[/] cache {result.cache_dir}", soft_wrap=True, highlight=False)
    console.print(
        f"  {result.n_new} new, {result.n_cached} cached, {result.n_failed} failed", highlight=False
    )
    print_class_counts(result.summary["counts"])
    if result.incomplete:  # only with data.allow_incomplete = true; otherwise preprocess raised it
        console.print(f"[yellow]![/] {result.incomplete}", soft_wrap=True, highlight=False)
    if result.n_failed:
        errors = result.cache_dir / "data_errors.csv"
        console.print(
            f"[yellow]![/] {result.n_failed} sample(s) skipped: see {errors}", soft_wrap=True, highlight=False
        )


def print_class_counts(counts: dict[str, Any]) -> None:
    """Samples per split, and each target's class counts per split, as rich tables."""
    if not counts:
        return
    splits = ("train", "val", "test")
    sizes = Table(title="samples per split")
    for split in splits:
        sizes.add_column(split, justify="right")
    sizes.add_row(*[str(counts["splits"].get(s, 0)) for s in splits])
    show_table(sizes)
    for target, per_split in counts.get("classes", {}).items():
        table = Table(title=f"{target}: class counts per split")
        table.add_column("class")
        for split in splits:
            table.add_column(split, justify="right")
        classes = list(next(iter(per_split.values()), {}))
        for name in classes:
            table.add_row(name, *[str(per_split.get(s, {}).get(name, 0)) for s in splits])
        show_table(table)
