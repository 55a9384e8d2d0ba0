"""Which integrated-gradients reference finds a lesion that is not the brightest thing in the image? (issue 24)

The 2D distractor classifier of ``medctl.demo_saliency`` with its round-lesion data (``--family lesion``, the
default here; the demo's own check moved to rods for the reason this script found): 160 synthetic 32x32 images,
two round distractors brighter than any lesion in every image, min-max scaled (z-scoring leaks the class into
the distractors' level), ``resnet_test_2d`` without max-pool fine-tuned from scratch. Every test lesion is
explained for its labelled class by each variant below, and the pointing game (peak of the map inside the mask,
tolerance 0) is compared with the image's own intensity map by the exact McNemar test on the same samples:

- IG from a black image (medctl's default), its ``|map|`` and its positive part;
- IG from other featureless references: white, mid-grey, the farthest value per pixel ("max-distance");
- IG averaged over uniform-noise references (Sturmfels et al. 2020, "Visualizing the Impact of Feature
  Attribution Baselines") and expected gradients from real reference images: the train split's healthy
  images (Erion et al. 2021), which hold distractors but no lesion;
- SmoothGrad-IG (Captum ``NoiseTunnel``), and the IG map smoothed, beside the intensity map smoothed the same.

    uv run python benchmarks/bench_ig_references.py              # ~3 min on 2 cores
    uv run python benchmarks/bench_ig_references.py --epochs 20
    uv run python benchmarks/bench_ig_references.py --family rod --n 320 --epochs 24   # the demo's data

Prints a RESULTS.md entry and appends it (``--no-append``: print only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from machine_info import machine, publish
from scipy import ndimage

from medctl.analysis.proportions import paired_hits_test, rate_interval
from medctl.data.dataset import CacheDataset
from medctl.demo_saliency import DISTRACTOR_DATA, train_on_distractors
from medctl.models.checkpoints import load_classifier
from medctl.saliency.attribution import ClassScores
from medctl.saliency.stage import CachedSamples

SMOOTH_SIGMA = 1.5  # pixels
SMOOTHED_INTENSITY = f"input intensity, smoothed (σ {SMOOTH_SIGMA})"
BASELINES = ("input intensity", SMOOTHED_INTENSITY)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(DISTRACTOR_DATA), default="lesion")
    parser.add_argument("--n", type=int, default=160, help="images")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=16, help="IG steps per reference")
    parser.add_argument("--references", type=int, default=8, help="noise / healthy-image references averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true")
    return parser.parse_args()


def healthy_references(cache: Path, count: int) -> torch.Tensor:
    """The first ``count`` train images without a lesion: (count, C, H, W)."""
    train = CacheDataset(cache, "train", ["label"])
    images = [train[i]["image"] for i in range(len(train)) if int(train[i]["label"]) == 0]
    return torch.stack(images[:count]).float()


def variants(scores: ClassScores, healthy: torch.Tensor, args: argparse.Namespace) -> dict[str, Callable]:
    """name -> f(x (1, C, H, W), target) -> a signed map (H, W)."""
    ig = IntegratedGradients(scores)
    noise = torch.Generator().manual_seed(args.seed)

    def from_reference(reference: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        return lambda x, t: ig.attribute(x, baselines=reference(x), target=t, n_steps=args.steps)[0, 0]

    def averaged(references: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def attribute(x: torch.Tensor, t: int) -> torch.Tensor:
            maps = [ig.attribute(x, baselines=r[None], target=t, n_steps=args.steps)[0, 0] for r in references(x)]
            return torch.stack(maps).mean(0)

        return attribute

    def uniform(x: torch.Tensor) -> torch.Tensor:
        low, high = float(x.min()), float(x.max())
        return low + (high - low) * torch.rand((args.references, *x.shape[1:]), generator=noise)

    def smoothgrad(x: torch.Tensor, t: int) -> torch.Tensor:
        spread = 0.2 * float(x.max() - x.min())
        tunnel = NoiseTunnel(ig)
        return tunnel.attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=args.steps // 2, nt_type="smoothgrad",
            nt_samples=args.references, stdevs=spread,
        )[0, 0]  # fmt: skip

    middle = lambda x: (x.min() + x.max()) / 2  # noqa: E731
    return {
        "black (medctl default)": from_reference(torch.zeros_like),
        "white": from_reference(lambda x: torch.full_like(x, float(x.max()))),
        "mid-grey": from_reference(lambda x: torch.full_like(x, float(middle(x)))),
        "max-distance": from_reference(lambda x: torch.where(x > middle(x), x.min(), x.max())),
        f"uniform noise, mean of {args.references}": averaged(uniform),
        f"healthy train images, mean of {len(healthy)} (expected gradients)": averaged(lambda x: healthy),
        "SmoothGrad-IG, noise 20% of the range": smoothgrad,
    }


def hits_of(cache: Path, checkpoint: Path, args: argparse.Namespace) -> dict[str, list[bool]]:
    classifier, _ = load_classifier(checkpoint)
    classifier.eval()
    scores = ClassScores(classifier, "label", "binary")
    healthy = healthy_references(cache, args.references)
    methods = variants(scores, healthy, args)
    hits: dict[str, list[bool]] = {}

    def score(name: str, amap: np.ndarray, mask: np.ndarray) -> None:
        hits.setdefault(name, []).append(bool(mask.flat[int(np.argmax(amap))]))

    for sample in CachedSamples.from_split(cache, "test", "label", 0, True):
        if "mask" not in sample or not sample["mask"].any():
            continue
        x, mask = sample["image"][None].float(), sample["mask"][0].numpy() > 0  # (1, C, H, W), (H, W)
        target = int(sample["label"])
        image = x[0, 0].numpy()
        score("input intensity", image, mask)
        score(SMOOTHED_INTENSITY, ndimage.gaussian_filter(image, SMOOTH_SIGMA), mask)
        for name, attribute in methods.items():
            amap = attribute(x, target).detach().numpy()
            score(f"IG, {name}: |map|", np.abs(amap), mask)
            score(f"IG, {name}: positive part", amap, mask)
            if name.startswith("black"):
                smoothed = ndimage.gaussian_filter(np.abs(amap), SMOOTH_SIGMA)
                score(f"IG, {name}: |map| smoothed (σ {SMOOTH_SIGMA})", smoothed, mask)
    return hits


def versus_text(hits: list[bool], other: list[bool]) -> str:
    """Discordant pairs (this map only – the other only) and the exact McNemar p."""
    test = paired_hits_test(hits, other)
    return f"{test.only_method}–{test.only_other}, p = {test.p:.3f}"


def report(hits: dict[str, list[bool]], val: float, args: argparse.Namespace, wall: float) -> list[str]:
    info = machine()
    intensity, smoothed = hits["input intensity"], hits[SMOOTHED_INTENSITY]
    data = DISTRACTOR_DATA[args.family]
    lines = [
        f"## bench_ig_references.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- the 2D distractor classifier, {args.family} data ({args.n} images of 32x32, {data.distractors} distractors,"
        f" min-max{', random flips' if data.flips else ''}), `resnet_test_2d` fine-tuned"
        f" {args.epochs} epochs (val balanced accuracy {val:.2f}), seed {args.seed}; {len(intensity)} test lesions,"
        f" each explained for its labelled class; IG {args.steps} steps per reference",
        f"- machine: {info['cpu']}, {info['cores']} cores, gpu {info['gpu']}; load average"
        f" {info['load average (1 min) at the end']}; wall time {wall / 60:.1f} min",
        "",
        "| map | pointing hits [95% CI] | vs input intensity (exact McNemar) | vs input intensity smoothed |",
        "| --- | --- | --- | --- |",
    ]
    for name, got in hits.items():
        rate = rate_interval(sum(got), len(got))
        versus = [versus_text(got, other) if name not in BASELINES else "—" for other in (intensity, smoothed)]
        lines.append(f"| {name} | {sum(got)}/{len(got)} [{rate.low:.2f}, {rate.high:.2f}] | {' | '.join(versus)} |")
    return lines


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ig_") as folder:
        trained = train_on_distractors(Path(folder), args.n, args.epochs, [f"run.seed={args.seed}"], args.family)
        hits = hits_of(trained.cache_dir, trained.best_checkpoint, args)
        lines = report(hits, float(trained.metrics["balanced_accuracy"]), args, time.perf_counter() - start)
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
