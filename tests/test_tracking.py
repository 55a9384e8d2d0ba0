"""[tracking] without a server: typed settings, a missing library, the rank-0 rule, and what a run folder
contributes to its tracked run (parameters, final metrics with CIs, provenance, artifacts)."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

import medctl.tracking as tracking
from cli_support import one_error_line
from medctl.cli.app import app
from medctl.config import TrackingConfig, load_config
from medctl.errors import ConfigError
from medctl.tracking.content import artifacts_of, final_metrics_of, params_of, provenance_of

runner = CliRunner()
TINY = ["data.preprocess.workers=1", 'run.device="cpu"', 'model.encoder="vit3d_test"', "data.batch_size=4"]


def test_a_missing_tracking_library_is_one_line_naming_the_install(synthetic_3d, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    result = runner.invoke(
        app,
        ["finetune", "-c", "config/finetune/linear_probe.toml", *synthetic_3d.config_overrides(), *TINY,
         'tracking.backend="mlflow"', f"run.root={json.dumps(str(tmp_path / 'runs'))}", 'run.name="no_lib"'],
    )  # fmt: skip
    line = one_error_line(result)
    assert "tracking.backend" in line and "uv sync --extra tracking" in line
    assert not (tmp_path / "runs").exists()


def test_tracking_settings_are_typed_and_off_by_default():
    assert load_config(None, [], env={}).tracking.backend == "none"
    with pytest.raises(ConfigError, match="tracking.backend"):
        load_config(None, ['tracking.backend="neptune"'], env={})
    with pytest.raises(ConfigError, match="tracking.log_every"):
        load_config(None, ["tracking.log_every=0"], env={})


def test_only_rank_0_tracks(monkeypatch):
    """Under torchrun the other ranks get a tracker that sends nothing and checks no server."""
    monkeypatch.setattr(tracking, "is_rank0", lambda: False)
    tracker = tracking.connect(TrackingConfig(backend="mlflow", uri="http://127.0.0.1:9"), kind="finetune")
    assert not tracker.active
    tracker.log_scalars("train", {"loss": 1.0}, 3)  # no backend: nothing happens, nothing raises


def test_a_run_folder_gives_flat_params_final_metrics_with_cis_provenance_and_its_artifacts(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[run]\nname = "ft"\n[train]\nepochs = 4\n[data]\nspatial = [8, 16]\n'
    )
    (tmp_path / "env.json").write_text(json.dumps({"git_sha": "abc123", "git_dirty": False, "host": "lab"}))
    (tmp_path / "metrics.json").write_text(json.dumps({
        "summary": {"n": 12, "auroc": 0.75, "auroc_ci": [0.5, 0.95]},
        "provenance": {"checkpoint_sha256": "f00d", "training_run": {"git_sha": "abc123", "name": "ft"}},
    }))  # fmt: skip
    (tmp_path / "figures").mkdir()
    for name in ("report.md", "figures/confusion_label.png", "preds.parquet"):
        (tmp_path / name).write_text("x")
    for sample in ("a", "b", "c", "d", "e"):
        (tmp_path / "maps" / sample).mkdir(parents=True)
        (tmp_path / "maps" / sample / "ig.png").write_text("x")

    assert params_of(tmp_path) == {"run.name": "ft", "train.epochs": 4, "data.spatial": "[8, 16]"}
    assert final_metrics_of(tmp_path) == {
        "n": 12.0,
        "auroc": 0.75,
        "auroc_ci_low": 0.5,
        "auroc_ci_high": 0.95,
    }
    assert provenance_of(tmp_path) == {
        "medctl.git_sha": "abc123", "medctl.git_dirty": "False", "medctl.checkpoint_sha256": "f00d",
        "medctl.training_run.git_sha": "abc123",
    }  # fmt: skip
    found = [p.relative_to(tmp_path).as_posix() for p in artifacts_of(tmp_path, checkpoints=False)]
    assert found == [
        "config.toml", "env.json", "metrics.json", "report.md", "figures/confusion_label.png",
        *[f"maps/{s}/ig.png" for s in "abcd"],
    ]  # fmt: skip
