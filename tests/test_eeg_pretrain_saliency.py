"""Spectrogram windows through the 2D stages: BYOL on resnet18_2d, MIM + InfoNCE on unet2d, saliency PNGs on
time x frequency axes, and `medctl demo --eeg` end to end (tiny)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic_eeg import make_eeg_dataset
from medctl.saliency.outputs import save_panel

runner = CliRunner()
SQUARE = ["data.eeg.image_size=[32, 32]", "data.batch_size=6", "pretrain.monitor_samples=8", "pretrain.epochs=1",
          "pretrain.warmup_epochs=0"]  # fmt: skip
PROJECTOR = ["projector_dim=16", "projector_hidden=32"]  # byol's and mim_contrastive's, each in its own table


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("eeg_2d")
    return make_eeg_dataset(root / "study", n_subjects=12, recordings_per_subject=1, seconds=8, cache_dir=root / "cache")


SLOW = pytest.mark.slow  # the full-size encoders the lab uses (resnet18_2d: 11M parameters)


@pytest.mark.parametrize(
    ("method", "encoder", "extra"),
    [
        ("byol", "resnet_test_2d", ["pretrain.byol.jigsaw_weight=0"]),  # the jigsaw shuffles 3D blocks
        ("mim_contrastive", "unet2d_tiny", ["pretrain.mim_contrastive.patch_size=8"]),
        pytest.param("byol", "resnet18_2d", ["pretrain.byol.jigsaw_weight=0"], marks=SLOW),
        pytest.param("mim_contrastive", "unet2d", ["pretrain.mim_contrastive.patch_size=8"], marks=SLOW),
    ],
)
def test_pretraining_on_spectrograms(study, tmp_path, method, encoder, extra):
    projector = [f"pretrain.{method}.{setting}" for setting in PROJECTOR]
    result = invoke("pretrain", *study.config_overrides(("health",)), *SQUARE, *projector, *extra, f'pretrain.method="{method}"',
                    f'model.encoder="{encoder}"', f'run.root="{tmp_path}"', 'run.name="ssl"')  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "ssl" / "results.json").read_text())
    assert np.isfinite(results["history"][-1]["train_loss"])
    ckpt = torch.load(tmp_path / "ssl" / "checkpoints" / "encoder.ckpt", weights_only=True)
    assert ckpt["model"]["name"] == encoder and ckpt["model"]["args"]["in_channels"] == 6
    assert ckpt["model"]["args"]["input_size"] == [32, 32]


def test_saliency_maps_over_time_and_frequency(study, tmp_path):
    trained = invoke("finetune", *study.config_overrides(("health", "age")), "model.encoder=resnet_test_2d",
                     "train.epochs=1", "train.warmup_epochs=0", f'run.root="{tmp_path}"', 'run.name="ft"')  # fmt: skip
    assert trained.exit_code == 0, trained.output
    result = invoke("saliency", "--ckpt", str(tmp_path / "ft" / "checkpoints" / "best.ckpt"), "--split", "test",
                    "--method", "gradients", "saliency.max_samples=2", "saliency.randomisation_check=false",
                    "--out", str(tmp_path / "sal"))  # fmt: skip
    assert result.exit_code == 0, result.output
    index = pd.read_csv(tmp_path / "sal" / "index.csv")
    assert len(index) == 2 and index["map_original_nrrd"].isna().all()  # no source grid for a spectrogram
    panel = Image.open(tmp_path / "sal" / index["panel_png"][0])
    assert panel.size[0] > 300 and panel.size[1] > 300


def test_panel_axes_are_seconds_and_hertz(tmp_path, monkeypatch):
    drawn = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.imshow

    def spy(self, *args, **kwargs):
        drawn.setdefault("extent", kwargs.get("extent"))
        drawn["xlabel"], drawn["ylabel"] = self.get_xlabel(), self.get_ylabel()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    image = np.random.default_rng(0).normal(size=(33, 25))  # 0..32 Hz every 1 Hz, 25 columns of 0.125 s
    save_panel(tmp_path / "p.png", image, np.abs(image), spacing=(1.0, 0.125), origin=(0.0, 2.5),
               axis_labels=("frequency (Hz)", "time (s)"))  # fmt: skip
    assert drawn["extent"] == pytest.approx((2.4375, 5.5625, -0.5, 32.5))  # time edges, then frequency edges
    figure_axes = (tmp_path / "p.png").stat().st_size
    assert figure_axes > 0


def test_demo_eeg_tiny_end_to_end(tmp_path):
    result = invoke("demo", "--eeg", "--size", "tiny", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    for task in ("health", "gender", "age"):
        assert task in result.output
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| age | mae |" in report and "predicting the mean" in report
    assert (tmp_path / "demo" / "report.html").is_file()
    again = invoke("demo", "--eeg", "--size", "tiny", "--out", str(tmp_path / "demo"))
    assert again.exit_code == 0 and "reused from an earlier run: dataset, preprocess, finetune" in again.output
