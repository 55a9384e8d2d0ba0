"""`medctl finetune` end to end through the CLI on the synthetic volumes: probe, fine-tune, multilabel 2D."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, hamming_loss, roc_auc_score
from typer.testing import CliRunner

import medctl.finetune.features as features_module
import medctl.training.fit as fit_module
from medctl.cli.app import app
from medctl.data.dataset import CacheDataset
from medctl.models.checkpoints import encoder_payload, load_classifier, read_checkpoint, save_checkpoint
from medctl.models.registry import build_encoder
from medctl.training.logging import read_metrics

runner = CliRunner()

# minmax intensity makes the task easy for any encoder: a volume with a lesion has its maximum there, so
# its organ ends up darker than a healthy volume's, a global cue that even random pooled features carry
EASY = ['data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"']


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def run_args(tmp_path, name: str) -> list[str]:
    return [f"run.root={json.dumps(str(tmp_path / 'runs'))}", f"run.name={json.dumps(name)}"]


def test_linear_probe_learns_the_easy_task_on_cached_features_and_writes_every_artifact(
    synthetic_3d, tmp_path, monkeypatch
):
    args = [
        "-c",
        "config/finetune/linear_probe.toml",
        *synthetic_3d.config_overrides(),
        *EASY,
        'model.encoder="vit3d_test"',
        "data.batch_size=4",
        "train.epochs=40",
        "train.lr_head=0.02",
        "train.warmup_epochs=1",
        "train.patience=20",
        *run_args(tmp_path, "probe"),
    ]
    result = invoke("finetune", *args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "probe"
    results = json.loads((run / "results.json").read_text())
    assert results["mode"] == "linear_probe" and results["feature_cache"] is True
    assert results["metrics"]["balanced_accuracy"] >= 0.9, results["metrics"]
    assert results["best_metric"] == results["metrics"]["balanced_accuracy"]
    assert len(results["history"]) == results["epochs_run"]
    assert json.loads((run / "timing.json").read_text())["wall_time_s"] > 0  # wall-clock figures live apart
    assert results["data_fingerprint"].startswith(results["cache_fingerprint"])
    assert len(results["split_manifest_hash"]) == 16

    # artifacts: checkpoints, class map, predictions, metrics log, tensorboard, curves
    for name in (
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "figures/training_curves.png",
        "config.toml",
        "env.json",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "class_to_idx.json").read_text()) == {"label": {"healthy": 0, "edema": 1}}
    assert len(read_metrics(run, "val")) == results["epochs_run"]

    # best.ckpt is a self-contained classifier; its val predictions are what val_preds.parquet holds
    classifier, meta = load_classifier(run / "checkpoints" / "best.ckpt")
    assert meta["model"]["name"] == "vit3d_test" and meta["targets"][0]["classes"] == ["healthy", "edema"]
    assert (
        meta["preprocessing"]["spatial_size"] == [16, 32, 32]
        and meta["metrics"]["epoch"] == results["best_epoch"]
    )
    assert meta["preprocessing"]["settings"]["preprocess"]["intensity"] == "minmax"
    assert "cache_affine" in meta["preprocessing"]["geometry"]
    cache = Path(results["cache_dir"])
    val = CacheDataset(cache, "val")
    preds = pd.read_parquet(run / "val_preds.parquet")
    assert list(preds.columns) == ["id", "y_true", "y_pred", "prob_healthy", "prob_edema"]
    assert preds["id"].tolist() == val.ids and preds["y_true"].tolist() == val.labels("label").tolist()
    with torch.no_grad():
        p_edema = torch.sigmoid(classifier(torch.stack([val[i]["image"] for i in range(len(val))]))["label"])[
            :, 0
        ]
    np.testing.assert_allclose(preds["prob_edema"], p_edema.numpy(), atol=1e-5)
    np.testing.assert_allclose(preds["prob_healthy"] + preds["prob_edema"], 1.0, atol=1e-6)

    # the embeddings were cached once per split: a second probe reads them instead of running the encoder
    features = sorted(p.name for p in (cache / "features").iterdir())
    assert len(features) == 2 and features[0].endswith("_train.pt") and features[1].endswith("_val.pt")
    monkeypatch.setattr(
        features_module, "embed_dataset", lambda *a, **k: pytest.fail("embeddings computed again")
    )
    again = invoke("finetune", *args[:-2], "train.epochs=2", *run_args(tmp_path, "probe_again"))
    assert again.exit_code == 0, again.output
    assert "reused" in " ".join(again.output.split())


def test_unfreeze_at_epoch_changes_encoder_weights_only_from_that_epoch(synthetic_2d, tmp_path, monkeypatch):
    torch.manual_seed(3)
    encoder = build_encoder("resnet_test_2d", input_size=(32, 32))  # BatchNorm: eval mode must hold it still
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    ckpt = save_checkpoint(
        tmp_path / "encoder.ckpt",
        encoder_payload(encoder, name="resnet_test_2d", args={"in_channels": 1, "input_size": [32, 32]}),
    )
    snapshots: list[dict[str, torch.Tensor]] = []
    original = fit_module.save_train_state

    def spy(path, *, model, **kwargs):  # records the weights at the end of every epoch, then saves as usual
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(path, model=model, **kwargs)

    monkeypatch.setattr(fit_module, "save_train_state", spy)
    result = invoke(
        "finetune",
        "-c",
        "config/finetune/finetune.toml",
        *synthetic_2d.config_overrides(),
        *EASY,
        'model.encoder="resnet_test_2d"',
        f"model.checkpoint={json.dumps(str(ckpt))}",
        "model.unfreeze_at_epoch=3",  # 1-based: epochs 1 and 2 frozen, the encoder trains in epoch 3
        "train.epochs=3",
        "train.patience=0",
        "train.warmup_epochs=0",
        "train.lr_encoder=1e-3",
        "train.augment.enabled=false",
        "data.batch_size=4",
        *run_args(tmp_path, "ft"),
    )
    assert result.exit_code == 0, result.output
    assert "(100% of the encoder)" in " ".join(result.output.split())
    assert "epoch 3: the encoder is unfrozen" in " ".join(result.output.split())
    assert len(snapshots) == 3

    def encoder_changed(state: dict[str, torch.Tensor]) -> list[str]:
        return [k for k, v in initial.items() if not torch.equal(state[f"encoder.{k}"], v)]

    assert encoder_changed(snapshots[0]) == [] and encoder_changed(snapshots[1]) == []  # epochs 1, 2: frozen
    changed = encoder_changed(snapshots[2])  # epoch 3: trains, BatchNorm statistics included
    assert any(k.endswith(".weight") for k in changed) and any("running_mean" in k for k in changed)
    heads = [k for k in snapshots[0] if k.startswith("heads.")]
    # the head trains from epoch 1
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in heads)

    results = json.loads((tmp_path / "runs" / "ft" / "results.json").read_text())
    assert results["mode"] == "finetune" and results["feature_cache"] is False
    rows = read_metrics(tmp_path / "runs" / "ft", "train")
    assert {"lr_head.decay", "lr_encoder.decay"} <= set(rows[0])
    best = read_checkpoint(tmp_path / "runs" / "ft" / "checkpoints" / "best.ckpt")
    assert best["medctl"]["kind"] == "classifier" and best["metrics"]["mode"] == "finetune"


def test_multilabel_2d_focal_dynamic_alpha_with_augmentation_end_to_end(synthetic_2d, tmp_path):
    table = pd.read_csv(synthetic_2d.table, sep="\t", dtype=str)
    lesion = (table["label"] == "edema").astype(int)
    table["lesion"], table["clear"] = lesion, 1 - lesion
    table["odd"] = [int(i) % 2 for i in table["participant_id"].str[-3:]]  # a label without image evidence
    path = tmp_path / "findings.tsv"
    table.to_csv(path, sep="\t", index=False)
    target = '{name="findings", kind="multilabel", columns=["lesion", "clear", "odd"]}'
    result = invoke(
        "finetune",
        "-c",
        "config/finetune/defects_convnext.toml",
        *synthetic_2d.config_overrides(),
        f"data.table={json.dumps(str(path))}",
        f"data.targets=[{target}]",
        "data.preprocess.spatial_size=[32, 32]",
        "data.preprocess.workers=1",
        "data.batch_size=4",
        'model.encoder="convnext_test_cbam"',
        'run.device="cpu"',
        "train.epochs=3",
        "train.warmup_epochs=1",
        "train.augment.blur_sigma=1.0",
        "train.augment.noise_std=0.05",
        "train.augment.crop_scale=0.8",
        *run_args(tmp_path, "ml"),
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "ml"
    results = json.loads((run / "results.json").read_text())
    assert results["mode"] == "finetune" and results["monitor"] == "macro_f1" and results["epochs_run"] == 3
    assert all(np.isfinite(row["train_loss"]) for row in results["history"])
    classifier, meta = load_classifier(run / "checkpoints" / "best.ckpt")
    assert meta["targets"] == [
        {"name": "findings", "kind": "multilabel", "classes": ["lesion", "clear", "odd"]}
    ]
    assert classifier.heads["findings"].fc.out_features == 3
    preds = pd.read_parquet(run / "val_preds.parquet")
    assert list(preds.columns) == ["id", "y_true", "y_pred", "prob_lesion", "prob_clear", "prob_odd"]
    truth = {
        i: [r["lesion"], r["clear"], r["odd"]]
        for r, i in zip(table.to_dict("records"), table["participant_id"], strict=True)
    }
    assert [list(v) for v in preds["y_true"]] == [truth[i] for i in preds["id"]]
    assert [list(v) for v in preds["y_pred"]] == [
        [int(p >= 0.5) for p in row] for row in preds[["prob_lesion", "prob_clear", "prob_odd"]].to_numpy()
    ]

    out = tmp_path / "eval"
    evaluated = invoke(
        "evaluate", "--ckpt", str(run / "checkpoints" / "best.ckpt"), "--out", str(out), "--bootstrap", "50"
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((out / "metrics.json").read_text())["targets"]["findings"]
    assert metrics["kind"] == "multilabel" and set(metrics["per_class"]) == {"lesion", "clear", "odd"}
    assert {"micro_f1", "macro_f1", "micro_auroc", "macro_auroc", "hamming_loss"} <= set(metrics)
    assert (out / "test_confusion_findings.csv").is_file() and (
        out / "figures" / "test_roc_findings.png"
    ).is_file()
    test = pd.read_parquet(out / "test_preds.parquet")  # the metrics are scikit-learn's on these rows
    y, pred = np.stack(test["y_true"].to_numpy()), np.stack(test["y_pred"].to_numpy())
    for average in ("micro", "macro"):
        expected = f1_score(y, pred, average=average, zero_division=np.nan)
        assert metrics[f"{average}_f1"] == pytest.approx(expected, nan_ok=True)
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    lesion = test["prob_lesion"].to_numpy()
    assert metrics["per_class"]["lesion"]["auroc"] == pytest.approx(roc_auc_score(y[:, 0], lesion))
