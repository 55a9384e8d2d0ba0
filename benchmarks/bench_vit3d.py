"""Forward and forward+backward throughput, FLOPs and peak memory of a vit3d encoder.

    uv run python benchmarks/bench_vit3d.py                      # GPU: vit3d_base, [1, 1, 64, 384, 384], bf16
    uv run python benchmarks/bench_vit3d.py --size 16 128 128    # what it runs on a CPU by default
    uv run python benchmarks/bench_vit3d.py --encoder vit3d_large --pos-embed rope --checkpointing

Design target (DESIGN.md): vit3d_base fine-tuning at [64, 384, 384] in bf16 on one H100 at >= 45% model
FLOPs utilisation. FLOPs are counted by ``torch.utils.flop_counter`` on one real step (matmuls,
convolutions and attention); MFU divides the achieved rate by the GPU's dense bf16 peak when known.
The figures are printed and appended, dated and with the machine, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medctl.models.registry import build_encoder

RESULTS = Path(__file__).with_name("RESULTS.md")
# dense bf16 tensor-core peaks (TFLOP/s) for MFU; other devices report achieved TFLOP/s only
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vit3d_base")
    parser.add_argument("--size", type=int, nargs=3, default=None, help="D H W; default 64 384 384 on GPU, 16 128 128 on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--pos-embed", choices=["sincos", "rope"], default="sincos")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every block")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    return parser.parse_args()


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "host": platform.node(),
        "cpu": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average": f"{os.getloadavg()[0]:.1f}",  # other work sharing the machine skews timings
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return info


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    size = tuple(args.size or ((64, 384, 384) if on_gpu else (16, 128, 128)))
    steps = args.steps or (10 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    precision = args.precision if args.precision != "auto" else ("bf16" if on_gpu else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    torch.manual_seed(0)
    encoder = build_encoder(
        args.encoder, input_size=size, pos_embed=args.pos_embed, activation_checkpointing=args.checkpointing
    ).to(device)
    params = sum(p.numel() for p in encoder.parameters())
    x = torch.randn(args.batch, 1, *size, device=device)  # (B, 1, D, H, W)
    tokens = math.prod(encoder.token_grid(size))

    def forward() -> None:
        with torch.inference_mode(), autocast:
            encoder(x)

    def train_step() -> None:
        with autocast:
            loss = encoder(x).float().pow(2).mean()
        loss.backward()
        encoder.zero_grad(set_to_none=True)

    encoder.train()
    with FlopCounterMode(display=False) as counter:
        train_step()
    step_flops = counter.get_total_flops()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)

    encoder.eval()
    fwd_s = timed(forward, steps, warmup, device)
    encoder.train()
    step_s = timed(train_step, steps, warmup, device)

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    achieved = step_flops / step_s / 1e12
    peak_rate = peak_tflops(device) if precision == "bf16" else None
    figures = {
        "forward": f"{fwd_s * 1000:.1f} ms/step, {args.batch / fwd_s:.2f} volumes/s, {args.batch * tokens / fwd_s:,.0f} tokens/s",
        "forward+backward": f"{step_s * 1000:.1f} ms/step, {args.batch / step_s:.2f} volumes/s, {args.batch * tokens / step_s:,.0f} tokens/s",
        "FLOPs per forward+backward": f"{step_flops / 1e12:.2f} TFLOP (torch.utils.flop_counter)",
        "achieved": f"{achieved:.2f} TFLOP/s" + (f", MFU {achieved / peak_rate:.1%} of {peak_rate:.0f} bf16 peak" if peak_rate else ""),
        "peak memory": (
            f"{peak:.2f} GiB allocated on the GPU"
            if on_gpu
            else f"{peak:.2f} GiB peak process RSS, {rss_imports:.2f} GiB of it Python and libraries before the model"
        ),
    }
    setting = (
        f"{args.encoder} ({params / 1e6:.1f}M parameters, {args.pos_embed}{', activation checkpointing' if args.checkpointing else ''}), "
        f"input [{args.batch}, 1, {', '.join(map(str, size))}] = {tokens:,} tokens per volume, {precision} on {device.type}, "
        f"{steps} timed steps after {warmup} warm-up"
    )
    note = ""
    if not on_gpu:
        note = "CPU run: a smaller input than the GPU target [1, 1, 64, 384, 384]; run on a GPU for the design figure."

    lines = [f"## vit3d throughput — {datetime.now().strftime('%Y-%m-%d %H:%M')}", "", f"- setting: {setting}"]
    lines += ["- machine: " + "; ".join(f"{k} {v}" for k, v in machine().items())]
    lines += [f"- {k}: {v}" for k, v in figures.items()]
    if note:
        lines.append(f"- note: {note}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        new = not RESULTS.exists()
        with open(RESULTS, "a") as fh:
            fh.write(("# medctl benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n\n" if new else "\n") + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
