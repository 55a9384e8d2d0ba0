"""``medctl finetune``: a linear probe or a fine-tune of a pretrained (or random) encoder, one head per target.

The recipe, top to bottom (the numbers are the steps in :func:`_finetune`):

1. data: preprocess (or reuse) the cache; targets, sizes and class counts come from it; splits are checked
   (empty validation split, classes with no training sample) before anything is built
   (:mod:`medctl.finetune.checks`);
2. the run directory (:func:`medctl.runs.open_run_dir`: ``config.toml``, ``env.json``; then
   ``class_to_idx.json``);
3. the model: the encoder from the registry at the cache's size and channels, ``model.checkpoint`` loaded
   into it (its load report logged), one head per target (:mod:`medctl.finetune.model`);
4. the training and selection samples, and the losses per target from the training class counts, summed with
   ``data.targets[].weight`` (:mod:`medctl.finetune.losses`); regression heads predict in the target's units;
5. how the encoder is used, one builder per mode in :mod:`medctl.finetune.modes`, each giving ``fit`` the
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

6. AdamW, cosine schedule with warmup, ``train.precision``;
7. :func:`medctl.training.fit.fit`: validation every epoch (:mod:`medctl.finetune.metrics`), early stopping on
   ``train.monitor``, the best epoch exported as a self-contained classifier (``checkpoints/best.ckpt``) with
   ``val_preds.parquet``; ``last.ckpt`` also holds learned task weights (``train.task_weights = "uncertainty"``),
   so ``--resume`` goes on with them;
8. ``results.json`` and ``figures/training_curves.png`` (:mod:`medctl.finetune.outputs`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from medctl.config import Config
from medctl.data.dataset import (
    CacheDataset,
    read_inner_split,
    read_summary,
    target_specs,
)
from medctl.data.preprocess import preprocess
from medctl.finetune.augment import ImageAugment, build_augment
from medctl.finetune.checks import (
    cached_spatial_size,
    check_monitor,
    check_splits,
    encoder_trainable_from,
    needs_drop_last,
    refuse_before_data,
    standardizes_inputs,
    wants_feature_cache,
)
from medctl.finetune.grid import probe_grid
from medctl.finetune.leakage import audit_checkpoint
from medctl.finetune.losses import build_loss, learned_loss_state, scale_regression_heads
from medctl.finetune.metrics import Validation, validation_metrics
from medctl.finetune.model import (
    build_optimization,
    build_pretrained_encoder,
    describe_run,
    start_epoch,
    wrap_for_fit,
)
from medctl.finetune.modes import ModeInputs, build_mode
from medctl.finetune.outputs import BestExport, FinetuneResult, finetune_result, plot_curves, write_results
from medctl.io import write_json
from medctl.models.classifier import build_classifier
from medctl.models.preprocessing import preprocessing_info
from medctl.progress import log
from medctl.runs import open_run_dir
from medctl.tracking import connect
from medctl.training.distributed import (
    barrier,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    is_rank0,
    rank0_value,
)
from medctl.training.fit import fit
from medctl.training.precision import resolve_device, set_threads
from medctl.training.seed import set_seed


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
    config, run_dir = refuse_before_data(config, run_dir, resume, overwrite=overwrite, extend=extend)

    # 1. data: the cache, its targets and sizes; splits that cannot train a classifier stop here
    cache = rank0_value(lambda: preprocess(config.data).cache_dir)  # a rerun decodes nothing
    summary = read_summary(cache)
    specs = target_specs(cache)
    warnings = check_splits(summary, specs, config.data, cache)
    check_monitor(train.monitor, specs)
    spatial_size = cached_spatial_size(summary, cache)
    augment = build_augment(train.augment, spatial_size, config.run.seed)
    use_feature_cache = wants_feature_cache(first_trainable, train, model_cfg, augment)
    preprocessing = preprocessing_info(cache)  # what best.ckpt and results.json record of the cache
    overlap = audit_checkpoint(model_cfg.checkpoint, config.sweep.pretrain_ids, cache)
    if overlap.leaked:
        warnings.append(overlap.describe(f"pretraining leakage: {model_cfg.checkpoint}"))

    # 2. the run directory
    open_run_dir(run_dir, config, command, resume=resume, overwrite=overwrite, extend=extend, act=is_rank0())
    barrier()
    tracker.begin(run_dir, resume=resume)
    if is_rank0():
        write_json(run_dir / "class_to_idx.json", {s.name: {c: i for i, c in enumerate(s.classes)} for s in specs})

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
    scales = scale_regression_heads(classifier, specs, config.data, train_set)
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
        in_channels=int(summary["in_channels"]), spatial_size=spatial_size,
        data_fingerprint=preprocessing["data_fingerprint"],
        standardize=standardizes_inputs(model_cfg, first_trainable),
    )  # fmt: skip
    grid = probe_grid(train, first_trainable, mode, inputs)  # train.grid: one head per (lr_head, weight_decay)
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
    validate = Validation.of(val_set, specs, mode.val_logits, loss_fn, device)
    export = BestExport(classifier, config, specs, preprocessing, kind, run_dir, val_set.ids, validate)
    fitted = fit(
        model=model, train_step=trained.train_step, train_loader=trained.train_loader, optimizer=optimizer,
        scheduler=scheduler, epochs=train.epochs, run_dir=run_dir, device=device, precision=train.precision,
        grad_clip=0.0 if grid else train.grad_clip, patience=train.patience, resume=resume, extend=extend,
        evaluate=grid.validation(validate, validation_metrics) if grid else validate,
        monitor=None if grid else train.monitor,  # a grid stops and selects each head on its own
        export_best=None if grid else export,
        extra_modules=learned_loss_state(loss_fn) | ({"grid": grid.selection} if grid else {}),
        start_epoch_hook=partial(start_epoch, classifier.encoder, first_trainable, train.lr_encoder, augment),
        log_every=train.log_every, sink=tracker, early_stop_when=grid.selection.all_stopped if grid else None,
    )  # fmt: skip
    # a grid: the winner's best epoch into the classifier's heads, exported as a single head's would be
    fitted, chosen = grid.export_winner(fitted, classifier.heads, validate, export) if grid else (fitted, None)

    # 8. results.json and the curves
    result = finetune_result(
        fitted, config, run_dir=run_dir, mode=kind, feature_cache=bool(mode.feature_cache), cache=cache,
        data_fingerprint=preprocessing["data_fingerprint"], warnings=warnings, overlap=overlap.to_dict(), encoder=encoder,
        wall_time_s=time.perf_counter() - start, grid=chosen,
    )  # fmt: skip
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


# ------------------------------------------------------------------------------------------ pieces


