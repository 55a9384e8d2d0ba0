"""`medctl pretrain` calibrates its collapse check on the untrained encoder: warns for a collapsing
objective, stays quiet for a healthy run, and reports the ratio either way."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.pretrain.byol import BYOL

runner = CliRunner()
TINY_BYOL = [
    'pretrain.method="byol"', 'model.encoder="mt3_tiny"',
    "model.encoder_args={stem_channels=[4, 8], embed_dim=32, depth=1, num_heads=2}",
    "pretrain.byol.projector_dim=16", "pretrain.byol.projector_hidden=32", "pretrain.byol.reconstruction_weight=0",
    "pretrain.byol.rotation_weight=0", "pretrain.byol.jigsaw_weight=0", "pretrain.warmup_epochs=0",
    "data.preprocess.spatial_size=[8, 16, 16]", "data.batch_size=4", "pretrain.monitor_samples=8",
]  # fmt: skip


def collapsing_forward(self: BYOL, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """An objective whose optimum is one point: the spread of the unit embeddings around their mean."""
    unit = F.normalize(self.encoder(x), dim=1)  # (B, D)
    return {"loss": (unit - unit.mean(0)).pow(2).sum(1).mean()}


def pretrain(dataset, tmp_path, name: str, *extra: str):
    args = [
        *dataset.config_overrides(),
        *TINY_BYOL,
        f'run.root="{tmp_path / "runs"}"',
        f'run.name="{name}"',
        *extra,
    ]
    with pytest.MonkeyPatch.context() as patch:
        for key in [n for n in os.environ if n.startswith("MEDCTL_")]:
            patch.delenv(key)
        patch.setenv("MEDCTL_NO_PROGRESS", "1")
        result = runner.invoke(app, ["pretrain", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split()), json.loads(
        (tmp_path / "runs" / name / "results.json").read_text()
    )


def test_collapse_warning_fires_for_a_collapsing_objective_not_for_byol(synthetic_3d, tmp_path, monkeypatch):
    healthy_out, healthy = pretrain(synthetic_3d, tmp_path, "healthy", "pretrain.epochs=2")
    assert "embeddings are collapsing" not in healthy_out
    assert "before pretraining: mean per-dimension std" in healthy_out
    initial = healthy["initial_monitoring"]
    assert initial["embed_std_mean"] > 0 and 0 <= initial["knn_accuracy"] <= 1
    last = healthy["history"][-1]
    assert last["val_embed_std_ratio"] == pytest.approx(
        last["val_embed_std_mean"] / initial["embed_std_mean"]
    )

    monkeypatch.setattr(BYOL, "forward", collapsing_forward)
    collapsed_out, collapsed = pretrain(
        synthetic_3d, tmp_path, "collapsed", "pretrain.epochs=4", "pretrain.lr=0.01", "pretrain.knn_every=0"
    )
    ratio = collapsed["history"][-1]["val_embed_std_ratio"]
    assert ratio < 0.5
    assert "warning: embeddings are collapsing" in collapsed_out
    assert (
        "that of the encoder before pretraining" in collapsed_out and "pretrain.ema_momentum" in collapsed_out
    )
