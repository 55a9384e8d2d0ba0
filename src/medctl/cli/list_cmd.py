"""`medctl list`: what is registered (encoders now; methods, losses and attributions join as their
modules land: add a member to `Listing` and a row source to `SOURCES`)."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import typer
from rich.table import Table

from medctl.cli.common import console, handle_errors


class Listing(StrEnum):
    models = "models"


def _models() -> list[dict[str, Any]]:
    from medctl.models.registry import describe_encoders  # torch and MONAI load only when listing

    return describe_encoders()


SOURCES: dict[Listing, Callable[[], list[dict[str, Any]]]] = {Listing.models: _models}
COLUMNS: dict[Listing, list[str]] = {
    Listing.models: ["name", "family", "input", "size", "embed_dim", "params", "description"],
}


@handle_errors
def list_command(what: Listing = typer.Argument(Listing.models, help="What to list.")) -> None:
    """List registered encoders with their input kind, input size, embedding width and parameter count.

    Example: medctl list models
    """
    rows = SOURCES[what]()
    table = Table(title=f"medctl {what.value}")
    for column in COLUMNS[what]:
        table.add_column(column, justify="right" if column in {"embed_dim", "params"} else "left")
    for row in rows:
        cells = [f"{row[c] / 1e6:.2f}M" if c == "params" else str(row[c]) for c in COLUMNS[what]]
        if row.get("for_tests"):
            cells[0] += " (test)"
        table.add_row(*cells)
    console.print(table)
