"""``journal.jsonl``: while a run is under way, one line per finished sample, fsync'd as it lands. A run killed
with ``kill -9`` leaves it behind, and the next run resumes from it instead of redoing the work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medctl.data.cache.sample import SampleOutcome
from medctl.io import dumps_json

JOURNAL = "journal.jsonl"


def append_journal(fh, outcome: SampleOutcome, fingerprint: str) -> None:
    """Append one finished sample (its arrays are already in place) and fsync: crash-consistent."""
    record = {
        "fingerprint": fingerprint,
        **{k: getattr(outcome, k) for k in ("id", "rows", "stage", "error", "key")},
    }
    fh.write(dumps_json(record, indent=None) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def read_journal(path: Path, cache: Path) -> dict[str, tuple[str, SampleOutcome]]:
    """An interrupted run's finished samples: source id -> (fingerprint, outcome). A torn last line
    (the kill came mid-write) and samples whose arrays are gone are left out, so they run again."""
    if not path.is_file():
        return {}
    found: dict[str, tuple[str, SampleOutcome]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        outcome = SampleOutcome(record["id"], record["rows"], record["stage"], record["error"], record["key"])
        if outcome.ok and not arrays_present(cache, outcome.rows):
            continue
        found[outcome.id] = (record["fingerprint"], outcome)
    return found


def arrays_present(cache: Path, rows: list[dict[str, Any]]) -> bool:
    present = all((cache / "images" / f"{r['id']}.npy").is_file() for r in rows)
    return present and all((cache / "masks" / f"{r['id']}.npy").is_file() for r in rows if r["has_mask"])
