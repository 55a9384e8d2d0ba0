"""Forward+backward throughput, MFU, peak memory and the SDPA backend of vit3d encoders at the largest batch that fits.

    uv run python benchmarks/bench_vit3d.py                       # GPU: vit3d_large and vit3d_giant, [B, 1, 64, 384, 384], bf16
    uv run python benchmarks/bench_vit3d.py --encoders vit3d_test --size 8 32 32   # a CPU smoke run
    uv run python benchmarks/bench_vit3d.py --encoders vit3d_large --checkpointing on --batch 4

Design target (DESIGN.md, issue 14): fine-tuning at [64, 384, 384] in bf16 on one H100/H200 at >= 45% model
FLOPs utilisation. For each encoder, with activation checkpointing off and on:

1. the largest batch that fits is *found*: one forward+backward at batch 1, 2, 4, ... until a CUDA
   out-of-memory error (or ``--max-batch``), then bisection between the last batch that fitted and the
   first that did not;
2. ``--steps`` timed forward+backward steps at that batch (after ``--warmup``): samples/s, tokens/s;
3. model FLOPs: ``torch.utils.flop_counter`` on one real forward+backward at batch 1 *without*
   checkpointing (matmuls, convolutions and attention), times the batch, so the recomputation that
   checkpointing adds is not counted as useful work; MFU divides the achieved rate by the device's
   dense bf16 peak (none on a CPU);
4. peak memory (``torch.cuda.max_memory_allocated`` during the timed steps; peak RSS on a CPU) and the
   SDPA backend PyTorch's dispatcher picks for the model's attention shape and dtype
   (``torch._fused_sdp_choice``, the function ``scaled_dot_product_attention`` itself calls).

The figures are printed and appended, dated and with the machine, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

from medctl.models.registry import build_encoder

RESULTS = Path(__file__).with_name("RESULTS.md")
# dense bf16 tensor-core peaks (TFLOP/s) for MFU, most specific names first; other devices report TFLOP/s only
PEAK_BF16_TFLOPS = {
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=None, help="default vit3d_large vit3d_giant on GPU, vit3d_test on CPU")
    parser.add_argument("--size", type=int, nargs=3, default=None, help="D H W; default 64 384 384 on GPU, 8 32 32 on CPU")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both", help="activation checkpointing")
    parser.add_argument("--batch", type=int, default=0, help="a fixed batch instead of searching for the largest")
    parser.add_argument("--max-batch", type=int, default=None, help="search limit (default 256 on GPU, 4 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on GPU, 1 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--pos-embed", choices=["sincos", "rope"], default="rope", help="V-JEPA 2's released ViTs use RoPE")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    return parser.parse_args()


@dataclass
class Row:
    encoder: str
    checkpointing: bool
    batch: int  # 0: batch 1 does not fit
    searched: str  # how the batch was chosen
    tokens: int  # per sample
    step_s: float = math.nan
    flops_per_sample: float = math.nan
    peak_gib: float = math.nan
    backend: str = ""

    def samples_per_s(self) -> float:
        return self.batch / self.step_s if self.batch else math.nan

    def tflops(self) -> float:
        return self.flops_per_sample * self.batch / self.step_s / 1e12 if self.batch else math.nan


# ------------------------------------------------------------------------------------------ pieces
def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(encoder: torch.nn.Module, x: torch.Tensor, autocast) -> None:
    """One forward+backward of a scalar of the pooled embedding (what a fine-tune's loss does)."""
    with autocast:
        loss = encoder(x).float().pow(2).mean()
    loss.backward()
    encoder.zero_grad(set_to_none=True)


def fits(encoder: torch.nn.Module, batch: int, size: tuple[int, ...], device: torch.device, autocast) -> bool:
    """Whether one forward+backward at ``batch`` runs without running out of memory."""
    ok = True
    try:
        train_step(encoder, torch.randn(batch, 1, *size, device=device), autocast)  # (B, 1, D, H, W)
        sync(device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        ok = False
    # out of the except block: the traceback, and the activations its frames held, are gone
    encoder.zero_grad(set_to_none=True)
    free_memory(device)
    return ok


def largest_batch(fit, limit: int) -> int:
    """The largest batch in [1, limit] with ``fit(batch)`` true, by doubling then bisecting; 0 if none."""
    good, bad = 0, limit + 1
    batch = 1
    while batch <= limit and fit(batch):
        good, batch = batch, batch * 2
    bad = min(bad, batch)
    while bad - good > 1:  # good fits, bad does not (or is past the limit)
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fit(middle) else (good, middle)
    return good


def model_flops(encoder: torch.nn.Module, size: tuple[int, ...], device: torch.device, autocast) -> float:
    """FLOPs of one forward+backward of one sample without activation checkpointing (model FLOPs)."""
    checkpointing, encoder.activation_checkpointing = encoder.activation_checkpointing, False
    x = torch.randn(1, 1, *size, device=device)
    with FlopCounterMode(display=False) as counter:
        train_step(encoder, x, autocast)
    encoder.activation_checkpointing = checkpointing
    del x
    free_memory(device)
    return float(counter.get_total_flops())


def sdpa_backend(encoder: torch.nn.Module, tokens: int, device: torch.device, dtype: torch.dtype) -> str:
    """The SDPA backend the dispatcher picks for this model's attention (q, k, v of (B, heads, N, head_dim))."""
    heads = encoder.num_heads
    head_dim = encoder.embed_dim // heads
    q = torch.empty(1, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)  # (1, h, N, d)
    try:
        choice = torch._fused_sdp_choice(q, q, q)
        return SDPBackend(choice).name.lower()
    except (AttributeError, RuntimeError, ValueError) as exc:  # a private API: say so rather than guess
        return f"unknown ({type(exc).__name__})"
    finally:
        del q
        free_memory(device)


def timed_steps(encoder, batch, size, device, autocast, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per forward+backward at ``batch`` and the peak memory (GiB) while timing."""
    x = torch.randn(batch, 1, *size, device=device)
    for _ in range(warmup):
        train_step(encoder, x, autocast)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(encoder, x, autocast)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    del x
    free_memory(device)
    return seconds, peak


def measure(name: str, checkpointing: bool, args, device, size, precision) -> Row:
    on_gpu = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    torch.manual_seed(0)
    encoder = build_encoder(name, input_size=size, pos_embed=args.pos_embed, activation_checkpointing=checkpointing)
    encoder = encoder.to(device).train()
    limit = args.max_batch or (256 if on_gpu else 4)
    if args.batch:
        batch, searched = args.batch, "fixed (--batch)"
    else:
        batch = largest_batch(lambda b: fits(encoder, b, size, device, autocast), limit)
        searched = "largest that fits" if batch < limit else f"search limit (--max-batch {limit})"
    tokens = math.prod(encoder.token_grid(size))
    row = Row(name, checkpointing, batch, searched, tokens)
    if not batch:
        return row
    row.flops_per_sample = model_flops(encoder, size, device, autocast)
    row.backend = sdpa_backend(encoder, tokens, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    steps = args.steps or (5 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    row.step_s, row.peak_gib = timed_steps(encoder, batch, size, device, autocast, steps, warmup)
    return row


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    size = tuple(args.size or ((64, 384, 384) if on_gpu else (8, 32, 32)))
    names = args.encoders or (["vit3d_large", "vit3d_giant"] if on_gpu else ["vit3d_test"])
    precision = args.precision if args.precision != "auto" else ("bf16" if on_gpu else "fp32")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    peak = peak_tflops(device, precision)

    rows = []
    for name in names:
        for checkpointing in modes:
            row = measure(name, checkpointing, args, device, size, precision)
            free_memory(device)  # the encoder went with measure's frame
            rows.append(row)
            print(
                f"{name:14s} checkpointing {'on ' if checkpointing else 'off'}  batch {row.batch:4d}  "
                f"{row.samples_per_s():8.2f} samples/s  {row.tflops():8.3g} TFLOP/s  peak {row.peak_gib:.1f} GiB  {row.backend}",
                flush=True,
            )

    lines = [
        f"## vit3d throughput at the largest batch — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- setting: input [B, 1, {', '.join(map(str, size))}] ({', '.join(f'{r.encoder} {r.tokens:,}' for r in rows[:: len(modes)])} tokens per volume)"
        f", {precision} on {device.type}, {args.pos_embed} positions, forward+backward of the pooled embedding "
        "(no optimizer step); the batch searched by doubling then bisecting on out-of-memory",
        "- machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        f"- MFU against {f'{peak:g} TFLOP/s dense bf16' if peak else 'no known peak for this device and precision'}; "
        "model FLOPs from torch.utils.flop_counter without checkpointing (recomputation not counted)",
        "",
        "| encoder | act. checkpointing | batch | samples/s | TFLOP/s | MFU | peak memory | SDPA backend |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if not row.batch:
            lines.append(f"| {row.encoder} | {'on' if row.checkpointing else 'off'} | does not fit | — | — | — | — | — |")
            continue
        mfu = f"{row.tflops() / peak:.1%}" if peak else "—"
        memory = f"{row.peak_gib:.1f} GiB" + ("" if on_gpu else " (RSS)")
        lines.append(
            f"| {row.encoder} | {'on' if row.checkpointing else 'off'} | {row.batch} ({row.searched}) | "
            f"{row.samples_per_s():.2f} | {row.tflops():.3g} | {mfu} | {memory} | {row.backend} |"
        )
    if not on_gpu:
        lines.append(
            "- note: no GPU was lent to this run: a CPU smoke test of the script at a tiny size. The design figure needs "
            "`uv run python benchmarks/bench_vit3d.py` on an H100/H200 (vit3d_large and vit3d_giant at [B, 1, 64, 384, 384])."
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
