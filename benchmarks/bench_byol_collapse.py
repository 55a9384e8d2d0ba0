"""Does a pretraining config collapse on a task it was not tuned on? One run, judged outside the run.

The issue-29 reproduction: the ``count`` family of ``medctl.data.synthetic`` (4 classes by the number of
small blobs, bias field, per-volume scaling; 120 volumes of 16x64x64 by default, ~70 in train), one
``medctl pretrain`` run in process (monitoring off unless ``--set`` turns it on, as the reporter had it),
then the encoder it exported and the same encoder at its random initialisation (``run.seed``) embed every
train/val/test volume, and each gets:

- spread: the mean per-dimension std of the L2-normalised embeddings (monitoring's ``collapse_stats``),
  and its ratio to the random initialisation's;
- 5-fold logistic regression (standardised features) and 5-fold cosine 5-NN accuracy over all volumes;
- a held-out probe: standardised logistic regression, C by 5-fold CV on train + val, accuracy on test with its
  95% Wilson interval, and the exact McNemar test of its per-volume hits against the random initialisation's on
  the same test volumes;
- with ``--extra-test N``: the same probe (fitted on train + val as above) judged on N more volumes that the
  generator draws at another seed, which no run has seen: 24 test volumes cannot tell a gain of 0.1 from
  luck, N = 480 can (paired hits, exact McNemar, as above).

    uv run python benchmarks/bench_byol_collapse.py --label defaults
    uv run python benchmarks/bench_byol_collapse.py --label no_ema_end --set pretrain.ema_momentum_end=0.99

Rows go to stdout and, as JSON lines, to ``--log`` (default /tmp/bench_byol_collapse.jsonl); the data is
cached under ``--root`` so repeated runs share it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medctl.analysis.proportions import paired_hits_test, rate_interval
from medctl.config import load_config
from medctl.data.dataset import CacheDataset, read_summary
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset
from medctl.models.architecture import pretrained_encoder
from medctl.pretrain.embeddings import collapse_stats, embed_items
from medctl.pretrain.run import run_pretrain
from medctl.training.seed import set_seed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run's row")
    parser.add_argument("--family", default="count")
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--size", type=int, nargs="+", default=[16, 64, 64])
    parser.add_argument("--oriented-bias", type=float, default=0.0)
    parser.add_argument("--encoder", default="mt3")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    parser.add_argument("--root", default="/tmp/bench_byol_collapse")
    parser.add_argument("--log", default="/tmp/bench_byol_collapse.jsonl")
    parser.add_argument(
        "--judge-only", action="store_true", help="judge the run's last exported encoder (a stopped run) without training"
    )
    parser.add_argument(
        "--export", default="encoder.ckpt", help="the run's file to judge (JEPA: context_encoder.ckpt, the online encoder)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (two runs side by side: 1 each)")
    parser.add_argument("--extra-test", type=int, default=0, help="judge on this many more unseen volumes too")
    return parser.parse_args()


SPLITS = ("train", "val", "test")
EXTRA_TEST_SEED = 1  # the generator's seed of the --extra-test volumes (the runs' data is seed 0)


def dataset_root(
    base: str | Path, family: str, n: int, size: list[int], oriented_bias: float = 0.0, seed: int = 0
) -> Path:
    """The synthetic dataset of these settings under ``base``, written the first time it is asked for."""
    root = Path(base) / f"{family}_{n}_{'x'.join(map(str, size))}_ob{oriented_bias:g}{f'_seed{seed}' if seed else ''}"
    if not (root / "participants.tsv").exists():
        make_synthetic_dataset(root, n=n, size=size, family=family, oriented_bias=oriented_bias, seed=seed)
    return root


def data_overrides(root: Path, family: str, size: list[int]) -> list[str]:
    """The ``data.*`` settings that read the synthetic dataset at ``root`` into its cache, on the CPU."""
    classes = {"count": '["one", "two", "three", "four"]', "shape": '["round", "elongated"]',
               "texture": '["coarse", "fine"]', "lesion": '["healthy", "edema"]'}[family]  # fmt: skip
    kind = "multiclass" if family == "count" else "binary"
    return [
        f'data.table="{root}/participants.tsv"', 'data.id_column="participant_id"',
        f'data.source.root="{root}/images"', 'data.source.pattern="{participant_id}.nrrd"',
        'data.split_column="recommended_split"', 'data.filter="retinal_oct == True"',
        f'data.targets=[{{name="label", kind="{kind}", classes={classes}}}]',
        f"data.preprocess.spatial_size={list(size)}", f'data.cache_dir="{root}/cache"',
        "data.preprocess.workers=1", "data.num_workers=0", 'run.device="cpu"',
    ]  # fmt: skip


def embed_split(encoder: torch.nn.Module, cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's embeddings (N, D) and labels (N,)."""
    data = CacheDataset(cache, split)
    with torch.no_grad():
        got = embed_items(encoder, data, range(len(data)), data.targets, batch_size=8, device=torch.device("cpu"))
    return got.vectors, got.labels["label"]


def embeddings(
    encoder: torch.nn.Module, cache: Path, extra_cache: Path | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's embeddings (N, D) and labels (N,); every volume of ``extra_cache`` as ``extra_test``."""
    encoder.eval()
    out = {split: embed_split(encoder, cache, split) for split in SPLITS}
    if extra_cache is not None:
        parts = [embed_split(encoder, extra_cache, split) for split in SPLITS]
        out["extra_test"] = (np.concatenate([v for v, _ in parts]), np.concatenate([y for _, y in parts]))
    return out


def extra_test_data(base: str | Path, family: str, n: int, size: list[int], oriented_bias: float = 0.0) -> tuple[Path, Path]:
    """The root and cache of ``n`` volumes drawn at ``EXTRA_TEST_SEED``, same family, size and scanner."""
    root = dataset_root(base, family, n, size, oriented_bias, EXTRA_TEST_SEED)
    config = load_config(None, data_overrides(root, family, size), env={})
    return root, preprocess(config.data).cache_dir


def held_out_probe(splits: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict[str, np.ndarray]:
    """A standardised logistic probe, its C picked by 5-fold CV on train + val, judged on test (and on the
    ``extra_test`` volumes where ``splits`` has them): a hit per judged volume, by split."""
    fit_x = np.concatenate([splits["train"][0], splits["val"][0]])
    fit_y = np.concatenate([splits["train"][1], splits["val"][1]])
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=folds, max_iter=3000))
    probe.fit(fit_x, fit_y)
    return {split: probe.predict(x) == y for split, (x, y) in splits.items() if split in ("test", "extra_test")}


def judge(splits: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict[str, float]:
    vectors = np.concatenate([splits[s][0] for s in SPLITS])
    labels = np.concatenate([splits[s][1] for s in SPLITS])
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    knn = KNeighborsClassifier(5, metric="cosine", algorithm="brute")
    hits = held_out_probe(splits, seed)
    test_hits = hits["test"]
    extra = {}
    if "extra_test" in hits:
        extra_hits = hits["extra_test"]
        extra = {
            "extra_rate": rate_interval(int(extra_hits.sum()), len(extra_hits)).text(),
            "extra_hits": extra_hits.astype(int).tolist(),
        }
    return {
        "spread": collapse_stats(vectors)["embed_std_mean"],
        "linear": float(cross_val_score(linear, vectors, labels, cv=folds).mean()),
        "knn": float(cross_val_score(knn, vectors, labels, cv=folds).mean()),
        "test_probe": float(test_hits.mean()),
        "test_rate": rate_interval(int(test_hits.sum()), len(test_hits)).text(),  # with its 95% Wilson interval
        "test_hits": test_hits.astype(int).tolist(),
        **extra,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    root = dataset_root(args.root, args.family, args.n, args.size, args.oriented_bias)
    overrides = [
        *data_overrides(root, args.family, args.size),
        f'run.root="{root}/runs"', f'run.name="{args.label}_s{args.seed}"', f"run.seed={args.seed}",
        f'model.encoder="{args.encoder}"', f"data.batch_size={args.batch}", f"pretrain.epochs={args.epochs}",
        "pretrain.monitor_every=0", "pretrain.knn_every=0",
        "pretrain.byol.rotation_weight=0", "pretrain.byol.jigsaw_weight=0", *args.set,
    ]  # fmt: skip
    config = load_config(None, overrides, env={})
    cache = preprocess(config.data).cache_dir
    extra = extra_test_data(args.root, args.family, args.extra_test, args.size, args.oriented_bias) if args.extra_test else None
    extra_cache = extra[1] if extra else None
    summary = read_summary(cache)
    start = time.perf_counter()
    if args.judge_only:
        encoder_checkpoint = Path(root) / "runs" / f"{args.label}_s{args.seed}" / "checkpoints" / args.export
        history = [json.loads(line) for line in (encoder_checkpoint.parents[1] / "metrics.jsonl").open()]
        history = [row for row in history if row.get("phase") == "train"]
        history = [{f"train_{k}" if k.startswith("loss") else k: v for k, v in row.items()} for row in history]
    else:
        result = run_pretrain(config, overwrite=True)
        encoder_checkpoint, history = result.run_dir / "checkpoints" / args.export, result.history
    wall = time.perf_counter() - start
    size = tuple(int(s) for s in summary["spatial_size"])
    shape = dict(in_channels=int(summary["in_channels"]), input_size=size, spatial_dims=int(summary["spatial_dims"]))
    set_seed(args.seed)
    random_init = pretrained_encoder(config.model, **shape).encoder  # the weights pretraining started from
    trained = pretrained_encoder(
        config.model.model_copy(update={"checkpoint": str(encoder_checkpoint), "checkpoint_key": ""}), **shape
    ).encoder
    before = judge(embeddings(random_init, cache, extra_cache), args.seed)
    after = judge(embeddings(trained, cache, extra_cache), args.seed)
    versus_random = paired_hits_test(after["test_hits"], before["test_hits"])
    extra_vs_random = (
        {"extra_test_vs_random": paired_hits_test(after["extra_hits"], before["extra_hits"]).to_dict()} if extra else {}
    )
    row = {
        "label": args.label, "export": args.export, "seed": args.seed, "epochs_done": len(history), "family": args.family, "set": args.set, "wall_s": round(wall),
        "loss_first": history[0]["train_loss"], "loss_last": history[-1]["train_loss"],
        "byol_first": history[0].get("train_loss_byol"), "byol_last": history[-1].get("train_loss_byol"),
        "spread_ratio": after["spread"] / before["spread"], "random": before, "trained": after,
        "test_vs_random": versus_random.to_dict(),
        **extra_vs_random,
        "monitor": {k: v for k, v in history[-1].items() if k.startswith("val_")},
        "per_epoch": [
            {k: round(v, 4) for k, v in record.items() if k.startswith(("val_", "train_loss")) and isinstance(v, float)}
            for record in history
        ],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    with open(args.log, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
