"""EEG: recordings per second through the spectrogram preprocessor, and a synthetic multi-task run.

    uv run python benchmarks/bench_eeg.py                 # small study: 48 EDF recordings of 20 s
    uv run python benchmarks/bench_eeg.py --size medium   # 120 recordings of 30 s

1. Writes the synthetic study (medctl.data.synthetic_eeg: 6 channels at 128 Hz), then times
   ``preprocess`` into a fresh cache (EDF read by MNE, STFT windows of 4 s every 2 s), with 1 and 2
   workers, and a rerun that decodes nothing.
2. Runs ``medctl demo --eeg``'s recipe on that study (one resnet_test_2d, heads for health, gender and age)
   and reports each task on the test split against chance (age: MAE against predicting the test mean).

Prints the figures and appends them to benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from machine_info import machine

from medctl.config import load_config
from medctl.data.preprocess import preprocess
from medctl.data.synthetic_eeg import make_eeg_dataset
from medctl.demo_eeg import EEG_SIZES, run_eeg_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=list(EEG_SIZES))
    parser.add_argument("--skip-training", action="store_true", help="only the preprocessor figures")
    args = parser.parse_args()
    size = EEG_SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix="bench_eeg_"))
    try:
        study = make_eeg_dataset(
            work / "data", n_subjects=size.n_subjects, recordings_per_subject=size.recordings_per_subject,
            seconds=size.seconds,
        )  # fmt: skip
        n = len(study.ids)
        lines = [f"- study: {n} EDF recordings of {size.seconds:g} s, 6 channels at 128 Hz ({args.size})"]
        for workers in (1, 2):
            cache = work / f"cache_{workers}"
            config = load_config(None, [*study.config_overrides(), f'data.cache_dir="{cache}"'])
            start = time.perf_counter()
            result = preprocess(config.data, workers=workers)
            seconds = time.perf_counter() - start
            lines.append(
                f"- preprocess, {workers} worker(s): {seconds:.1f} s, {n / seconds:.1f} recordings/s, "
                f"{len(result.manifest) / seconds:.0f} windows/s ({len(result.manifest)} windows, shape "
                f"{list(result.manifest['shape'].iloc[0])})"
            )
        start = time.perf_counter()
        again = preprocess(config.data, workers=1)
        lines.append(f"- rerun with nothing new: {time.perf_counter() - start:.2f} s, {again.n_new} decoded")
        if not args.skip_training:
            demo = work / "demo"
            demo.mkdir()
            shutil.copytree(work / "data", demo / "data")
            start = time.perf_counter()
            run = run_eeg_demo(demo, size=args.size)
            lines.append(
                f"- multi-task run ({run.n_windows} windows, resnet_test_2d, {size.epochs} epochs, early-stopped on "
                f"val_loss): {time.perf_counter() - start:.0f} s"
            )
            for name, task in run.tasks.items():
                low, high = task["ci"]
                lines.append(
                    f"  - {name}: test {task['metric']} {task['value']:.3f} [95% CI {low:.3f}, {high:.3f}], "
                    f"chance {task['chance']:.3f}: {'above chance' if task['beats_chance'] else 'NOT above chance'}"
                )
            results = json.loads((demo / "finetune" / "results.json").read_text())
            lines.append(f"  - best epoch {results['best_epoch']} (1-based); validation: " + ", ".join(
                f"{k} {v:.3f}" for k, v in results["metrics"].items() if k.endswith(("balanced_accuracy", "mae", "r2"))
            ))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    header = f"## EEG spectrograms and multi-task — {datetime.now():%Y-%m-%d %H:%M}"
    text = "\n".join([header, "", *lines, "- machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "", ""])
    print(text)
    with open(Path(__file__).with_name("RESULTS.md"), "a") as fh:
        fh.write("\n" + text)


if __name__ == "__main__":
    main()
