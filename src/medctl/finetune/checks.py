"""What a fine-tune checks and decides before it trains: when the encoder trains, which inputs the heads
see, the run folder and the splits; every refusal is one line naming the key or file and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medctl.analysis.regression import REGRESSION_HEADLINE
from medctl.config import Config, DataConfig, ModelConfig, TrainConfig
from medctl.data.tables import TargetSpec
from medctl.errors import ConfigError, DataError
from medctl.finetune.augment import ImageAugment
from medctl.finetune.metrics import VAL_METRICS
from medctl.models.architecture import choose_encoder
from medctl.progress import log
from medctl.runs import claim_run_dir, run_path, timestamp
from medctl.training.distributed import rank0_value


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


def needs_drop_last(first_trainable: int | None, n_train: int, batch_size: int) -> bool:
    """A last batch of one sample breaks BatchNorm in a training encoder: drop it then."""
    return first_trainable is not None and n_train > batch_size and n_train % batch_size == 1


def refuse_before_data(
    config: Config, run_dir: str | Path | None, resume: bool, *, overwrite: bool, extend: bool
) -> tuple[Config, Path]:
    """What is refused without the cache, so before the preprocess pass: ``model.encoder = "auto"`` with no
    checkpoint to read the architecture from, and the run folder's rule (:func:`medctl.runs.claim_run_dir`,
    checked only). Returns the config naming the run's folder (:func:`named_run`) and the folder."""
    model = config.model
    if model.encoder == "auto" and not model.checkpoint and not model.architecture_from:
        choose_encoder(model, in_channels=1)  # raises its one line: "auto" has nothing to read
    config = named_run(config, Path(run_dir) if run_dir is not None else None)
    path = run_path(config, resume=resume, stamp=rank0_value(timestamp))
    claim_run_dir(path, config, resume=resume, overwrite=overwrite, extend=extend, act=False)
    return config, path


def named_run(config: Config, run_dir: Path | None) -> Config:
    """``config`` with ``run.root`` / ``run.name`` naming ``run_dir`` when the caller chose the folder (a sweep
    entry, the demo), so that its ``config.toml`` says where it ran."""
    if run_dir is None:
        return config
    return config.model_copy(update={"run": config.run.model_copy(update={"root": str(run_dir.parent), "name": run_dir.name})})


def cached_spatial_size(summary: Mapping[str, Any], cache: Path) -> list[int]:
    size = summary.get("spatial_size")
    if not size:
        raise DataError(
            f"{cache}/summary.json: the cached samples have different sizes; a classifier needs one size: "
            "set data.preprocess.spatial_size (e.g. [32, 64, 64]) and rerun"
        )
    return [int(s) for s in size]


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
