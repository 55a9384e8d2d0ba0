"""`medctl check config` catches what a long run would find later (issue 15, items 3 and 13): registry
names with the closest one, every stage's settings against the model and data it builds, and the
`extends` merge rule with `replace` for a table that must not inherit the parent's keys."""

from __future__ import annotations

import json
import tomllib

from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(output: str) -> str:
    return " ".join(output.split())


# ------------------------------------------------------------------------------ item 3: registries
def test_every_registry_name_is_checked_at_once_with_the_closest_name():
    result = invoke(
        "check", "config", 'model.encoder="resnet9000"', 'pretrain.method="byl"', 'train.loss="focl"',
        'model.head.kind="mpl"', 'saliency.methods=["integrated_gradient", "gradcam"]',
    )  # fmt: skip
    assert result.exit_code == 2
    text = flat(result.output)
    assert "5 problems" in text
    assert "`model.encoder` = 'resnet9000' is not a registered encoder; did you mean `resnet50_3d`?" in text
    assert "`pretrain.method` = 'byl'" in text and "did you mean `byol`?" in text
    assert "`train.loss` = 'focl'" in text and "did you mean `focal`?" in text
    assert "`model.head.kind` = 'mpl'" in text and "did you mean `mlp`?" in text
    assert "'integrated_gradient'; did you mean `integrated_gradients`?" in text


def test_auto_encoder_is_a_valid_name():
    result = invoke("check", "config", 'model.encoder="auto"')
    assert result.exit_code == 0, result.output


def test_finetune_rejects_an_unknown_encoder_before_preprocessing(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=8, size=(8, 16, 16), seed=7)
    result = invoke(
        "finetune", *ds.config_overrides(), 'model.encoder="resnet9000"', f"run.root={json.dumps(str(tmp_path / 'runs'))}"
    )
    assert result.exit_code == 2
    assert "did you mean" in result.output
    assert not (tmp_path / "ds" / "cache").exists()  # nothing was preprocessed
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------- item 13: settings against the model
def test_encoder_args_the_encoder_does_not_take_are_named():
    result = invoke("check", "config", 'model.encoder="vit3d_test"', 'model.encoder_args={pos_embd="rope"}')
    assert result.exit_code == 2
    text = flat(result.output)
    assert "`model.encoder_args` has `pos_embd`, which vit3d_test does not take; did you mean `pos_embed`?" in text


def test_a_byol_rotation_on_a_non_square_plane_fails_at_check_time(tmp_path):
    config = tmp_path / "byol.toml"
    config.write_text(
        '[pretrain]\nmethod = "byol"\n[model]\nencoder = "mt3_tiny"\n[data.preprocess]\nspatial_size = [16, 32, 64]\n'
    )
    result = invoke("check", "config", "-c", str(config))
    assert result.exit_code == 2
    assert "`pretrain.byol.rotation_weight` = 0.5: rotations by 90 degrees need equal sizes in plane axial" in flat(
        result.output
    )
    fixed = invoke("check", "config", "-c", str(config), 'pretrain.byol.rotation_plane="coronal"', "pretrain.byol.jigsaw_weight=0")
    assert fixed.exit_code == 2  # coronal is (D, W) = (16, 64): still not square
    ok = invoke("check", "config", "-c", str(config), "pretrain.byol.rotation_weight=0")
    assert ok.exit_code == 0, ok.output
    assert "pretrain" in ok.output


def test_stage_settings_are_checked_against_the_encoder_and_targets():
    cases = {
        ('model.encoder="convnext_test_cbam"',): "reads 2D images (H, W) but data.preprocess.spatial_size = [32, 64, 64]",
        ('model.encoder="vit3d_test"', "data.preprocess.spatial_size=[15, 32, 32]"): "multiples of [2, 8, 8]",
        ('pretrain.method="jepa"', 'model.encoder="vit3d_test"', "pretrain.jepa.predictor_dim=100"): "predictor_dim",
        ('pretrain.method="mim_contrastive"', 'model.encoder="mt3_tiny"'): "mim_contrastive needs a 2D encoder with a decoder",
        ('data.targets=[{name="y", classes=["a", "b", "c"]}]', 'train.monitor="auc"'): "did you mean `auroc`?",
        ('data.targets=[{name="y", classes=["a", "b", "c"]}]', "train.class_weights=[1.0, 2.0]"): "one per class",
        ("model.freeze_encoder=false", "model.unfreeze_at_epoch=3"): "model.unfreeze_at_epoch",
        ("train.augment.enabled=true", "train.augment.flip_axes=[3]"): "train.augment.flip_axes",
        ('pretrain.method="byol"', "data.batch_size=1"): "byol needs at least 2 samples per batch",
    }
    for overrides, expected in cases.items():
        result = invoke("check", "config", *overrides)
        assert result.exit_code == 2, (overrides, result.output)
        assert expected in flat(result.output), (overrides, result.output)


def test_the_shipped_configs_pass_the_stage_checks():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "config").rglob("*.toml")):
        result = invoke("check", "config", "-c", str(path))
        assert result.exit_code == 0, (path, result.output)


# ----------------------------------------------------------------- item 13: the extends merge rule
def test_a_child_replaces_a_table_whole_with_replace(tmp_path):
    (tmp_path / "base.toml").write_text(
        '[model]\nencoder = "vit3d_test"\nencoder_args = {pos_embed = "rope", depth = 1}\n'
    )
    (tmp_path / "merged.toml").write_text('extends = "base.toml"\n[model]\nencoder_args = {num_heads = 4}\n')
    (tmp_path / "replaced.toml").write_text(
        'extends = "base.toml"\nreplace = ["model.encoder_args"]\n[model]\nencoder_args = {num_heads = 4}\n'
    )
    (tmp_path / "emptied.toml").write_text('extends = "base.toml"\nreplace = ["model.encoder_args"]\n')

    def resolved(name: str) -> dict:
        result = invoke("config", "show", "-c", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        return tomllib.loads(result.output)["model"]["encoder_args"]

    assert resolved("merged.toml") == {"pos_embed": "rope", "depth": 1, "num_heads": 4}  # tables merge key by key
    assert resolved("replaced.toml") == {"num_heads": 4}
    assert resolved("emptied.toml") == {}

    (tmp_path / "typo.toml").write_text('extends = "base.toml"\nreplace = ["model.encoder_arg"]\n')
    bad = invoke("config", "show", "-c", str(tmp_path / "typo.toml"))
    assert bad.exit_code == 2
    assert "`replace` names `model.encoder_arg`" in flat(bad.output) and "model.encoder_args" in flat(bad.output)
