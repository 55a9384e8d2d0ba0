"""A heterogeneous sweep through `medctl sweep`: V-JEPA 2-layout checkpoints of different position schemes,
grids, widths, entries and channels, each building its own encoder, plus a random baseline; and a checkpoint
whose input the cache cannot feed failing alone, with the reason."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from test_models_architecture import CASES, source, vjepa2_file

runner = CliRunner()


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    for i, (name, (made, entry, _)) in enumerate(CASES.items()):
        vjepa2_file(folder / f"{name}.pt", source(10 + i, **made), entry=entry)
    return folder


def sweep(synthetic_3d, folder, root, *extra):
    return runner.invoke(
        app,
        [
            "sweep", "-c", "config/sweep.toml", "--all-checkpoints", *synthetic_3d.config_overrides(),
            'data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"',
            "data.batch_size=4", "train.epochs=2", "train.patience=0", "train.warmup_epochs=0", "train.log_every=0",
            "sweep.bootstrap=0", f"sweep.checkpoint_dir={json.dumps(str(folder))}",
            f"run.root={json.dumps(str(root))}", 'run.name="mixed"', *extra,
        ],  # fmt: skip
        catch_exceptions=False,
    )


def test_one_sweep_over_mixed_vjepa2_checkpoints_has_only_ok_rows(synthetic_3d, mixed_dir, tmp_path):
    result = sweep(synthetic_3d, mixed_dir, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "mixed"
    board = pd.read_csv(sweep_dir / "leaderboard.csv").set_index("entry")
    assert sorted(board.index) == sorted([*CASES, "random_init"])
    assert board["status"].eq("ok").all(), board[["status", "reason"]]
    # the architecture per row, each entry's own; the random baseline has the first readable one's
    arch = board["architecture"]
    assert arch["rope"] == "vit3d_test (64 wide, 2 deep, 2 heads, RoPE, 2x8x8, 1 ch)"
    # a training file's sin-cos table may sit unused beside RoPE: the scheme is marked as guessed, and warned
    guessed = "sin-cos (guessed from its table)"
    assert arch["sincos_other_grid"] == f"vit3d_test (64 wide, 2 deep, 2 heads, {guessed}, 2x8x8, 1 ch)"
    assert arch["wide_context"] == f"vit3d (96 wide, 2 deep, 3 heads, {guessed}, 2x8x8, 1 ch)"
    output = " ".join(result.output.split())
    for name in ("sincos_other_grid", "wide_context"):
        assert f"{name}.pt: read as sin-cos positions from its pos_embed table" in output
    assert arch["rgb"] == arch["sincos_other_grid"]  # its 3-channel stem summed for the 1-channel cache
    assert arch["random_init"] == arch["rgb"]  # sorted files: rgb.pt is the first
    assert "| architecture |" in (sweep_dir / "leaderboard.md").read_text()
    # one split, one preprocessing, one head recipe for every row
    assert board["split_manifest_hash"].nunique() == 1
    configs = {name: json.loads((sweep_dir / name / "results.json").read_text()) for name in board.index}
    assert len({c["cache_fingerprint"] for c in configs.values()}) == 1
    heads = {name: torch.load(sweep_dir / name / "checkpoints" / "best.ckpt", weights_only=True)["model"]["head"]
             for name in board.index}  # fmt: skip
    assert len({json.dumps(h, sort_keys=True) for h in heads.values()}) == 1


def test_a_checkpoint_for_other_inputs_is_a_failed_row_with_the_reason(synthetic_3d, mixed_dir, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "rope.pt").write_bytes((mixed_dir / "rope.pt").read_bytes())
    vjepa2_file(folder / "big_patch.pt", source(3, size=(16, 48, 48), patch_size=48))  # 2x48x48 tubelets
    result = sweep(synthetic_3d, folder, tmp_path / "runs", "sweep.random_baseline=false")
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "runs" / "mixed" / "leaderboard.csv").set_index("entry")
    assert board.loc["rope", "status"] == "ok"
    assert board.loc["big_patch", "status"] == "failed"
    assert "2x48x48 tubelets do not tile the data's size [16, 32, 32]" in board.loc["big_patch", "reason"]
