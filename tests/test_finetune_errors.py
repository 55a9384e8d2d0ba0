"""Bad input to `medctl finetune`: one clear line naming the key or file and the fix, exit code 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.models.checkpoints import encoder_payload, save_checkpoint
from medctl.models.registry import build_encoder

runner = CliRunner()


def finetune(dataset, tmp_path, *extra: str):
    args = [
        *dataset.config_overrides(),
        "data.preprocess.workers=1",
        'run.device="cpu"',
        'model.encoder="vit3d_test"',
        "train.epochs=1",
        f"run.root={json.dumps(str(tmp_path / 'runs'))}",
        'run.name="bad"',
        *extra,
    ]
    return runner.invoke(app, ["finetune", *args], catch_exceptions=False)


def error_line(result) -> str:
    """The one `error:` line (library INFO lines may precede it); no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def relabelled_table(dataset, tmp_path, change) -> str:
    table = pd.read_csv(dataset.table, sep="\t", dtype=str)
    path = tmp_path / "table.tsv"
    change(table).to_csv(path, sep="\t", index=False)
    return f"data.table={json.dumps(str(path))}"


def test_a_checkpoint_of_another_encoder_is_refused_naming_the_file_and_model_encoder(synthetic_3d, tmp_path):
    other = build_encoder("mt3_tiny", input_size=(16, 32, 32))
    path = save_checkpoint(
        tmp_path / "mt3.ckpt", encoder_payload(other, name="mt3_tiny", args={"input_size": [16, 32, 32]})
    )
    line = error_line(finetune(synthetic_3d, tmp_path, f"model.checkpoint={json.dumps(str(path))}"))
    assert str(path) in line and "holds a `mt3_tiny` encoder but model.encoder = `vit3d_test`" in line
    assert 'set model.encoder = "mt3_tiny"' in line
    assert not (tmp_path / "runs" / "bad" / "checkpoints" / "best.ckpt").exists()


def test_a_class_missing_from_training_but_present_in_test_is_an_error(synthetic_3d, tmp_path):
    def drop_train_edema(table):
        moved = (table["label"] == "edema") & (table["recommended_split"] == "train")
        return table.assign(recommended_split=table["recommended_split"].where(~moved, "test"))

    line = error_line(
        finetune(synthetic_3d, tmp_path, relabelled_table(synthetic_3d, tmp_path, drop_train_edema))
    )
    assert "target `label`: class 'edema' has no training samples" in line and "recommended_split" in line


def test_a_foreign_checkpoint_that_does_not_fit_is_refused_naming_the_file(synthetic_3d, tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(build_encoder("resnet_test_3d", input_size=(16, 32, 32)).state_dict(), path)
    line = error_line(finetune(synthetic_3d, tmp_path, f"model.checkpoint={json.dumps(str(path))}"))
    assert str(path) in line and "model.encoder" in line


def test_an_empty_validation_split_is_an_error(synthetic_3d, tmp_path):
    def no_val(table):
        return table.assign(recommended_split=table["recommended_split"].replace("val", "train"))

    line = error_line(finetune(synthetic_3d, tmp_path, relabelled_table(synthetic_3d, tmp_path, no_val)))
    assert "validation split is empty; mark some rows 'val' in the `recommended_split` column" in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (['train.monitor="balanced_acc"'], "did you mean `balanced_accuracy`?"),
        (["model.freeze_encoder=false", "model.unfreeze_at_epoch=3"], "set model.freeze_encoder = true"),
        (['model.encoder="unet2d_tiny"'], "reads 2D images (H, W) but data.preprocess.spatial_size = [16, 32, 32]"),  # at load
        (["train.augment.enabled=true", "train.augment.flip_axes=[3]"], "train.augment.flip_axes"),
        (['train.loss="bce"', 'data.targets=[{name="label", kind="multiclass"}]'], "does not fit multiclass"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_training(synthetic_3d, tmp_path, overrides, expected):
    line = error_line(finetune(synthetic_3d, tmp_path, *overrides))
    assert expected in line
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()
