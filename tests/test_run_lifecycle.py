"""What happens to a run directory across commands, through the CLI: refusing to overwrite, resuming,
extending, cleaning up after a killed write, training without a val split, 1-based epochs everywhere."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app
from medctl.models.checkpoints import read_checkpoint
from medctl.training.logging import read_metrics

runner = CliRunner()

PROBE = [
    "-c", "config/finetune/linear_probe.toml", 'model.encoder="vit3d_test"', "data.batch_size=4",
    'data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"',
    "train.epochs=3", "train.warmup_epochs=0", "train.patience=0",
]  # fmt: skip


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def named(tmp_path: Path, name: str) -> list[str]:
    return [f"run.root={json.dumps(str(tmp_path / 'runs'))}", f"run.name={json.dumps(name)}"]


# ------------------------------------------------------------------------------ pretrain, no val split
def test_pretrain_without_a_val_split_monitors_on_train_and_finishes(synthetic_3d, tiny_byol, tmp_path):
    table = pd.read_csv(synthetic_3d.table, sep="\t", dtype=str)
    table["recommended_split"] = "train"  # unlabelled pretraining: everything is training data
    path = tmp_path / "all_train.tsv"
    table.to_csv(path, sep="\t", index=False)
    result = invoke(
        "pretrain", *synthetic_3d.config_overrides(), f"data.table={json.dumps(str(path))}",
        f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *tiny_byol, *named(tmp_path, "nv"),
        "pretrain.epochs=2", "pretrain.tsne_every=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "nv"
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["final_monitoring"]["embed_std_mean"] > 0
    assert "knn_accuracy" not in results["final_monitoring"]  # no val split, no k-NN: said, not crashed
    figures = {p.name for p in (run / "figures").iterdir()}
    assert {"tsne_epoch001.png", "tsne_epoch002.png", "tsne_final.png", "loss_curve.png"} <= figures


# -------------------------------------------------------------------------- pretrain: resume rules
@pytest.fixture
def finished_pretrain(synthetic_3d, tiny_byol, tmp_path):
    args = [*synthetic_3d.config_overrides(), *tiny_byol, *named(tmp_path, "byol"), "pretrain.knn_every=0",
            "pretrain.monitor_every=0", "pretrain.epochs=2"]  # fmt: skip
    result = invoke("pretrain", *args)
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "byol", args


def test_resume_refuses_changed_settings_and_extends_only_when_asked(finished_pretrain):
    run, args = finished_pretrain
    last = run / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns

    longer = invoke("pretrain", *args, "pretrain.epochs=3", "--resume")
    text = one_error_line(longer)
    assert "pretrain.epochs" in text and "--extend" in text and "2" in text and "3" in text
    changed = invoke("pretrain", *args, "pretrain.lr=0.5", "pretrain.ema_momentum=0.9", "--resume")
    text = one_error_line(changed)
    assert "pretrain.lr" in text and "pretrain.ema_momentum" in text and "new run.name" in text
    assert last.stat().st_mtime_ns == before  # nothing was touched

    # a killed checkpoint write left temp files; the next start of the run removes them
    stale = [run / "checkpoints" / ".last.ckpt.tmp4194301", run / "checkpoints" / ".encoder.ckpt.tmp4194302"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)

    extended = invoke("pretrain", *args, "pretrain.epochs=3", "--resume", "--extend")
    assert extended.exit_code == 0, extended.output
    assert not any(path.exists() for path in stale)
    assert "removed 2 temp file(s)" in " ".join(extended.output.split())
    assert read_checkpoint(last)["epoch"] == 2  # 0-based in the training state: the third epoch
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_run"] == 3 and [row["epoch"] for row in results["history"]] == [1, 2, 3]
    lr_epoch_3 = [row["lr"] for row in read_metrics(run, "train") if row["epoch"] == 3]
    assert lr_epoch_3 and lr_epoch_3[0] > 0  # a re-planned schedule, not the finished run's lr of 0
    assert tomllib.loads((run / "config.toml").read_text())["pretrain"]["epochs"] == 3


def test_pretrain_overwrite_starts_the_run_afresh(finished_pretrain):
    run, args = finished_pretrain
    refused = invoke("pretrain", *args)
    text = one_error_line(refused)
    assert "--resume" in text and "run.name" in text and "--overwrite" in text
    (run / "figures" / "old_only.png").write_bytes(b"x")
    again = invoke("pretrain", *args, "pretrain.epochs=1", "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((run / "results.json").read_text())["epochs_run"] == 1
    assert not (run / "figures" / "old_only.png").exists()


# ------------------------------------------------------------------------------ finetune / evaluate
def test_finetune_and_evaluate_refuse_to_overwrite_a_finished_run(synthetic_3d, tmp_path):
    args = [*PROBE, *synthetic_3d.config_overrides(), *named(tmp_path, "probe")]
    first = invoke("finetune", *args)
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "probe"
    results = run / "results.json"
    stamp = results.stat().st_mtime_ns

    again = invoke("finetune", *args)
    text = one_error_line(again)
    assert str(run) in text and "--resume" in text and "run.name" in text and "--overwrite" in text
    assert results.stat().st_mtime_ns == stamp
    overwritten = invoke("finetune", *args, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    assert results.stat().st_mtime_ns != stamp

    ckpt = str(run / "checkpoints" / "best.ckpt")
    out = tmp_path / "eval"
    assert invoke("evaluate", "--ckpt", ckpt, "--out", str(out), "--bootstrap", "10").exit_code == 0
    stamp = (out / "metrics.json").stat().st_mtime_ns
    refused = invoke("evaluate", "--ckpt", ckpt, "--out", str(out), "--bootstrap", "10")
    text = one_error_line(refused)
    assert str(out) in text and "--overwrite" in text and "--out" in text
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    assert invoke("evaluate", "--ckpt", ckpt, "--out", str(out), "--bootstrap", "10", "--overwrite").exit_code == 0


def test_a_probe_from_before_standardised_inputs_resumes_raw_when_told_so(synthetic_3d, tmp_path):
    args = [*PROBE, *synthetic_3d.config_overrides(), *named(tmp_path, "old_probe")]
    first = invoke("finetune", *args, "model.head.standardize=false")
    assert first.exit_code == 0, first.output
    saved = tmp_path / "runs" / "old_probe" / "config.toml"
    text, head = saved.read_text(), "[model.head]\n"
    before, after = text.split(head)
    saved.write_text(before + head + after.replace("standardize = false\n", "", 1))  # as older versions wrote it

    refused = invoke("finetune", *args, "--resume")  # today's default reads standardised embeddings
    text = one_error_line(refused)
    assert "model.head.standardize False -> True" in text
    resumed = invoke("finetune", *args, "model.head.standardize=false", "--resume")
    assert resumed.exit_code == 0, resumed.output


def test_finetune_epochs_are_one_based_everywhere(synthetic_2d, tmp_path):
    """unfreeze_at_epoch = 2 means: the encoder trains from the 2nd epoch; logs, results and metrics agree."""
    result = invoke(
        "finetune", "-c", "config/finetune/finetune.toml", *synthetic_2d.config_overrides(),
        'data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"',
        'model.encoder="resnet_test_2d"', "model.unfreeze_at_epoch=2", "train.epochs=2", "train.patience=0",
        "train.warmup_epochs=0", "train.augment.enabled=false", "data.batch_size=4", *named(tmp_path, "ft"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "epoch 2: the encoder is unfrozen" in shown and "0-based" not in shown
    run = tmp_path / "runs" / "ft"
    results = json.loads((run / "results.json").read_text())
    assert [row["epoch"] for row in results["history"]] == [1, 2] and results["best_epoch"] in (1, 2)
    assert f"best epoch {results['best_epoch']} of 2" in shown
    assert [row["epoch"] for row in read_metrics(run, "val")] == [1, 2]
    best = read_checkpoint(run / "checkpoints" / "best.ckpt")
    assert best["metrics"]["epoch"] == results["best_epoch"]
    assert results["mode"] == "finetune"
    lrs = [row["lr_encoder.decay"] for row in read_metrics(run, "train")]
    assert len(lrs) == 2 and lrs[1] > 0


def test_run_threads_sets_torch_threads(synthetic_3d, tmp_path):
    before = torch.get_num_threads()
    try:
        result = invoke("finetune", *PROBE, *synthetic_3d.config_overrides(), *named(tmp_path, "t"), "run.threads=1",
                        "train.epochs=1")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        env = json.loads((tmp_path / "runs" / "t" / "env.json").read_text())
        assert env["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)
