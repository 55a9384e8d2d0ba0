"""Multi-task models on EEG spectrograms (two binary targets + age) through `medctl finetune` / `evaluate`.

The metrics medctl reports are recomputed here with scikit-learn / SciPy from the predictions it saved.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic_eeg import make_eeg_dataset

runner = CliRunner()
BINARY = {"health": "patient", "gender": "M"}  # target -> its positive class


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("eeg_mt")
    return make_eeg_dataset(
        root / "study", n_subjects=12, recordings_per_subject=1, seconds=8, cache_dir=root / "cache"
    )


@pytest.fixture(scope="module")
def trained(study, tmp_path_factory):
    """A linear probe of three heads (health, gender, age) on a random resnet, early-stopped on val_age_mae."""
    runs = tmp_path_factory.mktemp("runs")
    result = invoke(
        "finetune", *study.config_overrides(), "model.encoder=resnet_test_2d", "train.epochs=4",
        "train.warmup_epochs=0", "train.lr_head=1e-2", "data.batch_size=8", 'train.monitor="val_age_mae"',
        'train.regression_loss="huber"', f'run.root="{runs}"', 'run.name="mt"',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return runs / "mt"


def check_against_sklearn(frame: pd.DataFrame, metrics: dict[str, float], sep: str = "_") -> None:
    """``metrics`` keyed ``<target><sep><metric>`` against scikit-learn on the saved prediction columns."""
    for target, positive in BINARY.items():
        y, pred, prob = (
            frame[f"{target}_true"],
            frame[f"{target}_pred"],
            frame[f"{target}_prob_{positive}"],
        )
        expected = {
            "accuracy": accuracy_score(y, pred),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "macro_f1": f1_score(y, pred, average="macro"),
            "auroc": roc_auc_score(y, prob),
        }
        for key, value in expected.items():
            assert metrics[f"{target}{sep}{key}"] == pytest.approx(value, abs=1e-6), (target, key)
    y, pred = frame["age_true"].to_numpy(), frame["age_pred"].to_numpy()
    expected = {
        "mae": mean_absolute_error(y, pred),
        "rmse": np.sqrt(mean_squared_error(y, pred)),
        "r2": r2_score(y, pred),
        "pearson_r": pearsonr(y, pred).statistic,
    }
    for key, value in expected.items():
        assert metrics[f"age{sep}{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_multitask_probe_metrics_equal_sklearn_on_its_saved_predictions(trained, study):
    results = json.loads((trained / "results.json").read_text())
    frame = pd.read_parquet(trained / "val_preds.parquet")
    assert {"health_true", "health_pred", "gender_true", "age_true", "age_pred"} <= set(
        frame.columns
    )
    assert frame["age_true"].dtype == np.float64
    table = pd.read_csv(study.table, sep="\t").set_index("recording_id")
    truth = table.loc[[i.rsplit("_w", 1)[0] for i in frame["id"]], "age"].to_numpy()
    np.testing.assert_array_equal(frame["age_true"].to_numpy(), truth)  # ages as written in the table
    check_against_sklearn(frame, results["metrics"])

    # early stopping minimised the monitored error: the best epoch has the smallest val_age_mae
    history = [r for r in results["history"] if "val_age_mae" in r]
    assert results["best_epoch"] == min(history, key=lambda r: r["val_age_mae"])["epoch"]
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["phase"] == "val"]
    train = [r for r in rows if r["phase"] == "train"]
    assert len(val) == 4 and all({"health_auroc", "gender_auroc", "age_mae", "age_r2"} <= set(r) for r in val)
    assert all({"loss_health", "loss_gender", "loss_age"} <= set(r) for r in train)
    assert list((trained / "tb").glob("events.out.tfevents.*"))

    # the standardisation of age is stored with the checkpoint, as buffers of its head
    ckpt = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)
    manifest = pd.read_parquet(next(study.cache_dir.iterdir()) / "manifest.parquet")
    train_ages = manifest.loc[manifest.split == "train", "age"].to_numpy()
    assert float(ckpt["state_dict"]["heads.age.mean"]) == pytest.approx(train_ages.mean(), rel=1e-6)
    assert float(ckpt["state_dict"]["heads.age.std"]) == pytest.approx(train_ages.std(), rel=1e-6)
    assert [t["kind"] for t in ckpt["targets"]] == ["binary", "binary", "regression"]


def test_evaluate_reports_every_task_with_sklearn_equal_metrics(trained, tmp_path):
    result = invoke("evaluate", "--ckpt", str(trained / "checkpoints" / "best.ckpt"), "--bootstrap", "50",
                    "--out", str(tmp_path / "eval"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "age (regression)" in result.output and "pearson r" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    frame = pd.read_parquet(tmp_path / "eval" / "test_preds.parquet")
    flat = {
        f"{name}_{key}": value for name, target in metrics["targets"].items() for key, value in target.items()
    }
    check_against_sklearn(frame, flat)
    age = metrics["targets"]["age"]
    assert age["ci"]["mae"]["low"] <= age["mae"] <= age["ci"]["mae"]["high"]
    assert age["mae_of_mean"] == pytest.approx(np.abs(frame.age_true - frame.age_true.mean()).mean())
    assert (tmp_path / "eval" / "figures" / "test_scatter_age.png").stat().st_size > 1000
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Target `age` (regression)" in report and "figures/test_scatter_age.png" in report


def test_uncertainty_weights_are_learned_and_bad_weights_are_named(study, tmp_path):
    common = [*study.config_overrides(), "model.encoder=resnet_test_2d", "train.epochs=2", "train.warmup_epochs=0",
              "train.lr_head=5e-2", f'run.root="{tmp_path}"', 'train.monitor="val_loss"']  # fmt: skip
    result = invoke("finetune", *common, 'train.task_weights="uncertainty"', 'run.name="unc"')
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "unc" / "metrics.jsonl").read_text().splitlines()]
    weights = [r["weight_age"] for r in rows if r["phase"] == "train"]
    assert weights and weights[-1] != pytest.approx(1.0, abs=1e-4)  # exp(-s), s learned from 0

    fixed = invoke("finetune", *common, "train.task_weights={age=0.0}", 'run.name="fixed"')
    assert fixed.exit_code == 0, fixed.output
    rows = [json.loads(line) for line in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["phase"] == "train"][-1]
    assert last["loss"] == pytest.approx(last["loss_health"] + last["loss_gender"], rel=1e-4)

    bad = runner.invoke(app, ["finetune", *common, "train.task_weights={agee=1.0}", 'run.name="bad"'])
    assert bad.exit_code == 2 and "`train.task_weights` names agee, not a target" in bad.output
    monitor = runner.invoke(app, ["finetune", *common, 'train.monitor="val_age_maee"', 'run.name="bad"'])
    assert monitor.exit_code == 2 and "did you mean `age_mae`?" in monitor.output


def test_a_non_numeric_regression_value_names_its_row(study, tmp_path):
    table = pd.read_csv(study.table, sep="\t", dtype=str)
    table.loc[3, "age"] = "unknown"
    path = tmp_path / "bad.tsv"
    table.to_csv(path, sep="\t", index=False)
    result = runner.invoke(app, ["preprocess", *study.config_overrides(), f'data.table="{path}"'])
    assert result.exit_code == 2
    assert (
        f"column 'age' (data.targets[2].column) holds 'unknown' for id {table.recording_id[3]}"
        in result.output
    )


def test_resume_restores_the_learned_uncertainty_weights(study, tmp_path, monkeypatch):
    """``train.task_weights = "uncertainty"`` learns log-variances in the loss; --resume must go on with them."""
    import medctl.finetune.metrics as metrics_module
    from medctl.training.state import read_train_state

    common = [*study.config_overrides(), "model.encoder=resnet_test_2d", "train.epochs=4", "train.warmup_epochs=0",
              "train.lr_head=5e-2", "data.batch_size=8", f'run.root="{tmp_path}"', 'train.monitor="val_loss"',
              'train.task_weights="uncertainty"', "train.patience=0"]  # fmt: skip
    full = invoke("finetune", *common, 'run.name="full"')
    assert full.exit_code == 0, full.output

    original, calls = metrics_module.validation_metrics, []

    def interrupt_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during epoch 3's validation: epochs 1 and 2 are in last.ckpt
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "validation_metrics", interrupt_in_epoch_3)
    interrupted = runner.invoke(app, ["finetune", *common, 'run.name="resumed"'])
    assert interrupted.exit_code != 0
    monkeypatch.setattr(metrics_module, "validation_metrics", original)
    saved = read_train_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 1
    log_vars_at_2 = saved["extra_modules"]["task_weights"]["log_vars"]
    assert not torch.equal(log_vars_at_2, torch.zeros(3))  # learned in epochs 1-2, not the initial zeros
    resumed = invoke("finetune", *common, 'run.name="resumed"', "--resume")
    assert resumed.exit_code == 0, resumed.output

    def train_rows(name: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["phase"] == "train"]

    full_rows, resumed_rows = train_rows("full"), train_rows("resumed")
    assert [r["epoch"] for r in resumed_rows] == [1, 2, 3, 4]
    for a, b in zip(full_rows, resumed_rows, strict=True):  # the weights each epoch trained with, and the losses
        for key in ("weight_health", "weight_gender", "weight_age", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["epoch"], key)
    final = {name: read_train_state(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("full", "resumed")}
    torch.testing.assert_close(
        final["resumed"]["extra_modules"]["task_weights"]["log_vars"],
        final["full"]["extra_modules"]["task_weights"]["log_vars"],
    )
