"""What a sweep remembers between runs: ``sweep_state.json`` and each finished entry's ``done.json``.

``sweep_state.json`` (written atomically by the sweep process after every change) records, per entry,
its checkpoint, kind, status (``pending``, ``running``, ``done``, ``failed``, ``interrupted``), the
one-line reason of a failure and timings. ``<entry>/done.json`` is written last, after training and
evaluation, so its presence (with ``results.json`` and both evaluations) means "finished": a rerun skips
the entry unless the split manifest, the checkpoint file, the entry's kind or the inner split changed.

``inner_split.csv`` (``sweep.select_on = "inner_val"``): the train split carved once into inner_train and
inner_val (``id``, ``group``, ``inner_split``); every entry fits on the first and picks its epoch on the
second. ``inner_split.json`` says how it was carved; the file's digest is in each entry's ``done.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from medctl.data.dataset import carve_inner_split
from medctl.io import write_json, write_text_atomic
from medctl.progress import log
from medctl.sweep.entries import INNER_SPLIT_FILE, SweepEntry

STATE_FILE = "sweep_state.json"
DONE_FILE = "done.json"
FINISHED_FILES = ("results.json", "checkpoints/best.ckpt", "eval_val/metrics.json", "eval_test/metrics.json")


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def checkpoint_stat(path: str) -> dict[str, int] | None:
    """Size and mtime of a checkpoint file (None for the random baseline or a missing file)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    stat = p.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class SweepState:
    """The sweep's own record; ``entries`` maps an entry name to its status dict."""

    path: Path
    split_manifest_hash: str
    mode: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, sweep_dir: Path, split_manifest_hash: str, mode: str) -> SweepState:
        """The previous state when there is one (its entries keep their statuses), else an empty one."""
        path = sweep_dir / STATE_FILE
        entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                entries = dict(json.loads(path.read_text()).get("entries", {}))
            except (json.JSONDecodeError, AttributeError):
                entries = {}  # a damaged record: the done markers still say what finished
        return cls(path, split_manifest_hash, mode, entries)

    def status(self, name: str) -> str:
        return str(self.entries.get(name, {}).get("status", "pending"))

    def mark(self, entry: SweepEntry, status: str, **fields: Any) -> None:
        record = self.entries.setdefault(entry.name, {})
        record.update(entry.to_dict(), status=status, updated=now(), **fields)
        if status in ("running", "done") and "reason" not in fields:
            record.pop("reason", None)
        self.save()

    def save(self) -> None:
        payload = {
            "split_manifest_hash": self.split_manifest_hash,
            "mode": self.mode,
            "updated": now(),
            "entries": self.entries,
        }
        write_json(self.path, payload)


def write_done(run_dir: Path, entry: SweepEntry, split_manifest_hash: str, **fields: Any) -> None:
    payload = {
        **entry.to_dict(),
        "checkpoint_stat": checkpoint_stat(entry.checkpoint),
        "split_manifest_hash": split_manifest_hash,
        "finished": now(),
        **fields,
    }
    write_json(run_dir / DONE_FILE, payload)


def finished(run_dir: Path, entry: SweepEntry, split_manifest_hash: str, inner_split: str = "") -> bool:
    """A done marker for this very entry (same kind, checkpoint file, split manifest and inner split digest,
    "" without one) and its files."""
    marker = run_dir / DONE_FILE
    if not marker.is_file() or not all((run_dir / name).is_file() for name in FINISHED_FILES):
        return False
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return (
        done.get("kind") == entry.kind
        and done.get("checkpoint") == entry.checkpoint
        and done.get("checkpoint_stat") == checkpoint_stat(entry.checkpoint)
        and done.get("split_manifest_hash") == split_manifest_hash
        and done.get("seed") == entry.seed
        and done.get("inner_split", "") == inner_split
    )


def freeze_inner_split(
    sweep_dir: Path, cache: Path, *, val_share: float, seed: int, split_manifest_hash: str
) -> str:
    """Carve the cache's train split into inner_train / inner_val (:func:`medctl.data.dataset.carve_inner_split`)
    into ``<sweep_dir>/inner_split.csv`` with its record ``inner_split.json``; returns the file's digest. The
    carving is deterministic, so a rerun on the same data and settings leaves the same file."""
    frame = carve_inner_split(cache, val_share, seed)
    counts = frame["inner_split"].value_counts()
    text = frame.to_csv(index=False)
    path = sweep_dir / INNER_SPLIT_FILE
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    digest = inner_split_digest(path)
    record = {
        "file": INNER_SPLIT_FILE,
        "digest": digest,
        "val_share": val_share,
        "seed": seed,
        "split_manifest_hash": split_manifest_hash,
        "n_inner_train": int(counts.get("inner_train", 0)),
        "n_inner_val": int(counts.get("inner_val", 0)),
        "grouped_by": "the manifest's group (data.group_column; the id when unset)",
    }
    write_json(sweep_dir / "inner_split.json", record)
    log(
        f"sweep: inner split {path}: {record['n_inner_train']} training samples fit, {record['n_inner_val']} pick "
        "the epoch; val and test select nothing"
    )
    return digest


def inner_split_digest(path: str | Path) -> str:
    """The digest of an inner split file ("" for none)."""
    file = Path(path) if path else None
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file is not None and file.is_file() else ""
