"""``medctl demo --eeg``: recordings to spectrograms to one multi-task model, on a laptop CPU, in minutes.

The recipe, top to bottom (each step is the library function its own command calls, writing an ordinary
run directory, so any step can be rerun by hand with the config it saved):

1. a synthetic EEG study written as real EDF files (:mod:`medctl.data.synthetic_eeg`): health carried
   by alpha vs theta power, gender by the side of a beta rhythm, age by delta amplitude;
2. ``preprocess``: each recording -> 4 s STFT spectrogram windows every 2 s, split by subject;
3. ``finetune``: one ``resnet_test_2d`` with three heads (health, gender: binary; age: regression),
   early-stopped on the validation loss of all three (balanced accuracy saturates before age is learned);
4. ``evaluate`` on the test split: every task with bootstrap intervals, a scatter plot for age;
5. ``report.md`` / ``report.html``: each task against chance (age: against predicting the training mean).

A second run reuses the cache and the trained model; ``fresh=True`` starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medctl.analysis.markdown import write_report
from medctl.config import Config, load_config
from medctl.data.preprocess import preprocess
from medctl.data.synthetic_eeg import SyntheticEEG, make_eeg_dataset
from medctl.errors import UserError
from medctl.evaluate import run_evaluate
from medctl.finetune.run import run_finetune
from medctl.progress import log


@dataclass(frozen=True)
class EEGDemoSize:
    n_subjects: int
    recordings_per_subject: int
    seconds: float
    epochs: int
    bootstrap: int


EEG_SIZES = {
    "tiny": EEGDemoSize(12, 1, 8.0, 3, 50),  # the test suite's end-to-end run
    "small": EEGDemoSize(24, 2, 20.0, 12, 1000),
    "medium": EEGDemoSize(40, 3, 30.0, 20, 1000),
}


@dataclass
class EEGDemoResult:
    out: Path
    report_md: Path
    report_html: Path
    tasks: dict[str, dict[str, Any]]  # target -> test metrics (with its chance level)
    n_recordings: int
    n_windows: int
    reused: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def eeg_demo_config(
    out: Path, study: SyntheticEEG, size: EEGDemoSize, config_file: Path | None, overrides: Iterable[str]
) -> Config:
    """Defaults < the user's ``-c`` file < the study's locations and spectrogram settings < the demo's model <
    the user's ``key=value``."""
    return load_config(
        config_file,
        [
            *study.config_overrides(),
            f"data.cache_dir={json.dumps(str(out / 'cache'))}",
            f"run.root={json.dumps(str(out))}",
            'run.name="finetune"',
            "data.batch_size=16",
            'model.encoder="resnet_test_2d"',
            "model.freeze_encoder=false",
            f"train.epochs={size.epochs}",
            "train.warmup_epochs=1",
            "train.lr_head=3e-3",
            "train.lr_encoder=3e-3",
            'train.monitor="val_loss"',  # every task's loss: balanced accuracy saturates before age is learned
            f"train.patience={size.epochs}",
            f"train.bootstrap={size.bootstrap}",
            *overrides,
        ],
    )


def run_eeg_demo(
    out: str | Path = "runs/demo_eeg",
    *,
    size: str = "small",
    fresh: bool = False,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> EEGDemoResult:
    """Run every step into ``out``; see the module docstring."""
    if size not in EEG_SIZES:
        raise UserError(f"--size {size!r} is not a demo size; use one of: {', '.join(EEG_SIZES)}")
    settings, out = EEG_SIZES[size], Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    seconds: dict[str, float] = {}

    # 1. the study, written once
    start = time.perf_counter()
    data_dir = out / "data"
    if (data_dir / "participants.tsv").is_file():
        study = SyntheticEEG(data_dir, data_dir / "participants.tsv", data_dir / "recordings")
        reused.append("dataset")
    else:
        study = make_eeg_dataset(
            data_dir,
            n_subjects=settings.n_subjects,
            recordings_per_subject=settings.recordings_per_subject,
            seconds=settings.seconds,
        )
    config = eeg_demo_config(out, study, settings, Path(config_file) if config_file else None, overrides)
    seconds["dataset"] = time.perf_counter() - start

    # 2. spectrogram windows into the cache
    start = time.perf_counter()
    prepared = preprocess(config.data)
    if prepared.n_new == 0:
        reused.append("preprocess")
    seconds["preprocess"] = time.perf_counter() - start

    # 3. one model, three heads
    start = time.perf_counter()
    run_dir = out / "finetune"
    best = run_dir / "checkpoints" / "best.ckpt"
    if (run_dir / "results.json").is_file() and best.is_file():
        reused.append("finetune")
    else:
        best = run_finetune(config, command="medctl demo --eeg", run_dir=run_dir).best_checkpoint
    seconds["finetune"] = time.perf_counter() - start

    # 4. every task on test
    start = time.perf_counter()
    evaluation = run_evaluate(best, split="test", out_dir=run_dir / "eval_test", overwrite=True)  # cheap: redone each time
    seconds["evaluate"] = time.perf_counter() - start

    # 5. the report
    tasks = task_summary(evaluation.metrics)
    manifest = prepared.manifest[prepared.manifest.status == "ok"]
    markdown = eeg_demo_report(config, tasks, manifest["source_id"].nunique(), len(manifest), run_dir)
    report_md, report_html = write_report(markdown, out, name="report")
    log("demo --eeg: reused " + ", ".join(reused) if reused else "demo --eeg: every step ran fresh")
    return EEGDemoResult(
        out, report_md, report_html, tasks, manifest["source_id"].nunique(), len(manifest), reused, seconds
    )


def task_summary(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per target its headline test number, interval and the chance level it must beat."""
    tasks = {}
    for name, target in metrics["targets"].items():
        if target["kind"] == "regression":
            tasks[name] = {
                "metric": "mae",
                "value": target["mae"],
                "ci": [target["ci"]["mae"]["low"], target["ci"]["mae"]["high"]],
                "chance": target["mae_of_mean"],
                "beats_chance": target["mae"] is not None and target["mae"] < target["mae_of_mean"],
                "r2": target["r2"],
            }
        else:
            tasks[name] = {
                "metric": "balanced_accuracy",
                "value": target["balanced_accuracy"],
                "ci": [target["ci"]["balanced_accuracy"]["low"], target["ci"]["balanced_accuracy"]["high"]],
                "chance": 1.0 / len(target["classes"]),
                "beats_chance": (target["balanced_accuracy"] or 0) > 1.0 / len(target["classes"]),
                "auroc": target["auroc"],
            }
    return tasks


def eeg_demo_report(
    config: Config, tasks: dict[str, dict[str, Any]], n_recordings: int, n_windows: int, run_dir: Path
) -> str:
    eeg = config.data.eeg
    lines = [
        "# medctl demo --eeg",
        "",
        f"{n_recordings} synthetic EDF recordings -> {n_windows} spectrogram windows ({eeg.window_s:g} s every "
        f"{eeg.hop_s:g} s, n_fft {eeg.n_fft}, hop {eeg.stft_hop}, up to {eeg.fmax:g} Hz), split by subject; "
        f"one `{config.model.encoder}` with a head per task, fine-tuned for {config.train.epochs} epochs.",
        "",
        "| task | test metric | value | 95% CI | chance | above chance |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    for name, task in tasks.items():
        low, high = task["ci"]
        interval = "—" if low is None else f"[{low:.3f}, {high:.3f}]"
        chance = "predicting the mean" if task["metric"] == "mae" else "1 / classes"
        lines.append(
            f"| {name} | {task['metric']} | {task['value']:.3f} | {interval} | {task['chance']:.3f} ({chance}) | "
            f"{'yes' if task['beats_chance'] else 'no'} |"
        )
    evaluation = run_dir / "eval_test"
    lines += ["", f"Per-task report: `{evaluation / 'report.md'}`.", ""]
    scatter = evaluation / "figures" / "test_scatter_age.png"
    if scatter.is_file():
        lines += [f"![age: predicted vs true]({scatter.relative_to(run_dir.parent)})", ""]
    return "\n".join(lines)
