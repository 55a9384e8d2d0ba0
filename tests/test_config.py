"""Configuration layers: defaults < file chain < env < key=value; every error at once."""

from __future__ import annotations

import pytest

from medctl.config import Config, load_config, parse_value
from medctl.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_live_in_the_models():
    config = load_config(None, env={})
    assert config == Config()
    assert config.train.monitor == "balanced_accuracy"
    assert config.model.unfreeze_at_epoch == -1


def test_precedence_of_all_four_layers(tmp_path):
    write(tmp_path / "base.toml", "[train]\nlr_head = 0.1\nlr_encoder = 0.1\nepochs = 3\npatience = 4\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[train]\nlr_encoder = 0.2\nepochs = 5\n')
    env = {"MEDCTL_TRAIN__EPOCHS": "7", "MEDCTL_TRAIN__PATIENCE": "8"}
    config = load_config(child, ["train.patience=9"], env=env)
    assert config.train.lr_head == 0.1  # base file
    assert config.train.lr_encoder == 0.2  # child file beats base
    assert config.train.epochs == 7  # env beats files
    assert config.train.patience == 9  # command line beats env
    assert config.train.weight_decay == Config().train.weight_decay  # default


def test_extends_chain_resolves_relative_to_each_file(tmp_path):
    (tmp_path / "a").mkdir()
    write(tmp_path / "root.toml", '[run]\nname = "root"\nseed = 1\n')
    write(tmp_path / "a" / "mid.toml", 'extends = "../root.toml"\n[run]\nseed = 2\n')
    leaf = write(tmp_path / "a" / "leaf.toml", 'extends = "mid.toml"\n[data]\nbatch_size = 3\n')
    config = load_config(leaf, env={})
    assert (config.run.name, config.run.seed, config.data.batch_size) == ("root", 2, 3)


def test_extends_cycle_is_a_clear_error(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle: a.toml -> b.toml -> a.toml"):
        load_config(tmp_path / "a.toml", env={})


def test_missing_parent_names_the_child(tmp_path):
    child = write(tmp_path / "child.toml", 'extends = "nope.toml"\n')
    with pytest.raises(ConfigError, match="not found .*extended by .*child.toml"):
        load_config(child, env={})


def test_all_errors_reported_at_once_with_suggestions(tmp_path):
    path = write(
        tmp_path / "bad.toml",
        '[train]\nlr_hed = 1\nepochs = "many"\n[modle]\nencoder = "x"\n[[data.targets]]\nname = "y"\nkind = "binry"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.batch_size=0"], env={})
    problems = info.value.problems
    assert "unknown key `train.lr_hed`; did you mean `train.lr_head`?" in problems
    assert "unknown key `modle`; did you mean `model`?" in problems
    assert any("`train.epochs` = 'many'" in p and "integer" in p for p in problems)
    assert any("`data.batch_size` = 0" in p and "greater than or equal to 1" in p for p in problems)
    assert any("`data.targets.0.kind` = 'binry'" in p and "'binary'" in p for p in problems)
    assert len(problems) == 5
    assert str(path) in str(info.value)


def test_unknown_key_inside_array_of_tables(tmp_path):
    path = write(tmp_path / "t.toml", '[[data.targets]]\nname = "y"\nclases = ["a"]\n')
    with pytest.raises(ConfigError, match=r"`data.targets\[0\].clases`; did you mean `data.targets\[0\].classes`"):
        load_config(path, env={})


def test_env_values_are_parsed_as_toml():
    env = {
        "MEDCTL_TRAIN__LR_HEAD": "1e-4",
        "MEDCTL_DATA__PREPROCESS__SPATIAL_SIZE": "[8, 16, 16]",
        "MEDCTL_MODEL__FREEZE_ENCODER": "false",
        "MEDCTL_RUN__NAME": "plain string",
        "MEDCTL_DEBUG": "1",  # not a config key: ignored
    }
    config = load_config(None, env=env)
    assert config.train.lr_head == pytest.approx(1e-4)
    assert config.data.preprocess.spatial_size == [8, 16, 16]
    assert config.model.freeze_encoder is False
    assert config.run.name == "plain string"


def test_env_unknown_section_is_named():
    with pytest.raises(ConfigError, match="MEDCTL_TRIAN__EPOCHS: unknown section"):
        load_config(None, env={"MEDCTL_TRIAN__EPOCHS": "3"})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.epochs"], env={})


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-4", 1e-4), ("3", 3), ("true", True), ("[1, 2]", [1, 2]), ('"x"', "x"), ("runs/a b", "runs/a b")],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_resolved_toml_round_trips(tmp_path):
    config = load_config(None, ["train.lr_head=0.5", 'data.targets=[{name="y", kind="binary"}]'], env={})
    path = write(tmp_path / "resolved.toml", config.to_toml())
    assert load_config(path, env={}) == config


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "config"
    files = sorted(root.rglob("*.toml"))
    assert len(files) >= 9
    for path in files:
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("#") and "medctl" in first_line, f"{path} must open with its command"
        load_config(path, env={})
