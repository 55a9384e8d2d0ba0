"""The demo's 2D saliency check over training seeds: does a map beat the input baselines and random weights? (issue 24)

``medctl.demo_saliency`` trains a 2D ResNet from scratch on images whose class evidence is not the brightest
thing (three round distractors brighter than it sit in every image), then ``medctl saliency`` scores
integrated gradients and HiResCAM on every test lesion with the demo's settings. This script repeats that for
several training seeds (the data stay the same) and prints each method's pointing game, its random-weight
copy's, the exact paired tests against the intensity map and against random weights, and the deletion sign
tests. ``--family lesion`` runs the earlier demo data (round lesions, two distractors, no flips, 160 images,
6 epochs) for comparison.

    uv run python benchmarks/bench_distractor_saliency.py                     # rods, 3 seeds, ~2 min on 2 cores
    uv run python benchmarks/bench_distractor_saliency.py --family lesion --n 160 --epochs 6

Prints a RESULTS.md entry and appends it (``--no-append``: print only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

from machine_info import machine, publish

from medctl.demo_saliency import DISTRACTOR_DATA, DISTRACTOR_METHODS, DISTRACTOR_SIZES, train_on_distractors
from medctl.io import format_number
from medctl.saliency.stage import run_saliency_stage


def parse_args() -> argparse.Namespace:
    small = DISTRACTOR_SIZES["small"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(DISTRACTOR_DATA), default="rod")
    parser.add_argument("--n", type=int, default=small.n, help="images")
    parser.add_argument("--epochs", type=int, default=small.epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (run.seed)")
    parser.add_argument("--no-append", action="store_true")
    return parser.parse_args()


def paired_cell(comparison: dict, wins: str = "only_method", losses: str = "only_other") -> str:
    """'18–0, p < 0.001': the discordant samples each way and the exact p."""
    p = comparison["p"]
    return f"{comparison[wins]}–{comparison[losses]}, p {'< 0.001' if p < 0.001 else f'= {p:.3f}'}"


def seed_rows(seed: int, scores: dict, lesions: int, val: float) -> list[str]:
    rows = []
    for method, entry in scores.items():
        deletion = entry.get("deletion") or {}
        comparisons = entry["comparisons"]
        rows.append(
            f"| {seed} | {val:.2f} | {method} | {entry['pointing_hits']}/{lesions} | "
            f"{entry['random_weights_hits']}/{entry['random_weights_scored']} | "
            f"{paired_cell(comparisons['input_intensity'])} | {paired_cell(comparisons['random_weights'])} | "
            f"{format_number(entry.get('randomisation_spearman'), 2)} | "
            f"{paired_cell(deletion['random_order'], 'lower', 'higher')} | "
            f"{paired_cell(deletion['random_weights'], 'lower', 'higher')} |"
        )
    return rows


def main() -> None:
    args = parse_args()
    data = DISTRACTOR_DATA[args.family]
    start = time.perf_counter()
    rows, intensity_hits = [], []
    with tempfile.TemporaryDirectory(prefix="bench_distractor_") as folder:
        for seed in args.seeds:
            root = Path(folder) / f"seed{seed}"
            trained = train_on_distractors(root, args.n, args.epochs, [f"run.seed={seed}"], args.family)
            stage = run_saliency_stage(
                trained.best_checkpoint, split="test", methods=list(DISTRACTOR_METHODS),
                out_dir=root / "saliency_test", max_samples=4,
            )  # fmt: skip
            result = stage.result
            intensity_hits.append(result.baselines["input_intensity"]["pointing_hits"])
            val = float(trained.metrics["balanced_accuracy"])
            rows += seed_rows(seed, result.scores, result.lesions_in_split, val)
    info = machine()
    lines = [
        f"## bench_distractor_saliency.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- {args.family} data: {args.n} 2D images of 32x32, {data.distractors} round distractors brighter than the"
        f" evidence in every image, min-max scaled{', random flips' if data.flips else ''}; `resnet_test_2d` (no"
        f" max-pool) from scratch, {args.epochs} epochs, training seeds {', '.join(map(str, args.seeds))} (the data"
        f" stay the same); the demo's saliency settings; the intensity map hits {', '.join(map(str, intensity_hits))}"
        " test lesions",
        f"- machine: {info['cpu']}, {info['cores']} cores, gpu {info['gpu']}; load average"
        f" {info['load average (1 min) at the end']}; wall time {(time.perf_counter() - start) / 60:.1f} min",
        "- paired cells: samples won–lost by the method, exact McNemar (pointing) or sign test (deletion: lower AUC"
        " wins)",
        "",
        "| seed | val bal. acc | map | hits | random-weight hits | vs intensity map | vs random weights |"
        " randomisation ρ | deletion vs random order | deletion vs random weights |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
