"""benchmarks/summary.py: the table at the top of RESULTS.md is read from the log, newest figure first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "summary.py"

LOG = """# medctl benchmark results

Appended by the scripts in benchmarks/; newest last.

## bench_cache.py — 2026-11-01 10:00

| cores | 2 |
| gpu | none |
| cache vs MONAI (target >= 25x) | 20.0x MISS |
| preprocess build, 1 worker(s), samples/s | 1.0 (10 s) |
| preprocess build, 2 worker(s), samples/s | 1.8 (6 s) |

## medctl demo --size small (2026-11-02 11:00)

- machine: x86_64, 2 cores
- fresh run: 320 s wall, peak memory 1.5 GB (target < 300 s, < 4 GB)

## bench_cache.py — 2026-11-03 12:00

| cores | 2 |
| cache vs MONAI (target >= 25x) | 40.5x PASS |
| preprocess rerun, nothing new | 0.3 s, 0 decoded |
"""


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("bench_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rows_by_target(module, text: str) -> dict[str, tuple[str, ...]]:
    return {row[0]: row for row in module.summary_rows(module.parse(text))}


def test_newest_section_that_measured_a_target_wins(summary):
    rows = rows_by_target(summary, LOG)
    cache = rows["epoch from the cache vs MONAI LoadImaged+resize"]
    assert cache[1:4] == ("40.5x", ">= 25x", "met") and cache[5] == "2026-11-03 12:00"
    # the newer bench_cache section has no worker rows, so the older one still answers for workers
    workers = rows["preprocess scales with workers"]
    assert workers[3] == "met" and workers[5] == "2026-11-01 10:00"


def test_a_missed_target_and_an_unmeasured_one_say_so(summary):
    rows = rows_by_target(summary, LOG)
    assert rows["medctl demo on a 2-core CPU"][1:4] == ("320 s, 1.5 GB", "< 300 s, < 4 GB", "**not met**")
    assert rows["vit3d_base fine-tune at [64, 384, 384], bf16, one H100"][1].startswith("not measured")


def test_rewriting_keeps_the_log_and_is_idempotent(summary):
    once = summary.with_summary(LOG)
    assert once.startswith("# medctl benchmark results") and summary.BEGIN in once
    assert once.split(summary.END, 1)[1].strip() == LOG.split("\n## ", 1)[1].join(["## ", ""]).strip()
    assert summary.with_summary(once) == once
