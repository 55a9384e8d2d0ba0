"""The demo's second saliency check: a 2D classifier on images whose evidence is not the brightest thing.

On the demo's volumes the lesions are the brightest structure, so the image's own intensity map finds every
one and no map can beat it. Here the evidence is a thin rod, present or absent, and every image, in both
classes, carries three round distractors brighter than it (``make_synthetic_dataset(family="rod", dims=2)``):
the intensity map points at a distractor, and a map that finds the rod must have it from the model. The images
are min-max scaled, since per-image z-scoring lets the class leak into the distractors' level
(``tests/test_data_synthetic.py``). A 2D ResNet without its first max-pool is trained from scratch, with random
flips (without them it learns the training images' distractor layouts and stops near 0.8 on val);
``medctl saliency`` then scores integrated gradients and HiResCAM on every test rod, each against the input
baselines and its random-weight copy by exact paired tests.

Its settings are its own: of the demo's config and ``key=value`` overrides only ``run.device`` reaches it (the
check is meant to show the verdicts on data where a map can win, whatever the 3D run was asked to do).

Why rods: an earlier version used round lesions dimmer than round distractors. There integrated gradients,
whose path from a black image dims each distractor through the lesion's brightness, hit no more lesions than
its random-weight copy; dimming never turns a ball into a rod. Measured at the small size (320 images, 24
epochs, 32 test rods, 3 training seeds; benchmarks/bench_distractor_saliency.py): integrated gradients hits
17-25 of 32 and HiResCAM 6-8, where both input baselines hit none (every p <= 0.031); the random-weight copies
hit 0-1, which IG beats on every seed and HiResCAM on 2 of 3.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medctl.config import Config, load_config
from medctl.data.synthetic import described_synthetic_dataset
from medctl.finetune.run import FinetuneResult, run_finetune
from medctl.saliency.stage import SaliencyStageResult, run_saliency_stage

DISTRACTOR_METHODS = ("integrated_gradients", "hirescam")
IMAGE_SIZE = (32, 32)


@dataclass(frozen=True)
class DistractorSize:
    n: int  # images
    epochs: int


DISTRACTOR_SIZES = {
    "tiny": DistractorSize(40, 2), "small": DistractorSize(320, 24), "medium": DistractorSize(320, 24)
}  # fmt: skip


@dataclass(frozen=True)
class DistractorData:
    distractors: int  # round balls brighter than the evidence, in every image
    flips: bool  # random flips while training


DISTRACTOR_DATA = {  # make_synthetic_dataset's family -> how the check uses it
    "rod": DistractorData(3, flips=True),  # the demo's
    "lesion": DistractorData(2, flips=False),  # round lesions: the earlier demo, where IG fails
}


def distractor_config(
    root: Path, n: int, epochs: int, overrides: Iterable[str] = (), family: str = "rod"
) -> Config:
    """The fine-tune of a 2D ResNet from scratch on ``n`` synthetic images with distractors under ``root``
    (:data:`DISTRACTOR_DATA` of ``family``): the images are written the first time (``root/data``), the run
    goes to ``root/finetune``."""
    data = DISTRACTOR_DATA[family]
    dataset, _ = described_synthetic_dataset(
        root / "data", n=n, dims=2, size=IMAGE_SIZE, seed=0, family=family, distractors=data.distractors
    )
    flips = ["train.augment.enabled=true", "train.augment.flip_axes=[0, 1]"] if data.flips else []
    overrides = [
        *dataset.config_overrides(), 'data.preprocess.intensity="minmax"', "data.preprocess.workers=1",
        "data.batch_size=8", 'model.encoder="resnet_test_2d"', "model.encoder_args={no_max_pool=true, conv1_t_stride=1}",
        "model.freeze_encoder=false", f"train.epochs={epochs}", "train.lr_head=1e-2", "train.lr_encoder=3e-3",
        "train.warmup_epochs=1", "train.patience=0", *flips, "train.grid={}", f"run.root={json.dumps(str(root))}",
        'run.name="finetune"', "run.seed=0", *overrides,
    ]  # fmt: skip
    return load_config(None, overrides, env={})


def train_on_distractors(
    root: Path, n: int, epochs: int, overrides: Iterable[str] = (), family: str = "rod"
) -> FinetuneResult:
    """:func:`distractor_config`, trained."""
    return run_finetune(distractor_config(root, n, epochs, overrides, family), overwrite=True)


def run_distractor_saliency(root: Path, size: str, device: str, reused: list[str]) -> SaliencyStageResult:
    """Train (or reuse) the 2D rod classifier under ``root`` and explain its test split."""
    settings = DISTRACTOR_SIZES[size]
    best = root / "finetune" / "checkpoints" / "best.ckpt"
    if (root / "finetune" / "results.json").exists() and best.exists():
        reused.append("saliency_2d")
    else:
        best = train_on_distractors(root, settings.n, settings.epochs, [f'run.device="{device}"']).best_checkpoint
    return run_saliency_stage(
        best, split="test", methods=list(DISTRACTOR_METHODS), out_dir=root / "saliency_test", max_samples=4
    )
