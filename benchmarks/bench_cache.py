"""Epoch read throughput: the preprocessed cache vs a MONAI LoadImaged+Resized pipeline vs bare np.load.

Target (DESIGN.md): an epoch from the cache (CacheDataset + DataLoader) is >= 25x faster than MONAI's
LoadImaged + Resized over the same gzip NRRDs, and >= 70% of bare ``np.load`` throughput. All are
measured in one run, on the same files, with the same DataLoader settings; each figure is the best
of ``--repeats`` epochs (page cache warm for all).

The fair limit for the loader is ``np.load`` + ``torch.stack`` into the same batches (float32, as the
loader yields them): what any loader of these arrays must do. Bare ``np.load`` (no batching) is shown too.
Preprocessing is timed with 1 and ``--preprocess-workers`` workers on the same settings.

    uv run python benchmarks/bench_cache.py                     # prints figures, appends to RESULTS.md
    uv run python benchmarks/bench_cache.py --n 16 --spatial-size 64 384 384 --dtype float16   # OCT size
    uv run python benchmarks/bench_cache.py --n 16 --no-append  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from medctl.config import load_config
from medctl.data.dataset import CacheDataset
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import make_synthetic_dataset

RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=48, help="volumes")
    parser.add_argument(
        "--source-size", type=int, nargs=3, default=[48, 160, 160], help="raw NRRD size (D H W)"
    )
    parser.add_argument("--spatial-size", type=int, nargs=3, default=[32, 96, 96], help="cache / resize size")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="cache array dtype")
    parser.add_argument("--skip-monai", action="store_true", help="leave out the MONAI pipeline (slow at OCT size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--loader-workers", type=int, default=0, help="DataLoader workers (same for both loaders)"
    )
    parser.add_argument("--preprocess-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per pipeline; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as in a DataLoader worker")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()


def epoch_rate(loader, n: int, repeats: int) -> float:
    """Samples per second of the fastest full pass over ``loader``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            seen += len(batch["image"]) if isinstance(batch, dict) else len(batch)
        best = min(best, time.perf_counter() - start)
        assert seen == n, f"read {seen} of {n} samples"
    return n / best


def monai_loader(paths: list[str], spatial_size: list[int], batch_size: int, workers: int) -> DataLoader:
    from monai.data import Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized

    transform = Compose(
        [
            LoadImaged(keys=["image"], reader="NrrdReader", image_only=True),
            EnsureChannelFirstd(keys=["image"]),
            Resized(keys=["image"], spatial_size=spatial_size, mode="trilinear"),
        ]
    )
    return DataLoader(
        Dataset([{"image": p} for p in paths], transform), batch_size=batch_size, num_workers=workers
    )


def item_rate(dataset: CacheDataset, repeats: int) -> float:
    """CacheDataset items one by one, without batching: the share the DataLoader's collation costs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def fair_limit(paths: list[str], batch_size: int, repeats: int) -> float:
    """np.load + torch.stack into the loader's batches (float32): the least any loader must do."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            torch.stack([torch.from_numpy(np.load(p)) for p in paths[i : i + batch_size]]).float()
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def bare_np_load(paths: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            np.load(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import monai

    return {
        "cpu": cpu or "unknown",
        "cores": str(os.cpu_count()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medctl-bench-") as tmp:
        ds = make_synthetic_dataset(Path(tmp) / "ds", n=args.n, size=args.source_size, n_excluded=0, seed=0)
        config = load_config(
            None,
            [
                *ds.config_overrides(),
                f"data.preprocess.spatial_size={json.dumps(args.spatial_size)}",
                f'data.preprocess.dtype="{args.dtype}"',
                'data.filter=""',
                'data.source.mask_root=""',
            ],
            env={},
        )
        build_s = {}
        for workers in sorted({1, args.preprocess_workers}):  # same settings, separate caches
            data = config.data.model_copy(update={"cache_dir": str(Path(tmp) / f"cache-{workers}")})
            start = time.perf_counter()
            result = preprocess(data, workers=workers)
            build_s[workers] = time.perf_counter() - start
        config.data.cache_dir = str(Path(tmp) / f"cache-{args.preprocess_workers}")
        start = time.perf_counter()
        rerun = preprocess(config.data, workers=args.preprocess_workers)
        rerun_s = time.perf_counter() - start
        assert rerun.n_new == 0, "a rerun decoded samples"

        cache_data = CacheDataset(result.cache_dir, None)
        cache_loader = DataLoader(cache_data, batch_size=args.batch_size, num_workers=args.loader_workers)
        raw_paths = [str(ds.image_root / f"{i}.nrrd") for i in cache_data.ids]
        npy_paths = [str(result.cache_dir / "images" / f"{i}.npy") for i in cache_data.ids]
        n = len(cache_data)
        loader = monai_loader(raw_paths, args.spatial_size, args.batch_size, args.loader_workers)

        monai_rate = float("nan") if args.skip_monai else epoch_rate(loader, n, args.repeats)
        cache_rate = epoch_rate(cache_loader, n, args.repeats)
        items_rate = item_rate(cache_data, args.repeats)
        fair_rate = fair_limit(npy_paths, args.batch_size, args.repeats)
        npload_rate = bare_np_load(npy_paths, args.repeats)

    speedup = cache_rate / monai_rate
    share = cache_rate / npload_rate
    fair_share = cache_rate / fair_rate
    figures = {
        "volumes": n,
        "raw NRRD (gzip int16)": "x".join(map(str, args.source_size)),
        f"cache array ({args.dtype})": "x".join(map(str, args.spatial_size)),
        "batch size / loader workers / torch threads": f"{args.batch_size} / {args.loader_workers} / {args.threads}",
        **{
            f"preprocess build, {w} worker(s), samples/s": f"{n / seconds:.1f} ({seconds:.1f} s)"
            for w, seconds in build_s.items()
        },
        "preprocess rerun, nothing new": f"{rerun_s:.2f} s, {rerun.n_new} decoded",
        "MONAI LoadImaged+Resized, samples/s": f"{monai_rate:.1f}",
        "CacheDataset+DataLoader, samples/s": f"{cache_rate:.1f}",
        "CacheDataset items, no batching, samples/s": f"{items_rate:.1f}",
        "fair limit: np.load + torch.stack, samples/s": f"{fair_rate:.1f}",
        "bare np.load, samples/s": f"{npload_rate:.1f}",
        "cache vs MONAI (target >= 25x)": "not run"
        if args.skip_monai
        else f"{speedup:.1f}x {'PASS' if speedup >= 25 else 'MISS'}",
        "cache vs fair limit (target >= 70%)": f"{fair_share:.0%} {'PASS' if fair_share >= 0.7 else 'MISS'}",
        "cache vs bare np.load (no batching)": f"{share:.0%}",
    }
    for key, value in figures.items():
        print(f"{key:46s} {value}")
    if args.no_append:
        return
    lines = [
        f"\n## bench_cache.py — {datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
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
