"""What a fine-tune writes: ``best.ckpt`` with ``val_preds.parquet`` at its best epoch, ``results.json``, the
curves, and the :class:`FinetuneResult` it returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from medctl.analysis.plots import plot_training_curves
from medctl.config import Config
from medctl.data.preprocess import missing_ids
from medctl.data.tables import TargetSpec
from medctl.finetune.metrics import Validation
from medctl.io import atomic_write
from medctl.models.architecture import describe_encoder
from medctl.models.checkpoints import classifier_payload, save_checkpoint
from medctl.models.encoders.base import Encoder
from medctl.runs import write_results_and_timing
from medctl.training.distributed import (
    unwrap,
)
from medctl.training.fit import FitResult
from medctl.training.predict import predictions_frame


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced; every path is inside ``run_dir``."""

    run_dir: Path
    best_checkpoint: Path  # checkpoints/best.ckpt, a self-contained classifier
    best_epoch: int | None  # 1-based
    monitor: str
    best_metric: float | None
    metrics: dict[str, float]  # validation metrics of the best epoch (without the val_ prefix)
    history: list[dict[str, float]]
    epochs_run: int
    stopped_early: bool
    wall_time_s: float
    mode: str  # "linear_probe" (the encoder never trains) or "finetune"
    feature_cache: bool  # True when the heads trained on cached embeddings
    cache_dir: Path
    data_fingerprint: str
    warnings: list[str] = field(default_factory=list)
    pretraining_overlap: dict[str, Any] = field(default_factory=dict)  # Overlap.to_dict() of model.checkpoint
    encoder: str = ""  # the registry name built (``model.encoder = "auto"`` resolved)
    architecture: str = ""  # one line: name, width, depth, heads, positions, channels
    grid: dict[str, Any] = field(default_factory=dict)  # train.grid: {"grid": every head, "selected": the winner}

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.json"


def finetune_result(
    fitted: FitResult,
    config: Config,
    *,
    run_dir: Path,
    mode: str,
    feature_cache: bool,
    cache: Path,
    data_fingerprint: str,
    warnings: list[str],
    overlap: dict[str, Any],
    encoder: Encoder,
    wall_time_s: float,
    grid: tuple[dict[str, float], dict[str, Any]] | None = None,
) -> FinetuneResult:
    """The run's :class:`FinetuneResult`: the best epoch's validation metrics and what identifies the run;
    with ``train.grid``, ``grid`` is the winner's metrics and what results.json records of the grid."""
    best_row = next((r for r in fitted.history if r["epoch"] == fitted.best_epoch), {})
    result = FinetuneResult(
        run_dir=run_dir,
        best_checkpoint=run_dir / "checkpoints" / "best.ckpt",
        best_epoch=fitted.best_epoch,
        monitor=config.train.monitor,
        best_metric=fitted.best_metric,
        metrics={k.removeprefix("val_"): v for k, v in best_row.items() if k.startswith("val_")},
        history=fitted.history,
        epochs_run=fitted.epochs_run,
        stopped_early=fitted.stopped_early,
        wall_time_s=wall_time_s,
        mode=mode,
        feature_cache=feature_cache,
        cache_dir=cache,
        data_fingerprint=data_fingerprint,
        warnings=warnings,
        pretraining_overlap=overlap,
        encoder=encoder.name,
        architecture=describe_encoder(encoder),
    )
    if grid is not None:
        result.metrics, result.grid = grid
    return result


@dataclass
class BestExport:
    """``fit``'s ``export_best``: ``checkpoints/best.ckpt`` (a self-contained classifier) and ``val_preds.parquet``."""

    classifier: nn.Module
    config: Config
    specs: Sequence[TargetSpec]
    preprocessing: Mapping[str, Any]
    mode: str
    run_dir: Path
    val_ids: Sequence[str]
    validation: Validation

    @property
    def model_info(self) -> dict[str, Any]:
        """The encoder's registry name and build arguments, and the head settings: what rebuilds the classifier."""
        encoder = unwrap(self.classifier).encoder
        return {"name": encoder.name, "args": encoder.build_args, "head": self.config.model.head.model_dump()}

    def __call__(self, epoch: int, record: dict[str, float]) -> None:
        val = {k.removeprefix("val_"): v for k, v in record.items() if k.startswith("val_")}
        payload = classifier_payload(
            unwrap(self.classifier).folded(),  # standardised inputs folded into plain heads
            model_info=self.model_info,
            targets=[s.to_dict() for s in self.specs],
            preprocessing=self.preprocessing,
            config_text=self.config.to_toml(),
            metrics={"epoch": record["epoch"], "monitor": self.config.train.monitor, "val": val, "mode": self.mode},
        )
        save_checkpoint(self.run_dir / "checkpoints" / "best.ckpt", payload)
        frame = predictions_frame(self.val_ids, self.validation.labels, self.validation.probs, self.specs)
        write_parquet_atomic(frame, self.run_dir / "val_preds.parquet")


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    with atomic_write(path, "wb") as fh:
        frame.to_parquet(fh, index=False)


def write_results(
    result: FinetuneResult, config: Config, preprocessing: Mapping[str, Any], specs: Sequence[TargetSpec]
) -> None:
    """``results.json``: best epoch and metrics, the history and what identifies the data; the wall time
    and throughput go to ``timing.json`` (:func:`medctl.runs.write_results_and_timing`)."""
    payload = {
        "mode": result.mode,
        "encoder": result.encoder or config.model.encoder,
        "architecture": result.architecture,
        "checkpoint": config.model.checkpoint,
        "feature_cache": result.feature_cache,
        "monitor": result.monitor,
        "selected_on": "inner_val" if config.train.inner_split else "val",  # the samples that picked the epoch
        "inner_split": config.train.inner_split,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "metrics": result.metrics,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "wall_time_s": round(result.wall_time_s, 3),
        "targets": [s.to_dict() for s in specs],
        "cache_dir": str(result.cache_dir),
        "data_fingerprint": result.data_fingerprint,
        "cache_fingerprint": preprocessing["cache_fingerprint"],
        "split_manifest_hash": preprocessing["split_manifest_hash"],
        "missing_ids": missing_ids(result.cache_dir),  # not fetched (storage outage; data.allow_incomplete)
        "best_checkpoint": str(result.best_checkpoint),
        "warnings": result.warnings,
        "pretraining_overlap": result.pretraining_overlap,
        "history": result.history,
        **result.grid,  # train.grid: every head (hyperparameters, best epoch, monitored value) and the selected one
    }
    write_results_and_timing(result.run_dir, payload)  # strict JSON: medctl.io's policy


def plot_curves(history: Sequence[Mapping[str, float]], specs: Sequence[TargetSpec], monitor: str, run_dir: Path) -> None:
    """``figures/training_curves.png``: the loss, balanced accuracy (with a classification target) and the monitor."""
    curves = ["loss", "balanced_accuracy"] if any(s.kind != "regression" for s in specs) else ["loss"]
    monitored = monitor.removeprefix("val_").removeprefix("train_")
    curves += [monitored] if monitored not in curves else []
    plot_training_curves(list(history), run_dir / "figures" / "training_curves.png", curves)
