"""The machine a benchmark ran on, as the rows of its RESULTS.md table (shared by bench_probe / bench_sweep), and
the one way an entry is printed and appended to RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu or "unknown",
        "cores": str(os.cpu_count()),
        "gpu": gpu,
        "load average (1 min) at the end": f"{os.getloadavg()[0]:.1f}",
        "platform": platform.platform(),
        "python / torch": f"{sys.version.split()[0]} / {torch.__version__}",
    }


RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(lines: list[str], append: bool = True) -> None:
    """Print a RESULTS.md entry and, unless ``append`` is false, add it to the end of the file."""
    print("\n".join(lines))
    if append:
        with RESULTS.open("a") as fh:
            fh.write("\n" + "\n".join(lines) + "\n")
