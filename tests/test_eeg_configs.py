"""The three EEG starting configs (config/eeg/) preprocess a small dataset laid out as each documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.io import savemat
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.config import load_config
from medctl.data.synthetic_eeg import write_edf

runner = CliRunner()


def noise(rng: np.random.Generator, channels: int, seconds: float, sfreq: float) -> np.ndarray:
    t = np.arange(int(seconds * sfreq)) / sfreq
    return rng.normal(0, 5, (channels, t.size)) + 20 * np.sin(2 * np.pi * 10 * t)  # (C, N) uV


def preprocess(config: str, tmp_path: Path, *overrides: str) -> pd.DataFrame:
    result = runner.invoke(
        app,
        ["preprocess", "-c", config, "--workers", "1", f'data.cache_dir="{tmp_path / "cache"}"', *overrides],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (cache,) = (tmp_path / "cache").iterdir()
    return pd.read_parquet(cache / "manifest.parquet")


def test_mental_arithmetic_edf_layout(tmp_path):
    config = "config/eeg/mental_arithmetic.toml"
    channels = load_config(config).data.eeg.channels
    rng = np.random.default_rng(0)
    rows = ["recording_id,subject,task,gender,age"]
    for s in range(4):
        for run, task in ((1, "rest"), (2, "arithmetic")):
            write_edf(tmp_path / "eegmat" / f"Subject{s:02d}_{run}.edf", noise(rng, 21, 10, 500), 500,
                      [*channels, "EEG A2-A1", "ECG ECG"])  # fmt: skip
            rows.append(f"Subject{s:02d}_{run},Subject{s:02d},{task},{'FM'[s % 2]},{20 + s}")
    (tmp_path / "recordings.csv").write_text("\n".join(rows) + "\n")
    manifest = preprocess(config, tmp_path, f'data.table="{tmp_path / "recordings.csv"}"',
                          f'data.source.root="{tmp_path / "eegmat"}"')  # fmt: skip
    assert (manifest.status == "ok").all() and len(manifest) == 8 * 4  # 10 s: 4 s windows every 2 s
    assert {tuple(s) for s in manifest["shape"]} == {(19, 46, 25)}
    assert (
        list(manifest.iloc[0]["channels"]) == channels
        and manifest.groupby("group").split.nunique().max() == 1
    )


def test_parkinsons_bdf_bids_layout(tmp_path):
    config = "config/eeg/parkinsons_rest.toml"
    rng = np.random.default_rng(1)
    rows = ["recording_id\tparticipant_id\tgroup\tage\tsession"]
    for name, group, sessions in (
        ("pd1", "PD", ("on", "off")),
        ("pd2", "PD", ("on", "off")),
        ("hc1", "HC", ("hc",)),
    ):
        for session in sessions:
            rec = f"sub-{name}_ses-{session}"
            path = tmp_path / "ds" / f"sub-{name}" / f"ses-{session}" / "eeg" / f"{rec}_task-rest_eeg.bdf"
            write_edf(path, noise(rng, 32, 16, 512), 512, [f"E{i}" for i in range(32)])
            rows.append(f"{rec}\tsub-{name}\t{group}\t{60 + len(rows)}\t{session}")
    (tmp_path / "participants.tsv").write_text("\n".join(rows) + "\n")
    manifest = preprocess(config, tmp_path, f'data.table="{tmp_path / "participants.tsv"}"',
                          f'data.source.root="{tmp_path / "ds"}"')  # fmt: skip
    assert set(manifest.source_id) == {
        "sub-pd1_ses-off",
        "sub-pd2_ses-off",
        "sub-hc1_ses-hc",
    }  # "on" filtered
    assert (manifest.status == "ok").all() and len(manifest) == 3 * 3  # 16 s: 8 s windows every 4 s
    assert {tuple(s) for s in manifest["shape"]} == {(32, 81, 25)}  # 0..40 Hz every 0.5 Hz, 1 + (1024-256)/32


def test_emotion_mat_trials_layout(tmp_path):
    config = "config/eeg/emotion_mat.toml"
    rng = np.random.default_rng(2)
    rows = ["trial_id,subject,emotion,valence,arousal"]
    (tmp_path / "trials").mkdir()
    for s in range(3):
        for t, emotion in enumerate(("negative", "neutral", "positive")):
            savemat(tmp_path / "trials" / f"s{s}_t{t}.mat", {"data": noise(rng, 32, 4, 128) * 1e-6})
            rows.append(f"s{s}_t{t},s{s},{emotion},{'low' if t == 0 else 'high'},{3 + t}")
    (tmp_path / "trials.csv").write_text("\n".join(rows) + "\n")
    manifest = preprocess(config, tmp_path, f'data.table="{tmp_path / "trials.csv"}"',
                          f'data.source.root="{tmp_path / "trials"}"')  # fmt: skip
    assert (manifest.status == "ok").all() and len(manifest) == 9 * 3  # 4 s: 2 s windows every 1 s
    assert {tuple(s) for s in manifest["shape"]} == {(1, 256, 32)}  # tiled, resized to image_size
    summary = json.loads(next((tmp_path / "cache").iterdir()).joinpath("summary.json").read_text())
    assert summary["targets"][2] == {"name": "arousal", "kind": "regression", "classes": []}
