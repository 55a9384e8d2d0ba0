"""Peak memory and time of preprocessing one CT-sized volume, against the bound of issue 13.

Bound: the peak RSS of one worker stays <= 3 x the source volume as float32 + 1 GB. Each volume (raw int16
NRRD, smooth body + noise) is preprocessed to ``--spatial-size`` by ``medctl.data.preprocess.preprocess``
with one worker in a fresh interpreter; the child reports ``ru_maxrss`` after a tiny warm-up (imports)
and at the end. ``--monai`` also runs MONAI ``Resize(anti_aliasing=True)`` (what preprocess did before) on
the smallest volume, for comparison (it needs ~25x the volume; never on 512^3).

    uv run python benchmarks/bench_memory.py                      # 100x512x512, 300x512x512, 512^3
    uv run python benchmarks/bench_memory.py --shapes 100,512,512 --no-append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
CHILD = r"""
import json, resource, sys, time
import numpy as np, pandas as pd, torch
from pathlib import Path
from medctl.config import load_config
from medctl.data.preprocess import preprocess
from medctl.data.readers import read_image, write_nrrd

root, size, monai = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
def config(name, images):
    pd.DataFrame({"participant_id": [name], "label": ["a"]}).to_csv(root / f"{name}.tsv", sep="\t", index=False)
    return load_config(None, [
        f"data.table={json.dumps(str(root / f'{name}.tsv'))}", f"data.source.root={json.dumps(str(images))}",
        'data.source.pattern="{participant_id}.nrrd"', "data.split_ratios=[1.0, 0.0, 0.0]",
        'data.targets=[{name="label", classes=["a", "b"]}]', f"data.preprocess.spatial_size={json.dumps(size)}",
        f"data.cache_dir={json.dumps(str(root / ('cache-' + name)))}"], env={}).data
write_nrrd(root / "warm" / "warm.nrrd", np.zeros((8, 16, 16), np.int16), spacing=(1, 1, 1), compress=False)
preprocess(config("warm", root / "warm"), workers=1)  # imports and allocator pools, not the volume
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if monai:
    from monai.transforms import Resize
    image = read_image(root / "ct" / "ct.nrrd")
    Resize(size, mode="trilinear", anti_aliasing=True)(torch.from_numpy(image.array.astype(np.float32)))
else:
    preprocess(config("ct", root / "ct"), workers=1)
seconds = time.perf_counter() - start
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["100,512,512", "300,512,512", "512,512,512"],
        help="D,H,W of each volume",
    )
    parser.add_argument("--spatial-size", type=int, nargs=3, default=[32, 64, 64])
    parser.add_argument("--monai", action="store_true", help="also MONAI's Resize on the first shape")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()


def write_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """An int16 CT-like volume, written slab by slab so the benchmark itself stays small."""
    import numpy as np

    from medctl.data.readers import write_nrrd

    rng = np.random.default_rng(0)
    d, h, w = shape
    yy, xx = np.meshgrid(
        np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32), indexing="ij"
    )
    volume = np.empty(shape, np.int16)
    for z in range(d):
        zz = 2 * z / max(d - 1, 1) - 1
        volume[z] = 800 * (zz**2 + yy**2 + xx**2 < 0.8) + 300 * np.sin(9 * yy) + rng.normal(0, 60, (h, w))
    write_nrrd(path, volume, spacing=(1.0, 1.0, 1.0), compress=False)


def measure(shape: tuple[int, int, int], size: list[int], monai: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="medctl-mem-") as tmp:
        write_volume(Path(tmp) / "ct" / "ct.nrrd", shape)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDCTL_NO_PROGRESS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, tmp, json.dumps(size), "1" if monai else "0"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    rows = []
    runs = [(tuple(map(int, s.split(","))), False) for s in args.shapes]
    if args.monai:
        runs.insert(0, (tuple(map(int, args.shapes[0].split(","))), True))
    for shape, monai in runs:
        figures = measure(shape, args.spatial_size, monai)
        as_float32 = 4 * shape[0] * shape[1] * shape[2]
        bound = 3 * as_float32 + 2**30
        row = {
            "volume (int16)": "x".join(map(str, shape)),
            "path": "MONAI Resize (before)" if monai else "medctl preprocess",
            "source as float32": f"{as_float32 / 2**30:.2f} GiB",
            "peak RSS": f"{figures['peak'] / 2**30:.2f} GiB",
            "added by the volume": f"{(figures['peak'] - figures['base']) / 2**30:.2f} GiB",
            "bound 3x+1 GB": f"{bound / 2**30:.2f} GiB {'PASS' if figures['peak'] <= bound else 'MISS'}",
            "time": f"{figures['seconds']:.1f} s",
        }
        print("  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
        rows.append(row)
    if args.no_append:
        return
    from machine_info import machine

    lines = [f"\n## bench_memory.py — {datetime.now().strftime('%Y-%m-%d %H:%M')}\n"]
    lines += [
        f"- setting: one worker, resize to {args.spatial_size}, raw int16 NRRD, fresh interpreter per row"
    ]
    lines += ["- machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()), ""]
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
