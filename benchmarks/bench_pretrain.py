"""Does pretraining help, and how fast is it? BYOL vs random init under a linear probe; samples/s per method.

    uv run python benchmarks/bench_pretrain.py             # appends a dated section to benchmarks/RESULTS.md
    uv run python benchmarks/bench_pretrain.py --no-write  # print only

1. Linear probe: on a synthetic 3D lesion dataset (``medctl.data.synthetic``, 80 volumes 16x32x32),
   ``mt3_tiny`` is pretrained with BYOL through ``medctl.pretrain.run.run_pretrain`` (labels never
   seen); the frozen encoder embeds the train split, a ``StandardScaler + LogisticRegression`` is fitted
   on the embeddings, and its accuracy on val + test is compared with the same probe on the same
   architecture at its random initialisation - the exact weights BYOL started from (same ``run.seed``).
   Two variants: plain BYOL (auxiliary heads off) for ``--seeds`` (default 0 1 2: about 4 minutes in
   all on 2 CPU cores), and BYOL with the reconstruction, rotation and jigsaw heads at their
   ``[pretrain.byol]`` defaults for ``--heads-seeds`` (none by default: each costs about 2.5 plain runs).
2. Throughput: samples/s of ``fit`` for each method (byol on mt3_tiny with its heads, mim_contrastive on
   unet2d_tiny, jepa on vit3d_test) on the CPU, and in bf16 on CUDA when a GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medctl.config import load_config
from medctl.data.dataset import CacheDataset
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset
from medctl.models.checkpoints import load_encoder_weights
from medctl.models.registry import build_encoder
from medctl.pretrain.embeddings import embed_items
from medctl.pretrain.run import run_pretrain
from medctl.training.seed import set_seed

RESULTS = Path(__file__).with_name("RESULTS.md")
SIZE = (16, 32, 32)
BYOL = ['pretrain.method="byol"', 'model.encoder="mt3_tiny"', "pretrain.warmup_epochs=2", "pretrain.monitor_every=0",
        "pretrain.knn_every=0"]  # fmt: skip
VARIANTS = {
    "BYOL": ["pretrain.byol.reconstruction_weight=0", "pretrain.byol.rotation_weight=0", "pretrain.byol.jigsaw_weight=0"],
    "BYOL + rec/rot/jigsaw heads": [],  # the [pretrain.byol] defaults: weights 1.0, 0.5, 0.5
}


def dataset_overrides(ds, root: Path) -> list[str]:
    return [*ds.config_overrides(), f'data.cache_dir="{root / "cache"}"', f'run.root="{root / "runs"}"']


def probe(encoder: torch.nn.Module, cache: Path) -> dict[str, float]:
    """StandardScaler + LogisticRegression on the train split's embeddings, scored on val + test."""
    encoder.eval()
    cpu = torch.device("cpu")

    def embeddings(split: str):
        ds = CacheDataset(cache, split)
        return embed_items(encoder, ds, range(len(ds)), ds.targets, batch_size=16, device=cpu)

    with torch.no_grad():
        train, val, test = embeddings("train"), embeddings("val"), embeddings("test")
    x_eval = np.concatenate([val.vectors, test.vectors])
    y_eval = np.concatenate([val.labels["label"], test.labels["label"]])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    pred = clf.fit(train.vectors, train.labels["label"]).predict(x_eval)
    return {
        "accuracy": accuracy_score(y_eval, pred),
        "balanced_accuracy": balanced_accuracy_score(y_eval, pred),
        "n_train": len(train.vectors),
        "n_eval": len(y_eval),
    }


def random_encoder(seed: int) -> torch.nn.Module:
    """mt3_tiny exactly as run_pretrain initialises it for ``run.seed = seed`` (it seeds right before building)."""
    set_seed(seed)
    return build_encoder("mt3_tiny", in_channels=1, input_size=SIZE)


def probe_comparison(
    root: Path, n: int, epochs: int, batch_size: int, plan: list[tuple[str, int]]
) -> list[dict]:
    ds = make_synthetic_dataset(root / "data3d", n=n, dims=3, size=SIZE, seed=0)
    base = dataset_overrides(ds, root)
    cache = preprocess(load_config(None, base).data).cache_dir
    random_scores: dict[int, dict] = {}
    rows = []
    for variant, seed in plan:
        if seed not in random_scores:
            random_scores[seed] = probe(random_encoder(seed), cache)
        name = f"byol_{len(rows)}"
        config = load_config(
            None,
            [*base, *BYOL, *VARIANTS[variant], f"run.seed={seed}", f'run.name="{name}"', f"pretrain.epochs={epochs}",
             f"data.batch_size={batch_size}"],
        )  # fmt: skip
        start = time.perf_counter()
        result = run_pretrain(config)
        wall = time.perf_counter() - start
        pretrained = build_encoder("mt3_tiny", in_channels=1, input_size=SIZE)
        load_encoder_weights(pretrained, result.encoder_checkpoint)
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "random": random_scores[seed],
                "byol": probe(pretrained, cache),
                "final_loss": result.final_loss,
                "samples_per_s": result.samples_per_s,
                "wall_s": wall,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def throughput(root: Path, device: str, precision: str, epochs: int = 2) -> list[dict]:
    """samples/s of fit per method: the median over epochs (the first one includes warm-up)."""
    ds3 = make_synthetic_dataset(root / "tp3d", n=40, dims=3, size=SIZE, seed=1)
    ds2 = make_synthetic_dataset(root / "tp2d", n=40, dims=2, size=(64, 64), seed=2)
    cases = [
        ("byol", ds3, ['model.encoder="mt3_tiny"']),
        ("mim_contrastive", ds2, ['model.encoder="unet2d_tiny"', "pretrain.mim_contrastive.patch_size=16"]),
        (
            "jepa",
            ds3,
            ['model.encoder="vit3d_test"', "pretrain.jepa.predictor_dim=64", "pretrain.jepa.predictor_heads=2"],
        ),
    ]
    rows = []
    for method, ds, extra in cases:
        config = load_config(
            None,
            [*dataset_overrides(ds, root), f'pretrain.method="{method}"', *extra, f'run.name="tp_{method}_{device}"',
             f"pretrain.epochs={epochs}", "data.batch_size=8", f'run.device="{device}"', f'pretrain.precision="{precision}"',
             "pretrain.monitor_every=0", "pretrain.knn_every=0"],
        )  # fmt: skip
        result = run_pretrain(config)
        rows.append(
            {
                "method": method,
                "encoder": config.model.encoder,
                "input": "x".join(map(str, ds.size)),
                "device": device,
                "precision": precision,
                "samples_per_s": result.samples_per_s,
                "last_epoch_samples_per_s": result.history[-1]["samples_per_s"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} cores (1-min load {load:.1f} at the end), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {gpu}"
    )


def markdown(probe_rows: list[dict], tp_rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    n_train = probe_rows[0]["random"]["n_train"] if probe_rows else "?"
    n_eval = probe_rows[0]["random"]["n_eval"] if probe_rows else "?"
    lines = [
        f"\n## bench_pretrain.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Machine: {machine()}. Total wall time {wall:.0f} s.",
        "",
        "### Linear probe: BYOL-pretrained vs randomly initialised `mt3_tiny`",
        "",
        f"{args.n} synthetic lesion volumes 16x32x32 ({n_train} train, probe scored on {n_eval} val+test); BYOL "
        f"{args.epochs} epochs, batch {args.batch_size}, lr and views at the `[pretrain]` and `[pretrain.byol]` defaults; probe = "
        "StandardScaler + LogisticRegression(C=0.1) on the frozen pooled embeddings; random = the same weights BYOL "
        "started from.",
        "",
        "| variant | seed | random acc | BYOL acc | random bal. acc | BYOL bal. acc | final loss | samples/s | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in probe_rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['random']['accuracy']:.3f} | {r['byol']['accuracy']:.3f} | "
            f"{r['random']['balanced_accuracy']:.3f} | {r['byol']['balanced_accuracy']:.3f} | {r['final_loss']:.3f} | "
            f"{r['samples_per_s']:.1f} | {r['wall_s']:.0f} |"
        )
    if probe_rows:
        wins = sum(r["byol"]["balanced_accuracy"] > r["random"]["balanced_accuracy"] for r in probe_rows)
        mean_r = np.mean([r["random"]["balanced_accuracy"] for r in probe_rows])
        mean_b = np.mean([r["byol"]["balanced_accuracy"] for r in probe_rows])
        lines += [
            "",
            f"BYOL beats random in {wins} of {len(probe_rows)} runs; mean balanced accuracy {mean_b:.3f} vs {mean_r:.3f}.",
        ]
    lines += [
        "",
        "### Throughput: samples/s of `fit` (median over 2 epochs, batch 8; byol with its three heads on)",
        "",
        "| method | encoder | input | device | precision | samples/s | last epoch |",
        "| --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in tp_rows:
        lines.append(
            f"| {r['method']} | {r['encoder']} | {r['input']} | {r['device']} | {r['precision']} | "
            f"{r['samples_per_s']:.1f} | {r['last_epoch_samples_per_s']:.1f} |"
        )
    if not torch.cuda.is_available():
        lines += ["", "bf16 on CUDA: not measured, no GPU visible on this machine."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80, help="synthetic volumes (about 60%% train)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of plain BYOL")
    parser.add_argument(
        "--heads-seeds",
        type=int,
        nargs="*",
        default=[],
        help="seeds of BYOL with its heads (~2.5x slower each)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MEDCTL_NO_PROGRESS", "1")
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    plan = [("BYOL", s) for s in args.seeds] + [("BYOL + rec/rot/jigsaw heads", s) for s in args.heads_seeds]
    try:
        probe_rows = probe_comparison(root, args.n, args.epochs, args.batch_size, plan)
        tp_rows = [] if args.skip_throughput else throughput(root, "cpu", "fp32")
        if torch.cuda.is_available() and not args.skip_throughput:
            tp_rows += throughput(root, "cuda", "bf16")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = markdown(probe_rows, tp_rows, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        with open(RESULTS, "a") as fh:
            fh.write(text)
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
