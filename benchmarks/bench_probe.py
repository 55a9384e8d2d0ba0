"""Linear probe: heads trained on cached embeddings vs the frozen encoder run every epoch.

Target (DESIGN.md): the cached-feature probe is >= 30x faster over 50 epochs and trains the same head.
Both runs go through ``run_finetune`` with the same config and seed on the same preprocessed cache
(built before timing); only ``train.feature_cache`` differs. The cached run starts with an empty feature
cache, so its time includes computing the embeddings once. Figures: the wall time of each whole run,
their ratio, the mean training-epoch time of each, and the largest difference between the two heads.
The cached run still runs the encoder over train and val once, so over E epochs the ratio cannot pass
about E (50x here); its fixed costs (cache check, checkpoints, logs, figure) weigh more on small data.

    uv run python benchmarks/bench_probe.py                      # prints figures, appends to RESULTS.md
    uv run python benchmarks/bench_probe.py --epochs 5 --no-append   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from medctl.config import load_config
from medctl.data.dataset import CacheDataset
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset
from medctl.finetune import run_finetune
from medctl.models.registry import build_encoder
from medctl.training.precision import resolve_device
from medctl.training.state import read_train_state

RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=32, help="synthetic volumes (about 60%% train, 20%% val)")
    parser.add_argument("--size", type=int, nargs=3, default=[32, 32, 32], help="cached volume size (D H W)")
    parser.add_argument("--encoder", default="mt3", help="registered encoder (random initialisation)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="run.device: cpu, cuda, auto")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()


def probe(overrides: list[str], feature_cache: bool, name: str):
    config = load_config(
        None, [*overrides, f"train.feature_cache={str(feature_cache).lower()}", f'run.name="{name}"'], env={}
    )
    start = time.perf_counter()
    result = run_finetune(config)
    return result, time.perf_counter() - start


def warm_up(args: argparse.Namespace) -> None:
    """torch's optimizer imports (seconds) and the first forward pass's kernel setup, untimed."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    encoder = build_encoder(args.encoder, input_size=args.size).to(resolve_device(args.device)).eval()
    with torch.no_grad():
        encoder(torch.zeros(args.batch_size, 1, *args.size, device=resolve_device(args.device)))


def heads_of(run_dir: Path) -> dict[str, torch.Tensor]:
    state = read_train_state(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("heads.")}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MEDCTL_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = make_synthetic_dataset(root / "data", n=args.n, dims=3, size=args.size, seed=0)
        overrides = [
            *dataset.config_overrides(),
            f"model.encoder={json.dumps(args.encoder)}",
            f"data.batch_size={args.batch_size}",
            f"run.device={json.dumps(args.device)}",
            f"run.root={json.dumps(str(root / 'runs'))}",
            f"train.epochs={args.epochs}",
            "train.patience=0",  # every epoch runs: the same amount of work in both
            "train.log_every=0",
            "data.preprocess.workers=1",
        ]
        preprocess(load_config(None, overrides, env={}).data)  # untimed, shared by both runs
        warm_up(args)  # once-per-process costs, paid untimed so that neither run carries them
        cached, cached_s = probe(overrides, True, "cached")
        direct, direct_s = probe(overrides, False, "direct")
        a, b = heads_of(cached.run_dir), heads_of(direct.run_dir)
        head_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        head_scale = max(float(b[k].abs().max()) for k in b)
        assert len(list((cached.cache_dir / "features").glob("*_train.pt"))) == 1
        assert cached.feature_cache and not direct.feature_cache
        n_train, n_val = (len(CacheDataset(cached.cache_dir, split)) for split in ("train", "val"))

    def epoch_s(result) -> float:
        return sum(row["epoch_time_s"] for row in result.history) / len(result.history)

    ratio = direct_s / cached_s
    figures = {
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
    for key, value in figures.items():
        print(f"{key:52s} {value}")
    if args.no_append:
        return
    lines = [
        f"\n## bench_probe.py — {datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/ (newest last).\n")
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
