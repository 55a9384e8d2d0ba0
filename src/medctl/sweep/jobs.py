"""One sweep entry as a job: trained and evaluated in this process or a spawned worker (pinned to one GPU, or
to its share of the CPU cores), its outcome returned as plain values, never raised."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from medctl.config import Config
from medctl.errors import CheckpointError, MedctlError, RunFailure
from medctl.evaluate import run_evaluate
from medctl.finetune import run_finetune
from medctl.sweep.entries import (
    SweepEntry,
    entry_config,
)
from medctl.sweep.state import (
    DONE_FILE,
    inner_split_digest,
    write_done,
)


def now_s() -> float:
    return round(time.time(), 3)


def visible_gpus() -> list[str]:
    """The GPU indices workers are pinned to, one each round-robin (none on a CPU-only machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def init_worker(slots: Any, devices: list[str], threads: int) -> None:
    """In each spawned worker, before any CUDA call: pin one GPU, or limit torch to its share of the cores."""
    slot = slots.get()
    os.environ["MEDCTL_NO_PROGRESS"] = "1"  # one progress bar, the sweep's
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    else:
        import torch

        torch.set_num_threads(threads)


def run_entry_job(
    *,
    config: dict[str, Any],
    entry: dict[str, Any],
    run_dir: str,
    manifest_hash: str,
    command: str,
    resume: bool,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one entry; returns ``{"status", "reason", "wall_time_s"}`` and never raises a
    medctl error or a failure of the run (KeyboardInterrupt passes). Picklable arguments: runs in workers."""
    start = time.perf_counter()
    the_entry = SweepEntry.from_dict(entry)
    try:
        train_and_evaluate(
            Config.model_validate(config), the_entry, Path(run_dir), manifest_hash, command, resume, overwrite
        )
    except MedctlError as exc:
        return {
            "status": "failed",
            "reason": first_line(str(exc)),
            "wall_time_s": time.perf_counter() - start,
        }
    except Exception as exc:  # a failure inside one entry's run becomes its row; the others go on
        return {
            "status": "failed",
            "reason": first_line(f"{type(exc).__name__}: {exc}"),
            "wall_time_s": time.perf_counter() - start,
        }
    return {"status": "done", "reason": "", "wall_time_s": time.perf_counter() - start}


def train_and_evaluate(
    config: Config,
    entry: SweepEntry,
    run_dir: Path,
    manifest_hash: str,
    command: str,
    resume: bool,
    overwrite: bool = False,
) -> None:
    """run_finetune into ``run_dir``, the manifest check, run_evaluate on val and test, then ``done.json``."""
    if entry.checkpoint and not Path(entry.checkpoint).expanduser().is_file():
        raise CheckpointError(f"{entry.checkpoint}: no such file; fix the path in sweep.checkpoints")
    (run_dir / DONE_FILE).unlink(missing_ok=True)
    resolved = entry_config(config, entry)
    result = run_finetune(resolved, command=command, resume=resume, run_dir=run_dir, overwrite=overwrite)
    recorded = json.loads(result.results_path.read_text()).get("split_manifest_hash")
    if recorded != manifest_hash:
        raise RunFailure(
            f"{result.results_path}: trained on split manifest {recorded}, not the sweep's {manifest_hash} "
            "(the data changed during the sweep); rerun the sweep"
        )
    evaluated = {}
    for split in ("val", "test"):
        evaluated[split] = run_evaluate(
            result.best_checkpoint,
            split=split,
            config_overrides=resolved,
            out_dir=run_dir / f"eval_{split}",
            n_bootstrap=config.sweep.bootstrap,
            overwrite=True,  # the entry was just trained: its evaluations are redone with it
        )
    write_done(
        run_dir,
        entry,
        manifest_hash,
        epochs_run=result.epochs_run,
        train_wall_time_s=round(result.wall_time_s, 3),
        n_test=evaluated["test"].n_samples,
        inner_split=inner_split_digest(resolved.train.inner_split),
    )


def first_line(text: str) -> str:
    """A message on one line (a multi-problem ConfigError's lines joined)."""
    return " ".join(line.strip() for line in text.strip().splitlines()) or "no reason given"
