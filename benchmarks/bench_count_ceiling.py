"""How much of the count family can anything read at this size? The ceiling a pretraining gain is judged under.

Issue 29 asks BYOL to beat random initialisation on the ``count`` family (4 classes by the number of small bright
blobs; 120 volumes of 16x64x64, ~70 in train). Before reading a pretraining result on it, this measures, on the
same data and splits as ``bench_byol_collapse.py``:

- the family's reference reader (``medctl.data.synthetic_families.read_count``: bright groups against the organ's
  local median, no model, no labels): exact and within-one accuracy over every volume;
- each encoder at its random initialisation: the same embedding probes as ``bench_byol_collapse.py``;
- each encoder trained from scratch **with the labels** (``medctl finetune``, encoder and head together):
  balanced accuracy on test, and the same probes on its encoder. A self-supervised encoder whose linear probe
  beats this has learned more of the count from no labels than supervision did with them.

    uv run python benchmarks/bench_count_ceiling.py                        # mt3 and resnet_test_3d, ~12 min
    uv run python benchmarks/bench_count_ceiling.py --encoder mt3 --epochs 60
    uv run python benchmarks/bench_count_ceiling.py --extra-test 480   # and on 480 volumes no run has seen

With ``--extra-test N`` the reader, each trained classifier and each held-out probe are also judged on N more
volumes the generator draws at another seed (``bench_byol_collapse.py``'s, shared with it): the 24 test
volumes alone put a 95% interval of about ±0.18 around an accuracy.

Prints a RESULTS.md entry and appends it (``--no-append``: print only).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_byol_collapse import SPLITS, data_overrides, dataset_root, embeddings, extra_test_data, judge
from machine_info import machine, publish

from medctl.analysis.proportions import rate_interval
from medctl.config import load_config
from medctl.data.preprocess import preprocess
from medctl.data.readers import read_image
from medctl.data.synthetic_families import COUNT_CLASSES, read_count
from medctl.evaluate.stage import run_evaluate
from medctl.finetune.run import run_finetune
from medctl.models.architecture import pretrained_encoder
from medctl.training.seed import set_seed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", action="append", help="repeatable; default mt3 and resnet_test_3d")
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--size", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3, help="head and encoder learning rate of the supervised run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="/tmp/bench_byol_collapse", help="shared with bench_byol_collapse.py")
    parser.add_argument("--extra-test", type=int, default=0, help="judge on this many more unseen volumes too")
    parser.add_argument("--no-append", action="store_true")
    return parser.parse_args()


def reader_accuracy(root: Path) -> tuple[float, float, int]:
    """The reference reader over every volume of the table: exact and within-one accuracy, and how many."""
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    truth, read = [], []
    for row in table.itertuples():
        image = read_image(root / "images" / f"{row.participant_id}.nrrd")
        truth.append(COUNT_CLASSES.index(row.label) + 1)
        read.append(read_count(image.array[0], image.spacing))
    truth, read = np.asarray(truth), np.asarray(read)
    return float((truth == read).mean()), float((np.abs(truth - read) <= 1).mean()), len(truth)


def classifier_hits_on(checkpoint: Path, extra_root: Path, out: Path) -> np.ndarray:
    """The trained classifier's hit per volume of every split of the dataset at ``extra_root`` (through
    ``run_evaluate`` with the checkpoint's data pointed there, as ``medctl evaluate ... data.table=...`` does)."""
    hits = []
    for split in SPLITS:
        data = [f'data.table="{extra_root}/participants.tsv"', f'data.source.root="{extra_root}/images"',
                f'data.cache_dir="{extra_root}/cache"']  # fmt: skip
        evaluated = run_evaluate(checkpoint, split=split, overrides=data, out_dir=out / split, n_bootstrap=0, overwrite=True)
        preds = pd.read_parquet(evaluated.preds_path)
        hits.append((preds["y_true"] == preds["y_pred"]).to_numpy())
    return np.concatenate(hits)


def encoder_rows(args: argparse.Namespace, root: Path, encoder: str, extra: tuple[Path, Path] | None) -> list[dict]:
    """Random initialisation and supervised-from-scratch rows for one encoder; ``extra``: the unseen volumes'
    dataset root and cache."""
    overrides = [
        *data_overrides(root, "count", args.size), f'model.encoder="{encoder}"', "data.batch_size=8",
        f'run.root="{root}/runs"', f'run.name="supervised_{encoder}_s{args.seed}"', f"run.seed={args.seed}",
        "model.freeze_encoder=false", f"train.epochs={args.epochs}", f"train.lr_head={args.lr}",
        f"train.lr_encoder={args.lr}", "train.patience=0", "train.grid={}", "train.log_every=0",
    ]  # fmt: skip
    config = load_config(None, overrides, env={})
    cache = preprocess(config.data).cache_dir
    shape = dict(in_channels=1, input_size=tuple(args.size), spatial_dims=3)
    set_seed(args.seed)
    random_init = pretrained_encoder(config.model, **shape).encoder
    extra_cache = extra[1] if extra else None
    rows = [{
        "encoder": encoder, "weights": "random initialisation",
        **judge(embeddings(random_init, cache, extra_cache), args.seed),
    }]  # fmt: skip
    start = time.perf_counter()
    result = run_finetune(config, overwrite=True)
    wall = time.perf_counter() - start
    evaluated = run_evaluate(
        result.best_checkpoint, split="test", out_dir=root / "runs" / f"eval_{encoder}_s{args.seed}", n_bootstrap=0,
        overwrite=True,
    )  # fmt: skip
    supervised = pretrained_encoder(
        config.model.model_copy(update={"checkpoint": str(result.best_checkpoint), "checkpoint_key": ""}), **shape
    ).encoder
    rows.append({
        "encoder": encoder, "weights": f"supervised from scratch, {args.epochs} epochs ({wall:.0f} s)",
        "classifier_test": float(evaluated.summary["balanced_accuracy"]), "classifier_val": float(result.metrics["balanced_accuracy"]),
        **judge(embeddings(supervised, cache, extra_cache), args.seed),
    })  # fmt: skip
    if extra:
        hits = classifier_hits_on(result.best_checkpoint, extra[0], root / "runs" / f"eval_{encoder}_s{args.seed}_extra")
        rows[-1]["classifier_extra"] = rate_interval(int(hits.sum()), len(hits)).text()
    return rows


def report(
    args: argparse.Namespace, readers: list[tuple[float, float, int]], rows: list[dict], wall: float
) -> list[str]:
    info = machine()
    reader, extra = readers[0], args.extra_test > 0
    size = "x".join(map(str, args.size))
    lines = [
        f"## bench_count_ceiling.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- data: the count family, {args.n} volumes of {size} (bench_byol_collapse.py's, same splits); supervised runs:"
        f" encoder and head together from random initialisation, lr {args.lr:g}, batch 8, {args.epochs} epochs,"
        f" the epoch of best val balanced accuracy kept, seed {args.seed}",
        f"- machine: {info['cpu']}, {info['cores']} cores, gpu {info['gpu']}; load average {info['load average (1 min) at the end']};"
        f" wall time {wall / 60:.1f} min",
        f"- reference reader (`read_count`, no model, no labels), all {reader[2]} volumes: exact {reader[0]:.2f},"
        f" within one {reader[1]:.2f} (chance 0.25 exact)"
        + (f"; on the {readers[1][2]} unseen volumes: exact {readers[1][0]:.2f}, within one {readers[1][1]:.2f}" if extra else ""),
        "",
        "| encoder | weights | classifier test bal. acc. (val) | 5-fold linear probe | 5-fold k-NN | held-out test probe |"
        + (f" classifier on {args.extra_test} unseen volumes | probe on them |" if extra else ""),
        "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if extra else ""),
    ]
    for row in rows:
        classifier = f"{row['classifier_test']:.2f} ({row['classifier_val']:.2f})" if "classifier_test" in row else "—"
        unseen = f" {row.get('classifier_extra', '—')} | {row['extra_rate']} |" if extra else ""
        lines.append(
            f"| {row['encoder']} | {row['weights']} | {classifier} | {row['linear']:.2f} | {row['knn']:.2f} | {row['test_probe']:.2f} |"
            + unseen
        )
    lines += [
        "",
        "The 5-fold columns of a supervised row fold in the volumes its encoder was trained on, labels and all: only",
        "its two test columns are held out.",
    ]
    return lines


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = dataset_root(args.root, "count", args.n, args.size)
    readers = [reader_accuracy(root)]
    extra = None
    if args.extra_test:
        extra = extra_test_data(args.root, "count", args.extra_test, args.size)
        readers.append(reader_accuracy(extra[0]))
    print("reference reader (exact, within one, volumes):", readers, flush=True)
    encoders = args.encoder or ["mt3", "resnet_test_3d"]
    rows = [row for encoder in encoders for row in encoder_rows(args, root, encoder, extra)]
    lines = report(args, readers, rows, time.perf_counter() - start)
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
