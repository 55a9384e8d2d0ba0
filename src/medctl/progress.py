"""Progress bars on stderr with rate and ETA; silent when MEDCTL_NO_PROGRESS=1 or stderr is not a terminal.

Library code reports progress through :func:`progress_bar` and :func:`log`; it never prints directly,
so tests and ``torchrun`` workers other than rank 0 stay quiet.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger("medctl")


def progress_enabled() -> bool:
    if os.environ.get("MEDCTL_NO_PROGRESS", "") in {"1", "true"}:
        return False
    return int(os.environ.get("RANK", "0")) == 0 and sys.stderr.isatty()


class _Bar:
    """Handle returned by :func:`progress_bar`: ``advance(n, **fields)`` and ``update(**fields)``."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, **fields: object) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def update(self, **fields: object) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(description: str, total: float | None) -> Iterator[_Bar]:
    """A rich bar with count, rate and ETA; ``info`` is a free text field (loss, samples/s) at the end."""
    if not progress_enabled():
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, info="")
        yield _Bar(progress, task)


def log(message: str) -> None:
    """A line for the user (shown by the CLI through the ``medctl`` logger)."""
    logger.info(message)
