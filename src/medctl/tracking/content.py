"""What a run folder contributes to its tracked run: parameters, provenance tags, final metrics, artifacts.

Everything is read from the files the stages already write (``config.toml``, ``env.json``,
``results.json``, evaluate's ``metrics.json``, saliency's ``scores.json``), so the tracked run holds
exactly what the folder holds.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from medctl.runs import flatten

# env.json / results.json / metrics.json keys that say what a result was computed from
PROVENANCE_KEYS = (
    "medctl", "git_sha", "git_dirty", "torch", "device", "seed", "cache_fingerprint", "split_manifest_hash",
    "data_fingerprint", "checkpoint", "checkpoint_sha256", "same_data_as_training", "encoder", "mode", "method",
)  # fmt: skip
# reports, tables and figures, relative to the folder; a saliency folder's first few panels
ARTIFACTS = (
    "config.toml", "env.json", "results.json", "metrics.json", "scores.json", "index.csv", "report.md",
    "report.html", "leaderboard.md", "leaderboard.csv", "leaderboard_seeds.csv", "*.png", "figures/*.png",
)  # fmt: skip
PANELS = "maps/*/*.png"
MAX_PANELS = 4
CHECKPOINTS = ("checkpoints/best.ckpt", "checkpoints/encoder.ckpt")


def params_of(folder: Path) -> dict[str, Any]:
    """The resolved config of the folder, flattened (``train.lr_head``); lists as their TOML text."""
    path = folder / "config.toml"
    if not path.is_file():
        return {}
    return {
        k: v if isinstance(v, str | int | float | bool) else json.dumps(v)
        for k, v in flatten(tomllib.loads(path.read_text())).items()
    }


def provenance_of(folder: Path) -> dict[str, str]:
    """``medctl.<key>`` tags from what env.json, results.json and metrics.json (its ``provenance``) hold."""
    found: dict[str, Any] = {}
    for name in ("env.json", "results.json", "metrics.json"):
        data = _json(folder / name)
        found |= {k: data[k] for k in PROVENANCE_KEYS if data.get(k) not in (None, "")}
        found |= {
            k: v
            for k, v in flatten(data.get("provenance") or {}).items()
            if k.split(".")[-1] in PROVENANCE_KEYS and v not in (None, "")
        }
    return {f"medctl.{k}": str(v) for k, v in found.items()}


def final_metrics_of(folder: Path) -> dict[str, float]:
    """The figures a run ends with: fine-tune's best-epoch metrics, pretraining's final monitoring,
    evaluate's headline metrics with their 95% CIs (``<metric>_ci_low`` / ``_ci_high``), saliency's
    scores per method (``<method>/pointing_hit_rate``, ...)."""
    results, evaluated = _json(folder / "results.json"), _json(folder / "metrics.json")
    final: dict[str, Any] = {}
    final |= {f"final/{k}": v for k, v in (results.get("metrics") or {}).items()}
    final |= {f"final/{k}": v for k, v in (results.get("final_monitoring") or {}).items()}
    for key in ("best_metric", "best_epoch", "epochs_run", "final_loss"):
        final[f"final/{key}"] = results.get(key)
    for key, value in (evaluated.get("summary") or {}).items():
        if isinstance(value, list) and len(value) == 2:  # "balanced_accuracy_ci": [low, high]
            final[f"{key}_low"], final[f"{key}_high"] = value
        else:
            final[key] = value
    for method, figures in (_json(folder / "scores.json").get("scores") or {}).items():  # saliency
        final |= {f"{method}/{k}": v for k, v in figures.items() if k != "seconds"}
    return {
        k: float(v)
        for k, v in final.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def artifacts_of(folder: Path, *, checkpoints: bool) -> list[Path]:
    """The files of ``folder`` worth a look in the tracker's UI (see ARTIFACTS), checkpoints when asked."""
    found = [path for pattern in ARTIFACTS for path in sorted(folder.glob(pattern)) if path.is_file()]
    found += sorted(folder.glob(PANELS))[:MAX_PANELS]
    if checkpoints:
        found += [folder / name for name in CHECKPOINTS if (folder / name).is_file()]
    return list(dict.fromkeys(found))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
