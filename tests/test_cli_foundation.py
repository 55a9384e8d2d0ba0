"""The CLI's contract: help, exit codes (0 ok, 2 user error, 1 failure), --debug, secret-free runs."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.config import load_config
from medctl.runs import create_run_dir, redact

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "check"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("medctl ")


def test_check_config_valid_exits_0(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[train]\nepochs = 3\n[[data.targets]]\nname = "label"\nkind = "binary"\n')
    result = runner.invoke(app, ["check", "config", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "label" in result.output


def test_check_config_invalid_exits_2_with_every_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr_hed = 1\nepochs = -1\n")
    result = runner.invoke(app, ["check", "config", "-c", str(path)])
    assert result.exit_code == 2
    assert "did you mean `train.lr_head`" in result.output
    assert "`train.epochs` = -1" in result.output
    assert "Traceback" not in result.output


def test_missing_config_file_is_exit_2(tmp_path):
    result = runner.invoke(app, ["config", "show", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "config file not found" in result.output


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "config", "show", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_config_show_prints_resolved_toml(monkeypatch):
    monkeypatch.setenv("MEDCTL_TRAIN__EPOCHS", "11")
    result = runner.invoke(app, ["config", "show", "train.lr_head=0.25"])
    assert result.exit_code == 0, result.output
    assert "lr_head = 0.25" in result.output
    assert "epochs = 11" in result.output


def test_usage_error_is_exit_2():
    result = runner.invoke(app, ["config", "show", "--no-such-option"])
    assert result.exit_code == 2


def test_check_env_reports_versions_and_disk(tmp_path):
    result = runner.invoke(app, ["check", "env", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for field in ("torch", "monai", "bf16", "free_disk_gb", "device"):
        assert field in result.output


def test_run_directory_never_holds_secrets(tmp_path, monkeypatch):
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLESECRETID42",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SESSION_TOKEN": "FQoGZXIvYXdzEXAMPLESESSIONTOKEN",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    config = load_config(None, [f"run.root={tmp_path}", "run.name=r1"])
    command = "medctl finetune -c my.toml data.source.password=hunter2 train.epochs=2"
    run_dir = create_run_dir(config, command)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.toml", "env.json"}
    for path in files:
        text = path.read_text()
        for value in [*secrets.values(), "hunter2"]:
            assert value not in text, f"{value} leaked into {path}"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == 42 and env["torch"] and "train.epochs=2" in env["command"]
    assert {"git_sha", "git_dirty", "python", "monai", "host", "device"} <= set(env)


def test_redact_hides_secret_looking_overrides():
    assert redact("a=1 aws_secret_access_key=xyz token=abc") == "a=1 aws_secret_access_key=*** token=***"


def test_run_name_defaults_to_timestamp(tmp_path):
    config = load_config(None, [f"run.root={tmp_path}"])
    run_dir = create_run_dir(config)
    assert run_dir.parent == tmp_path and run_dir.name[:2] == "20"
