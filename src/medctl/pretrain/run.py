"""``medctl pretrain``: self-supervised pretraining of an encoder, read top to bottom like a recipe.

The numbers are the steps in :func:`_pretrain`:

0. the method's typed table ``[pretrain.<method>]`` checked and completed;
1. the device, and the run folder's rule (:func:`medctl.runs.claim_run_dir`: new, ``--resume`` or
   ``--overwrite``) checked before any work;
2. the preprocessed cache (built once, reused after), the train split (optionally a subset) and val;
3. the encoder (optionally initialised from ``model.checkpoint``) inside the method module
   (``METHODS[pretrain.method]``, built from its typed table);
4. AdamW + cosine schedule with warmup, the EMA momentum schedule for target networks;
5. the run directory (:func:`medctl.runs.open_run_dir`), monitoring and the per-epoch export;
6. :func:`medctl.training.fit.fit`: bf16 on CUDA, gradient clipping, ``last.ckpt`` every epoch,
   ``--resume``; monitoring (collapse, k-NN, t-SNE, reconstruction panels) as its ``evaluate``;
7. exports: ``checkpoints/encoder.ckpt`` (a medctl encoder checkpoint, every epoch and at the end, so
   ``medctl finetune model.checkpoint=runs/<name>/checkpoints/encoder.ckpt`` takes it as is: the ONLINE
   encoder for byol and mim_contrastive; for jepa the EMA target encoder, as the loader's default entry
   of a JEPA file is ``target_encoder``, with the online one in ``context_encoder.ckpt`` and, with
   ``pretrain.jepa.export_vjepa2``, both in V-JEPA 2's layout in ``vjepa2.pt``), ``figures/*.png`` and
   ``results.json`` (history, throughput, final monitoring).

``pretrain.subset`` trains on part of the train split: ``"fraction:0.25"`` keeps a seeded random quarter
(``run.seed``); ``"<column>:<value>"`` keeps the rows of the cache manifest whose ``column`` equals
``value`` (e.g. ``"label:healthy"`` - a target column accepts the class name -, ``"group:sub-003"``).
Monitoring always uses the whole train and val splits (fixed subsets of ``pretrain.monitor_samples``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medctl.config import Config, PretrainConfig
from medctl.data.dataset import CacheDataset, read_summary
from medctl.data.preprocess import preprocess
from medctl.data.provenance import pool_provenance
from medctl.errors import RunFailure
from medctl.models.architecture import pretrained_encoder
from medctl.models.checkpoints import encoder_payload, save_checkpoint
from medctl.models.preprocessing import preprocessing_info
from medctl.pretrain import METHODS, build_method, method_settings, resolved_pretrain
from medctl.pretrain import monitoring as mon
from medctl.pretrain.samples import check_batch_size, select_subset, summary_input_size, trained_ids
from medctl.pretrain.verdict import CollapseCheck, EpochWatch, verdicts_in
from medctl.progress import log
from medctl.runs import claim_run_dir, open_run_dir, run_path, timestamp, write_results_and_timing
from medctl.tracking import connect
from medctl.training.distributed import (
    barrier,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    is_rank0,
    make_loader,
    rank,
    rank0_value,
    unwrap,
    world_size,
    wrap_ddp,
)
from medctl.training.fit import FitResult, fit
from medctl.training.optim import (
    adamw_with_cosine,
    ema_initial_share,
    momentum_schedule,
    param_groups_with_decay,
)
from medctl.training.precision import resolve_device, set_threads
from medctl.training.seed import set_seed


@dataclass
class PretrainResult:
    run_dir: Path
    encoder_checkpoint: Path
    epochs_run: int
    final_loss: float
    samples_per_s: float  # median over epochs of fit's samples/s
    knn_accuracy: float | None  # last measured; None without labels or val samples
    monitoring: dict[str, float] = field(default_factory=dict)  # last epoch's collapse/k-NN figures
    history: list[dict[str, float]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def run_pretrain(
    config: Config, *, command: str = "", resume: bool = False, overwrite: bool = False, extend: bool = False
) -> PretrainResult:
    """Pretrain ``config.model.encoder`` with ``config.pretrain.method``; see the module docstring.

    ``resume`` continues ``last.ckpt`` with the run's own settings (``extend``: to a larger
    ``pretrain.epochs``); ``overwrite`` deletes an earlier run of that name first."""
    joined = init_distributed()
    try:
        return _pretrain(config, command=command, resume=resume, overwrite=overwrite, extend=extend)
    finally:
        if joined:
            cleanup_distributed()


def _pretrain(config: Config, *, command: str, resume: bool, overwrite: bool, extend: bool) -> PretrainResult:
    # 0. the method's table checked and completed before any work (config.toml then holds all of it)
    config = config.model_copy(update={"pretrain": resolved_pretrain(config.pretrain)})
    settings = config.pretrain
    tracker = connect(config.tracking, kind="pretrain")  # a tracking server that does not answer stops us here

    # 1. device, threads, and the run directory (an earlier run there is never silently overwritten)
    device = resolve_device(config.run.device)
    set_threads(config.run.threads, config.data.num_workers)
    run_dir = run_path(config, resume=resume, stamp=rank0_value(timestamp))
    claim_run_dir(run_dir, config, resume=resume, overwrite=overwrite, extend=extend, act=False)
    start = time.perf_counter()

    # 2. data: the cache (rank 0 builds or reuses it), the train split or a subset of it, val
    cache = rank0_value(lambda: preprocess(config.data).cache_dir)  # a rerun decodes nothing
    summary = read_summary(cache)
    input_size = summary_input_size(summary, cache)
    train_full = CacheDataset(cache, "train")
    train_set = select_subset(train_full, settings.subset, seed=config.run.seed)
    val_set = CacheDataset(cache, "val")
    batch_size = check_batch_size(settings.method, config.data.batch_size, len(train_set))
    loader = make_loader(
        train_set,
        batch_size,
        shuffle=True,
        num_workers=config.data.num_workers,
        seed=config.run.seed,
        drop_last=True,
    )
    log(f"pretrain {settings.method}: {len(train_set)} training samples of {list(input_size)}, {len(loader)} steps/epoch")

    # 3. the encoder, optionally from a checkpoint, inside the method module; seeded right here, so
    #    run.seed alone fixes the initial weights (every rank builds the same; augmentations differ)
    set_seed(config.run.seed, config.run.deterministic)
    encoder = build_encoder(config, summary, input_size)
    method = build_method(settings.method, encoder, method_settings(settings)).to(device)
    model = wrap_ddp(method, find_unused_parameters=True)
    if world_size() > 1:
        set_seed(config.run.seed + rank(), config.run.deterministic)

    # 4. optimizer over the online parts only, cosine schedule, EMA momentum per step
    optimizer, scheduler = build_optimization(method, settings, len(loader))
    ema = EmaUpdate(model, settings.epochs * len(loader), settings.ema_momentum, settings.ema_momentum_end)
    target_export = exported_target_check(method, settings, ema.total_steps)

    # 5. the run directory (config.toml, env.json), monitoring and exports
    open_run_dir(run_dir, config, command, resume=resume, overwrite=overwrite, extend=extend, act=is_rank0())
    barrier()
    tracker.begin(run_dir, resume=resume)
    preprocessing = preprocessing_info(cache)
    provenance = pool_provenance(
        trained_ids(train_set), cache_fingerprint=summary["fingerprint"], id_column=config.data.id_column,
        subset=settings.subset,
    )  # fmt: skip
    export = EncoderExport(run_dir / "checkpoints", method, config, preprocessing, provenance)
    monitor = mon.make_monitor(
        method, train_full, val_set, limit=settings.monitor_samples, seed=config.run.seed,
        figures=run_dir / "figures", batch_size=batch_size, device=device, precision=settings.precision,
        method_name=settings.method,
    )  # fmt: skip
    initial = calibrate_monitor(monitor, settings)

    # 6. train
    fitted = fit(
        model=model, train_step=method_step, train_loader=loader, optimizer=optimizer, scheduler=scheduler,
        epochs=settings.epochs, run_dir=run_dir, device=device, precision=settings.precision,
        grad_clip=settings.grad_clip, evaluate=MonitorEpochs(method, monitor, settings), after_step=ema,
        export_last=export, resume=resume, log_every=settings.log_every, extend=extend, sink=tracker,
        stop_when=EpochWatch(settings.method, chance_losses(method), settings.stop_on_collapse),
    )  # fmt: skip

    # 7. final exports (rank 0): encoder.ckpt with the final figures, t-SNE, loss curve, results.json
    facts = {
        "method": settings.method, "encoder": encoder.name, "train_samples": len(train_set),
        "input_size": list(input_size), "device": str(device), "precision": settings.precision,
        "initial_monitoring": initial, **target_export,
    }  # fmt: skip
    pretext = pretext_vs_chance(method, settings.method, fitted.history)
    if pretext:
        facts["pretext_vs_chance"] = pretext
    facts["collapse_check"] = {"ratio_below": settings.collapse_ratio, "verdicts": verdicts_in(fitted.history)}
    if fitted.stop_reason:
        facts["stopped"] = fitted.stop_reason
    result = finish(fitted, run_dir, export, monitor, facts, seed=config.run.seed, start=start)
    tracker.finish()
    if fitted.stop_reason:
        raise RunFailure(
            f"pretraining stopped: {fitted.stop_reason} (pretrain.stop_on_collapse = true); its checkpoints and "
            f"results.json are in {run_dir}; change what the warning above names and start again with a new "
            f"run.name, or train on as it is with: medctl pretrain -c {run_dir / 'config.toml'} --resume "
            "pretrain.stop_on_collapse=false"
        )
    return result


# -------------------------------------------------------------------------------- what fit calls
def method_step(model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
    """``fit``'s ``train_step``: the method module computes its own loss."""
    return model(batch["image"])  # (B, C, *S) -> {"loss", ...}


@dataclass
class EmaUpdate:
    """``fit``'s ``after_step``: the target networks follow the online ones with the scheduled momentum."""

    model: nn.Module
    total_steps: int
    start: float
    end: float

    def __call__(self, step: int) -> None:
        momentum = momentum_schedule(step, self.total_steps, self.start, self.end)
        unwrap(self.model).update_target(momentum)


LEARNED_BELOW_CHANCE = 0.9  # a pretext head has learned when its last epoch's loss is under 90% of chance


def chance_losses(method: nn.Module) -> dict[str, float]:
    """Each pretext classifier's loss at chance (byol's rotation and jigsaw heads); {} for other methods."""
    return method.chance_losses() if hasattr(method, "chance_losses") else {}


def pretext_vs_chance(method: nn.Module, method_name: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Each pretext classifier's last-epoch loss beside its chance level (``method.chance_losses()``: byol's
    rotation and jigsaw heads), for results.json; a head that ended above 90% of chance learned nothing on
    this data while the total loss fell, and gets a warning with the setting that turns it off."""
    chance = chance_losses(method)
    last = history[-1] if history else {}
    report = {}
    for key, level in chance.items():
        final = last.get(f"train_{key}")
        if final is None:
            continue
        head = key.removeprefix("loss_")
        learned = final < LEARNED_BELOW_CHANCE * level
        report[head] = {"final_loss": final, "chance": level, "learned": learned}
        if not learned and is_rank0():
            log(
                f"warning: {method_name}'s {head} head ended at loss {final:.3f} against {level:.3f} for a uniform "
                f"guess over {round(math.exp(level))} classes: it learned nothing on this data and costs throughput; "
                f"set pretrain.{method_name}.{head}_weight=0, or train on data whose {head} it can see (centred, "
                "symmetric volumes give it none)"
            )
    return report


TARGET_STILL_INITIAL = 0.5  # warn when the exported EMA target holds more than this share of its initial weights
SUGGESTED_SHARE = 0.2  # the advice names the first momentum that brings the share to this or below


def exported_target_check(method: nn.Module, settings: PretrainConfig, total_steps: int) -> dict[str, Any]:
    """For a method whose ``encoder.ckpt`` is its EMA target (jepa): how much of the target's initial weights
    the momentum schedule leaves after this run's steps (``ema_target`` in results.json), with a warning and
    the fix when the export would still be mostly its random initialisation; ``{}`` for other methods."""
    exported = method.exported_encoders()["encoder"] if hasattr(method, "exported_encoders") else None
    if exported is None or exported is not getattr(method, "target_encoder", None):
        return {}
    start, end = settings.ema_momentum, settings.ema_momentum_end
    share = ema_initial_share(total_steps, start, end)
    if share > TARGET_STILL_INITIAL and is_rank0():
        lower = next(
            (m for m in (0.98, 0.95, 0.9, 0.8, 0.5, 0.0) if m < start and ema_initial_share(total_steps, m, end) <= SUGGESTED_SHARE),
            0.0,
        )
        log(
            f"warning: {settings.method} exports its EMA target as encoder.ckpt, and after {total_steps} steps at "
            f"momentum {start:g}->{end:g} it still holds {share:.0%} of its initial weights, close to a random "
            "initialisation; set "
            f"pretrain.ema_momentum={lower:g} ({ema_initial_share(total_steps, lower, end):.0%} left), train longer, or "
            "probe checkpoints/context_encoder.ckpt (the online encoder)"
        )
    return {"ema_target": {"momentum": [start, end], "steps": total_steps, "initial_share": share}}


@dataclass
class MonitorEpochs:
    """``fit``'s ``evaluate``: rank 0 measures collapse, k-NN and t-SNE as ``pretrain.*_every`` say; every
    rank returns rank 0's figures."""

    method: nn.Module
    monitor: Any  # mon.make_monitor's fixed train/val samples
    settings: PretrainConfig

    def __post_init__(self) -> None:
        self.check = CollapseCheck.from_settings(self.settings)

    def __call__(self, epoch: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if is_rank0():
            verdict_due = self.check.due(epoch, self.monitor.reference)
            metrics = mon.monitor_epoch(
                self.method,
                self.monitor,
                epoch,
                self.settings.epochs,
                monitor_every=self.settings.monitor_every,
                knn_every=self.settings.knn_every,
                tsne_every=self.settings.tsne_every,
                verdict=verdict_due,
            )
            if verdict_due:
                metrics |= self.check.judge(epoch, metrics, self.monitor.reference)
        return gather_objects(metrics)[0]  # every rank agrees on rank 0's figures


@dataclass
class EncoderExport:
    """``fit``'s ``export_last``: ``encoder.ckpt`` (and the method's other exports) in ``folder`` every epoch."""

    folder: Path
    method: nn.Module
    config: Config
    preprocessing: dict[str, Any]
    provenance: dict[str, Any]

    def __call__(self, epoch: int, record: dict[str, float]) -> None:
        self.save(record)

    def save(self, metrics: dict) -> None:
        export_encoders(self.folder, self.method, self.config, self.preprocessing, metrics, self.provenance)


# ---------------------------------------------------------------------------------------- pieces
def build_encoder(config: Config, summary: dict[str, Any], input_size: tuple[int, ...]) -> nn.Module:
    """``model.encoder`` for the cache's channels and size, ``model.checkpoint`` loaded into it (report logged)."""
    built = pretrained_encoder(
        config.model,
        in_channels=int(summary["in_channels"]),
        input_size=input_size,
        spatial_dims=int(summary["spatial_dims"]),
    )
    if built.report is not None:
        log(f"encoder initialised from {config.model.checkpoint}: " + "; ".join(built.report.lines()))
    return built.encoder


def build_optimization(
    method: nn.Module, settings: PretrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the method's online (trainable) parameters, cosine schedule with warmup per step. A method's
    ``lr_scales`` ({submodule name: multiple of pretrain.lr}) gives those submodules groups of their own."""
    scaled = {name: scale for name, scale in getattr(method, "lr_scales", {}).items() if scale != 1.0}
    own = {id(p) for name in scaled for p in getattr(method, name).parameters()}
    groups = [
        {**group, "params": [p for p in group["params"] if id(p) not in own]}
        for group in param_groups_with_decay(method, settings.lr, settings.weight_decay, include_frozen=False)
    ]
    for name, scale in scaled.items():
        groups += param_groups_with_decay(
            getattr(method, name), settings.lr * scale, settings.weight_decay, name=name, include_frozen=False
        )
    groups = [group for group in groups if group["params"]]
    return adamw_with_cosine(
        groups, weight_decay=settings.weight_decay, steps_per_epoch=steps_per_epoch,
        warmup_epochs=settings.warmup_epochs, epochs=settings.epochs, min_lr_ratio=settings.min_lr_ratio,
    )  # fmt: skip


def calibrate_monitor(monitor: Any, settings: Any) -> dict[str, float]:
    """The untrained encoder's collapse statistics (and k-NN accuracy): the reference of every later
    collapse check; {} when monitoring and the collapse verdict are off, or on ranks other than 0."""
    if not is_rank0() or (settings.monitor_every <= 0 and settings.knn_every <= 0 and not settings.collapse_check):
        return {}
    initial = mon.calibrate(monitor)
    log(
        f"before pretraining: mean per-dimension std {initial['embed_std_mean']:.2e}, "
        f"effective rank {initial['embed_rank']:.1f}"
        + (f", k-NN accuracy {initial['knn_accuracy']:.3f}" if "knn_accuracy" in initial else "")
    )
    return initial


def finish(
    fitted: FitResult,
    run_dir: Path,
    export: EncoderExport,
    monitor: Any,
    facts: dict[str, Any],
    *,
    seed: int,
    start: float,
) -> PretrainResult:
    """The final exports (rank 0): ``encoder.ckpt`` with the last monitoring figures, the final figures and
    ``results.json`` (``facts`` first: method, encoder, sizes, device); then the :class:`PretrainResult`."""
    history = fitted.history
    final = {k[len("val_") :]: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    throughput = statistics.median(row["samples_per_s"] for row in history) if history else 0.0
    final_loss = float(history[-1]["train_loss"]) if history else float("nan")
    encoder_path = export.folder / "encoder.ckpt"
    drawn: list[Path] = []
    if is_rank0():
        export.save({"loss": final_loss, "samples_per_s": throughput, "epochs": fitted.epochs_run, **final})
        drawn = mon.final_figures(export.method, monitor, history, seed=seed)
        results = {
            "method": facts["method"],
            "encoder": facts["encoder"],
            "epochs_run": fitted.epochs_run,
            **{k: v for k, v in facts.items() if k not in ("method", "encoder")},
            "final_loss": final_loss,
            "samples_per_s": throughput,
            "final_monitoring": final,
            "encoder_checkpoint": str(encoder_path),
            "figures": [str(p) for p in drawn],
            "wall_time_s": time.perf_counter() - start,
            "history": history,
        }
        write_results_and_timing(run_dir, results)
    barrier()
    return PretrainResult(
        run_dir=run_dir,
        encoder_checkpoint=encoder_path,
        epochs_run=fitted.epochs_run,
        final_loss=final_loss,
        samples_per_s=throughput,
        knn_accuracy=last_value(history, "val_knn_accuracy"),
        monitoring=final,
        history=history,
        figures=drawn,
    )


# ----------------------------------------------------------------------------------------- exports
def export_encoders(
    folder: Path,
    method: nn.Module,
    config: Config,
    preprocessing: dict[str, Any],
    metrics: dict,
    provenance: dict[str, Any] | None = None,
) -> None:
    """``encoder.ckpt`` and the method's other exports (``method.exported_encoders()``: jepa adds the online
    ``context_encoder.ckpt`` and, with ``pretrain.jepa.export_vjepa2``, ``vjepa2.pt`` in V-JEPA 2's layout)."""
    exported = (
        method.exported_encoders() if hasattr(method, "exported_encoders") else {"encoder": method.encoder}
    )
    for name, encoder in exported.items():
        export_encoder(folder / f"{name}.ckpt", encoder, config, preprocessing, metrics, provenance)
    if getattr(method, "export_vjepa2", False):
        done = int(metrics["epochs"]) if "epochs" in metrics else int(metrics.get("epoch", -1)) + 1
        save_checkpoint(folder / "vjepa2.pt", method.vjepa2_layout(epoch=done))


def export_encoder(
    path: Path,
    encoder: nn.Module,
    config: Config,
    preprocessing: dict[str, Any],
    metrics: dict,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """An encoder as a medctl encoder checkpoint (atomic), loadable by ``model.checkpoint``, with the
    hashed ids of its training pool (``provenance``, :mod:`medctl.data.provenance`)."""
    payload = encoder_payload(
        encoder,
        name=encoder.name,
        args=encoder.build_args,
        config_text=config.to_toml(),
        metrics=metrics,
    )
    payload["preprocessing"] = preprocessing
    if provenance is not None:
        payload["provenance"] = provenance
    return save_checkpoint(path, payload)


def last_value(history: list[dict[str, float]], key: str) -> float | None:
    for row in reversed(history):
        if key in row:
            return float(row[key])
    return None


__all__ = ["METHODS", "PretrainResult", "run_pretrain"]
