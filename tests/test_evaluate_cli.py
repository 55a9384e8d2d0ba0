"""`medctl evaluate --ckpt`: every artifact, with values equal to scikit-learn's on the same predictions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.config import load_config
from medctl.data.dataset import CacheDataset, read_summary, split_manifest_hash
from medctl.data.synthetic import make_synthetic_dataset
from medctl.evaluate import run_evaluate
from medctl.finetune import run_finetune
from medctl.models.checkpoints import encoder_payload, load_classifier, read_checkpoint, save_checkpoint
from medctl.models.registry import build_encoder
from medctl.runs import git_state

runner = CliRunner()
CLASSES = ["healthy", "mild", "severe"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class probe trained briefly (so its predictions are imperfect) and its run directory."""
    root = tmp_path_factory.mktemp("evaluate")
    dataset = make_synthetic_dataset(root / "data", n=30, n_classes=3, size=(8, 16, 16), seed=2)
    config = load_config(
        None,
        [
            *dataset.config_overrides(),
            "data.preprocess.workers=1",
            "data.batch_size=4",
            'run.device="cpu"',
            'model.encoder="vit3d_test"',
            "train.epochs=4",
            "train.lr_head=0.01",
            "train.patience=0",
            f"run.root={json.dumps(str(root / 'runs'))}",
            'run.name="probe"',
            "run.seed=5",
        ],
        env={},
    )
    result = run_finetune(config)
    return dataset, result


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_evaluate_writes_every_artifact_with_values_equal_to_sklearn(trained):
    _, result = trained
    ckpt = result.best_checkpoint
    out = invoke("evaluate", "--ckpt", str(ckpt), "--bootstrap", "200")
    assert out.exit_code == 0, out.output
    shown = " ".join(out.output.split())
    assert "label (multiclass) on" in shown and "balanced accuracy" in shown and "95% CI" in shown

    folder = result.run_dir / "eval_test"  # the default: <run dir>/eval_<split>/
    for name in (
        "test_preds.parquet",
        "metrics.json",
        "report.md",
        "report.html",
        "test_confusion_label.csv",
        "figures/test_confusion_label.png",
        "figures/test_roc_label.png",
    ):
        assert (folder / name).is_file(), name

    # the predictions are the classifier's own on the cached test split
    preds = pd.read_parquet(folder / "test_preds.parquet")
    test = CacheDataset(result.cache_dir, "test")
    assert preds["id"].tolist() == test.ids and preds["y_true"].tolist() == test.labels("label").tolist()
    classifier, _ = load_classifier(ckpt)
    with torch.no_grad():
        probs = torch.softmax(
            classifier(torch.stack([test[i]["image"] for i in range(len(test))]))["label"], 1
        )
    p = preds[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(p, probs.numpy(), atol=1e-5)
    y, pred = preds["y_true"].to_numpy(), preds["y_pred"].to_numpy()
    assert (pred == p.argmax(1)).all() and set(preds["pred_label"]) <= set(CLASSES)

    # metrics.json equals scikit-learn on those predictions
    metrics = json.loads((folder / "metrics.json").read_text())
    label = metrics["targets"]["label"]
    assert metrics["split"] == "test" and metrics["n_samples"] == len(test) == label["n"]
    assert label["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert label["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert label["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0)
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=[0, 1, 2], zero_division=0
    )
    for k, name in enumerate(CLASSES):
        entry = label["per_class"][name]
        assert entry["support"] == support[k] and entry["recall"] == pytest.approx(recall[k])
        assert (entry["precision"] or 0.0) == pytest.approx(precision[k]) and (
            entry["f1"] or 0.0
        ) == pytest.approx(f1[k])
        assert entry["auroc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
    assert label["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    matrix = pd.read_csv(folder / "test_confusion_label.csv", index_col=0)
    assert list(matrix.columns) == CLASSES
    np.testing.assert_array_equal(matrix.to_numpy(), confusion_matrix(y, pred, labels=[0, 1, 2]))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        ci = label["ci"][key]
        assert ci["low"] <= label[key] <= ci["high"] and ci["n_requested"] == 200 and ci["level"] == 0.95
    assert metrics["summary"]["balanced_accuracy"] == label["balanced_accuracy"]

    report = (folder / "report.md").read_text()
    assert "figures/test_confusion_label.png" in report and "figures/test_roc_label.png" in report
    assert "data:image/png;base64," in (folder / "report.html").read_text()


def test_evaluate_records_where_its_numbers_come_from(trained, tmp_path):
    """metrics.json and report.md name the checkpoint file, its training run, the data and the code;
    env.json sits beside them (issue 18, item 7)."""
    _, result = trained
    ckpt, out = result.best_checkpoint, tmp_path / "e"
    shown = invoke("evaluate", "--ckpt", str(ckpt), "--out", str(out), "--bootstrap", "0")
    assert shown.exit_code == 0, shown.output
    origin = json.loads((out / "metrics.json").read_text())["provenance"]
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert origin["checkpoint"] == str(ckpt.resolve()) and origin["checkpoint_sha256"] == sha
    run = origin["training_run"]
    assert run["dir"] == str(result.run_dir.resolve()) and run["name"] == "probe"
    assert run["epoch"] == read_checkpoint(ckpt)["metrics"]["epoch"]
    assert run["git_sha"] == json.loads((result.run_dir / "env.json").read_text())["git_sha"]
    assert origin["cache"] == str(result.cache_dir.resolve())
    assert origin["cache_fingerprint"] == read_summary(result.cache_dir)["fingerprint"]
    assert origin["split_manifest_hash"] == split_manifest_hash(result.cache_dir)
    assert origin["same_data_as_training"] is True
    assert origin["git_sha"] == git_state()["git_sha"] and origin["medctl"]
    env = json.loads((out / "env.json").read_text())
    assert (
        env["seed"] == 5
        and env["torch"]
        and env["command"].startswith("medctl")
        and env["git_sha"] == origin["git_sha"]
    )
    report = (out / "report.md").read_text()
    assert "## Provenance" in report and sha in report and str(ckpt.resolve()) in report
    assert origin["split_manifest_hash"] in report and "env.json" in report
    assert sha[:12] in " ".join(shown.output.split())


def test_evaluating_the_validation_split_reproduces_the_training_val_preds(trained, tmp_path):
    _, result = trained
    evaluated = run_evaluate(result.best_checkpoint, split="val", out_dir=tmp_path / "val", n_bootstrap=0)
    assert evaluated.preds_path == tmp_path / "val" / "val_preds.parquet"
    during_training = pd.read_parquet(result.run_dir / "val_preds.parquet")
    after = pd.read_parquet(evaluated.preds_path)
    assert after["id"].tolist() == during_training["id"].tolist()
    columns = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(after[columns].to_numpy(), during_training[columns].to_numpy(), atol=1e-5)
    assert evaluated.summary["balanced_accuracy"] == pytest.approx(result.metrics["balanced_accuracy"])


def test_a_config_file_or_overrides_point_the_data_elsewhere(trained, tmp_path):
    dataset, result = trained
    elsewhere = tmp_path / "other_cache"
    config = tmp_path / "data.toml"
    config.write_text(f"[data]\ncache_dir = {json.dumps(str(elsewhere))}\n")
    out = invoke(
        "evaluate",
        "--ckpt",
        str(result.best_checkpoint),
        "-c",
        str(config),
        "--out",
        str(tmp_path / "a"),
        "--bootstrap",
        "0",
    )
    assert out.exit_code == 0, out.output
    assert len(list(elsewhere.glob("*/images/*.npy"))) == len(dataset.ids) - 2  # a new cache, built there
    again = invoke(
        "evaluate",
        "--ckpt",
        str(result.best_checkpoint),
        f"data.cache_dir={json.dumps(str(elsewhere))}",
        "--out",
        str(tmp_path / "b"),
        "--bootstrap",
        "0",
    )
    assert again.exit_code == 0, again.output
    first, second = (pd.read_parquet(tmp_path / d / "test_preds.parquet") for d in ("a", "b"))
    pd.testing.assert_frame_equal(first, second)
    # the same classifier on the training cache
    original = run_evaluate(result.best_checkpoint, out_dir=tmp_path / "c", n_bootstrap=0)
    assert str(elsewhere) not in str(result.cache_dir)
    pd.testing.assert_frame_equal(first, pd.read_parquet(original.preds_path))


def test_bad_evaluate_input_is_one_line_with_exit_2(trained, tmp_path):
    _, result = trained
    cases = [
        (
            [
                "--ckpt",
                str(result.best_checkpoint),
                'data.targets=[{name="label", kind="multiclass", classes=["healthy", "severe", "mild"]}]',
            ],
            "set data.targets to the classifier's classes",
        ),
        (["--ckpt", str(result.best_checkpoint), "--split", "holdout"], "split 'holdout' is not one of"),
        (
            ["--ckpt", str(result.best_checkpoint), "data.preprocess.spatial_size=[8, 32, 32]"],
            "was trained on [8, 16, 16]",
        ),
        (["--ckpt", str(tmp_path / "missing.ckpt")], "checkpoint not found"),
    ]
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 16))
    path = save_checkpoint(tmp_path / "enc.ckpt", encoder_payload(encoder, name="vit3d_test", args={}))
    cases.append((["--ckpt", str(path)], "a medctl encoder checkpoint; pass a classifier"))
    for args, expected in cases:
        out = invoke("evaluate", *args, "--out", str(tmp_path / "x"))
        assert out.exit_code == 2, out.output
        errors = [line for line in out.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], out.output


def test_evaluate_json_is_the_metrics_file_on_stdout(trained, tmp_path):
    _, result = trained
    out = tmp_path / "j"
    shown = invoke("evaluate", "--ckpt", str(result.best_checkpoint), "--out", str(out), "--bootstrap", "0", "--json")
    assert shown.exit_code == 0, shown.output
    printed = json.loads(shown.stdout)  # logs went to stderr: stdout is one JSON document
    assert printed["metrics"] == json.loads((out / "metrics.json").read_text())
    assert printed["out_dir"] == str(out) and printed["n_samples"] > 0
