"""``medctl evaluate``: a trained classifier on one split -> predictions, metrics with CIs, figures, a report.

The checkpoint alone suffices: it rebuilds the classifier and holds the resolved config of its training
run, whose ``[data]`` section says where the cache is and how it was made. A config file (``-c``), a
``Config`` or ``key=value`` overrides can point the data elsewhere (another table, another bucket, a
cache on this machine); the cache must have been made with the same size, channels and classes.

Steps: load the classifier -> resolve the data settings -> the cache (built when missing) -> logits on
the split -> :func:`medctl.analysis.reports.evaluate_predictions`, which writes ``<split>_preds.parquet``,
``metrics.json`` (with bootstrap CIs), confusion matrices (CSV + PNG), ROC curves, ``report.md`` and
``report.html`` into ``<run dir>/eval_<split>/`` unless ``out_dir`` says otherwise, with ``env.json``
(versions, device, git state, command, seed; no secrets) beside them. ``metrics.json`` and
``report.md`` carry the provenance (:func:`provenance`): which checkpoint file (path and SHA-256), from
which training run, on which cache (settings fingerprint, split-manifest hash, and whether both match
what the classifier was trained on), and the git SHA the evaluation ran at.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medctl.analysis.reports import evaluate_predictions
from medctl.config import Config, checkpoint_config
from medctl.data.dataset import CacheDataset, check_cache_fits, read_summary, split_manifest_hash
from medctl.data.preprocess import ensure_cache
from medctl.data.tables import TargetSpec
from medctl.errors import ConfigError, DataError
from medctl.io import write_json
from medctl.models.checkpoints import load_classifier
from medctl.progress import log
from medctl.runs import environment_info, git_state, redact
from medctl.tracking import connect
from medctl.training.precision import resolve_device, set_threads
from medctl.training.predict import labels_of, predict_logits, probabilities


@dataclass
class EvaluateResult:
    """Where the evaluation went and what ``metrics.json`` holds."""

    out_dir: Path
    split: str
    checkpoint: Path
    n_samples: int
    metrics: dict[str, Any]  # the metrics.json payload: summary, per-target metrics with CIs, files

    @property
    def summary(self) -> dict[str, Any]:
        """The primary target's headline numbers and CIs (what a leaderboard row takes)."""
        return self.metrics["summary"]

    @property
    def preds_path(self) -> Path:
        return self.out_dir / f"{self.split}_preds.parquet"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.md"


def run_evaluate(
    checkpoint: str | Path,
    *,
    split: str = "test",
    config_overrides: Config | None = None,
    out_dir: str | Path | None = None,
    n_bootstrap: int | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
    command: str = "",
) -> EvaluateResult:
    """Evaluate the classifier in ``checkpoint`` on ``split`` of its data (see the module docstring).

    ``config_overrides``: a Config whose ``[data]`` and ``[run]`` sections replace the checkpoint's.
    ``config_file`` / ``overrides``: a TOML file and ``key=value`` items layered over the checkpoint's
    config (what ``medctl evaluate -c FILE key=value`` passes). ``n_bootstrap`` defaults to
    ``train.bootstrap``; ``out_dir`` to ``<run dir>/eval_<split>/``. An earlier evaluation there
    (``metrics.json``) is refused unless ``overwrite``. ``command`` (the command line) goes into
    ``env.json``, with secret-looking values hidden.
    """
    checkpoint = Path(checkpoint)
    out = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint, split)
    if (out / "metrics.json").is_file() and not overwrite:
        raise ConfigError(
            [f"{out} already holds an evaluation ({out / 'metrics.json'}); choose another --out, or replace it "
             "with --overwrite"],
            "--out",
        )  # fmt: skip
    classifier, meta = load_classifier(checkpoint)
    config = checkpoint_config(meta, checkpoint, config_overrides, config_file, overrides)
    tracker = connect(config.tracking, kind="evaluate")
    device = resolve_device(config.run.device)
    set_threads(config.run.threads, config.data.num_workers)
    classifier = classifier.to(device)
    specs = [TargetSpec.from_dict(t) for t in meta.get("targets") or []]

    cache = ensure_cache(config.data)
    check_cache_fits(cache, specs, meta.get("preprocessing") or {}, checkpoint)
    dataset = CacheDataset(cache, split, [s.name for s in specs])
    if not len(dataset):
        raise DataError(
            f"{cache}: the {split} split has no samples; pick another with --split (train, val, test)"
        )

    logits = predict_logits(
        classifier,
        dataset,
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
        device=device,
        precision=config.train.precision,
    )
    probs = {s.name: probabilities(logits[s.name], s.kind) for s in specs}
    model = meta.get("model") or {}
    env = environment_info(out.parent) | {"command": redact(command), "seed": config.run.seed}
    write_json(out / "env.json", env)
    payload = evaluate_predictions(
        dataset.ids,
        labels_of(dataset, specs),
        probs,
        [s.to_dict() for s in specs],
        out,
        split=split,
        n_bootstrap=config.train.bootstrap if n_bootstrap is None else n_bootstrap,
        seed=config.run.seed,
        title=f"{model.get('name', 'classifier')} ({checkpoint.name})",
        provenance=provenance(checkpoint, meta, cache, git=env),
    )
    log(f"evaluate: {len(dataset)} {split} samples -> {out}")
    # into the tracked run of the checkpoint's training run, or a new run linked to it
    tracker.begin(out, source_run=payload["provenance"]["training_run"]["dir"])
    tracker.finish()
    return EvaluateResult(out, split, checkpoint, len(dataset), payload)


def provenance(
    checkpoint: Path, meta: Mapping[str, Any], cache: Path, git: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Where an evaluation's numbers come from: the checkpoint file, its training run, the data, the code.

    The training run is the checkpoint's run directory (``runs/<name>/`` for ``checkpoints/best.ckpt``)
    with its name, best epoch and, from its ``env.json`` when there, the git SHA it was trained at. The
    data is the cache evaluated, with its settings fingerprint and split-manifest hash next to the ones
    recorded at training. ``git``: a mapping with ``git_sha`` / ``git_dirty`` (default: looked up now).
    """
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    trained_config = _toml_or_empty(meta.get("config") or "")
    training_env = run_dir / "env.json"
    trained_at = json.loads(training_env.read_text()).get("git_sha") if training_env.is_file() else None
    preprocessing = meta.get("preprocessing") or {}
    fingerprint, manifest_hash = read_summary(cache).get("fingerprint"), split_manifest_hash(cache)
    recorded = preprocessing.get("cache_fingerprint"), preprocessing.get("split_manifest_hash")
    git = git if git is not None else git_state()
    return {
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
        "training_run": {
            "dir": str(run_dir.resolve()),
            "name": (trained_config.get("run") or {}).get("name"),
            "epoch": (meta.get("metrics") or {}).get("epoch"),
            "git_sha": trained_at,
        },
        "cache": str(cache.resolve()),
        "cache_fingerprint": fingerprint,
        "split_manifest_hash": manifest_hash,
        "trained_cache_fingerprint": recorded[0],
        "trained_split_manifest_hash": recorded[1],
        "same_data_as_training": None if None in recorded else recorded == (fingerprint, manifest_hash),
        "git_sha": git.get("git_sha"),
        "git_dirty": git.get("git_dirty"),
        "medctl": (meta.get("medctl") or {}).get("version"),
    }


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _toml_or_empty(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}


def default_out_dir(checkpoint: Path, split: str) -> Path:
    """``runs/x/checkpoints/best.ckpt`` -> ``runs/x/eval_<split>``; elsewhere, beside the checkpoint."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / f"eval_{split}"
