"""How results reach the user: tables whose names and numbers are never cut, JSON, and log lines.

Results go to stdout, progress and log lines to stderr, so ``medctl sweep > out.txt`` holds the
results alone. A table is printed three ways:

- on a terminal wide enough for it: rich's boxed table;
- on a terminal too narrow for it: one block per row, ``header: value`` lines, nothing cut;
- into a file, a pipe or a CI log (not a terminal): plain columns at their natural width, which any
  width of log viewer shows whole and ``grep``/``awk`` can read.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medctl.io import to_jsonable

console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[
    bool, typer.Option("--json", help="One JSON document on stdout instead of text (exit codes unchanged).")
]


def cell_text(cell: Any) -> str:
    """A table cell as plain text: rich ``Text`` and console markup (``[green]✓[/]``) unwrapped."""
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain


def table_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a rich table as plain strings."""
    headers = [cell_text(column.header) for column in table.columns]
    columns = [[cell_text(cell) for cell in column.cells] for column in table.columns]
    return headers, [list(row) for row in zip(*columns, strict=True)]


def plain_table(table: Table) -> str:
    """Aligned columns at their natural width, under the title; for files, pipes and logs."""
    headers, rows = table_rows(table)
    shown_headers = table.show_header and any(headers)
    widths = [max([len(h) if shown_headers else 0, *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    right = [column.justify == "right" for column in table.columns]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(padded).rstrip()

    out = [cell_text(table.title)] if table.title else []
    if shown_headers:
        out.append(line(headers))
    out += [line(row) for row in rows]
    return "\n".join(out)


def stacked_table(table: Table) -> str:
    """One block per row, ``header: value`` per line: a table too wide for the terminal, nothing cut."""
    headers, rows = table_rows(table)
    width = max((len(h) for h in headers), default=0)
    blocks = [cell_text(table.title)] if table.title else []
    for row in rows:
        lines = [f"  {h.rjust(width)}: {v}" if h else f"  {v}" for h, v in zip(headers, row, strict=True)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def natural_width(table: Table, to: Console) -> int:
    """The width ``table`` takes with no cell wrapped or cut."""
    return to.measure(table, options=to.options.update(max_width=1_000_000)).maximum


def show_table(table: Table, to: Console | None = None) -> None:
    """Print ``table`` so that every name and number stays whole, whatever the terminal (see module doc)."""
    to = to or console
    if not to.is_terminal:
        to.print(plain_table(table), markup=False, highlight=False, soft_wrap=True)
    elif natural_width(table, to) <= to.width:
        to.print(table)
    else:
        to.print(stacked_table(table), markup=False, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    """One JSON document on stdout (non-finite numbers as null), for ``--json``."""
    console.print(json.dumps(to_jsonable(value), indent=2), markup=False, highlight=False, soft_wrap=True)


class UserLineHandler(logging.Handler):
    """Log records as plain lines on stderr; only warnings and errors carry a level prefix."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # a malformed record must not kill the run it reports on
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
        elif record.levelno >= logging.WARNING:
            err_console.print(Text.assemble(("warning: ", "yellow"), message), highlight=False, soft_wrap=True)
        else:
            err_console.print(message, markup=False, highlight=False, soft_wrap=True)
