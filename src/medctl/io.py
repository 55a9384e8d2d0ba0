"""The one way medctl writes a file, and the one JSON policy.

Atomic write contract (:func:`atomic_write`), used for every file a run leaves behind:
1. the bytes go to ``.<name>.tmp<pid>`` in the target's own folder (same filesystem, so step 3 is atomic);
2. the temp file is flushed and fsynced;
3. ``os.replace`` puts it in place: a reader sees the old file or the new one, never half of one;
4. the folder is fsynced, so the rename itself survives a power cut;
5. on any failure the temp file is removed and the old file is left untouched.
A ``kill -9`` between 1 and 3 leaves a temp file behind; :func:`remove_stale_temps` clears them.

JSON policy (:func:`to_jsonable`): numpy scalars and arrays become Python values, tuples lists, paths
strings, and non-finite floats ``null`` (JSON has no NaN; ``json.dumps`` would write invalid ``NaN``).
The same values in text go through :func:`format_number` (one missing-value mark, :data:`MISSING`), and
every report's Markdown table through :func:`markdown_table` (one escaping rule, :func:`markdown_cell`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np

TEMP_MARK = ".tmp"


def temp_path(path: Path) -> Path:
    """Where :func:`atomic_write` puts the bytes before they replace ``path``."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path`` (see the module contract)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(payload)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temp files that a killed write left in ``folder`` (not recursive); returns what went."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in folder.glob(f".*{TEMP_MARK}*"):
        stem, _, pid = candidate.name.rpartition(TEMP_MARK)
        # our own pid: leftovers of an earlier, failed write of this process
        if stem and pid.isdigit() and candidate.is_file() and (int(pid) == os.getpid() or not process_alive(int(pid))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def to_jsonable(value: Any) -> Any:
    """Plain JSON values under the module's policy (non-finite floats become ``None``)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, list | tuple | np.ndarray):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


MISSING = "—"  # how every report shows a value that is not there (None, NaN, inf, text where a number goes)


def format_number(value: Any, digits: int = 3) -> str:
    """A number for a table or a report line: ``digits`` decimals; :data:`MISSING` for None, NaN, inf or text."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return MISSING
    return f"{value:.{digits}f}" if math.isfinite(value) else MISSING


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell: ``|`` escaped, line breaks as spaces (a row is one line)."""
    return str(value).replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A GFM pipe table as lines: the header, the alignment row, one line per row, every cell through
    :func:`markdown_cell` (format numbers with :func:`format_number` first). ``align`` has one letter per
    column, ``l`` or ``r`` (default: all left)."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"markdown_table: {len(header)} columns but alignment {align!r}")

    def line(cells: Sequence[Any]) -> str:
        return "|" + "".join(f" {text} |" if text else " |" for text in map(markdown_cell, cells))

    rules = ["---:" if a == "r" else "---" for a in align]
    return [line(header), "| " + " | ".join(rules) + " |", *(line(row) for row in rows)]


def dumps_json(value: Any, *, indent: int | None = 2) -> str:
    """``value`` as strict JSON text (``allow_nan=False`` holds the policy)."""
    return json.dumps(to_jsonable(value), indent=indent, allow_nan=False)


def write_json(path: str | Path, value: Any) -> None:
    """``value`` as strict JSON, written atomically, with a trailing newline."""
    write_text_atomic(path, dumps_json(value) + "\n")
