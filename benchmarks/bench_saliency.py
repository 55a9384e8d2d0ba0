"""Seconds per 3D attribution map and peak memory, for each saliency method, on a registry encoder.

    uv run python benchmarks/bench_saliency.py                          # CPU: resnet10_3d, [1, 1, 32, 64, 64]
    uv run python benchmarks/bench_saliency.py --encoder mt3_tiny --size 16 32 32
    uv run python benchmarks/bench_saliency.py --methods integrated_gradients gradcam   # GPU: vit3d_large, [1, 1, 64, 384, 384]

Design target (DESIGN.md, issue 14): integrated gradients on one [64, 384, 384] volume in < 10 s on one
H100/H200, for the OCT researcher's V-JEPA 2 ViT-L (``vit3d_large``, the GPU default; resnet10_3d on a CPU).
Each method runs through ``medctl.saliency.compute_map`` exactly as ``run_saliency`` calls it (fp32, IG's
internal batch sized automatically), once untimed, then ``--repeats`` timed calls. The classifier is the
encoder with a linear head of two classes (random weights: timing does not depend on them).

Each method runs in a fresh process (so one method's freed-but-cached memory does not hide the next
one's), and its peak memory is measured on the first, cold call: on CUDA ``torch.cuda.max_memory_allocated``
above what the model and input hold; on CPU the process's peak resident set size (VmHWM) above the
resident size just before the call. Settings default to ``[saliency]``'s defaults. The figures are printed and appended, dated and with the machine, to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from medctl.config import SaliencyConfig
from medctl.models.classifier import build_classifier
from medctl.models.registry import build_encoder
from medctl.saliency import METHODS, ClassScores, auto_internal_batch_size, compute_map

RESULTS = Path(__file__).with_name("RESULTS.md")
DEFAULTS = SaliencyConfig()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--encoder", default=None, help="a 3D encoder of `medctl list models`; default vit3d_large on GPU, resnet10_3d on CPU"
    )
    parser.add_argument(
        "--size", type=int, nargs=3, default=None, help="D H W; default 64 384 384 on GPU, 32 64 64 on CPU"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ig-steps", type=int, default=DEFAULTS.ig_steps)
    parser.add_argument(
        "--occlusion-window",
        type=int,
        nargs=3,
        default=None,
        help="default: [saliency] on CPU, 16 64 64 on GPU",
    )
    parser.add_argument("--occlusion-stride", type=int, nargs=3, default=None, help="default: the window")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed maps per method (default 3 on GPU, 1 on CPU)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # one method, in its own process
    return parser.parse_args()


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
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


# -------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def memory_now(device: torch.device) -> int:
    """Bytes in use now: CUDA allocated, or the process's resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return (_status_kib("VmRSS") or 0) * 1024


def peak_since(device: torch.device, baseline: int) -> tuple[float, str]:
    """GiB of peak use above ``baseline`` and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30, "CUDA allocated"
    peak = _status_kib("VmHWM")
    if peak is None:  # no /proc: the lifetime peak (ru_maxrss is bytes on macOS, KiB elsewhere)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return (peak * 1024 - baseline) / 2**30, "peak RSS"


# ---------------------------------------------------------------------------------------------- main
def settings_for(args: argparse.Namespace, on_gpu: bool) -> tuple[tuple[int, ...], SaliencyConfig]:
    size = tuple(args.size or ((64, 384, 384) if on_gpu else (32, 64, 64)))
    window = tuple(args.occlusion_window or ((16, 64, 64) if on_gpu else DEFAULTS.occlusion_window))
    stride = tuple(args.occlusion_stride or window)
    return size, SaliencyConfig(ig_steps=args.ig_steps, occlusion_window=list(window), occlusion_stride=list(stride))


def encoder_name(args: argparse.Namespace, on_gpu: bool) -> str:
    return args.encoder or ("vit3d_large" if on_gpu else "resnet10_3d")


def measure(args: argparse.Namespace, method: str) -> dict:
    """In this process: build the classifier, then one cold map (memory) and timed maps (speed)."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    on_gpu = device.type == "cuda"
    size, settings = settings_for(args, on_gpu)
    torch.manual_seed(0)
    encoder = build_encoder(encoder_name(args, on_gpu), in_channels=1, input_size=size)
    if encoder.spatial_dims != 3:
        raise SystemExit(f"{args.encoder} is a 2D encoder; this benchmark times 3D maps")
    classifier = build_classifier(encoder, [{"name": "label", "kind": "multiclass", "classes": ["a", "b"]}])
    classifier = classifier.to(device).eval()
    scores = ClassScores(classifier, "label", "multiclass")
    x = torch.randn(1, 1, *size, device=device)  # (1, C, D, H, W)

    baseline = memory_now(device)
    start = time.perf_counter()
    amap = compute_map(method, scores, x, 1, settings)  # cold: kernels, allocator, Captum hooks
    cold = time.perf_counter() - start
    peak, how = peak_since(device, baseline)
    assert amap.shape == size
    repeats = args.repeats or (3 if on_gpu else 1)
    start = time.perf_counter()
    for _ in range(repeats):
        compute_map(method, scores, x, 1, settings)  # returns numpy: synchronised
    seconds = (time.perf_counter() - start) / repeats
    note = ""
    if method == "integrated_gradients":
        batch = auto_internal_batch_size(scores, x, 1, limit=settings.ig_steps)
        note = f"{settings.ig_steps} steps, internal batch {batch} (automatic)"
    elif method == "occlusion":
        note = f"window {list(settings.occlusion_window)}, stride {list(settings.occlusion_stride)}"
    elif method in ("gradcam", "hirescam"):
        note = "encoder.gradcam_layer, upsampled trilinearly"
    return {
        "method": method,
        "seconds": seconds,
        "cold_seconds": cold,
        "repeats": repeats,
        "peak_gib": peak,
        "how": how,
        "note": note,
        "device": device.type,
        "size": list(size),
        "params": sum(p.numel() for p in classifier.parameters()),
        "encoder": encoder_name(args, on_gpu),
    }


def main() -> None:
    args = parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args, args.child)), flush=True)
        return

    rows = []
    for method in args.methods:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", method]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        row = json.loads(lines[-1].removeprefix("RESULT "))
        rows.append(row)
        print(
            f"{method:22s} {row['seconds']:8.2f} s/map (cold {row['cold_seconds']:.2f} s)   peak +{row['peak_gib']:.2f} GiB ({row['how']})",
            flush=True,
        )

    first = rows[0]
    on_gpu = first["device"] == "cuda"
    lines = [
        f"## saliency maps — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- setting: {first['encoder']} ({first['params'] / 1e6:.1f}M parameters incl. a 2-class linear head, random weights), "
        f"input [1, 1, {', '.join(map(str, first['size']))}], fp32 on {first['device']}, "
        f"{first['repeats']} timed map(s) per method after one cold map; each method in a fresh process",
        "- machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        "| method | s / map | cold map (s) | peak memory added | notes |",
        "| --- | ---: | ---: | ---: | --- |",
        *[
            f"| {r['method']} | {r['seconds']:.2f} | {r['cold_seconds']:.2f} | {r['peak_gib']:.2f} GiB ({r['how']}) | {r['note']} |"
            for r in rows
        ],
    ]
    if not on_gpu:
        lines.append(
            "- note: no GPU was lent to this run: a CPU run on a smaller input than the GPU target (IG on "
            "[1, 1, 64, 384, 384] < 10 s on one H100/H200, vit3d_large by default there)."
        )
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + text + "\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
