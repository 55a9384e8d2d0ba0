"""Metrics of a run: one JSON object per line in ``metrics.jsonl`` and tensorboard scalars in ``tb/``.

A ``metrics.jsonl`` row is flat: ``{"time": unix seconds, "phase": "train"|"val"|"train_step"|...,
"epoch": 1-based epoch, "step": optimizer steps done, <metric>: value, ...}``, so
``pandas.read_json(path, lines=True)`` gives a table. Tensorboard tags are ``<phase>/<metric>`` against
the optimizer step. Only rank 0 writes (``enabled``). A ``sink`` (an experiment tracker,
:mod:`medctl.tracking`) receives every row as it is written: the same phase, scalars and step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from medctl.io import dumps_json, write_text_atomic
from medctl.training.distributed import is_rank0


class ScalarSink(Protocol):
    """Where a row goes besides metrics.jsonl and tensorboard; it must never raise (it warns)."""

    def log_scalars(self, phase: str, scalars: Mapping[str, float], step: int) -> None: ...


class MetricsLogger:
    """Append rows to ``<run_dir>/metrics.jsonl`` and scalars to ``<run_dir>/tb/``; ``close()`` at the end."""

    def __init__(self, run_dir: str | Path, enabled: bool | None = None, sink: ScalarSink | None = None):
        self.run_dir = Path(run_dir)
        self.sink = sink
        self.path = self.run_dir / "metrics.jsonl"
        self.tb_dir = self.run_dir / "tb"
        self.enabled = is_rank0() if enabled is None else enabled
        self._writer: Any = None  # SummaryWriter, made on first use (importing tensorboard is slow)
        self._purge_step: int | None = None

    def log(self, phase: str, values: Mapping[str, float | torch.Tensor], *, epoch: int, step: int) -> None:
        if not self.enabled:
            return
        scalars = {name: _as_float(value) for name, value in values.items()}
        row = {
            "time": round(time.time(), 3),
            "phase": phase,
            "epoch": int(epoch),
            "step": int(step),
            **scalars,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(dumps_json(row, indent=None) + "\n")
        writer = self._tb()
        for name, value in scalars.items():
            if math.isfinite(value):
                writer.add_scalar(f"{phase}/{name}", value, step)
        if self.sink is not None:
            self.sink.log_scalars(phase, scalars, step)

    def rewind(self, *, epoch: int, step: int) -> None:
        """Forget what an interrupted run logged after its last checkpoint (before resuming there).

        Drops ``metrics.jsonl`` rows of epochs >= ``epoch`` and tensorboard events at steps >= ``step``.
        """
        if not self.enabled:
            return
        if self.path.exists():
            kept = [row for row in _parse_rows(self.path.read_text()) if row["epoch"] < epoch]
            write_text_atomic(self.path, "".join(dumps_json(row, indent=None) + "\n" for row in kept))
        self._purge_step = step
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tb(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer


def read_metrics(run_dir: str | Path, phase: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl`` (of one ``phase`` if given)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for row in _parse_rows(path.read_text()) if phase is None or row["phase"] == phase]


def _parse_rows(text: str) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a last line torn by a crash mid-write is not a row and is left out."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn write: the row was never complete
    return rows


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)
