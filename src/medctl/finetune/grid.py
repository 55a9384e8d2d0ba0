"""``train.grid``: a grid of probe heads trained in one pass over each batch, the best kept.

The reference protocols train many heads on one frozen backbone and keep the best on validation (V-JEPA 2's
attentive probe: 5 learning rates x 4 weight decays; DINOv2's linear evaluation; CT-FM: 13 learning rates on
cached embeddings), so a leaderboard compares encoders rather than one learning rate's luck. Here:

- every combination of ``train.grid.lr_head`` x ``train.grid.weight_decay`` is one member; the members are
  copies of the run's heads (same initial weights, same standardisation) stacked into one module
  (:class:`~medctl.training.stacked.Stacked`), so one batch read (cached embeddings, cached tokens, or the
  frozen encoder's output, computed once per batch) feeds them all;
- each member has its own AdamW moments, learning rate, weight decay and gradient clipping
  (:class:`~medctl.training.stacked.StackedAdamW`) and its own early stopping and best epoch on the
  selection split (val, or inner_val); a stopped member keeps its weights, as a run that stopped would. The
  run ends when every member has stopped (or at ``train.epochs``);
- so member ``g`` trains exactly as a single-head run with its ``lr_head`` and ``weight_decay`` would;
- the winner is the member with the best monitored value on the selection split, ties to the smaller lr
  (then the smaller weight decay); its best-epoch weights become ``best.ckpt`` in the usual format, with
  ``val_preds.parquet``; every member is recorded in ``results.json["grid"]``, the winner under
  ``results.json["selected"]``. A winner on the grid's edge logs one warning naming the edge.

The encoder never trains in a grid run: a fine-tune's encoder, trained by all the heads at once, would be
none of the single runs, so a grid with a fine-tune is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from medctl.config import TrainConfig
from medctl.data.tables import TargetSpec
from medctl.errors import ConfigError, RunFailure
from medctl.finetune.modes import CachedLogits, Mode, ModeInputs, ProbeHeads
from medctl.finetune.tokens import cached_logits
from medctl.progress import log
from medctl.training.distributed import is_rank0
from medctl.training.early_stopping import EarlyStopping, lower_is_better
from medctl.training.fit import FitResult
from medctl.training.multitask import UncertaintyWeightedLoss
from medctl.training.optim import build_scheduler
from medctl.training.precision import autocast_context
from medctl.training.predict import predict_logits
from medctl.training.stacked import Stacked, StackedAdamW

Logits = dict[str, torch.Tensor]  # {target: (N, G, K)}: the member axis second


@dataclass(frozen=True)
class GridPoint:
    lr_head: float
    weight_decay: float

    def label(self) -> str:
        return f"lr_head {self.lr_head:g}, weight_decay {self.weight_decay:g}"


def grid_points(train: TrainConfig) -> list[GridPoint]:
    """Every combination, ordered by lr then weight decay (the tie order); an empty list takes the scalar setting."""
    lrs = sorted(train.grid.lr_head) or [train.lr_head]
    decays = sorted(train.grid.weight_decay) or [train.weight_decay]
    return [GridPoint(lr, wd) for lr in lrs for wd in decays]


def probe_grid(train: TrainConfig, first_trainable: int | None, mode: Mode, inputs: ModeInputs) -> Grid | None:
    """``train.grid``'s stacked heads on ``mode``'s inputs (what a grid refuses checked first); None without one."""
    if not train.grid.enabled:
        return None
    check_grid(train, first_trainable, inputs.loss_fn)
    return build_grid(mode, inputs, grid_points(train), train.monitor, train.patience)


def check_grid(train: TrainConfig, first_trainable: int | None, loss_fn: nn.Module) -> None:
    """A grid trains probe heads on a frozen encoder and selects on the selection split; say what else is refused."""
    problems = []
    if first_trainable is not None:
        problems.append(
            "`train.grid` trains probe heads on a frozen encoder, but this run fine-tunes it (model.freeze_encoder "
            "/ model.unfreeze_at_epoch); set train.grid = {} for a fine-tune"
        )
    if train.monitor == "train_loss":
        problems.append("`train.monitor` = train_loss selects nothing on held-out samples; a grid needs a validation metric")
    if isinstance(loss_fn, UncertaintyWeightedLoss):
        problems.append('`train.task_weights` = "uncertainty" learns one set of weights, not one per grid head; set train.grid = {}')
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------ the model
class GridProbe(nn.Module):
    """The stacked heads, behind the frozen encoder when it runs every step: ``x -> {target: (B, G, K)}``.

    ``head_inputs`` (the classifier's) turns images into what the heads read, once per batch for all members;
    without it the input is already cached embeddings (B, D) or tokens (B, T, D)."""

    def __init__(self, stacked: Stacked, encoder: nn.Module | None = None, head_inputs: Callable | None = None):
        super().__init__()
        self.stacked = stacked
        self.encoder = encoder  # registered so fit's train()/eval() reach it; frozen throughout
        self.head_inputs = head_inputs

    def forward(self, x: torch.Tensor) -> Logits:
        return self.stacked(self.head_inputs(x) if self.head_inputs is not None else x)


def member_losses(loss_fn: nn.Module, logits: Logits, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(G,) each member's loss on the batch: the run's loss, vectorised over the member axis (dim 1)."""
    return vmap(lambda one: loss_fn(one, labels)["loss"], in_dims=1)(dict(logits))


@dataclass
class GridStep:
    """``fit``'s train step: every member's loss on one batch; their sum back-propagates (each member's
    gradient is its own loss's). Each member's loss is logged as ``train_grid<g>_loss``."""

    loss_fn: nn.Module
    names: Sequence[str]

    def __call__(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        if isinstance(batch, Mapping):  # images with their labels under the target names
            inputs, labels = batch["image"], batch
        else:  # cached rows: (z, *labels), one label tensor per target
            inputs, *values = batch
            labels = dict(zip(self.names, values, strict=True))
        losses = member_losses(self.loss_fn, model(inputs), labels)  # (G,)
        return {"loss": losses.sum(), **{f"grid{g}_loss": loss for g, loss in enumerate(losses.detach())}}


# ------------------------------------------------------------------------------------- the selection
class GridSelection(nn.Module):
    """Per member: early stopping on ``monitor`` and the weights of its best epoch. Buffers only, so
    ``last.ckpt`` keeps it (``fit``'s ``extra_modules``) and ``--resume`` goes on with it."""

    def __init__(self, points: Sequence[GridPoint], stacked: Stacked, monitor: str, patience: int):
        super().__init__()
        members = len(points)
        # the stack in a list: read here, trained and saved by the grid's module
        self.points, self.stacked, self.monitor, self.patience = list(points), [stacked], monitor, patience
        self.mode = "min" if lower_is_better(monitor) else "max"
        self.register_buffer("best_value", torch.full((members,), math.nan, dtype=torch.float64))
        self.register_buffer("best_epoch", torch.zeros(members, dtype=torch.long))  # 1-based; 0: none yet
        self.register_buffer("bad_epochs", torch.zeros(members, dtype=torch.long))
        device = stacked.params[0].device
        self.register_buffer("active", torch.ones(members, dtype=torch.bool, device=device))
        for i, param in enumerate(stacked.params):
            self.register_buffer(f"best_{i}", param.detach().clone())  # (G, ...)

    def update(self, epoch: int, values: Sequence[float]) -> None:
        """This epoch's (0-based) monitored value of every member: best epochs, weights, who stops."""
        for g, value in enumerate(values):
            if not self.active[g]:
                continue
            stopper = EarlyStopping(self.monitor, self.mode, patience=self.patience)
            best = float(self.best_value[g])
            stopper.best, stopper.bad_epochs = (None if math.isnan(best) else best), int(self.bad_epochs[g])
            if stopper.update(value):
                self.best_value[g], self.best_epoch[g] = stopper.best, epoch + 1
                for i, param in enumerate(self.stacked[0].params):
                    getattr(self, f"best_{i}")[g].copy_(param.detach()[g])
            self.bad_epochs[g] = stopper.bad_epochs
            if stopper.should_stop:
                self.active[g] = False

    def all_stopped(self) -> bool:
        return not bool(self.active.any())

    def winner(self) -> int | None:
        """The member with the best value so far; ties to the first (smaller lr, then smaller weight decay)."""
        scored = [(g, float(v)) for g, v in enumerate(self.best_value) if not math.isnan(float(v))]
        if not scored:
            return None
        sign = 1.0 if self.mode == "min" else -1.0
        return min(scored, key=lambda item: (sign * item[1], item[0]))[0]

    def best_state(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s best-epoch weights, keyed as the heads' own (``ProbeHeads`` names)."""
        stacked = self.stacked[0]
        state = stacked.member_state(member)
        return state | {name: getattr(self, f"best_{i}")[member].clone() for i, name in enumerate(stacked.names)}


@dataclass
class GridValidation:
    """``fit``'s ``evaluate``: every member's validation metrics; the selection follows them. Returns the
    metrics of the member selected so far and each member's monitored value (``val_grid<g>_<metric>``)."""

    logits: Callable[[], Logits]
    loss_fn: nn.Module
    specs: Sequence[TargetSpec]
    labels: dict[str, np.ndarray]
    targets: dict[str, torch.Tensor]
    selection: GridSelection
    metrics_of: Callable[..., tuple[dict[str, float], dict[str, np.ndarray]]]  # run.validation_metrics
    stopped: dict[int, dict[str, float]] = field(default_factory=dict)  # a stopped member's last metrics: it is frozen

    def __call__(self, epoch: int) -> dict[str, float]:
        monitored = self.selection.monitor.removeprefix("val_")
        logits = self.logits()  # {target: (N_val, G, K)}
        with torch.no_grad():
            device = next(iter(self.targets.values())).device
            losses = member_losses(self.loss_fn, {k: v.to(device) for k, v in logits.items()}, self.targets).tolist()
        per_member = [
            self.stopped.get(g) or self.metrics_of({k: v[:, g] for k, v in logits.items()}, self.labels, self.specs, loss)[0]
            for g, loss in enumerate(losses)
        ]
        self.selection.update(epoch, [m[monitored] for m in per_member])
        self.stopped = {g: m for g, m in enumerate(per_member) if not self.selection.active[g]}
        leader = self.selection.winner()
        shown = per_member[leader if leader is not None else 0]
        return shown | {f"grid{g}_{monitored}": m[monitored] for g, m in enumerate(per_member)}


# ------------------------------------------------------------------------------------------ the grid
@dataclass
class Grid:
    """What the recipe needs from a grid run: the mode ``fit`` trains, its optimiser and validation, and
    the selection that picks the winner afterwards."""

    points: list[GridPoint]
    mode: Mode  # the stacked heads' mode; the single-head mode stays the recipe's for the export
    selection: GridSelection
    stacked: Stacked

    def optimization(self, train: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
        """One AdamW step for all members (each at its own lr and weight decay, clipped on its own) and the
        run's cosine schedule with warmup, as a single head's :func:`~medctl.finetune.model.build_optimization`."""
        optimizer = StackedAdamW(
            self.stacked,
            [p.lr_head for p in self.points],
            [p.weight_decay for p in self.points],
            active=self.selection.active,
            max_norm=train.grad_clip,
        )
        scheduler = build_scheduler(
            optimizer, warmup_steps=train.warmup_epochs * steps_per_epoch,
            total_steps=train.epochs * steps_per_epoch, min_lr_ratio=train.min_lr_ratio,
        )  # fmt: skip
        return optimizer, scheduler

    def validation(self, single: Any, metrics_of: Callable[..., Any]) -> GridValidation:
        """Every member validated as ``single`` (the run's :class:`~medctl.finetune.metrics.Validation`) would be."""
        return GridValidation(
            self.mode.val_logits, single.loss_fn, single.specs, single.labels, single.targets, self.selection, metrics_of
        )

    def select(self, fitted: FitResult, heads: nn.ModuleDict) -> tuple[FitResult, dict[str, Any]]:
        """Load the winner's best-epoch weights into ``heads`` (the classifier's); the fit result as the
        winner's, and what ``results.json`` records of every member (``grid``) and the winner (``selected``)."""
        winner = self.selection.winner()
        if winner is None:
            raise RunFailure(f"no grid head produced a finite `{self.selection.monitor}` on the selection split; check its labels")
        ProbeHeads(heads).load_state_dict(self.selection.best_state(winner))
        members = [self.record(g, fitted.history) for g in range(len(self.points))]
        chosen = members[winner]
        log(f"grid: {len(self.points)} heads; selected {self.points[winner].label()} ({self.selection.monitor} "
            f"{chosen['value']:.4g} at epoch {chosen['best_epoch']})")  # fmt: skip
        edge = edge_warning(self.points, winner)
        value = float(self.selection.best_value[winner])
        result = replace(fitted, best_epoch=chosen["best_epoch"], best_metric=value)
        return result, {"grid": members, "selected": chosen | {"index": winner, "edge": edge}}

    def export_winner(
        self, fitted: FitResult, heads: nn.ModuleDict, validate: Callable[[int], dict[str, float]], export: Any
    ) -> tuple[FitResult, tuple[dict[str, float], dict[str, Any]]]:
        """The winner's best epoch into the classifier's ``heads`` (:meth:`select`), validated and exported as a
        single head's would be: the winner's fit result, and (its metrics, what results.json records of the grid)."""
        fitted, selected = self.select(fitted, heads)
        metrics = validate(fitted.best_epoch - 1)
        if is_rank0():
            export(fitted.best_epoch - 1, {"epoch": fitted.best_epoch, **{f"val_{k}": v for k, v in metrics.items()}})
        return fitted, (metrics, selected)

    def record(self, member: int, history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        point, monitored = self.points[member], self.selection.monitor.removeprefix("val_")
        value = float(self.selection.best_value[member])
        epochs = [row for row in history if f"train_grid{member}_loss" in row]
        if not self.selection.active[member]:  # stopped: the epochs after it left its weights as they were
            epochs = epochs[: int(self.selection.best_epoch[member] + self.selection.bad_epochs[member])]
        return {
            "lr_head": point.lr_head,
            "weight_decay": point.weight_decay,
            "best_epoch": int(self.selection.best_epoch[member]) or None,
            "monitor": self.selection.monitor,
            "value": value if math.isfinite(value) else None,
            "epochs_trained": len(epochs),
            "train_loss": [row[f"train_grid{member}_loss"] for row in epochs],
            f"val_{monitored}": [row[f"val_grid{member}_{monitored}"] for row in epochs],
        }


def edge_warning(points: Sequence[GridPoint], winner: int) -> str:
    """One line when the winner sits on an edge of the grid, naming it ("" otherwise); weight decay 0 is a
    floor, not an edge."""
    chosen = points[winner]
    edges = []
    for key, values in (("lr_head", sorted({p.lr_head for p in points})), ("weight_decay", sorted({p.weight_decay for p in points}))):
        value = getattr(chosen, key)
        if len(values) < 2:
            continue
        if value == values[0] and value > 0:
            edges.append(f"the smallest {key} ({value:g}): widen train.grid.{key} downwards")
        elif value == values[-1]:
            edges.append(f"the largest {key} ({value:g}): widen train.grid.{key} upwards")
    if not edges:
        return ""
    line = f"grid: the selected head is on the grid's edge, {'; and '.join(edges)}"
    log(f"warning: {line}")
    return line


def build_grid(mode: Mode, inputs: ModeInputs, points: Sequence[GridPoint], monitor: str, patience: int) -> Grid:
    """The stacked heads on the same inputs as ``mode`` (the single-head mode build_mode chose): its loader,
    its cache, and, when the encoder runs, the encoder output shared by all members."""
    classifier = inputs.classifier
    stacked = Stacked(ProbeHeads(classifier.heads), len(points)).to(inputs.device)
    if mode.feature_cache:
        module = GridProbe(stacked)
        cached: CachedLogits = mode.val_logits  # type: ignore[assignment]
        val_logits: Callable[[], Logits] = CachedGridLogits(module, cached.inputs, cached.rows, inputs)
    else:
        module = GridProbe(stacked, classifier.encoder, classifier.head_inputs)
        val_logits = partial(
            predict_logits, module, inputs.val_set, batch_size=inputs.batch_size, num_workers=inputs.num_workers,
            device=inputs.device, precision=inputs.precision,
        )  # fmt: skip
    selection = GridSelection(points, stacked, monitor, patience).to(inputs.device)
    grid_mode = Mode(
        module=module, train_loader=mode.train_loader, train_step=GridStep(inputs.loss_fn, inputs.names),
        val_logits=val_logits, feature_cache=mode.feature_cache,
    )  # fmt: skip
    log(f"grid: {len(points)} heads (lr_head x weight_decay) trained together on each batch")
    return Grid(list(points), grid_mode, selection, stacked)


@dataclass
class CachedGridLogits:
    """The stacked heads over the cached validation inputs, in eval mode, the global RNG left alone."""

    module: GridProbe
    inputs: torch.Tensor | np.ndarray  # (N_val, D) on device, or (N_val, T, D) float16 memory map
    rows: int
    mode_inputs: ModeInputs

    def __call__(self) -> Logits:
        device, precision = self.mode_inputs.device, self.mode_inputs.precision
        with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast_context(device, precision):
            self.module.eval()
            logits = cached_logits(self.module, self.inputs, batch_size=self.rows, device=device)
            self.module.train()
        return logits
