"""`run.deterministic = true` (issue 15, item 11): two CPU runs give byte-identical results.json, the
mode is recorded in env.json, and wall-clock figures live in timing.json, not results.json."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset

runner = CliRunner()


def test_two_deterministic_finetunes_write_identical_results(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, size=(8, 16, 16), seed=8)
    run_dir = tmp_path / "runs" / "det"
    args = [
        "finetune", *ds.config_overrides(), 'model.encoder="vit3d_test"', "model.freeze_encoder=false",
        "train.epochs=2", "data.batch_size=4", "data.num_workers=1", 'run.device="cpu"',
        "train.augment.enabled=true", "train.augment.noise_std=0.3", "train.augment.flip_axes=[1, 2]",
        "run.deterministic=true", f"run.root={json.dumps(str(tmp_path / 'runs'))}", 'run.name="det"',
    ]  # fmt: skip
    outputs = []
    for _ in range(2):
        shutil.rmtree(run_dir, ignore_errors=True)
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append((run_dir / "results.json").read_bytes())
        env = json.loads((run_dir / "env.json").read_text())
        assert env["deterministic"] is True
        timing = json.loads((run_dir / "timing.json").read_text())
        assert timing["wall_time_s"] > 0 and len(timing["epochs"]) == 2
    assert outputs[0] == outputs[1]
    results = json.loads(outputs[0])
    assert "wall_time_s" not in results and all("epoch_time_s" not in row for row in results["history"])
    assert results["epochs_run"] == 2
