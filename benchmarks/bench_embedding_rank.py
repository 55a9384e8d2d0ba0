"""Spread or rank: which collapse does a pretraining run show? (issue 29)

For finished runs of ``bench_byol_collapse.py`` (or ``bench_count_ceiling.py``'s supervised ones) on the same
dataset, embed every volume with the run's encoder and with the random initialisation it started from, and
print per run:

- the spread the collapse check used alone before (mean per-dimension std of the L2-normalised embeddings), as
  a ratio to the untrained encoder's;
- the effective rank of the centred embeddings (RankMe, Garrido et al. 2023; ``medctl.pretrain.embeddings``),
  untrained -> trained, and its ratio;
- the share of the embeddings' energy in their common mean direction, untrained -> trained: when it is near 1,
  unit vectors differ only by small angles around the mean, and their spread says little about how many
  directions vary;
- for encoders with a CNN stem (``stem_features``: mt3), the same effective rank of the stem's globally pooled
  feature map, to tell where in the network the directions are lost.

    uv run python benchmarks/bench_embedding_rank.py defaults30_s0:mt3 resnet_defaults_s0:resnet_test_3d \
        jepa_defaults_s0:vit3d_test:context_encoder.ckpt supervised_mt3_s0:mt3:best.ckpt

Each item is ``run:encoder[:checkpoint file]`` under ``<root>/<dataset>/runs/``; the seed is the run name's
``_s<seed>`` tail. Prints a RESULTS.md entry and appends it (``--no-append``: print only).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from bench_byol_collapse import data_overrides, dataset_root, embeddings
from machine_info import machine, publish

from medctl.config import load_config
from medctl.data.preprocess import preprocess
from medctl.models.architecture import pretrained_encoder
from medctl.pretrain.embeddings import collapse_stats
from medctl.training.seed import set_seed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run:encoder[:checkpoint file], e.g. defaults30_s0:mt3")
    parser.add_argument("--family", default="count")
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--size", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--root", default="/tmp/bench_byol_collapse", help="shared with bench_byol_collapse.py")
    parser.add_argument("--no-append", action="store_true")
    return parser.parse_args()


def figures(vectors: np.ndarray) -> dict[str, float]:
    """Spread, effective rank and the mean direction's share of the energy of (N, D) embeddings."""
    stats = collapse_stats(vectors)
    mean_share = float((vectors.mean(axis=0) ** 2).sum() / (vectors**2).sum(axis=1).mean())
    return {"spread": stats["embed_std_mean"], "rank": stats["embed_rank"], "mean_share": mean_share}


def every_volume(encoder: torch.nn.Module, cache: Path) -> np.ndarray:
    return np.concatenate([vectors for vectors, _ in embeddings(encoder, cache).values()])


class PooledStem(torch.nn.Module):
    """An encoder's CNN stem, globally average-pooled: (B, C_in, *S) -> (B, C)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder.stem_features(x)  # (B, C, d, h, w)
        return features.flatten(2).mean(dim=2)  # (B, C)


def stem_rank(encoder: torch.nn.Module, cache: Path) -> float | None:
    """Effective rank of the pooled stem features over every volume; None for encoders without a stem."""
    if not hasattr(encoder, "stem_features"):
        return None
    return collapse_stats(every_volume(PooledStem(encoder), cache))["embed_rank"]


def run_row(root: Path, args: argparse.Namespace, item: str) -> str:
    run, encoder, *rest = item.split(":")
    checkpoint = root / "runs" / run / "checkpoints" / (rest[0] if rest else "encoder.ckpt")
    seed = int(run.rsplit("_s", 1)[1])
    config = load_config(None, [*data_overrides(root, args.family, args.size), f'model.encoder="{encoder}"'], env={})
    cache = preprocess(config.data).cache_dir
    shape = dict(in_channels=1, input_size=tuple(args.size), spatial_dims=3)
    set_seed(seed)
    random_encoder = pretrained_encoder(config.model, **shape).encoder
    update = {"checkpoint": str(checkpoint), "checkpoint_key": ""}
    trained_encoder = pretrained_encoder(config.model.model_copy(update=update), **shape).encoder
    untrained, trained = (figures(every_volume(e, cache)) for e in (random_encoder, trained_encoder))
    stems = [stem_rank(e, cache) for e in (random_encoder, trained_encoder)]
    stem = "—" if stems[0] is None else f"{stems[0]:.1f} → {stems[1]:.1f} ({stems[1] / stems[0]:.2f}x)"
    return (
        f"| {run} | {checkpoint.name} | {trained['spread'] / untrained['spread']:.2f}x | "
        f"{untrained['rank']:.1f} → {trained['rank']:.1f} ({trained['rank'] / untrained['rank']:.2f}x) | {stem} | "
        f"{untrained['mean_share']:.3f} → {trained['mean_share']:.3f} |"
    )


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    root = dataset_root(args.root, args.family, args.n, args.size)
    rows = [run_row(root, args, item) for item in args.runs]
    info = machine()
    publish([
        f"## bench_embedding_rank.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- the {args.family} family, {args.n} volumes of {'x'.join(map(str, args.size))} (bench_byol_collapse.py's);"
        " every volume embedded by each run's encoder and by the random initialisation it started from",
        f"- machine: {info['cpu']}, {info['cores']} cores, gpu {info['gpu']}; wall time"
        f" {(time.perf_counter() - start) / 60:.1f} min",
        "",
        "| run | encoder file | spread vs untrained | effective rank, untrained → trained | pooled stem's rank |"
        " mean direction's energy share |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ], append=not args.no_append)  # fmt: skip


if __name__ == "__main__":
    main()
