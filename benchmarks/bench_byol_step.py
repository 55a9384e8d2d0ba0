"""What does BYOL's decorrelation term cost per training step? (issue 29)

One BYOL step (two views, online and target passes, backward, AdamW) on random volumes, timed with
``pretrain.byol.decorrelation_weight`` 0 and 5, alternating so that load drifts hit both alike; the median of
``--repeats`` timed steps after ``--warmup`` untimed ones. The heads are off, so the term is the only difference.

    uv run python benchmarks/bench_byol_step.py                       # mt3_tiny at 16x32x32, batch 8
    uv run python benchmarks/bench_byol_step.py --encoder mt3 --size 16 64 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime

import torch
from machine_info import machine, publish

from medctl.models.registry import build_encoder
from medctl.pretrain import build_method
from medctl.pretrain.byol import ByolSettings

WEIGHTS = (0.0, 5.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="mt3_tiny")
    parser.add_argument("--size", type=int, nargs=3, default=[16, 32, 32])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    return parser.parse_args()


def step_timer(weight: float, args: argparse.Namespace):
    """A BYOL model at ``weight`` and a function that runs one training step and returns its seconds."""
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder, in_channels=1, input_size=tuple(args.size))
    settings = ByolSettings(decorrelation_weight=weight, reconstruction_weight=0, rotation_weight=0, jigsaw_weight=0)
    method = build_method("byol", encoder, settings)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(args.batch, 1, *args.size)  # (B, 1, D, H, W)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        method(x)["loss"].backward()
        optimizer.step()
        method.update_target(0.99)
        return time.perf_counter() - start

    return step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    steps = {w: step_timer(w, args) for w in WEIGHTS}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[float, list[float]] = {w: [] for w in WEIGHTS}
    for _ in range(args.repeats):
        for w, step in steps.items():
            times[w].append(step())
    info = machine()
    rows = [f"| {w:g} | {statistics.median(t):.3f} | {min(t):.3f}–{max(t):.3f} |" for w, t in times.items()]
    ratio = statistics.median(times[5.0]) / statistics.median(times[0.0])
    publish([
        f"## bench_byol_step.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- one BYOL step, heads off, `{args.encoder}` at {'x'.join(map(str, args.size))}, batch {args.batch}, "
        f"{args.threads} threads; median of {args.repeats} steps after {args.warmup} warm-up steps, the two settings "
        "alternating",
        f"- machine: {info['cpu']}, {info['cores']} cores, gpu {info['gpu']}",
        "",
        "| `decorrelation_weight` | median s/step | range |",
        "| ---: | ---: | --- |",
        *rows,
        "",
        f"- with the term / without: {ratio:.3f}x",
    ], append=not args.no_append)  # fmt: skip


if __name__ == "__main__":
    main()
