"""The CLI in any terminal: names and numbers never cut, results on stdout, logs and progress on stderr."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from medctl import __version__
from medctl.cli.app import app
from medctl.cli.output import UserLineHandler, show_table
from medctl.models.registry import describe_encoders


def _medctl(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "MEDCTL_NO_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "medctl", *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def _wide_table() -> Table:
    table = Table(title="leaderboard")
    for column in ("entry", "val bal. acc.", "test bal. acc.", "checkpoint"):
        table.add_column(column, justify="right" if "acc" in column else "left")
    table.add_row("byol_half_a_seed_2024", "0.917 [0.833, 1.000]", "0.667 [0.500, 0.833]", "/data/ckpts/encoder.ckpt")
    table.add_row("random_init", "[green]0.583[/]", "0.667", "—")
    return table


def test_list_models_piped_at_80_columns_shows_every_name_whole() -> None:
    result = _medctl("list", "models")
    assert result.returncode == 0, result.stderr
    first_cells = [line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip()]
    names = [row["name"] for row in describe_encoders()]
    assert first_cells == names
    assert "…" not in result.stdout and "┃" not in result.stdout


def test_list_json_is_one_parseable_document_with_every_model() -> None:
    result = _medctl("list", "models", "--json", columns=40)
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == [row["name"] for row in describe_encoders()]
    assert all(isinstance(row["params"], int) and row["params"] > 0 for row in rows)


def test_plain_rows_when_not_a_terminal_keep_every_cell_and_drop_markup() -> None:
    out = Console(width=30, force_terminal=False, record=True)
    show_table(_wide_table(), to=out)
    text = out.export_text()
    assert "byol_half_a_seed_2024" in text and "0.917 [0.833, 1.000]" in text and "/data/ckpts/encoder.ckpt" in text
    assert "[green]" not in text and "0.583" in text
    lines = text.splitlines()
    assert lines[0] == "leaderboard" and lines[1].startswith("entry")
    # right-justified numbers line up on their last character
    assert lines[2].index("0.917 [0.833, 1.000]") + 20 == lines[3].index("0.583") + 5


def test_a_narrow_terminal_stacks_rows_instead_of_cutting() -> None:
    out = Console(width=40, force_terminal=True, record=True)
    show_table(_wide_table(), to=out)
    text = out.export_text()
    assert "entry: byol_half_a_seed_2024" in text
    assert "checkpoint: /data/ckpts/encoder.ckpt" in text
    assert "…" not in text


def test_a_wide_terminal_gets_the_boxed_table() -> None:
    out = Console(width=200, force_terminal=True, record=True)
    show_table(_wide_table(), to=out)
    text = out.export_text()
    assert "┃" in text and "byol_half_a_seed_2024" in text


def test_log_lines_carry_a_prefix_only_for_warnings_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("medctl.test_output")
    handler = UserLineHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("cache: 12 samples")
        logger.warning("spatial_size distorts the aspect ratio")
    finally:
        logger.removeHandler(handler)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["cache: 12 samples", "warning: spatial_size distorts the aspect ratio"]


def test_debug_is_taken_after_the_subcommand(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("MEDCTL_DEBUG", raising=False)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'many'\n")
    quiet = CliRunner().invoke(app, ["check", "config", "-c", str(bad)])
    monkeypatch.delenv("MEDCTL_DEBUG", raising=False)
    loud = CliRunner().invoke(app, ["check", "config", "-c", str(bad), "--debug"])
    monkeypatch.delenv("MEDCTL_DEBUG", raising=False)
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and "Traceback" in loud.output
    assert "train.epochs" in loud.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"medctl {__version__}"


def test_check_json_documents(synthetic_3d, tmp_path) -> None:
    runner = CliRunner()
    valid = runner.invoke(app, ["check", "config", 'model.encoder="mt3_tiny"', "train.epochs=3", "--json"])
    assert valid.exit_code == 0, valid.output
    assert json.loads(valid.stdout) == {
        "valid": True, "config": None, "stages": ["finetune", "preprocess"], "encoder": "mt3_tiny", "targets": []
    }  # fmt: skip
    data = runner.invoke(app, ["check", "data", *synthetic_3d.config_overrides(), "--json"])
    report = json.loads(data.stdout)
    assert data.exit_code == (0 if report["ok"] else 2)
    assert {row["name"] for row in report["rows"]} >= {"table", "readable"}
    assert sum(report["counts"]["splits"].values()) == report["n_samples"] == 22
    env = runner.invoke(app, ["check", "env", "--root", str(tmp_path), "--json"])
    deps = json.loads(env.stdout)["dependencies"]
    assert env.exit_code == 0 and {"torch", "monai", "pydicom"} <= {d["name"] for d in deps}
    assert all(d["ok"] for d in deps)
