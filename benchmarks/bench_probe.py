"""Probe speed: cached embeddings vs the frozen encoder every epoch, and a grid of heads vs one head.

Three parts, each on one synthetic dataset and its preprocessed cache (built untimed), every run through
``run_finetune`` with ``train.patience = 0`` (every epoch runs, the same work on both sides of a ratio):

- ``p1`` (DESIGN.md target >= 30x): the cached-feature probe against the frozen encoder run every epoch,
  ``train.feature_cache`` the only difference. The cached run starts with an empty feature cache, so its
  time includes computing the embeddings once; over E epochs the ratio cannot pass about E. Figures: whole-run
  wall times, their ratio, mean training-epoch times, the largest difference between the two heads;
- ``grid`` (issue 23: a 20-head ``train.grid`` <= 2x one head on cached embeddings, <= 4x for the attentive
  probe on cached tokens): the grid (5 lr_head x 4 weight_decay, config/sweep.toml's) against one head, both
  on a cache an untimed one-epoch run filled;
- ``optimism``: how much the best-on-val grid point overstates its own test score. Per seed (``run.seed``:
  the random encoder, head initialisation and batch order), val minus test balanced accuracy of the grid's
  selected head and of the one fixed head (train.lr_head / weight_decay defaults), paired over the seeds.

    uv run python benchmarks/bench_probe.py                      # every part; prints figures, appends to RESULTS.md
    uv run python benchmarks/bench_probe.py --parts grid --epochs 5 --no-append   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from medctl.analysis.leaderboard import paired_seed_test
from medctl.config import load_config
from medctl.data.dataset import CacheDataset
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset
from medctl.evaluate import run_evaluate
from medctl.finetune import run_finetune
from medctl.models.registry import build_encoder
from medctl.training.precision import resolve_device
from medctl.training.state import read_train_state

RESULTS = Path(__file__).with_name("RESULTS.md")


GRID = "train.grid={lr_head=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], weight_decay=[0.0, 1e-4, 1e-3, 1e-2]}"  # sweep.toml's
PARTS = ("p1", "grid", "optimism")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=240, help="synthetic volumes (about 60%% train, 20%% val)")
    parser.add_argument("--size", type=int, nargs=3, default=[16, 32, 32], help="cached volume size (D H W)")
    parser.add_argument("--encoder", default="mt3_tiny", help="registered encoder (random initialisation)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5, help="optimism: run.seed 0 .. seeds-1")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--device", default="cpu", help="run.device: cpu, cuda, auto")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()


def probe(overrides: list[str], name: str, *extra: str):
    config = load_config(None, [*overrides, *extra, f'run.name="{name}"'], env={})
    start = time.perf_counter()
    result = run_finetune(config)
    return result, time.perf_counter() - start


def epoch_s(result) -> float:
    """The mean training-epoch time of a run (its loop alone, without validation, caching or exports)."""
    return sum(row["epoch_time_s"] for row in result.history) / len(result.history)


def warm_up(args: argparse.Namespace) -> None:
    """torch's optimizer imports (seconds) and the first forward pass's kernel setup, untimed."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    encoder = build_encoder(args.encoder, input_size=args.size).to(resolve_device(args.device)).eval()
    with torch.no_grad():
        encoder(torch.zeros(args.batch_size, 1, *args.size, device=resolve_device(args.device)))


def heads_of(run_dir: Path) -> dict[str, torch.Tensor]:
    state = read_train_state(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("heads.")}


def part_p1(args: argparse.Namespace, overrides: list[str]) -> dict[str, str]:
    cached, cached_s = probe(overrides, "cached", "train.feature_cache=true")
    direct, direct_s = probe(overrides, "direct", "train.feature_cache=false")
    a, b = heads_of(cached.run_dir), heads_of(direct.run_dir)
    head_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    head_scale = max(float(b[k].abs().max()) for k in b)
    assert cached.feature_cache and not direct.feature_cache
    n_train, n_val = (len(CacheDataset(cached.cache_dir, split)) for split in ("train", "val"))
    ratio = direct_s / cached_s
    return {
        "encoder / volume / device": f"{args.encoder} (random init) / {'x'.join(map(str, args.size))} / {args.device}",
        "samples (train / val)": f"{n_train} / {n_val}",
        "epochs x batch size": f"{args.epochs} x {args.batch_size}",
        "frozen encoder every epoch, whole run": f"{direct_s:.1f} s ({epoch_s(direct) * 1000:.0f} ms per training epoch)",
        "cached features, whole run (incl. embedding once)": f"{cached_s:.1f} s ({epoch_s(cached) * 1000:.1f} ms per training epoch)",
        "speed-up (target >= 30x)": f"{ratio:.1f}x {'PASS' if ratio >= 30 else 'MISS'}",
        "training epochs alone, speed-up": f"{epoch_s(direct) / epoch_s(cached):.0f}x",
        "same head: max abs difference of head weights": f"{head_diff:.2e} (largest weight {head_scale:.2f})",
        "best epoch / val balanced accuracy (cached, direct)": f"{cached.best_epoch} / {cached.best_metric:.3f}, "
        f"{direct.best_epoch} / {direct.best_metric:.3f}",
    }


def part_grid(args: argparse.Namespace, overrides: list[str]) -> dict[str, str]:
    figures = {}
    for label, kind, target in (("cached embeddings, linear", "linear", 2.0), ("cached tokens, attentive", "attentive", 4.0)):
        head = [f'model.head.kind="{kind}"']
        probe(overrides, f"warm_{kind}", *head, "train.epochs=1")  # the embedding or token cache, untimed
        one, one_s = probe(overrides, f"one_{kind}", *head)
        grid, grid_s = probe(overrides, f"grid_{kind}", *head, GRID)
        assert one.feature_cache and grid.feature_cache and len(grid.grid["grid"]) == 20
        ratio, epoch_ratio = grid_s / one_s, epoch_s(grid) / epoch_s(one)
        figures[f"{label}: 1 head / 20-head grid, whole run"] = f"{one_s:.1f} s / {grid_s:.1f} s"
        figures[f"{label}: grid / one head (target <= {target:g}x)"] = (
            f"{ratio:.2f}x {'PASS' if ratio <= target else 'MISS'}; training epochs alone {epoch_ratio:.2f}x "
            f"({epoch_s(one) * 1000:.1f} vs {epoch_s(grid) * 1000:.1f} ms)"
        )
        selected = grid.grid["selected"]
        figures[f"{label}: selected point (val balanced accuracy) vs the one head"] = (
            f"lr {selected['lr_head']:g}, wd {selected['weight_decay']:g} ({grid.best_metric:.3f}) vs "
            f"lr 1e-3, wd 1e-4 ({one.best_metric:.3f})"
        )
    return figures


def part_optimism(args: argparse.Namespace, overrides: list[str], root: Path) -> dict[str, str]:
    gaps: dict[str, dict[int, float]] = {"grid": {}, "fixed": {}}
    tests: dict[str, dict[int, float]] = {"grid": {}, "fixed": {}}
    for seed in range(args.seeds):
        for name, extra in (("grid", [GRID]), ("fixed", [])):
            result, _ = probe(overrides, f"opt_{name}_{seed}", f"run.seed={seed}", "train.patience=10", *extra)
            test = run_evaluate(result.best_checkpoint, split="test", out_dir=root / f"eval_{name}_{seed}", n_bootstrap=0)
            tests[name][seed] = float(test.summary["balanced_accuracy"])
            gaps[name][seed] = float(result.metrics["balanced_accuracy"]) - tests[name][seed]

    def spread(values: dict[int, float]) -> str:
        array = np.array(list(values.values()))
        return f"{array.mean():+.3f} ± {array.std(ddof=1):.3f}"

    extra_gap = paired_seed_test(gaps["grid"], gaps["fixed"])
    test_gain = paired_seed_test(tests["grid"], tests["fixed"])
    n = extra_gap["n"]
    return {
        "seeds (random encoder, head init, batch order)": f"{n} (run.seed 0..{n - 1}), patience 10, {args.epochs} epochs",
        "val - test balanced accuracy, grid's selected head (mean ± sd)": spread(gaps["grid"]),
        "val - test balanced accuracy, fixed head lr 1e-3 wd 1e-4": spread(gaps["fixed"]),
        "grid's extra optimism (paired over seeds)": f"{extra_gap['mean']:+.3f} ± {extra_gap['std']:.3f}, p = {extra_gap['p']:.2f}"
        + ("" if extra_gap["p"] < 0.05 else " (not distinguishable from 0)"),
        "test balanced accuracy, grid - fixed (paired)": f"{test_gain['mean']:+.3f} ± {test_gain['std']:.3f}, p = {test_gain['p']:.2f}"
        + ("" if test_gain["p"] < 0.05 else " (not distinguishable)"),
        "per seed test (grid / fixed)": ", ".join(f"{tests['grid'][s]:.2f}/{tests['fixed'][s]:.2f}" for s in sorted(tests["grid"])),
        "per seed val (grid / fixed)": ", ".join(
            f"{gaps['grid'][s] + tests['grid'][s]:.2f}/{gaps['fixed'][s] + tests['fixed'][s]:.2f}" for s in sorted(tests["grid"])
        ),
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MEDCTL_NO_PROGRESS", "1")
    figures: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = make_synthetic_dataset(root / "data", n=args.n, dims=3, size=args.size, seed=0)
        overrides = [
            *dataset.config_overrides(),
            f"model.encoder={json.dumps(args.encoder)}",
            f"data.batch_size={args.batch_size}",
            f"data.preprocess.spatial_size={json.dumps(args.size)}",
            f"run.device={json.dumps(args.device)}",
            f"run.root={json.dumps(str(root / 'runs'))}",
            f"train.epochs={args.epochs}",
            "train.patience=0",  # every epoch runs: the same amount of work in both
            "train.log_every=0",
            "data.preprocess.workers=1",
        ]
        preprocess(load_config(None, overrides, env={}).data)  # untimed, shared by every run
        warm_up(args)  # once-per-process costs, paid untimed so that no run carries them
        if "p1" in args.parts:
            figures["cached probe vs the frozen encoder every epoch (P1)"] = part_p1(args, overrides)
        if "grid" in args.parts:
            figures["a 20-head grid vs one head on the same cache"] = part_grid(args, overrides)
        if "optimism" in args.parts:
            figures["how much the best-on-val grid point overstates its test score"] = part_optimism(args, overrides, root)
    for title, rows in figures.items():
        print(f"\n{title}")
        for key, value in rows.items():
            print(f"  {key:64s} {value}")
    if args.no_append:
        return
    setting = (
        f"{args.n} synthetic volumes {'x'.join(map(str, args.size))}, {args.encoder} (random init), "
        f"{args.epochs} epochs x batch {args.batch_size}, {args.device}"
    )
    lines = [
        f"\n## bench_probe.py — {datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        f"setting: {setting}",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    for title, rows in figures.items():
        lines += ["", f"| {title} | |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in rows.items()]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/ (newest last).\n")
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
