"""`medctl demo` on this machine: wall time and peak memory of a fresh run, then of a rerun (reuse).

Target (DESIGN.md): < 5 minutes and < 4 GB peak memory on a 2-core CPU.

    uv run python benchmarks/bench_demo.py [--size small]     # prints figures, appends to RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def timed_demo(out: Path, size: str) -> tuple[float, float, str]:
    """Run the real CLI in a child process: (seconds, peak RSS of the child tree in GB, its output)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "medctl", "demo", "--size", size, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "MEDCTL_NO_PROGRESS": "1"},
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # kB -> GB (Linux)
    return seconds, peak_gb, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="small")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        fresh_s, peak_gb, output = timed_demo(out, args.size)
        rerun_s, _, _ = timed_demo(out, args.size)
        board = pd.read_csv(out / "sweep" / "leaderboard.csv")
        ranking = ", ".join(
            f"{row.entry} {row.val_balanced_accuracy:.3f}" for row in board.itertuples() if row.status == "ok"
        )
    summary = [line for line in output.splitlines() if "balanced accuracy" in line or "pointing game" in line]
    lines = [
        f"\n## medctl demo --size {args.size} ({datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end, {platform.platform()}",
        f"- fresh run: {fresh_s:.0f} s wall, peak memory {peak_gb:.2f} GB (target < 300 s, < 4 GB)",
        f"- rerun reusing the cache and finished runs: {rerun_s:.0f} s",
        f"- leaderboard, val balanced accuracy of the linear probe: {ranking}",
        *[f"- {line.strip()}" for line in summary],
        "",
    ]
    print("\n".join(lines))
    with RESULTS.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
