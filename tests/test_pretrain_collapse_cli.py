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


def pretrain(dataset, tmp_path, name: str, *extra: str, exit_code: int = 0, resume: bool = False):
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
        result = runner.invoke(app, ["pretrain", *args, *(["--resume"] if resume else [])], catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return " ".join(result.output.split()), json.loads(
        (tmp_path / "runs" / name / "results.json").read_text()
    )


def test_collapse_verdict_stops_a_collapsing_objective_early_not_byol(synthetic_3d, tmp_path, monkeypatch):
    healthy_out, healthy = pretrain(synthetic_3d, tmp_path, "healthy", "pretrain.epochs=2")
    assert "embeddings are collapsing" not in healthy_out
    # the verdict comes at the end (epoch 2; the early one is due after epoch 3) and says so
    assert "collapse check after epoch 2: spread" in healthy_out and ": not collapsed" in healthy_out
    assert "COLLAPSED" not in healthy_out and "!!!" not in healthy_out
    (verdict,) = healthy["collapse_check"]["verdicts"]
    assert verdict["epoch"] == 2 and verdict["collapse_failed"] == 0.0 and verdict["collapse_spread_ratio"] > 0.5
    assert healthy["collapse_check"]["ratio_below"] == 0.1 and "stopped" not in healthy
    assert "before pretraining: mean per-dimension std" in healthy_out and ", effective rank " in healthy_out
    initial = healthy["initial_monitoring"]
    assert initial["embed_std_mean"] > 0 and 0 <= initial["knn_accuracy"] <= 1
    # the effective rank beside the spread, against the same untrained encoder
    assert verdict["collapse_rank_ratio"] == pytest.approx(verdict["embed_rank"] / initial["embed_rank"])
    assert verdict["collapse_rank_ratio"] > 0.1
    assert f"effective rank {verdict['embed_rank']:.1f} ({verdict['collapse_rank_ratio']:.2f}x)" in healthy_out
    last = healthy["history"][-1]
    assert last["val_embed_std_ratio"] == pytest.approx(
        last["val_embed_std_mean"] / initial["embed_std_mean"]
    )

    # monitoring off, as the reporter of issue 29 had it: the verdict after epoch 2 still runs, fails, and stops
    monkeypatch.setattr(BYOL, "forward", collapsing_forward)
    settings = ["pretrain.epochs=4", "pretrain.lr=0.01", "pretrain.knn_every=0", "pretrain.monitor_every=0",
                "pretrain.collapse_check_epoch=2"]  # fmt: skip
    collapsed_out, collapsed = pretrain(
        synthetic_3d, tmp_path, "collapsed", *settings, "pretrain.stop_on_collapse=true", exit_code=1
    )
    ratio = collapsed["history"][-1]["val_embed_std_ratio"]
    assert collapsed["epochs_run"] == 2 and ratio < 0.1
    assert "collapse check after epoch 2" in collapsed_out and "COLLAPSED below 0.1x" in collapsed_out
    assert "pretraining stopped: the collapse check failed after epoch 2" in collapsed_out
    assert "--resume pretrain.stop_on_collapse=false" in collapsed_out
    assert collapsed["stopped"] and collapsed["collapse_check"]["verdicts"][0]["collapse_failed"] == 1.0
    checkpoints = tmp_path / "runs" / "collapsed" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and (checkpoints / "encoder.ckpt").is_file()
    # the way on that the message names: the same run, resumed without the stop, trains to its last epoch
    _, resumed = pretrain(
        synthetic_3d, tmp_path, "collapsed", *settings, "pretrain.stop_on_collapse=false", resume=True
    )
    assert resumed["epochs_run"] == 4 and resumed["collapse_check"]["verdicts"][-1]["epoch"] == 4
    assert "warning: !!! collapse check" in collapsed_out and "pretrain.ema_momentum" in collapsed_out  # the advice
