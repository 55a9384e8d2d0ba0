"""Each pretraining method owns its typed table [pretrain.<name>]: a new method is one module plus one registry
line, its table is checked by every command that loads a config, and the old flat keys say where they went."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app
from medctl.config import PretrainConfig, Section, dump_toml, load_config
from medctl.errors import ConfigError
from medctl.pretrain import METHODS, MethodSpec, method_settings, method_table_problems, resolved_pretrain
from medctl.runs import check_resume_settings

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


# ------------------------------------------------------- a new method: this module and one registry line
class ToySettings(Section):
    """``[pretrain.toy]``."""

    spread: float = Field(default=1.0, gt=0)  # the embedding's target standard deviation
    noise_std: float = Field(default=0.1, ge=0)


class Toy(nn.Module):
    """Pull the spread of noisy embeddings towards a target: the smallest method the stage can run."""

    def __init__(self, encoder: nn.Module, settings: ToySettings):
        super().__init__()
        self.encoder, self.spread, self.noise_std = encoder, settings.spread, settings.noise_std


    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x + self.noise_std * torch.randn_like(x))  # (B, D)
        loss = (z.std(dim=0) - self.spread).pow(2).mean()
        return {"loss": loss, "spread_target": torch.tensor(self.spread)}

    def update_target(self, momentum: float) -> None:
        """No target network."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> None:
        return None


@pytest.fixture
def toy(monkeypatch):
    """The one registry line, for this test only."""
    monkeypatch.setitem(METHODS, "toy", MethodSpec(Toy, ToySettings, min_batch=3, min_batch_reason="toy reasons"))


TINY = [
    "data.preprocess.spatial_size=[8, 16, 16]", "data.batch_size=4", "pretrain.monitor_samples=8",
    'model.encoder="mt3_tiny"', "model.encoder_args={stem_channels=[4, 8], embed_dim=32, depth=1, num_heads=2}",
    "pretrain.warmup_epochs=0", "data.preprocess.workers=1", "pretrain.epochs=2",
]  # fmt: skip


def test_a_registered_method_is_checked_trained_and_recorded_from_its_own_table(toy, synthetic_3d, tmp_path):
    config = tmp_path / "toy.toml"
    config.write_text('[pretrain]\nmethod = "toy"\nlr = 5e-3\n\n[pretrain.toy]\nspread = 2.5\n')
    data = [*synthetic_3d.config_overrides(), *TINY]

    ok = invoke("check", "config", "-c", str(config), *data)
    assert ok.exit_code == 0, ok.output
    typo = one_error_line(invoke("check", "config", "-c", str(config), *data, "pretrain.toy.sprad=1"))
    assert "unknown key `pretrain.toy.sprad`; did you mean `pretrain.toy.spread`?" in typo
    negative = one_error_line(invoke("check", "config", "-c", str(config), *data, "pretrain.toy.spread=-1"))
    assert "`pretrain.toy.spread` = -1: Input should be greater than 0" in negative
    small = one_error_line(invoke("check", "config", "-c", str(config), *data, "data.batch_size=2"))
    assert "`data.batch_size` = 2: toy needs at least 3 samples per batch (toy reasons)" in small

    result = invoke("pretrain", "-c", str(config), *data, f'run.root="{tmp_path / "runs"}"', 'run.name="toy"')
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "toy"
    history = json.loads((run / "results.json").read_text())["history"]
    assert [row["train_spread_target"] for row in history] == [2.5, 2.5]  # the table's value reached the module
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    saved = tomllib.loads((run / "config.toml").read_text())["pretrain"]
    assert saved["method"] == "toy" and saved["toy"] == {"spread": 2.5, "noise_std": 0.1}  # defaults filled in
    assert (run / "checkpoints" / "encoder.ckpt").is_file()

    listed = invoke("list", "methods")
    assert "toy" in listed.output and "Pull the spread" in listed.output


def test_a_table_of_no_registered_method_is_refused_before_any_work(synthetic_3d, tmp_path):
    args = [*synthetic_3d.config_overrides(), *TINY, 'pretrain.method="toy"', "pretrain.toy.spread=2",
            f'run.root="{tmp_path / "runs"}"']  # fmt: skip
    text = one_error_line(invoke("pretrain", *args))
    assert "`pretrain.method` = 'toy' is not a pretraining method" in text
    assert "`[pretrain.toy]` is not a pretraining method's table" in text and "known: " + ", ".join(METHODS) in text
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- every command, every layer
@pytest.mark.parametrize("command", [["preprocess"], ["finetune"], ["sweep"], ["config", "show"]])
def test_a_typo_in_a_method_table_fails_every_command_that_loads_a_config(command, synthetic_3d, tmp_path):
    text = one_error_line(invoke(*command, *synthetic_3d.config_overrides(), "pretrain.byol.rotaton_weight=0"))
    assert "unknown key `pretrain.byol.rotaton_weight`; did you mean `pretrain.byol.rotation_weight`?" in text


def test_old_flat_keys_say_where_they_moved(tmp_path):
    config = tmp_path / "old.toml"
    config.write_text("[pretrain]\nrotation_weight = 0.0\nhalves_crop_scale = [0.5, 1.0]\nprojector_dim = 64\n")
    text = one_error_line(invoke("check", "config", "-c", str(config)))
    assert "`pretrain.rotation_weight` moved to `pretrain.byol.rotation_weight`" in text
    assert "`pretrain.halves_crop_scale` moved to `pretrain.mim_contrastive.halves_crop_scale`" in text
    assert "`pretrain.projector_dim` moved to `pretrain.byol.projector_dim` or `pretrain.mim_contrastive.projector_dim`" in text
    flag = one_error_line(invoke("check", "config", "pretrain.export_vjepa2=true"))
    assert "`pretrain.export_vjepa2` moved to `pretrain.jepa.export_vjepa2`" in flag


def test_tables_come_from_files_the_environment_and_the_command_line(tmp_path, monkeypatch):
    base = tmp_path / "base.toml"
    base.write_text('[pretrain]\nmethod = "jepa"\n\n[pretrain.jepa]\npredictor_dim = 64\nmask_blocks = 3\n')
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n\n[pretrain.jepa]\nmask_blocks = 2\n')
    monkeypatch.setenv("MEDCTL_PRETRAIN__JEPA__PREDICTOR_DEPTH", "3")
    config = load_config(child, ["pretrain.jepa.predictor_heads=4"])
    settings = method_settings(config.pretrain)
    assert (settings.predictor_dim, settings.mask_blocks, settings.predictor_depth, settings.predictor_heads) == (
        64, 2, 3, 4,
    )  # fmt: skip
    assert settings.mask_block_scale == [0.1, 0.2]  # the section's default
    replaced = tmp_path / "replaced.toml"
    replaced.write_text('extends = "base.toml"\nreplace = ["pretrain.jepa"]\n')
    monkeypatch.delenv("MEDCTL_PRETRAIN__JEPA__PREDICTOR_DEPTH")
    assert method_settings(load_config(replaced).pretrain).predictor_dim == 96


def test_problems_name_the_full_key_and_come_all_at_once():
    pretrain = {"method": "byol", "byol": {"view_crop_scale": [0.5, 2.0], "rotation_plane": "oblique"},
                "jepa": {"mask_aspect_ratio": [2.0, 1.0]}}  # fmt: skip
    problems = method_table_problems(pretrain)
    assert len(problems) == 3
    assert any(p.startswith("`pretrain.byol.view_crop_scale` = [0.5, 2.0]: needs [low, high]") for p in problems)
    assert any(p.startswith("`pretrain.byol.rotation_plane` = 'oblique'") for p in problems)
    assert any(p.startswith("`pretrain.jepa.mask_aspect_ratio` = [2.0, 1.0]") for p in problems)
    with pytest.raises(ConfigError, match="pretrain.byol.view_crop_scale"):
        resolved_pretrain(PretrainConfig.model_validate(pretrain))
    with pytest.raises(ConfigError, match=r"`pretrain.projector_dim` is not a \[pretrain\] key"):
        resolved_pretrain(PretrainConfig(projector_dim=16))  # beside the shared keys only tables, also in code


def test_configs_this_program_wrote_with_flat_keys_still_load(tmp_path):
    """A checkpoint's config from before the method tables: evaluate and saliency layer files on top of it."""
    old = {"pretrain": {"method": "byol", "epochs": 3, "rotation_weight": 0.0, "projector_dim": 64, "mask_blocks": 9}}
    config = load_config(None, ["train.epochs=2"], base=old)
    assert config.pretrain.epochs == 3 and config.train.epochs == 2
    settings = method_settings(config.pretrain)
    assert settings.rotation_weight == 0.0 and settings.projector_dim == 64  # moved into its method's table
    assert "jepa" not in config.pretrain.model_extra  # another method's key did nothing and is dropped


def test_resume_of_a_run_saved_with_flat_keys_sees_no_change(tmp_path):
    def resolved(*overrides: str):
        config = load_config(None, list(overrides))
        return config.model_copy(update={"pretrain": resolved_pretrain(config.pretrain)})

    now = resolved("pretrain.byol.rotation_weight=0", "pretrain.byol.pretext_reorient=0", "pretrain.byol.decorrelation_weight=0")
    flat = tomllib.loads(now.to_toml())
    byol = flat["pretrain"].pop("byol")
    added_later = ("pretext_reorient", "view_bias_field", "predictor_lr_scale", "decorrelation_weight")
    for added in added_later:  # added after the tables: an older config.toml lacks them
        del byol[added]
    flat["pretrain"] |= byol  # the layout of a config.toml written before the tables
    (tmp_path / "config.toml").write_text(dump_toml(flat))
    check_resume_settings(tmp_path, now, extend=False)  # the same settings: no error
    # its pretext views kept their intensity trend: resuming at today's default names the one setting that differs
    with pytest.raises(ConfigError, match=r"differ: pretrain.byol.pretext_reorient 0.0 -> 1.0; resume"):
        check_resume_settings(
            tmp_path, resolved("pretrain.byol.rotation_weight=0", "pretrain.byol.decorrelation_weight=0"), extend=False
        )
    # its loss had no decorrelation term: today's default of 5 is named as the change
    with pytest.raises(ConfigError, match=r"differ: pretrain.byol.decorrelation_weight 0.0 -> 5.0; resume"):
        check_resume_settings(
            tmp_path, resolved("pretrain.byol.rotation_weight=0", "pretrain.byol.pretext_reorient=0"), extend=False
        )
    with pytest.raises(ConfigError, match=r"pretrain.byol.rotation_weight 0.0 -> 0.5"):
        check_resume_settings(tmp_path, resolved(), extend=False)
