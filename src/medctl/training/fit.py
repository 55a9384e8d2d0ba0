"""The training loop shared by ``medctl pretrain`` and ``medctl finetune``.

``fit`` owns the mechanics every stage repeats (autocast, backward, clipping, optimizer and scheduler
steps, logging, validation, early stopping, checkpoints, resume); a stage owns what is particular to it
and hands it in as plain functions. It reads top to bottom; there are no callbacks beyond these.

What the caller builds before calling ``fit``
---------------------------------------------
- ``model`` on ``device`` (``model.to(device)`` first, then the optimizer), wrapped with
  :func:`~medctl.training.distributed.wrap_ddp` under torchrun. Its weights go into ``last.ckpt``.
- ``optimizer`` (:func:`~medctl.training.optim.build_optimizer`) over every trainable parameter,
  including those of ``extra_modules`` (projector, predictor, ...). Gradients are clipped over exactly
  the optimizer's parameters.
- ``scheduler`` stepped once per optimizer step (:func:`~medctl.training.optim.build_scheduler` with
  ``total_steps = epochs * steps_per_epoch``), or None.
- ``train_loader``: best from :func:`~medctl.training.distributed.make_loader`; ``fit`` calls
  ``sampler.set_epoch(epoch)`` on it each epoch, so the shuffle depends only on (seed, epoch).
- Seeding (:func:`~medctl.training.seed.set_seed`) before the model is built.

The functions ``fit`` calls
---------------------------
- ``train_step(model, batch, step) -> dict[str, Tensor]``: the forward pass and the loss, run inside
  the autocast context. ``batch`` is what the loader yields with every tensor (inside dicts, lists,
  tuples) already moved to ``device``. ``step`` is the 0-based global optimizer step this batch makes.
  The dict must hold ``"loss"`` (a scalar with a graph); every other scalar in it (e.g. ``loss_byol``,
  ``loss_rotation``) is averaged over the epoch and logged as ``train/<name>``. Call ``model(...)``
  rather than ``model.module``, or DDP will not synchronise gradients. Do not call ``backward``.
- ``after_step(step)``: after the optimizer and scheduler stepped, with the same ``step``; for EMA
  target updates (:func:`~medctl.training.ema.ema_update` with
  :func:`~medctl.training.optim.momentum_schedule`). Raising here (e.g. KeyboardInterrupt) stops the
  run; the previous epoch's ``last.ckpt`` is intact.
- ``start_epoch_hook(epoch)``: at the start of each epoch, after ``model.train()``: unfreeze the
  encoder at some epoch, put a frozen encoder back in ``eval()``, change augmentation strength.
  ``fit`` sets ``model.train()`` every epoch; the modes of ``extra_modules`` are the caller's.
- ``evaluate(epoch) -> dict[str, float]``: validation metrics after each epoch, called on every rank;
  they must agree across ranks (compute on rank 0 and broadcast, or all-reduce). It is responsible
  for ``model.eval()`` and ``torch.no_grad()`` itself.
- ``export_best(epoch, record)``: rank 0, when the monitored metric improved (every epoch when there
  is no ``monitor``): write the user-facing ``checkpoints/best.ckpt`` (a classifier or an encoder).
  ``record`` is this epoch's history row (see below).
- ``export_last(epoch, record)``: rank 0, every epoch, after ``export_best``.
- ``early_stop_when()``: after each epoch's validation; True ends the run as early stopping does (a probe grid
  stops when each of its heads has stopped on its own).
- ``stop_when(record) -> str``: every rank, after ``last.ckpt`` is written; a non-empty reason ends the
  run there (``FitResult.stop_reason``). It must agree across ranks: read it from the record, whose
  ``val_`` figures ``evaluate`` already made agree. The saved state is not marked as stopped, so
  ``--resume`` trains on from the next epoch.

Monitoring and early stopping
-----------------------------
``monitor`` names a metric of this epoch's history row: ``"balanced_accuracy"`` is looked up as
``val_balanced_accuracy`` (then as given), ``"train_loss"`` names the training loss. Names containing
"loss" are minimised, others maximised. ``patience > 0`` stops after that many epochs without
improvement. A monitor that is not in the row is a ConfigError listing the available names.

What ``fit`` writes (rank 0 only)
---------------------------------
- ``metrics.jsonl`` + ``tb/`` via :class:`~medctl.training.logging.MetricsLogger` (and every row to
  ``sink``, an experiment tracker, when given): phase ``train``
  (epoch means of ``train_step``'s scalars, ``lr``, ``lr_<group name>``, ``grad_norm`` before clipping
  when ``grad_clip > 0``, ``samples_per_s``, ``epoch_time_s``), phase ``val`` (``evaluate``'s dict), and
  every ``log_every`` steps phase ``train_step`` (``loss``, ``lr``).
- ``checkpoints/last.ckpt``: a ``train_state`` (:mod:`medctl.training.state`) written atomically as
  the last act of every epoch, after evaluation and the exports, so its existence means "this epoch is
  completely done".

History rows (``FitResult.history``, ``export_*``'s ``record``): flat dicts
``{"epoch", "step", "lr", "train_loss", "train_<name>", "samples_per_s", "epoch_time_s", "val_<metric>"}``.
Epochs are 1-based wherever a user sees them: history rows, ``metrics.jsonl``, logs, ``FitResult.best_epoch``
(and so results.json, plots and checkpoints' metrics). The hooks (``start_epoch_hook``, ``evaluate``,
``export_*``) receive the 0-based epoch index, the loop's own counter; ``step`` counts optimizer steps.

Resume
------
``resume=True`` reads ``<run_dir>/checkpoints/last.ckpt`` (or ``resume`` is a path), restores model,
optimizer, scheduler, ``extra_modules``, early-stopping state, history, epoch, step and every RNG, drops
what the interrupted run logged after that checkpoint, and continues with the next epoch. Build
everything exactly as for a fresh run first. On CPU the result is bit-identical to an uninterrupted
run; under DDP each rank restores its own RNG snapshot.

``epochs`` must be what the run was started with (a ConfigError otherwise), unless ``extend=True``:
then the run goes on to the new, larger ``epochs`` with the schedule the caller built for it (cosine
over the new total), re-planned from the step the run reached: the lr jumps from the finished run's
floor back to where a run planned for the new length would be, and decays to the floor at the new end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medctl.errors import ConfigError, RunFailure
from medctl.progress import log, progress_bar
from medctl.training.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_bool,
    gather_objects,
    is_rank0,
    world_size,
)
from medctl.training.early_stopping import EarlyStopping
from medctl.training.logging import MetricsLogger, ScalarSink
from medctl.training.precision import autocast_context, effective_precision
from medctl.training.seed import rng_state
from medctl.training.state import load_train_state, save_train_state

TrainStep = Callable[[nn.Module, Any, int], Mapping[str, torch.Tensor]]


@dataclass
class FitResult:
    best_epoch: int | None  # 1-based; with no monitor, the last epoch
    best_metric: float | None  # the monitored value at best_epoch; None without a monitor
    epochs_run: int  # epochs completed, including those before a resume
    history: list[dict[str, float]]  # one row per completed epoch
    stopped_early: bool
    stop_reason: str = ""  # what ``stop_when`` said when it ended the run; "" otherwise


def fit(
    *,
    model: nn.Module,
    train_step: TrainStep,
    train_loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs: int,
    run_dir: str | Path,
    device: torch.device | str,
    precision: str = "fp32",
    grad_clip: float = 1.0,
    evaluate: Callable[[int], Mapping[str, float]] | None = None,
    monitor: str | None = None,
    patience: int = 0,
    after_step: Callable[[int], None] | None = None,
    extra_modules: Mapping[str, nn.Module] | None = None,
    export_best: Callable[[int, dict[str, float]], None] | None = None,
    export_last: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool | str | Path = False,
    logger: MetricsLogger | None = None,
    max_steps_per_epoch: int | None = None,
    start_epoch_hook: Callable[[int], None] | None = None,
    log_every: int = 0,
    extend: bool = False,
    sink: ScalarSink | None = None,
    early_stop_when: Callable[[], bool] | None = None,
    stop_when: Callable[[dict[str, float]], str] | None = None,
) -> FitResult:
    """Train ``model`` for ``epochs`` epochs; see the module docstring for the full contract."""
    device = torch.device(device)
    run_dir = Path(run_dir)
    last_path = run_dir / "checkpoints" / "last.ckpt"
    extra_modules = dict(extra_modules or {})
    stopper = EarlyStopping(monitor, patience=patience) if monitor else None
    own_logger = logger is None
    logger = logger if logger is not None else MetricsLogger(run_dir, sink=sink)
    precision = effective_precision(device, precision)
    history: list[dict[str, float]] = []
    best_epoch: int | None = None
    best_metric: float | None = None
    start_epoch, step, stopped_early, stop_reason = 0, 0, False, ""

    # 1. resume: put every piece of state back as it was at the end of the last finished epoch
    if resume:
        path = last_path if resume is True else Path(resume)
        planned = schedule_plan(scheduler)  # the schedule built for `epochs`, before the saved one loads
        state = load_train_state(
            path, model=model, optimizer=optimizer, scheduler=scheduler, extra_modules=extra_modules
        )
        start_epoch, step = state.epoch + 1, state.step
        saved_epochs = state.extra.get("epochs")
        if saved_epochs is not None and saved_epochs != epochs:
            check_extension(path, saved_epochs, epochs, start_epoch, extend)
            replan_schedule(scheduler, optimizer, planned)
            log(f"extending the run from {saved_epochs} to {epochs} epochs; the lr schedule is re-planned")
        history = list(state.extra.get("history", []))
        best_epoch, best_metric = state.best.get("epoch"), state.best.get("metric")
        stopped_early = bool(state.extra.get("stopped_early", False))
        if stopper is not None and state.extra.get("early_stopping"):
            stopper.load_state_dict(state.extra["early_stopping"])
        logger.rewind(epoch=start_epoch + 1, step=step)
        log(f"resumed from {path} after epoch {state.epoch + 1} (step {step})")

    try:
        for epoch in range(start_epoch, epochs):
            if stopped_early:
                break
            # 2. one pass over the training data
            model.train()
            _set_sampler_epoch(train_loader, epoch)
            if start_epoch_hook is not None:
                start_epoch_hook(epoch)
            train_metrics, step = train_one_epoch(
                model=model,
                train_step=train_step,
                train_loader=train_loader,
                optimizer=optimizer,
                scheduler=scheduler,
                device=device,
                precision=precision,
                grad_clip=grad_clip,
                after_step=after_step,
                epoch=epoch,
                epochs=epochs,
                step=step,
                max_steps=max_steps_per_epoch,
                logger=logger,
                log_every=log_every,
            )
            logger.log("train", train_metrics, epoch=epoch + 1, step=step)

            # 3. validation, then one flat history row for the epoch
            val_metrics = {k: float(v) for k, v in (evaluate(epoch) if evaluate is not None else {}).items()}
            if val_metrics:
                logger.log("val", val_metrics, epoch=epoch + 1, step=step)
            record: dict[str, float] = {"epoch": epoch + 1, "step": step, "lr": train_metrics["lr"]}
            record |= {_prefixed("train", k): v for k, v in train_metrics.items() if k != "lr"}
            record |= {f"val_{k}": v for k, v in val_metrics.items()}
            history.append(record)

            # 4. best epoch and early stopping
            if stopper is None:
                improved = True
            else:
                value = _monitored_value(record, stopper.monitor)
                improved = stopper.update(value)
                stopped_early = broadcast_bool(stopper.should_stop, device)
            if improved:
                best_epoch = epoch + 1
                best_metric = stopper.best if stopper is not None else None
            if early_stop_when is not None:
                stopped_early = broadcast_bool(stopped_early or early_stop_when(), device)
            _log_epoch(record, epoch, epochs, monitor, improved and stopper is not None)

            # 5. exports, then last.ckpt as the commit point of the epoch
            if is_rank0():
                if improved and export_best is not None:
                    export_best(epoch, record)
                if export_last is not None:
                    export_last(epoch, record)
            rngs = gather_objects(rng_state())  # taken last: the next epoch starts from exactly this state
            if is_rank0():
                save_train_state(
                    last_path,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    epoch=epoch,
                    step=step,
                    best={"epoch": best_epoch, "metric": best_metric, "monitor": monitor},
                    extra_modules=extra_modules,
                    extra={
                        "history": history,
                        "stopped_early": stopped_early,
                        "early_stopping": stopper.state_dict() if stopper is not None else None,
                        "epochs": epochs,
                    },
                    rng_states=rngs,
                )
            barrier()
            if stopped_early:
                log(f"early stopping: no improvement of {monitor} for {patience} epochs" if stopper else "early stopping")
            # 6. the caller's own reason to stop, after the epoch is saved (a resume continues from here)
            stop_reason = stop_when(record) if stop_when is not None else ""
            if stop_reason:
                break
    finally:
        if own_logger:
            logger.close()
        else:
            logger.flush()
    return FitResult(best_epoch, best_metric, len(history), history, stopped_early, stop_reason)


def train_one_epoch(
    *,
    model: nn.Module,
    train_step: TrainStep,
    train_loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    precision: str,
    grad_clip: float,
    after_step: Callable[[int], None] | None,
    epoch: int,
    epochs: int,
    step: int,
    max_steps: int | None,
    logger: MetricsLogger,
    log_every: int,
) -> tuple[dict[str, float], int]:
    """One pass: forward (autocast), backward, clip, optimizer + scheduler step, ``after_step``.

    Returns the epoch means of ``train_step``'s scalars (averaged over ranks) plus ``lr``, ``grad_norm``,
    ``samples_per_s`` and ``epoch_time_s``, and the new global step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, torch.Tensor] = {}
    n_steps, n_samples = 0, 0
    lrs: dict[str, float] = {}
    total = _epoch_length(train_loader, max_steps)
    start = time.perf_counter()
    with progress_bar(f"epoch {epoch + 1}/{epochs}", total=total) as bar:
        for batch in train_loader:
            if max_steps is not None and n_steps >= max_steps:
                break
            batch = move_to_device(batch, device)
            lrs = _group_lrs(optimizer)  # the lr this step uses

            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, precision):
                out = train_step(model, batch, step)
            loss = out["loss"]
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise RunFailure(
                    f"training loss is {loss_value} at epoch {epoch + 1}, step {step}; lower the learning rate or "
                    "check the inputs, then resume from checkpoints/last.ckpt"
                )
            if not loss.requires_grad:
                raise RunFailure("train_step returned a loss without a graph: nothing it used is trainable")
            loss.backward()
            if grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
                out = {**out, "grad_norm": norm}
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step(step)

            for name, value in out.items():
                value = (
                    value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                )
                sums[name] = sums.get(name, 0.0) + value.to(device)
            n_steps += 1
            step += 1
            n_samples += _batch_size(batch) * world_size()
            rate = n_samples / max(time.perf_counter() - start, 1e-9)
            bar.advance(1, info=f"loss {loss_value:.4f} · {rate:.1f} samples/s")
            if log_every > 0 and step % log_every == 0:
                logger.log("train_step", {"loss": loss_value, "lr": lrs["lr"]}, epoch=epoch + 1, step=step)
    if n_steps == 0:
        raise RunFailure(
            f"epoch {epoch + 1} had no batches: the training split is empty or smaller than a batch"
        )
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    means = all_reduce_mean(torch.stack([sums[name] / n_steps for name in names]))
    metrics = {name: float(value) for name, value in zip(names, means.tolist(), strict=True)}
    metrics |= lrs
    metrics |= {"samples_per_s": n_samples / elapsed, "epoch_time_s": elapsed}
    return metrics, step


def schedule_plan(scheduler: Any) -> list[dict[str, Any]] | None:
    """The plan of a LambdaLR built from plain objects (:class:`~medctl.training.optim.WarmupCosine`)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    return [dict(vars(fn)) for fn in lambdas] if lambdas and all(hasattr(fn, "__dict__") for fn in lambdas) else None


def replan_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, planned: list[dict[str, Any]] | None) -> None:
    """Put the plan built for this run back after a resume loaded the saved one; the lr follows at once."""
    if scheduler is None or planned is None:
        return
    for fn, plan in zip(scheduler.lr_lambdas, planned, strict=True):
        vars(fn).update(plan)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def check_extension(path: Path, saved: int, epochs: int, done: int, extend: bool) -> None:
    """A resume with another ``epochs`` than the run was planned for: only forward, only when asked."""
    if not extend:
        raise ConfigError(
            [f"{path} was planned for {saved} epochs, not {epochs}; pass --extend to train on to {epochs} "
             f"epochs (the lr schedule is re-planned for {epochs}), or resume with epochs = {saved}"],
            "--resume",
        )  # fmt: skip
    if epochs <= done:
        raise ConfigError(
            [f"--extend to {epochs} epochs: the run in {path} has already done {done}; ask for more"], "--resume"
        )


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in ``batch`` (dicts, lists, tuples, recursively) on ``device``; the rest unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    for sampler in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def _epoch_length(loader: Any, max_steps: int | None) -> int | None:
    try:
        length = len(loader)
    except TypeError:  # an iterable dataset has no length
        return max_steps
    return length if max_steps is None else min(length, max_steps)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple | list) else ()
    )
    for value in values:
        size = _batch_size(value)
        if size:
            return size
    return 0


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr`` of the first group, and ``lr_<name>`` of every named group (first group of each name)."""
    lrs = {"lr": float(optimizer.param_groups[0]["lr"])}
    for group in optimizer.param_groups:
        name = group.get("name")
        if name:
            lrs.setdefault(f"lr_{name}", float(group["lr"]))
    return lrs


def _prefixed(prefix: str, name: str) -> str:
    return name if name in ("samples_per_s", "epoch_time_s") or name.startswith("lr_") else f"{prefix}_{name}"


def _monitored_value(record: Mapping[str, float], monitor: str) -> float:
    for key in (f"val_{monitor}", monitor):
        if key in record:
            return float(record[key])
    available = ", ".join(k for k in record if k not in ("epoch", "step"))
    raise ConfigError([f"monitor `{monitor}` is not a metric this run produces; use one of: {available}"])


def _log_epoch(record: Mapping[str, float], epoch: int, epochs: int, monitor: str | None, best: bool) -> None:
    if not is_rank0():
        return
    shown = [f"{k} {v:.4g}" for k, v in record.items() if k.startswith(("train_loss", "val_")) and "_grid" not in k]
    mark = f"  (best {monitor})" if best else ""
    log(f"epoch {epoch + 1}/{epochs}  " + "  ".join(shown) + mark)
