"""Sweep of K checkpoints vs K separate naive runs that run the frozen encoder every epoch.

Both sides do the same work per checkpoint on the same preprocessed cache (built before timing): a
linear probe of the encoder for the same epochs, then the test split evaluated with ``run_evaluate``.
The naive side is K ``run_finetune`` calls with ``train.feature_cache=false`` (the encoder runs every
step) plus K test evaluations; the sweep side is one ``run_sweep`` (embeddings computed once per entry
and split, val and test evaluated, the leaderboard with paired p-values written), starting with an
empty feature cache. Figures: both wall times and their ratio, and the leaderboard's leader.

    uv run python benchmarks/bench_sweep.py                           # prints figures, appends to RESULTS.md
    uv run python benchmarks/bench_sweep.py --epochs 5 --no-append    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from medctl.config import load_config
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset
from medctl.evaluate import run_evaluate
from medctl.finetune import run_finetune
from medctl.models.checkpoints import encoder_payload, save_checkpoint
from medctl.models.registry import build_encoder
from medctl.sweep import run_sweep

RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=3, help="checkpoints (perturbed copies of a random encoder)")
    parser.add_argument("--n", type=int, default=32, help="synthetic volumes (about 60%% train, 20%% val)")
    parser.add_argument("--size", type=int, nargs=3, default=[16, 32, 32], help="cached volume size (D H W)")
    parser.add_argument("--encoder", default="mt3_tiny", help="registered encoder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--bootstrap", type=int, default=200, help="resamples for CIs and p-values (both sides)"
    )
    parser.add_argument("--device", default="cpu", help="run.device: cpu, cuda, auto")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()


def make_checkpoints(folder: Path, encoder: str, size: list[int], k: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(k):
        torch.manual_seed(i)
        model = build_encoder(encoder, input_size=size)
        paths.append(
            save_checkpoint(
                folder / f"ckpt_{i}.pt", encoder_payload(model, name=encoder, args=model.build_args)
            )
        )
    return paths


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MEDCTL_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = make_synthetic_dataset(root / "data", n=args.n, dims=3, size=args.size, seed=0)
        checkpoints = make_checkpoints(root / "ckpts", args.encoder, args.size, args.k)
        overrides = [
            *dataset.config_overrides(),
            f"model.encoder={json.dumps(args.encoder)}",
            f"data.batch_size={args.batch_size}",
            f"run.device={json.dumps(args.device)}",
            f"run.root={json.dumps(str(root / 'runs'))}",
            f"train.epochs={args.epochs}",
            "train.patience=0",  # every epoch runs: the same amount of work on both sides
            "train.log_every=0",
            f"train.bootstrap={args.bootstrap}",
            f"sweep.bootstrap={args.bootstrap}",
            "data.preprocess.workers=1",
            f"sweep.checkpoint_dir={json.dumps(str(root / 'ckpts'))}",
            "sweep.random_baseline=false",
        ]
        cache = preprocess(load_config(None, overrides, env={}).data).cache_dir  # untimed, shared
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # torch's one-time optimizer imports, untimed

        start = time.perf_counter()
        naive_scores = {}
        for path in checkpoints:
            config = load_config(
                None,
                [
                    *overrides,
                    "train.feature_cache=false",
                    f'run.name="naive_{path.stem}"',
                    f'model.checkpoint="{path}"',
                ],
                env={},
            )
            result = run_finetune(config)
            assert not result.feature_cache
            naive_scores[path.stem] = run_evaluate(result.best_checkpoint, split="test").summary[
                "balanced_accuracy"
            ]
        naive_s = time.perf_counter() - start

        shutil.rmtree(cache / "features", ignore_errors=True)  # the sweep computes its embeddings, timed
        start = time.perf_counter()
        sweep = run_sweep(load_config(None, [*overrides, 'run.name="sweep"'], env={}))
        sweep_s = time.perf_counter() - start
        board = sweep.leaderboard
        assert (board["status"] == "ok").all() and len(board) == args.k, board[["entry", "status", "reason"]]
        per_entry = board.set_index("entry")["test_balanced_accuracy"].to_dict()

    ratio = naive_s / sweep_s
    figures = {
        "checkpoints x encoder / volume / device": f"{args.k} x {args.encoder} / {'x'.join(map(str, args.size))} / {args.device}",
        "samples / epochs x batch size": f"{args.n} / {args.epochs} x {args.batch_size}",
        "naive: K runs, encoder every epoch, + test evaluation": f"{naive_s:.1f} s",
        "sweep: one run_sweep (cached embeddings, val+test eval, leaderboard)": f"{sweep_s:.1f} s",
        "speed-up": f"{ratio:.1f}x",
        "leader / test balanced accuracy (sweep; naive)": f"{sweep.leader} / "
        + ", ".join(f"{k} {per_entry[k]:.3f}; {naive_scores[k]:.3f}" for k in sorted(per_entry)),
    }
    for key, value in figures.items():
        print(f"{key:70s} {value}")
    if args.no_append:
        return
    lines = [
        f"\n## bench_sweep.py — {datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
