"""Which participants an encoder was pretrained on, kept as hashes: the pretraining-leakage audit.

An encoder pretrained on participants that later sit in a downstream val or test split has seen those
volumes, so its probe scores are optimistic. ``medctl pretrain`` stores in ``encoder.ckpt`` a
``provenance`` block (plain values, so ``torch.load(weights_only=True)`` reads it)::

    {"format": 1, "id_hash": "sha256[:16]", "ids": [str] (sorted hashes), "n_ids": int,
     "pool_digest": str, "cache_fingerprint": str, "splits": ["train"], "subset": str, "id_column": str}

An id's hash is the first 16 hex digits of the SHA-256 of its string (UTF-8), with no salt: anyone with
a downstream table can test its ids against the pool without the raw ids being stored. ``finetune``,
``sweep`` and ``check data`` count the downstream val/test ids among them; a foreign checkpoint has no
such block, and its pool is "unknown" unless ``sweep.pretrain_ids`` lists it (one raw id per line).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medctl.errors import DataError

FORMAT = 1
ID_HASH = "sha256[:16]"
AUDITED = ("val", "test")  # pretraining on downstream train participants is not leakage


def hash_id(id_: str) -> str:
    """The stored form of a participant id: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(str(id_).encode("utf-8")).hexdigest()[:16]


def pool_provenance(
    ids: Iterable[str],
    *,
    cache_fingerprint: str,
    id_column: str,
    splits: Sequence[str] = ("train",),
    subset: str = "",
) -> dict[str, Any]:
    """The ``provenance`` block of an encoder pretrained on ``ids`` (raw ids in, hashes out)."""
    hashes = sorted({hash_id(i) for i in ids})
    return {
        "format": FORMAT,
        "id_hash": ID_HASH,
        "ids": hashes,
        "n_ids": len(hashes),
        "pool_digest": hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16],
        "cache_fingerprint": cache_fingerprint,
        "splits": list(splits),
        "subset": subset,
        "id_column": id_column,
    }


@dataclass(frozen=True)
class PretrainPool:
    """The hashed ids an encoder was pretrained on and where that list came from."""

    hashes: frozenset[str]
    source: str  # e.g. "encoder.ckpt provenance" or "sweep.pretrain_ids (ids.txt)"


def pool_from_provenance(block: Any, source: str) -> PretrainPool | None:
    """The pool of a checkpoint's ``provenance`` block; None when there is none this version can read."""
    if (
        not isinstance(block, Mapping)
        or block.get("id_hash") != ID_HASH
        or not isinstance(block.get("ids"), list)
    ):
        return None
    return PretrainPool(frozenset(str(h) for h in block["ids"]), source)


def read_pretrain_ids(path: str | Path) -> PretrainPool:
    """``sweep.pretrain_ids``: a text file of raw ids, one per line (blank lines and ``#`` comments skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f'sweep.pretrain_ids = {str(path)!r}: no such file; list the pretraining ids one per line, or set it to ""'
        )
    ids = [
        line.strip()
        for line in file.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not ids:
        raise DataError(f"sweep.pretrain_ids = {str(path)!r}: the file lists no ids; one id per line")
    return PretrainPool(frozenset(hash_id(i) for i in ids), f"sweep.pretrain_ids ({file.name})")


# ------------------------------------------------------------------------------------------ overlap
@dataclass
class Overlap:
    """How many downstream participants per split were in an encoder's pretraining pool.

    ``status``: "known" (counted), "unknown" (a checkpoint without provenance and no sweep.pretrain_ids)
    or "none" (a random initialisation: nothing was pretrained).
    """

    status: str
    source: str = ""
    pool_size: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # split -> downstream ids found in the pool
    totals: dict[str, int] = field(default_factory=dict)  # split -> downstream ids

    @property
    def leaked(self) -> int:
        """Val and test participants in the pool."""
        return sum(self.counts.get(s, 0) for s in AUDITED)

    def cell(self) -> str:
        """The leaderboard's ``pretrain_overlap`` cell: "2 val / 1 test", "0", "unknown" or "none"."""
        if self.status != "known":
            return self.status
        return " / ".join(f"{self.counts.get(s, 0)} {s}" for s in AUDITED) if self.leaked else "0"

    def describe(self, what: str) -> str:
        """One line for a log or a check row, naming ``what`` (a checkpoint)."""
        if self.status == "none":
            return f"{what}: random initialisation, no pretraining pool"
        if self.status == "unknown":
            return (
                f"{what}: pretraining pool unknown (no medctl provenance in the checkpoint); list its pretraining "
                "ids in sweep.pretrain_ids to count val/test participants among them"
            )
        found = ", ".join(f"{self.counts.get(s, 0)} of {self.totals.get(s, 0)} {s}" for s in AUDITED)
        verdict = (
            "participants were in its pretraining pool"
            if self.leaked
            else "participants in its pretraining pool"
        )
        return f"{what}: {found} {verdict} ({self.pool_size} ids, from {self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "source": self.source,
            "pool_size": self.pool_size,
            "val": self.counts.get("val") if self.status == "known" else None,
            "test": self.counts.get("test") if self.status == "known" else None,
            "train": self.counts.get("train") if self.status == "known" else None,
            "n_val": self.totals.get("val", 0),
            "n_test": self.totals.get("test", 0),
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Overlap:
        """Back from :meth:`to_dict` (a run's ``results.json``)."""
        splits = [s for s in ("train", *AUDITED) if value.get(s) is not None]
        return cls(
            str(value.get("status", "unknown")),
            str(value.get("source", "")),
            int(value.get("pool_size") or 0),
            {s: int(value[s]) for s in splits},
            {s: int(value.get(f"n_{s}") or 0) for s in AUDITED},
        )


def count_overlap(pool: PretrainPool | None, ids_by_split: Mapping[str, Sequence[str]]) -> Overlap:
    """How many ids of each split are in ``pool`` (status "unknown" without a pool)."""
    totals = {split: len(ids) for split, ids in ids_by_split.items()}
    if pool is None:
        return Overlap("unknown", totals=totals)
    counts = {split: sum(hash_id(i) in pool.hashes for i in ids) for split, ids in ids_by_split.items()}
    return Overlap("known", pool.source, len(pool.hashes), counts, totals)
