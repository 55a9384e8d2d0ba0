"""``medctl finetune``: a linear probe or a fine-tune of a pretrained (or random) encoder, one head per target.

The recipe, top to bottom:

1. data: preprocess (or reuse) the cache; targets, sizes and class counts come from it; splits are checked
   (empty validation split, classes with no training sample) before anything is built;
2. the run directory (``config.toml``, ``env.json``, ``class_to_idx.json``);
3. the model: the encoder from the registry at the cache's size and channels, ``model.checkpoint`` loaded
   into it (its load report logged), one head per target;
4. how the encoder is used, one builder per mode in :mod:`medctl.finetune.modes`, each giving ``fit`` the
   same :class:`~medctl.finetune.modes.Mode` (the module it trains, the loader and step, the validation logits):

   - **linear probe with cached features** (encoder frozen throughout, ``train.feature_cache`` on, no
     augmentation): each split's embeddings are computed once and cached (:mod:`medctl.finetune.features`),
     or, for an attentive head, every token as a float16 memory map (:mod:`medctl.finetune.tokens`) when
     they fit ``train.feature_cache_max_gb``; the heads train on those with the same loop;
   - otherwise the encoder runs every step: an augmented probe (frozen encoder, ``[train.augment]``) or a
     fine-tune. Epochs are 1-based: ``model.unfreeze_at_epoch = k`` keeps the encoder frozen (in eval
     mode, no gradients) in epochs ``1 .. k-1`` and trains it from epoch ``k`` on, with its own learning
     rate ``train.lr_encoder`` (the heads use ``train.lr_head``); ``0`` or ``1`` train it from the first
     epoch, ``-1`` never unfreezes; ``model.freeze_encoder = false`` trains it from the first epoch;

   with ``train.grid`` (:mod:`medctl.finetune.grid`), a probe trains one head per (lr_head, weight_decay)
   on the same inputs, stacked, and keeps the best on the selection split;

5. losses per target from the training class counts (:mod:`medctl.training.losses`), summed with
   ``data.targets[].weight``; AdamW, cosine schedule with warmup, ``train.precision``;
6. :func:`medctl.training.fit.fit`: validation every epoch, early stopping on ``train.monitor``, the best
   epoch exported as a self-contained classifier (``checkpoints/best.ckpt``) with ``val_preds.parquet``;
   ``last.ckpt`` also holds learned task weights (``train.task_weights = "uncertainty"``), so ``--resume``
   goes on with them;
7. ``results.json`` and ``figures/training_curves.png``.
"""

from __future__ import annotations

import difflib
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medctl.config import Config, DataConfig, ModelConfig, TrainConfig
from medctl.data.dataset import (
    CacheDataset,
    read_inner_split,
    read_summary,
    split_manifest_hash,
    target_specs,
)
from medctl.data.preprocess import missing_ids, preprocess
from medctl.data.tables import TargetSpec
from medctl.errors import ConfigError, DataError
from medctl.evaluation.bootstrap import headline_metrics
from medctl.evaluation.metrics import class_probs
from medctl.evaluation.plots import plot_training_curves
from medctl.evaluation.regression import REGRESSION_HEADLINE
from medctl.finetune.augment import ImageAugment, build_augment
from medctl.finetune.features import data_fingerprint
from medctl.finetune.grid import build_grid, check_grid, grid_points
from medctl.finetune.leakage import audit_checkpoint
from medctl.finetune.modes import ModeInputs, build_mode
from medctl.io import atomic_write, write_json
from medctl.models.architecture import choose_encoder, describe_encoder, pretrained_encoder
from medctl.models.checkpoints import classifier_payload, save_checkpoint
from medctl.models.classifier import build_classifier
from medctl.models.encoders.base import Encoder
from medctl.progress import log
from medctl.runs import check_resume_settings, claim_run_dir, create_run_dir, write_results_and_timing
from medctl.tracking import connect
from medctl.training.distributed import (
    barrier,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    is_rank0,
    rank0_value,
    unwrap,
    wrap_ddp,
)
from medctl.training.fit import FitResult, fit
from medctl.training.losses import LossSettings, MultiTargetLoss, build_target_loss, label_counts
from medctl.training.multitask import RegressionLoss, UncertaintyWeightedLoss
from medctl.training.optim import adamw_with_cosine, param_groups_with_decay
from medctl.training.precision import resolve_device, set_threads
from medctl.training.predict import labels_of, predictions_frame, probabilities
from medctl.training.seed import set_seed

VAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss")
GEOMETRY_CONVENTION = (
    "the cache manifest keeps each sample's source geometry (orig_shape, spacing, origin, direction row-major) "
    "and cache_affine (cached voxel index -> LPS world, row-major 4x4) to map results back onto the source scan"
)


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


def run_finetune(
    config: Config,
    *,
    command: str = "",
    resume: bool = False,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    extend: bool = False,
) -> FinetuneResult:
    """Train a classifier as ``config`` says (see the module docstring); ``resume`` continues ``last.ckpt``
    with the run's own settings (``extend``: to a larger ``train.epochs``); ``overwrite`` replaces an
    earlier run in the folder, which is otherwise refused.

    ``run_dir`` defaults to ``<run.root>/<run.name>``. Under torchrun every rank calls this; rank 0 writes.
    """
    joined = not is_distributed() and init_distributed()
    try:
        return _finetune(
            config, command=command, resume=resume, run_dir=run_dir, overwrite=overwrite, extend=extend
        )
    finally:
        if joined:
            cleanup_distributed()


def _finetune(
    config: Config, *, command: str, resume: bool, run_dir: str | Path | None, overwrite: bool, extend: bool
) -> FinetuneResult:
    start = time.perf_counter()
    tracker = connect(config.tracking, kind="finetune")  # a tracking server that does not answer stops us here
    set_threads(config.run.threads, config.data.num_workers)
    train, model_cfg = config.train, config.model
    first_trainable = encoder_trainable_from(model_cfg, train.epochs)
    refuse_before_data(config, run_dir, resume, overwrite=overwrite, extend=extend)

    # 1. data: the cache, its targets and sizes; splits that cannot train a classifier stop here
    cache = rank0_value(lambda: preprocess(config.data).cache_dir)  # a rerun decodes nothing
    summary = read_summary(cache)
    specs = target_specs(cache)
    warnings = check_splits(summary, specs, config.data, cache)
    check_monitor(train.monitor, specs)
    spatial_size = cached_spatial_size(summary, cache)
    augment = build_augment(train.augment, spatial_size, config.run.seed)
    use_feature_cache = wants_feature_cache(first_trainable, train, model_cfg, augment)
    data_print = data_fingerprint(cache)
    overlap = audit_checkpoint(model_cfg.checkpoint, config.sweep.pretrain_ids, cache)
    if overlap.leaked:
        warnings.append(overlap.describe(f"pretraining leakage: {model_cfg.checkpoint}"))

    # 2. the run directory
    run_dir = prepare_run_dir(config, command, run_dir, resume, overwrite=overwrite, extend=extend)
    tracker.begin(run_dir, resume=resume)
    if is_rank0():
        class_to_idx = {s.name: {c: i for i, c in enumerate(s.classes)} for s in specs}
        write_json(run_dir / "class_to_idx.json", class_to_idx)

    # 3. the model: seeded encoder with the pretrained weights, one head per target
    set_seed(config.run.seed, config.run.deterministic)
    device = resolve_device(config.run.device)
    encoder = build_pretrained_encoder(model_cfg, summary, spatial_size)
    classifier = build_classifier(
        encoder, specs, kind=model_cfg.head.kind, hidden=model_cfg.head.hidden, dropout=model_cfg.head.dropout
    ).to(device)

    # 4. the data and the losses; regression heads predict in the target's units
    names = [s.name for s in specs]
    train_set, val_set = training_sets(cache, names, augment, train.inner_split)
    scales = regression_scales(specs, config.data, train_set)
    for name, (mean, std) in scales.items():
        classifier.heads[name].set_scale(mean, std)
    loss_fn = build_loss(train, config.data, specs, train_set, scales).to(device)

    # 5. the mode: cached embeddings, cached tokens, or the encoder every step (the global RNG is left alone)
    inputs = ModeInputs(
        classifier=classifier, names=names, train_set=train_set, val_set=val_set, loss_fn=loss_fn,
        batch_size=config.data.batch_size, num_workers=config.data.num_workers, seed=config.run.seed,
        drop_last=needs_drop_last(first_trainable, len(train_set), config.data.batch_size), device=device,
        precision=train.precision,
    )  # fmt: skip
    mode = build_mode(
        inputs, feature_cache=use_feature_cache, encoder=encoder, model=model_cfg, train=train,
        in_channels=int(summary["in_channels"]), spatial_size=spatial_size, data_print=data_print,
        standardize=standardizes_inputs(model_cfg, first_trainable),
    )  # fmt: skip
    grid = None  # train.grid: copies of the heads stacked, one per (lr_head, weight_decay), on the same batches
    if train.grid.enabled:
        check_grid(train, first_trainable, loss_fn)
        grid = build_grid(mode, inputs, grid_points(train), train.monitor, train.patience)
    trained = grid.mode if grid else mode
    model = wrap_for_fit(trained.module, classifier.encoder, first_trainable)

    # 6. optimizer over the heads (lr_head) and, when it ever trains, the encoder (lr_encoder); a grid's
    #    heads each at their own lr and weight decay, each clipped on its own
    steps = len(mode.train_loader)
    optimizer, scheduler = (
        grid.optimization(train, steps) if grid else build_optimization(classifier, loss_fn, train, first_trainable, steps)
    )
    kind = "linear_probe" if first_trainable is None else "finetune"
    log(describe_run(kind, encoder, len(train_set), len(val_set), mode.feature_cache, first_trainable))

    # 7. the loop: validation every epoch, the best epoch exported as a classifier with its predictions
    preprocessing = preprocessing_info(summary, spatial_size, data_print, cache)
    validate = Validation.of(val_set, specs, mode.val_logits, loss_fn, device)
    model_info = {"name": encoder.name, "args": encoder.build_args, "head": model_cfg.head.model_dump()}
    export = BestExport(classifier, model_info, config, specs, preprocessing, kind, run_dir, val_set.ids, validate)
    fitted = fit(
        model=model,
        train_step=trained.train_step,
        train_loader=trained.train_loader,
        optimizer=optimizer,
        scheduler=scheduler,
        epochs=train.epochs,
        run_dir=run_dir,
        device=device,
        precision=train.precision,
        grad_clip=0.0 if grid else train.grad_clip,
        evaluate=grid.validation(validate, validation_metrics) if grid else validate,
        monitor=None if grid else train.monitor,  # a grid stops and selects each head on its own
        patience=train.patience,
        export_best=None if grid else export,
        extra_modules=learned_loss_state(loss_fn) | ({"grid": grid.selection} if grid else {}),
        resume=resume,
        start_epoch_hook=partial(start_epoch, classifier.encoder, first_trainable, train.lr_encoder, augment),
        log_every=train.log_every,
        extend=extend,
        sink=tracker,
        early_stop_when=grid.selection.all_stopped if grid else None,
    )
    selected: dict[str, Any] = {}
    if grid:  # the winner's best epoch into the classifier's heads, exported as a single head's would be
        fitted, selected = grid.select(fitted, classifier.heads)
        winner_metrics = validate(fitted.best_epoch - 1)
        if is_rank0():
            export(fitted.best_epoch - 1, {"epoch": fitted.best_epoch, **{f"val_{k}": v for k, v in winner_metrics.items()}})

    # 8. results
    result = finetune_result(
        fitted, config, run_dir=run_dir, mode=kind, feature_cache=bool(mode.feature_cache), cache=cache,
        data_print=data_print, warnings=warnings, overlap=overlap.to_dict(), encoder=encoder,
        wall_time_s=time.perf_counter() - start,
    )  # fmt: skip
    if grid:
        result.metrics, result.grid = winner_metrics, selected
    if is_rank0():
        write_results(result, config, preprocessing, specs)
        plot_curves(fitted.history, specs, train.monitor, run_dir)
        tracker.finish()
    barrier()
    return result


def training_sets(
    cache: Path, names: Sequence[str], augment: ImageAugment | None, inner_split: str
) -> tuple[CacheDataset, CacheDataset]:
    """The samples the heads fit on and the ones that pick the epoch: train and val, or with
    ``train.inner_split`` the file's inner_train and inner_val parts of the train split."""
    if not inner_split:
        return CacheDataset(cache, "train", list(names), transform=augment), CacheDataset(cache, "val", list(names))
    parts = read_inner_split(inner_split, cache)
    log(
        f"inner split {inner_split}: fit on {len(parts['inner_train'])} training samples, the epoch is picked on "
        f"{len(parts['inner_val'])} others; val and test select nothing"
    )
    return (
        CacheDataset(cache, "train", list(names), transform=augment, ids=parts["inner_train"], name="inner_train"),
        CacheDataset(cache, "train", list(names), ids=parts["inner_val"], name="inner_val"),
    )


# ------------------------------------------------------------------------------- what fit calls
def start_epoch(
    encoder: nn.Module, first_trainable: int | None, lr_encoder: float, augment: ImageAugment | None, epoch: int
) -> None:
    """``fit``'s ``start_epoch_hook``: the encoder trains from ``first_trainable`` (0-based) on and is otherwise
    frozen in eval mode (no dropout, BatchNorm statistics untouched); the augmentation draws follow the epoch."""
    trains = first_trainable is not None and epoch >= first_trainable
    set_trainable(encoder, trains)
    if not trains:
        encoder.eval()
    if first_trainable is not None and epoch == first_trainable and epoch > 0:  # 0-based index
        log(f"epoch {epoch + 1}: the encoder is unfrozen (lr_encoder {lr_encoder:g})")
    if isinstance(augment, ImageAugment):
        augment.set_epoch(epoch)


@dataclass
class Validation:
    """``fit``'s ``evaluate``: the mode's validation logits, their loss and metrics; the probabilities of the
    latest epoch are kept for :class:`BestExport`."""

    logits: Callable[[], dict[str, torch.Tensor]]
    loss_fn: nn.Module
    specs: Sequence[TargetSpec]
    labels: dict[str, np.ndarray]  # {target: (N_val,) or (N_val, K)}, as the predictions frame reads them
    targets: dict[str, torch.Tensor]  # the same on device, as the loss reads them
    device: torch.device
    probs: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        val_set: CacheDataset,
        specs: Sequence[TargetSpec],
        logits: Callable[[], dict[str, torch.Tensor]],
        loss_fn: nn.Module,
        device: torch.device,
    ) -> Validation:
        targets = {s.name: torch.as_tensor(val_set.labels(s.name)).to(device) for s in specs}
        return cls(logits, loss_fn, specs, labels_of(val_set, specs), targets, device)

    def __call__(self, epoch: int) -> dict[str, float]:
        logits = self.logits()
        with torch.no_grad():
            loss = float(self.loss_fn({k: v.to(self.device) for k, v in logits.items()}, self.targets)["loss"])
        metrics, self.probs = validation_metrics(logits, self.labels, self.specs, loss)
        return metrics


@dataclass
class BestExport:
    """``fit``'s ``export_best``: ``checkpoints/best.ckpt`` (a self-contained classifier) and ``val_preds.parquet``."""

    classifier: nn.Module
    model_info: Mapping[str, Any]  # the encoder's registry name and build arguments, the head settings
    config: Config
    specs: Sequence[TargetSpec]
    preprocessing: Mapping[str, Any]
    mode: str
    run_dir: Path
    val_ids: Sequence[str]
    validation: Validation

    def __call__(self, epoch: int, record: dict[str, float]) -> None:
        val = {k.removeprefix("val_"): v for k, v in record.items() if k.startswith("val_")}
        payload = classifier_payload(
            unwrap(self.classifier).folded(),  # standardised inputs folded into plain heads
            model_info=dict(self.model_info),
            targets=[s.to_dict() for s in self.specs],
            preprocessing=self.preprocessing,
            config_text=self.config.to_toml(),
            metrics={"epoch": record["epoch"], "monitor": self.config.train.monitor, "val": val, "mode": self.mode},
        )
        save_checkpoint(self.run_dir / "checkpoints" / "best.ckpt", payload)
        frame = predictions_frame(self.val_ids, self.validation.labels, self.validation.probs, self.specs)
        write_parquet_atomic(frame, self.run_dir / "val_preds.parquet")


# ------------------------------------------------------------------------------------------ pieces
def describe_run(
    kind: str, encoder: Encoder, n_train: int, n_val: int, feature_cache: str, first_trainable: int | None
) -> str:
    """The one log line that says what this run trains, on what."""
    return (
        f"finetune: {kind} of {describe_encoder(encoder)} ({sum(p.numel() for p in encoder.parameters()):,} parameters) "
        f"on {n_train} train / {n_val} val samples"
        + (f", heads on cached {feature_cache}" if feature_cache else "")
        + (f", encoder trains from epoch {first_trainable + 1}" if first_trainable else "")
    )


def finetune_result(
    fitted: FitResult,
    config: Config,
    *,
    run_dir: Path,
    mode: str,
    feature_cache: bool,
    cache: Path,
    data_print: str,
    warnings: list[str],
    overlap: dict[str, Any],
    encoder: Encoder,
    wall_time_s: float,
) -> FinetuneResult:
    """The run's :class:`FinetuneResult`: the best epoch's validation metrics and what identifies the run."""
    best_row = next((r for r in fitted.history if r["epoch"] == fitted.best_epoch), {})
    return FinetuneResult(
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
        data_fingerprint=data_print,
        warnings=warnings,
        pretraining_overlap=overlap,
        encoder=encoder.name,
        architecture=describe_encoder(encoder),
    )


def needs_drop_last(first_trainable: int | None, n_train: int, batch_size: int) -> bool:
    """A last batch of one sample breaks BatchNorm in a training encoder: drop it then."""
    return first_trainable is not None and n_train > batch_size and n_train % batch_size == 1


def wrap_for_fit(module: nn.Module, encoder: nn.Module, first_trainable: int | None) -> nn.Module:
    """``module`` wrapped for DDP under torchrun, with the encoder trainable iff it trains from the start.

    DDP registers only trainable parameters: an encoder that unfreezes later is wrapped trainable, and its
    frozen epochs leave it unused."""
    set_trainable(encoder, first_trainable == 0 or bool(is_distributed() and first_trainable))
    model = wrap_ddp(module, find_unused_parameters=bool(first_trainable))
    set_trainable(encoder, first_trainable == 0)
    return model


def build_optimization(
    classifier: nn.Module, loss_fn: nn.Module, train: TrainConfig, first_trainable: int | None, steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the heads (``lr_head``), learned task weights and, when it ever trains, the encoder
    (``lr_encoder``); a cosine schedule with warmup over ``train.epochs * steps`` optimizer steps."""
    groups = param_groups_with_decay(classifier.heads, train.lr_head, train.weight_decay, name="head")
    if isinstance(loss_fn, UncertaintyWeightedLoss):  # the learned task weights train with the heads
        groups.append({"params": [loss_fn.log_vars], "lr": train.lr_head, "weight_decay": 0.0, "name": "task_weights"})
    if first_trainable is not None:
        groups += param_groups_with_decay(
            classifier.encoder, train.lr_encoder, train.weight_decay, name="encoder"
        )
    return adamw_with_cosine(
        groups, weight_decay=train.weight_decay, steps_per_epoch=steps, warmup_epochs=train.warmup_epochs,
        epochs=train.epochs, min_lr_ratio=train.min_lr_ratio,
    )  # fmt: skip


def preprocessing_info(
    summary: Mapping[str, Any], spatial_size: Sequence[int], data_print: str, cache: Path
) -> dict[str, Any]:
    """What ``best.ckpt`` and ``results.json`` record of the cache the classifier was trained on."""
    return {
        "settings": summary["settings"],
        "spatial_dims": int(summary["spatial_dims"]),
        "in_channels": int(summary["in_channels"]),
        "spatial_size": list(spatial_size),
        "cache_fingerprint": summary["fingerprint"],
        "data_fingerprint": data_print,
        "split_manifest_hash": split_manifest_hash(cache),
        "geometry": GEOMETRY_CONVENTION,
    }


def plot_curves(history: Sequence[Mapping[str, float]], specs: Sequence[TargetSpec], monitor: str, run_dir: Path) -> None:
    """``figures/training_curves.png``: the loss, balanced accuracy (with a classification target) and the monitor."""
    curves = ["loss", "balanced_accuracy"] if any(s.kind != "regression" for s in specs) else ["loss"]
    monitored = monitor.removeprefix("val_").removeprefix("train_")
    curves += [monitored] if monitored not in curves else []
    plot_training_curves(list(history), run_dir / "figures" / "training_curves.png", curves)


def encoder_trainable_from(model: ModelConfig, epochs: int) -> int | None:
    """The 0-based index of the first epoch in which the encoder trains (``model.unfreeze_at_epoch`` is
    1-based: 3 trains it from the 3rd epoch, index 2; 0 and 1 from the first); None when it stays frozen."""
    if not model.freeze_encoder:
        if model.unfreeze_at_epoch > 1:
            raise ConfigError(
                [
                    f"`model.freeze_encoder` = false trains the encoder from epoch 1, but `model.unfreeze_at_epoch` = "
                    f"{model.unfreeze_at_epoch}; set model.freeze_encoder = true to keep it frozen until then"
                ]
            )
        return 0
    if model.unfreeze_at_epoch < 0:
        return None
    if model.unfreeze_at_epoch > epochs:
        log(
            f"model.unfreeze_at_epoch = {model.unfreeze_at_epoch} is after the last epoch ({epochs}): "
            "the encoder stays frozen (a linear probe)"
        )
        return None
    return max(model.unfreeze_at_epoch - 1, 0)


def standardizes_inputs(model: ModelConfig, first_trainable: int | None) -> bool:
    """``model.head.standardize`` applies to a linear or MLP probe whose encoder never trains: a fine-tune's
    features move, and an attentive head normalises its own tokens."""
    return model.head.standardize and first_trainable is None and model.head.kind != "attentive"


def wants_feature_cache(
    first_trainable: int | None, train: TrainConfig, model: ModelConfig, augment: ImageAugment | None
) -> bool:
    """Cached embeddings (or tokens, for an attentive head) serve a probe whose encoder never trains and sees
    no augmentation."""
    if first_trainable is not None or not train.feature_cache:
        return False
    if augment is not None:
        log("augmented probe: the frozen encoder runs every epoch (train.augment is on)")
        return False
    return True


def refuse_before_data(
    config: Config, run_dir: str | Path | None, resume: bool, *, overwrite: bool, extend: bool
) -> None:
    """What is refused without the cache, so before the preprocess pass: a run already in the folder (or
    --resume of none), and ``model.encoder = "auto"`` with no checkpoint to read the architecture from."""
    model = config.model
    if model.encoder == "auto" and not model.checkpoint and not model.architecture_from:
        choose_encoder(model, in_channels=1)  # raises its one line: "auto" has nothing to read
    if run_dir is None and not config.run.name:
        return
    path = Path(run_dir) if run_dir is not None else Path(config.run.root) / config.run.name
    if resume:
        check_resume_settings(path, config, extend=extend)
    claim_run_dir(path, resume=resume, overwrite=overwrite, act=False)


def prepare_run_dir(
    config: Config,
    command: str,
    run_dir: str | Path | None,
    resume: bool,
    *,
    overwrite: bool = False,
    extend: bool = False,
) -> Path:
    """``<run.root>/<run.name>`` (or ``run_dir``) with ``config.toml`` and ``env.json`` (rank 0 writes).

    A folder holding a finished or started run is refused unless ``resume`` (same settings, see
    :func:`medctl.runs.check_resume_settings`) or ``overwrite`` (:func:`medctl.runs.claim_run_dir`). A
    fresh run in a folder that an earlier run left without a checkpoint starts its ``metrics.jsonl`` and
    ``tb/`` afresh (they would mix with the old run's); ``resume`` keeps them.
    """
    if run_dir is not None:
        path = Path(run_dir)
        config = config.model_copy(
            update={"run": config.run.model_copy(update={"root": str(path.parent), "name": path.name})}
        )
    path = Path(config.run.root) / config.run.name
    if config.run.name:
        if resume:
            check_resume_settings(path, config, extend=extend)
        claim_run_dir(path, resume=resume, overwrite=overwrite, act=is_rank0())
    if is_rank0():
        path = create_run_dir(config, command)
        if not resume:
            for stale in ("metrics.jsonl", "checkpoints/last.ckpt", "results.json"):
                (path / stale).unlink(missing_ok=True)
            shutil.rmtree(path / "tb", ignore_errors=True)
    barrier()
    return path


def cached_spatial_size(summary: Mapping[str, Any], cache: Path) -> list[int]:
    size = summary.get("spatial_size")
    if not size:
        raise DataError(
            f"{cache}/summary.json: the cached samples have different sizes; a classifier needs one size: "
            "set data.preprocess.spatial_size (e.g. [32, 64, 64]) and rerun"
        )
    return [int(s) for s in size]


def build_pretrained_encoder(
    model: ModelConfig, summary: Mapping[str, Any], spatial_size: Sequence[int]
) -> Encoder:
    """``model.encoder`` (``auto``: the checkpoint's own architecture) for the cache's size and channels, with
    ``model.checkpoint`` loaded (report logged); see :mod:`medctl.models.architecture`."""
    in_channels = int(summary["in_channels"])
    if model.encoder != "auto" and in_channels != model.in_channels:
        log(
            f"the cache has {in_channels} channel(s): building {model.encoder} for that (model.in_channels = {model.in_channels})"
        )
    built = pretrained_encoder(
        model, in_channels=in_channels, input_size=spatial_size, spatial_dims=int(summary["spatial_dims"])
    )
    encoder = built.encoder
    if built.report is None:
        log(f"{encoder.name}: random initialisation (model.checkpoint is empty)")
        return encoder
    log(f"{describe_encoder(encoder)} <- {model.checkpoint}")
    arch = built.choice.architecture
    for line in (arch.lines() if arch is not None and model.encoder == "auto" else []) + built.choice.notes:
        log(f"  {line}")
    for line in built.report.lines():
        log(f"  {line}")
    return encoder


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def regression_scales(
    specs: Sequence[TargetSpec], data: DataConfig, train_set: CacheDataset
) -> dict[str, tuple[float, float]]:
    """``{target: (mean, std)}`` of each regression target's training values ((0, 1) when not standardised)."""
    standardize = {t.name: t.standardize for t in data.targets}
    scales = {}
    for spec in specs:
        if spec.kind != "regression":
            continue
        values = np.asarray(train_set.labels(spec.name), dtype=np.float64)
        std = float(values.std()) if len(values) else 0.0
        if standardize.get(spec.name, True):
            if std == 0:
                raise DataError(
                    f"target `{spec.name}`: every training value is {values[0] if len(values) else '?'}; "
                    "a constant cannot be learned (check the column, or the split)"
                )
            scales[spec.name] = (float(values.mean()), std)
        else:
            scales[spec.name] = (0.0, 1.0)
    return scales


def build_loss(
    train: TrainConfig,
    data: DataConfig,
    specs: Sequence[TargetSpec],
    train_set: CacheDataset,
    scales: Mapping[str, tuple[float, float]] | None = None,
) -> MultiTargetLoss | UncertaintyWeightedLoss:
    """One loss per target (classification: from its training class counts; regression: on the standardised
    scale), weighted by ``train.task_weights`` (a table, or learned "uncertainty") over ``data.targets[].weight``."""
    losses: dict[str, nn.Module] = {}
    settings = LossSettings.of(train)
    for spec in specs:
        if spec.kind == "regression":
            mean, std = (scales or {}).get(spec.name, (0.0, 1.0))
            losses[spec.name] = RegressionLoss(train.regression_loss, mean=mean, std=std, huber_delta=train.huber_delta)
            continue
        counts = label_counts(train_set.labels(spec.name), spec.kind, len(spec.classes))
        losses[spec.name] = build_target_loss(spec.kind, settings, counts, target=spec.name)
    if train.task_weights == "uncertainty":
        return UncertaintyWeightedLoss(losses)
    unknown = sorted(set(train.task_weights) - set(losses))
    if unknown:
        raise ConfigError(
            [f"`train.task_weights` names {', '.join(unknown)}, not a target; targets are {', '.join(losses)}"]
        )
    weights = {t.name: t.weight for t in data.targets if t.name in losses} | dict(train.task_weights)
    return MultiTargetLoss(losses, weights)


def learned_loss_state(loss_fn: nn.Module) -> dict[str, nn.Module]:
    """What of the loss ``last.ckpt`` must hold for ``--resume``: the learned task weights (``log_vars`` of
    ``train.task_weights = "uncertainty"``) live in the loss, not the model; fixed weights have nothing to keep."""
    return {"task_weights": loss_fn} if isinstance(loss_fn, UncertaintyWeightedLoss) else {}


def validation_metrics(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, np.ndarray],
    specs: Sequence[TargetSpec],
    loss: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The monitored dict (means over targets, plus ``<target>_<metric>`` with several) and the probabilities."""
    probs = {s.name: probabilities(logits[s.name], s.kind) for s in specs}
    per_target = {s.name: epoch_metrics(labels[s.name], probs[s.name], s) for s in specs}
    if len(specs) == 1:
        metrics = dict(per_target[specs[0].name])
    else:
        metrics = {}
        for key in VAL_METRICS[:-1]:  # means over the classification targets
            values = [m[key] for m in per_target.values() if key in m and math.isfinite(m[key])]
            if values or any(s.kind != "regression" for s in specs):
                metrics[key] = float(np.mean(values)) if values else float("nan")
        for name, values in per_target.items():
            metrics |= {f"{name}_{key}": value for key, value in values.items()}
    metrics["loss"] = loss
    return metrics, probs


def epoch_metrics(y_true: np.ndarray, probs: np.ndarray, spec: TargetSpec) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and AUROC of one target (``nan`` where undefined).

    The vectorised forms from :mod:`medctl.evaluation.bootstrap` on one "resample" that holds every
    sample once: the values of :func:`medctl.evaluation.metrics.target_metrics` (scikit-learn) at a
    fraction of the cost, which matters when a probe validates every few milliseconds.
    """
    p = probs if spec.kind in ("multilabel", "regression") else class_probs(probs, len(spec.classes))  # (N, K)
    once = np.ones((1, len(y_true)))  # (1, N) draw counts
    return {
        name: float(metric.batched(y_true, p, once)[0])
        for name, metric in headline_metrics(spec.kind).items()
    }


def check_monitor(monitor: str, specs: Sequence[TargetSpec]) -> None:
    """A ``train.monitor`` this run will produce, checked before any training."""
    def keys(spec: TargetSpec) -> tuple[str, ...]:
        return REGRESSION_HEADLINE if spec.kind == "regression" else VAL_METRICS[:-1]

    if len(specs) == 1:
        known = [*keys(specs[0]), "loss"]
    else:
        known = list(VAL_METRICS) if any(s.kind != "regression" for s in specs) else ["loss"]
        known += [f"{s.name}_{key}" for s in specs for key in keys(s)]
    if monitor == "train_loss" or monitor.removeprefix("val_") in known:
        return
    close = difflib.get_close_matches(monitor.removeprefix("val_"), known, n=1, cutoff=0.5)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise ConfigError(
        [f"`train.monitor` = {monitor!r} is not a metric of this run; {hint}use one of: {', '.join(known)}"]
    )


def check_splits(
    summary: Mapping[str, Any], specs: Sequence[TargetSpec], data: DataConfig, cache: Path
) -> list[str]:
    """Errors for splits that cannot train and validate a classifier; warnings (returned, logged) otherwise.

    Errors: an empty train or validation split; a class (multilabel: a label's positives) present in val
    or test but absent from train, which the classifier could never learn. Warning: a listed class with no
    sample in any split.
    """
    counts = summary["counts"]
    where = f"the `{data.split_column}` column" if data.split_column else "data.split_ratios"
    for split, name in (("train", "training"), ("val", "validation")):
        if not counts["splits"].get(split, 0):
            lost = uncached_rows(split, summary, cache)
            if lost:
                fix = f"the table has {split} rows, but none is in the cache: {lost}"
            elif data.split_column:
                fix = f"mark some rows {split!r} in the `{data.split_column}` column"
            else:
                fix = f"give data.split_ratios a {split} share, e.g. [0.7, 0.15, 0.15]"
            raise DataError(f"{cache}/manifest.parquet: the {name} split is empty; {fix}")
    warnings = []
    for spec in specs:
        per_split = counts["classes"][spec.name]
        for cls in spec.classes:
            n_train = per_split.get("train", {}).get(cls, 0)
            n_other = sum(per_split.get(s, {}).get(cls, 0) for s in ("val", "test"))
            if n_train == 0 and n_other > 0:
                what = "positive samples" if spec.kind == "multilabel" else "samples"
                raise DataError(
                    f"target `{spec.name}`: class {cls!r} has no training {what} but {n_other} in val/test, so the "
                    f"classifier cannot learn it; move some of them to the train split ({where}) or merge the class"
                )
            if n_train == 0:
                warnings.append(f"target `{spec.name}`: class {cls!r} has no samples in any split")
    for warning in warnings:
        log(f"warning: {warning}")
    return warnings


def uncached_rows(split: str, summary: Mapping[str, Any], cache: Path) -> str:
    """Why the table's ``split`` rows are not in the cache ("8 not fetched ...; 2 failed ..."), or ""."""
    missing = int(summary.get("missing_splits", {}).get(split, 0))
    manifest = pd.read_parquet(cache / "manifest.parquet", columns=["source_id", "split", "status"])
    failed = manifest[(manifest.split == split) & (manifest.status == "failed")].source_id.nunique()
    reasons = []
    if missing:
        reasons.append(
            f"{missing} not fetched while storage was unreachable (data.allow_incomplete = true went on without "
            "them): rerun `medctl preprocess` when it is back"
        )
    if failed:
        reasons.append(f"{failed} failed to preprocess (see {cache}/data_errors.csv)")
    return "; ".join(reasons)


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
