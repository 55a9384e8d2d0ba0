"""`medctl sweep` on a multi-task EEG study (health, gender: binary; age: regression) through the CLI: the board
ranks on the chosen metric in its direction, shows every task, and reads old prediction files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medctl.analysis.bootstrap import headline_metrics, paired_bootstrap_pvalue
from medctl.analysis.columns import prediction_column, truth_column
from medctl.cli.app import app
from medctl.data.synthetic_eeg import make_eeg_dataset
from medctl.models.checkpoints import encoder_payload, save_checkpoint
from medctl.models.registry import build_encoder
from medctl.sweep.records import rank_metric

runner = CliRunner()
ENCODER = "resnet_test_2d"


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("eeg_sweep")
    return make_eeg_dataset(
        root / "study", n_subjects=12, recordings_per_subject=1, seconds=8, cache_dir=root / "cache"
    )


@pytest.fixture(scope="module")
def checkpoint_dir(study, tmp_path_factory) -> Path:
    """Two 'pretrained' resnet_test_2d encoders for the study's spectrograms (different perturbations)."""
    assert invoke("preprocess", *study.config_overrides()).exit_code == 0
    summary = json.loads((next(study.cache_dir.iterdir()) / "summary.json").read_text())
    folder = tmp_path_factory.mktemp("eeg_ckpts")
    for name, seed in (("ssl_a", 1), ("ssl_b", 2)):
        torch.manual_seed(seed)
        encoder = build_encoder(
            ENCODER, in_channels=summary["in_channels"], input_size=summary["spatial_size"]
        )
        with torch.no_grad():
            for param in encoder.parameters():
                param.add_(0.05 * seed * torch.randn_like(param))
        save_checkpoint(
            folder / f"{name}.pt", encoder_payload(encoder, name=ENCODER, args=encoder.build_args)
        )
    return folder


def sweep_args(
    study, checkpoint_dir: Path, root: Path, *extra: str, targets=("health", "gender", "age")
) -> list[str]:
    return [
        "sweep", "--all-checkpoints", *study.config_overrides(targets),
        f'model.encoder="{ENCODER}"', "data.batch_size=8", "train.epochs=3", "train.warmup_epochs=0",
        "train.lr_head=1e-2", "train.patience=0", "train.log_every=0", "sweep.bootstrap=30",
        f"sweep.checkpoint_dir={json.dumps(str(checkpoint_dir))}", f"run.root={json.dumps(str(root))}",
        'run.name="sw"', 'run.device="cpu"', *extra,
    ]  # fmt: skip


def test_a_sweep_ranks_on_a_regression_metric_lowest_first_and_shows_every_task(
    study, checkpoint_dir, tmp_path
):
    result = invoke(*sweep_args(study, checkpoint_dir, tmp_path, 'train.monitor="val_age_mae"'))
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "sw"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    ok = board[board["status"] == "ok"].reset_index(drop=True)
    assert sorted(ok["entry"]) == ["random_init", "ssl_a", "ssl_b"] and ok["rank"].tolist() == [1, 2, 3]

    # ranked on test age MAE (train.monitor's metric), lowest first, and the board says so
    assert ok["test_age_mae"].is_monotonic_increasing
    assert set(board["ranked_on"]) == {"test"} and set(board["selected_on"]) == {"val"}
    assert set(board["ranked_by"]) == {"age_mae"} and set(board["better"]) == {"lower"}
    md = (sweep_dir / "leaderboard.md").read_text()
    assert "ranked on test age MAE (lower is better)" in md and "train.monitor = 'val_age_mae'" in md
    assert "ranked on test age MAE (lower is better)" in " ".join(result.output.split())

    # every task's headline metrics, on both splits, each the entry's own evaluated number
    header = md.split("\n| ---")[0].splitlines()[-1]
    for label in ("test health bal. acc.", "test gender AUROC", "val age MAE", "test age R²", "test age r"):
        assert f"| {label} |" in header, label
    for _, row in ok.iterrows():
        for split in ("val", "test"):
            metrics = json.loads((sweep_dir / row["entry"] / f"eval_{split}" / "metrics.json").read_text())
            targets = metrics["targets"]
            assert row[f"{split}_balanced_accuracy"] == pytest.approx(targets["health"]["balanced_accuracy"])
            assert row[f"{split}_gender_auroc"] == pytest.approx(targets["gender"]["auroc"])
            for metric in ("mae", "rmse", "r2", "pearson_r"):
                assert row[f"{split}_age_{metric}"] == pytest.approx(targets["age"][metric]), (split, metric)
            assert row[f"{split}_age_mae_low"] == pytest.approx(targets["age"]["ci"]["mae"]["low"])

    # p vs leader: the paired bootstrap of the MAE on the same test windows, from the saved predictions
    def age_predictions(entry: str) -> tuple[np.ndarray, np.ndarray]:
        frame = pd.read_parquet(sweep_dir / entry / "eval_test" / "test_preds.parquet").set_index("id")
        frame = frame.sort_index()
        return frame["age_true"].to_numpy(), frame["age_pred"].to_numpy()[:, None]

    leader, second = ok["entry"].iloc[0], ok["entry"].iloc[1]
    y, leader_pred = age_predictions(leader)
    _, second_pred = age_predictions(second)
    expected = paired_bootstrap_pvalue(headline_metrics("regression")["mae"], y, second_pred, leader_pred, n=30,
                                       seed=42)  # fmt: skip
    assert ok["p_vs_leader"].iloc[1] == pytest.approx(expected)

    # 2. a sweep that reuses these entries reads run directories whose predictions use the earlier column names
    for entry in ok["entry"]:
        path = sweep_dir / entry / "eval_test" / "test_preds.parquet"
        frame = pd.read_parquet(path)
        legacy = {f"{t}_{w}": f"{t}_y_{w}" for t in ("health", "gender", "age") for w in ("true", "pred")}
        frame.rename(columns=legacy).to_parquet(path, index=False)
        assert truth_column(pd.read_parquet(path).columns, "age", 3) == "age_y_true"
    again = invoke(*sweep_args(study, checkpoint_dir, tmp_path, 'train.monitor="val_age_mae"'))
    assert again.exit_code == 0, again.output
    assert "ssl_a already finished, skipped" in again.output
    rerun = pd.read_csv(sweep_dir / "leaderboard.csv")
    pd.testing.assert_series_equal(rerun["p_vs_leader"], board["p_vs_leader"])
    pd.testing.assert_series_equal(rerun["entry"], board["entry"])


def test_sweep_rank_by_names_the_metric_and_seeds_follow_its_direction(study, checkpoint_dir, tmp_path):
    """Age first (the primary target is a regression); sweep.rank_by picks R² (higher first) over the monitor."""
    args = sweep_args(study, checkpoint_dir, tmp_path, 'train.monitor="val_loss"', 'sweep.rank_by="r2"',
                      "sweep.seeds=[0, 1]", "sweep.random_baseline=false", targets=("age", "health"))  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "sw"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    per_seed = pd.read_csv(sweep_dir / "leaderboard_seeds.csv")
    assert set(board["ranked_by"]) == {"r2"} and set(board["better"]) == {"higher"}
    assert board["test_r2"].is_monotonic_decreasing and board["rank"].tolist() == [1, 2]
    for _, row in board.iterrows():  # mean ± std over the seeds, of every task
        mine = per_seed[per_seed["entry"].str.startswith(f"{row['entry']}/")]
        assert len(mine) == 2
        for key in ("test_r2", "test_mae", "val_health_auroc"):
            assert row[key] == pytest.approx(mine[key].mean()) and row[f"{key}_std"] == pytest.approx(
                mine[key].std()
            )
    md = (sweep_dir / "leaderboard.md").read_text()
    assert "ranked on test age R² (higher is better)" in md and "sweep.rank_by = 'r2'" in md
    assert "| test age MAE |" in md and "| test health AUROC |" in md and "paired t-test across seeds" in md

    # a loss monitor with no rank_by ranks on the primary target's headline: MAE for a regression target
    fallback = invoke(*args[:-3], "sweep.seeds=[0, 1]", "sweep.random_baseline=false")
    assert fallback.exit_code == 0, fallback.output
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert set(board["ranked_by"]) == {"mae"} and board["test_mae"].is_monotonic_increasing
    assert "train.monitor = 'val_loss' is not a metric" in (sweep_dir / "leaderboard.md").read_text()


def test_a_rank_by_that_names_no_metric_stops_the_sweep_before_it_runs(study, checkpoint_dir, tmp_path):
    result = runner.invoke(app, sweep_args(study, checkpoint_dir, tmp_path, 'sweep.rank_by="age_maee"'))
    assert result.exit_code == 2
    assert (
        "`sweep.rank_by` = 'age_maee' is not a metric" in result.output
        and "did you mean `age_mae`?" in result.output
    )
    assert not (tmp_path / "sw").exists()


def test_prediction_columns_accept_both_layouts():
    assert truth_column(["id", "y_true", "y_pred"], "label", 1) == "y_true"
    assert prediction_column(["id", "age_true", "age_pred"], "age", 2) == "age_pred"
    assert prediction_column(["id", "age_y_true", "age_y_pred"], "age", 2) == "age_y_pred"
    from medctl.errors import DataError

    with pytest.raises(DataError, match="p.parquet: no column age_true or age_y_true for target `age`"):
        truth_column(["id", "health_true"], "age", 2, "p.parquet")


def test_inner_val_selection_reads_the_ranked_targets_own_value_not_the_mean_over_targets():
    """With several targets, results.json's bare ``balanced_accuracy`` is the mean over targets; choosing
    fine-tunes by the first target's balanced accuracy on inner val must read ``<target>_balanced_accuracy``."""
    targets = [("health", "binary"), ("gender", "binary"), ("age", "regression")]
    assert rank_metric("balanced_accuracy", "", targets).monitored_key == "health_balanced_accuracy"
    assert rank_metric("age_mae", "", targets).monitored_key == "age_mae"
    assert rank_metric("auroc", "", [("health", "binary")]).monitored_key == "auroc"
