"""`medctl list`: what is registered: encoders, pretraining methods, losses, attribution methods."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import typer
from rich.table import Table

from medctl.cli.common import handle_errors
from medctl.cli.output import print_json, show_table


class Listing(StrEnum):
    models = "models"
    methods = "methods"
    losses = "losses"
    attributions = "attributions"


def _models() -> list[dict[str, Any]]:
    from medctl.models.registry import describe_encoders  # torch and MONAI load only when listing

    return describe_encoders()


def _first_doc_line(obj: Any) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def _methods() -> list[dict[str, Any]]:
    from medctl.pretrain import METHODS

    return [{"name": name, "description": _first_doc_line(spec.module)} for name, spec in METHODS.items()]


def _losses() -> list[dict[str, Any]]:
    from medctl.training.losses import describe_losses

    return describe_losses()


def _attributions() -> list[dict[str, Any]]:
    from medctl.saliency.attribution import METHOD_ALIASES, METHODS

    short = {full: alias for alias, full in METHOD_ALIASES.items()}
    return [
        {"name": name + (f" ({short[name]})" if name in short else ""), "description": _first_doc_line(fn)}
        for name, fn in METHODS.items()
    ]


SOURCES: dict[Listing, Callable[[], list[dict[str, Any]]]] = {
    Listing.models: _models,
    Listing.methods: _methods,
    Listing.losses: _losses,
    Listing.attributions: _attributions,
}
COLUMNS: dict[Listing, list[str]] = {
    Listing.models: ["name", "family", "input", "size", "embed_dim", "params", "description"],
    Listing.methods: ["name", "description"],
    Listing.losses: ["name", "description"],
    Listing.attributions: ["name", "description"],
}


@handle_errors
def list_command(
    what: Listing = typer.Argument(Listing.models, help="What to list."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array of objects on stdout."),
) -> None:
    """List encoders (input kind, size, width, parameters), pretraining methods, losses or attribution methods.

    Examples: medctl list models | medctl list methods | medctl list losses | medctl list models --json
    """
    rows = SOURCES[what]()
    if as_json:
        print_json([{c: row[c] for c in COLUMNS[what]} | {"for_tests": bool(row.get("for_tests"))} for row in rows])
        return
    table = Table(title=f"medctl {what.value}")
    for column in COLUMNS[what]:
        table.add_column(column, justify="right" if column in {"embed_dim", "params"} else "left")
    for row in rows:
        cells = [f"{row[c] / 1e6:.2f}M" if c == "params" else str(row[c]) for c in COLUMNS[what]]
        if row.get("for_tests"):
            cells[0] += " (test)"
        table.add_row(*cells)
    show_table(table)
