"""`medctl demo` end to end at its smallest size: every stage's artifacts, their values, and reuse."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.demo import default_config_text

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_shipped_demo_config_is_the_embedded_default():
    shipped = ROOT / "config" / "demo.toml"  # a link to the one file, src/medctl/demo.toml, not a copy
    assert shipped.is_symlink() and shipped.resolve() == (ROOT / "src" / "medctl" / "demo.toml").resolve()
    assert tomllib.loads(shipped.read_text()) == tomllib.loads(default_config_text())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    first = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(out)])
    assert first.exit_code == 0, first.output
    return out, first.output


def test_demo_writes_every_stage(demo_run):
    out, output = demo_run
    assert "[8/9] saliency_2d" in output and "[9/9] report" in output
    # dataset + cache
    assert (out / "data" / "participants.tsv").exists() and any((out / "data" / "masks").iterdir())
    manifest = pd.read_parquet(next((out / "cache").glob("*/manifest.parquet")))
    assert set(manifest["split"]) == {"train", "val", "test"} and (manifest["status"] == "ok").all()
    # three pretrained encoders, published under their names
    for name in ("byol_all", "byol_half_a", "byol_half_b"):
        assert (out / "checkpoints" / f"{name}.ckpt").stat().st_size > 0
        assert (out / "pretrain" / name / "metrics.jsonl").exists()
    # the sweep: three checkpoints + random baseline, epochs picked on val, sorted by test balanced accuracy
    board = pd.read_csv(out / "sweep" / "leaderboard.csv")
    assert set(board["entry"]) == {"byol_all", "byol_half_a", "byol_half_b", "random_init"}
    assert (board["status"] == "ok").all()
    assert set(board["selected_on"]) == {"val"} and set(board["ranked_on"]) == {"test"}
    ranked = board["test_balanced_accuracy"].tolist()
    assert ranked == sorted(ranked, reverse=True)
    entry_metrics = json.loads((out / "sweep" / board["entry"][0] / "eval_test" / "metrics.json").read_text())
    assert board["test_balanced_accuracy"][0] == pytest.approx(entry_metrics["summary"]["balanced_accuracy"])
    # fine-tune of a pretrained leader, evaluated on test
    pretrained = board[board["checkpoint"].fillna("") != ""]  # the random baseline leads nothing to fine-tune
    finetuned = tomllib.loads((out / "finetune" / "config.toml").read_text())["model"]["checkpoint"]
    assert finetuned == pretrained["checkpoint"].iloc[0] and "byol" in finetuned
    metrics = json.loads((out / "finetune" / "eval_test" / "metrics.json").read_text())
    assert 0.0 <= metrics["summary"]["balanced_accuracy"] <= 1.0
    assert (out / "finetune" / "eval_test" / "test_preds.parquet").exists()
    # saliency maps with pointing-game scores against the masks
    index = pd.read_csv(out / "finetune" / "saliency_test" / "index.csv")
    assert set(index["method"]) == {"integrated_gradients", "gradcam", "hirescam"}
    assert list((out / "finetune" / "saliency_test").rglob("*.nrrd"))
    scores = json.loads((out / "finetune" / "saliency_test" / "scores.json").read_text())
    assert scores["settings"]["gradcam_layer"] == "" and set(scores["cam_layers"]) == {"gradcam", "hirescam"}
    for entry in scores["scores"].values():  # every rate with its interval, every verdict from a test
        assert entry["n_scored"] == 0 or entry["pointing_low"] <= entry["pointing_hit_rate"] <= entry["pointing_high"]
        assert "beats" not in entry["verdict"] or any(c["p"] < 0.05 for c in entry["comparisons"].values())
    # the 2D check whose evidence (a rod) is not the brightest thing: every test rod scored, both methods, each
    # against the input baselines and its random-weight copy; too few rods at this size to call a beat
    distractors = out / "distractors_2d"
    scored = json.loads((distractors / "saliency_test" / "scores.json").read_text())
    assert set(scored["scores"]) == {"integrated_gradients", "hirescam"}
    lesion_ids = {p.stem for p in (distractors / "data" / "masks").iterdir() if np.asarray(PILImage.open(p)).any()}
    test_ids = set(pd.read_parquet(next((distractors / "data" / "cache").glob("*/manifest.parquet"))).query("split == 'test'")["id"])
    assert scored["lesions_in_split"] == len(lesion_ids & test_ids) > 0
    for entry in scored["scores"].values():
        assert entry["n_scored"] == entry["random_weights_scored"] == scored["lesions_in_split"]
    assert scored["baselines"]["input_intensity"]["pointing_hit_rate"] == 0.0  # the distractors are brighter
    assert "saliency, 2D, evidence not the brightest: hirescam: pointing game" in " ".join(output.split())
    # the report embeds its figures
    html = (out / "report.html").read_text()
    report = (out / "report.md").read_text()
    assert "## Leaderboard" in report and "pointing game [95% CI]" in report and "medctl sweep" in report
    section = report.split("## Saliency where the evidence is not the brightest thing (2D)")[1]
    assert "Too few to decide" in section and "input intensity (no model)" in section
    assert html.count("data:image/png;base64") >= 2


def test_demo_rerun_reuses_finished_work(demo_run):
    out, _ = demo_run
    board_mtime = (out / "sweep" / "byol_all" / "results.json").stat().st_mtime
    again = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "reused" in again.output and "pretrain byol_all" in again.output and "saliency_2d" in again.output
    assert (out / "sweep" / "byol_all" / "results.json").stat().st_mtime == board_mtime


def test_demo_rejects_unknown_size(tmp_path):
    result = runner.invoke(app, ["demo", "--size", "huge", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "tiny, small, medium" in result.output


def test_demo_bad_override_is_one_line_exit_2(tmp_path):
    # the demo's own layers and the user's key=value go through config.apply_overrides / load_config:
    # a bad key is the one-line config error every command gives, never a traceback or a silent drop
    result = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(tmp_path / "d"), "badkey=1"])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error_lines == ["error: override `badkey=1`: unknown key `badkey`; known: run, data, model, train, "
                           "pretrain, sweep, saliency, tracking"]  # fmt: skip
    assert not (tmp_path / "d" / "pretrain").exists()  # nothing trained


def test_demo_eeg_reads_the_config_file(tmp_path):
    # `-c` with --eeg is the file under the demo's layers (it was dropped before): its bad key names the file
    config = tmp_path / "mine.toml"
    config.write_text("[train]\nlr_headd = 1e-3\n")
    result = runner.invoke(app, ["demo", "--eeg", "--size", "tiny", "--out", str(tmp_path / "d"), "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert f"{config}: unknown key `train.lr_headd`; did you mean `train.lr_head`?" in " ".join(result.output.split())
    assert not (tmp_path / "d" / "finetune").exists()
