"""mim_contrastive learns: its encoder beats the same encoder at random initialisation on held-out images.

The data are 2D synthetic lesion images with two bright distractor balls in every image
(``make_synthetic_dataset(dims=2, distractors=2)``): a lesion is the class evidence, and it is not the
brightest structure, so a random U-Net's pooled features do not separate the classes well (a logistic
probe near 0.55 balanced accuracy). Every "edema" image holds its lesion, unlike axial slices cut from
the synthetic volumes, where most slices of an "edema" volume show none (see benchmarks/RESULTS.md).

The measure is a logistic regression on standardised embeddings, fitted on the train split and scored on
val + test (balanced accuracy), and the collapse statistic of :mod:`medctl.pretrain.monitoring` (per-dimension
spread of the unit embeddings, now over before) on the same held-out images.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset
from medctl.models.checkpoints import load_encoder_weights
from medctl.models.registry import build_encoder
from medctl.pretrain import build_method
from medctl.pretrain.embeddings import collapse_stats
from medctl.pretrain.mim_contrastive import MIMContrastiveSettings
from medctl.pretrain.monitoring import COLLAPSE_RATIO

SIZE = (32, 32)
MIM = dict(projector_dim=32, projector_hidden=64, patch_size=8)  # 32 x 16 halves: a 4 x 2 patch grid


@pytest.fixture(scope="module")
def lesion_images(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("lesion_images"), n=240, dims=2, size=SIZE, seed=0, distractors=2
    )


def load_split(dataset, splits: tuple[str, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """The images of ``splits``, each z-scored as preprocessing does: (N, 1, H, W) and labels (N,)."""
    table = pd.read_csv(dataset.table, sep="\t")
    table = table[table["recommended_split"].isin(splits) & table["retinal_oct"].astype(str).str.upper().eq("TRUE")]
    images = []
    for pid in table["participant_id"]:
        pixels = np.asarray(Image.open(dataset.image_root / f"{pid}.png"), dtype=np.float32)  # (H, W)
        images.append((pixels - pixels.mean()) / (pixels.std() + 1e-6))
    labels = table["label"].map({name: i for i, name in enumerate(dataset.classes)}).to_numpy()
    return torch.from_numpy(np.stack(images))[:, None], labels


def probe_and_spread(encoder, train, held_out) -> tuple[float, float]:
    """Logistic-probe balanced accuracy on ``held_out`` and the mean per-dimension spread of its unit embeddings."""
    encoder.eval()
    with torch.no_grad():
        fit, score = encoder(train[0]).numpy(), encoder(held_out[0]).numpy()  # (N, E) each
    scaler = StandardScaler().fit(fit)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(fit), train[1])
    accuracy = balanced_accuracy_score(held_out[1], probe.predict(scaler.transform(score)))
    return float(accuracy), collapse_stats(score)["embed_std_mean"]


def test_mim_contrastive_beats_its_random_initialisation_on_held_out_images(lesion_images):
    torch.manual_seed(0)
    train, held_out = load_split(lesion_images, ("train",)), load_split(lesion_images, ("val", "test"))
    encoder = build_encoder("unet2d_tiny", in_channels=1, input_size=SIZE)
    before, spread_before = probe_and_spread(copy.deepcopy(encoder), train, held_out)
    method = build_method("mim_contrastive", encoder, MIMContrastiveSettings(**MIM))
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(0)
    for _ in range(150):  # 150 steps of 16, as 17 epochs of `medctl pretrain` on these 144 training images
        method.train()
        batch = train[0][torch.randperm(len(train[0]), generator=order)[:16]]  # (16, 1, 32, 32)
        optimizer.zero_grad()
        method(batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)  # pretrain.grad_clip's default
        optimizer.step()
    after, spread_after = probe_and_spread(method.encoder, train, held_out)
    assert after >= before + 0.1, (before, after)
    assert spread_after / spread_before >= COLLAPSE_RATIO


@pytest.mark.slow
def test_pretrain_cli_mim_contrastive_beats_its_random_initialisation(lesion_images, tmp_path):
    """Through `medctl pretrain`: the exported encoder.ckpt against the same architecture at random
    initialisation, and the run's own collapse check at its last epoch."""
    args = [
        *lesion_images.config_overrides(), 'run.device="cpu"', "data.num_workers=0", "data.preprocess.workers=1",
        f'run.root="{tmp_path / "runs"}"', 'run.name="mim"', "run.seed=0", 'model.encoder="unet2d_tiny"',
        'pretrain.method="mim_contrastive"', *[f"pretrain.mim_contrastive.{k}={v}" for k, v in MIM.items()], "pretrain.epochs=17",
        "pretrain.warmup_epochs=1", "data.batch_size=16", "pretrain.monitor_every=17", "pretrain.knn_every=17",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for key in [n for n in os.environ if n.startswith("MEDCTL_")]:
            patch.delenv(key)
        patch.setenv("MEDCTL_NO_PROGRESS", "1")
        result = CliRunner().invoke(app, ["pretrain", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "mim"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_monitoring"]["embed_std_ratio"] >= COLLAPSE_RATIO

    train, held_out = load_split(lesion_images, ("train",)), load_split(lesion_images, ("val", "test"))
    torch.manual_seed(0)
    random_init = build_encoder("unet2d_tiny", in_channels=1, input_size=SIZE)
    pretrained = copy.deepcopy(random_init)
    load_encoder_weights(pretrained, run_dir / "checkpoints" / "encoder.ckpt")
    before, _ = probe_and_spread(random_init, train, held_out)
    after, _ = probe_and_spread(pretrained, train, held_out)
    assert after >= before + 0.1, (before, after)
