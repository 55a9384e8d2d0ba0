"""EEG recordings -> spectrogram windows through `medctl preprocess` / `medctl check data`, on real EDF files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.config import EEGConfig
from medctl.data.eeg import read_recording
from medctl.data.synthetic_eeg import make_eeg_dataset, write_edf

runner = CliRunner()
SFREQ = 128.0


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def only_cache(root: Path) -> Path:
    (cache,) = [p for p in root.iterdir() if p.is_dir()]
    return cache


def sine_study(tmp_path: Path, hz: dict[str, float], seconds: float = 10.0) -> list[str]:
    """One EDF per id, every channel a sine of the id's frequency (plus a little noise), and a table."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SFREQ)) / SFREQ
    rows = []
    for i, (id_, f) in enumerate(hz.items()):
        data = np.stack([20 * np.sin(2 * np.pi * f * t + c) + rng.normal(0, 0.5, t.size) for c in range(4)])
        write_edf(tmp_path / "rec" / f"{id_}.edf", data, SFREQ, ["Fz", "Cz", "Pz", "Oz"])
        rows.append(f"{id_}\ts{i // 2}\t{'a' if i % 2 else 'b'}\t{['train', 'val', 'test'][i % 3]}")
    (tmp_path / "table.tsv").write_text("id\tsubject\tlabel\tsplit\n" + "\n".join(rows) + "\n")
    return [
        'data.modality="eeg"',
        f'data.table="{tmp_path / "table.tsv"}"',
        'data.id_column="id"',
        'data.split_column="split"',
        f'data.source.root="{tmp_path / "rec"}"',
        'data.source.pattern="{id}.edf"',
        'data.targets=[{name="label", kind="binary", classes=["a", "b"]}]',
        f'data.cache_dir="{tmp_path / "cache"}"',
        "data.eeg.window_s=2.0",
        "data.eeg.hop_s=1.0",
        "data.eeg.n_fft=64",
        "data.eeg.stft_hop=16",
    ]


def test_spectrogram_shapes_and_the_peak_of_a_known_sine(tmp_path):
    overrides = sine_study(tmp_path, {"r12": 12.0, "r20": 20.0, "r6": 6.0})
    result = invoke(
        "preprocess", "--workers", "1", *overrides, "data.eeg.fmax=40", 'data.eeg.channels=["Oz", "Cz"]'
    )
    assert result.exit_code == 0, result.output
    cache = only_cache(tmp_path / "cache")
    manifest = pd.read_parquet(cache / "manifest.parquet")
    # 10 s, windows of 2 s every 1 s -> 9 windows; each (2 channels, 0..40 Hz every 2 Hz = 21, 1 + (256-64)/16 = 13)
    assert manifest.groupby("source_id").size().to_dict() == {"r12": 9, "r20": 9, "r6": 9}
    assert all(list(s) == [2, 21, 13] for s in manifest["shape"])
    first = manifest.iloc[0]
    assert list(first["channels"]) == ["Oz", "Cz"] and first["sfreq"] == SFREQ
    assert list(first["spacing"]) == [2.0, 0.125] and list(first["orig_shape"]) == [2, 1280]
    assert manifest.loc[manifest.source_id == "r12", "window_start_s"].tolist() == [
        float(k) for k in range(9)
    ]
    summary = json.loads((cache / "summary.json").read_text())
    assert (
        summary["spatial_dims"] == 2 and summary["in_channels"] == 2 and summary["spatial_size"] == [21, 13]
    )
    for row in manifest.itertuples():
        image = np.load(cache / "images" / f"{row.id}.npy")
        peak_row = int(image.mean(axis=(0, 2)).argmax())
        peak_hz = row.origin[0] + peak_row * row.spacing[0]
        expected = {"r12": 12.0, "r20": 20.0, "r6": 6.0}[row.source_id]
        assert peak_hz == expected, (row.id, peak_hz)

    tiled = invoke("preprocess", "--workers", "1", *overrides, 'data.eeg.layout="tiled"', "data.eeg.fmax=40")
    assert tiled.exit_code == 0, tiled.output
    shapes = {
        tuple(s)
        for p in (tmp_path / "cache").iterdir()
        for s in pd.read_parquet(p / "manifest.parquet")["shape"]
    }
    assert (1, 4 * 21, 13) in shapes


def test_windows_of_one_subject_never_cross_splits(tmp_path):
    study = make_eeg_dataset(tmp_path / "eeg", n_subjects=10, recordings_per_subject=2, seconds=8, seed=1)
    overrides = [
        o for o in study.config_overrides(("health", "age")) if not o.startswith("data.split_column")
    ]
    result = invoke("preprocess", "--workers", "1", *overrides, f'data.cache_dir="{tmp_path / "cache"}"',
                    "data.split_ratios=[0.5, 0.25, 0.25]")  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(only_cache(tmp_path / "cache") / "manifest.parquet")
    assert len(manifest) == 20 * 3  # 8 s, windows of 4 s every 2 s
    per_subject = manifest.groupby("group")["split"].nunique()
    assert len(per_subject) == 10 and (per_subject == 1).all()
    assert set(manifest.split) == {"train", "val", "test"}
    assert manifest.age.dtype == float and manifest.groupby("group")["age"].nunique().max() == 1
    assert "age: class counts per split" in result.output and "mean" in result.output

    check = invoke("check", "data", *overrides, "data.split_ratios=[0.5, 0.25, 0.25]")
    assert check.exit_code == 0, check.output
    assert "no subject spans two splits" in check.output and "headers read" in check.output


def test_truncated_and_fake_edf_are_recorded_skips_and_a_rerun_reuses_the_rest(tmp_path):
    overrides = sine_study(tmp_path, {"ok1": 10.0, "ok2": 10.0, "trunc": 10.0, "fake": 10.0, "short": 10.0})
    rec = tmp_path / "rec"
    data = (rec / "trunc.edf").read_bytes()
    (rec / "trunc.edf").write_bytes(data[: len(data) // 3])
    (rec / "fake.edf").write_text("this is not an EDF file at all\n" * 20)
    write_edf(rec / "short.edf", np.zeros((4, 128)), SFREQ, ["Fz", "Cz", "Pz", "Oz"])
    result = invoke("preprocess", "--workers", "1", *overrides)
    assert result.exit_code == 0, result.output
    cache = only_cache(tmp_path / "cache")
    errors = pd.read_csv(cache / "data_errors.csv").set_index("id")
    assert set(errors.index) == {"trunc", "fake", "short"}
    assert errors.loc["fake", "stage"] == "read" and "not a readable EDF file" in errors.loc["fake", "error"]
    assert (
        errors.loc["trunc", "stage"] == "read"
        and "truncated: the header states 10 data records" in errors.loc["trunc", "error"]
    )
    assert (
        errors.loc["short", "stage"] == "transform"
        and "shorter than one window" in errors.loc["short", "error"]
    )
    again = invoke("preprocess", "--workers", "1", *overrides)
    assert again.exit_code == 0 and "0 new, 2 cached, 3 failed" in again.output

    strict = runner.invoke(app, ["preprocess", "--strict", "--workers", "1", *overrides])
    assert strict.exit_code == 2 and "trunc" in strict.output and "rerun without --strict" in strict.output


def test_missing_channels_and_impossible_settings_are_clear_errors(tmp_path):
    overrides = sine_study(tmp_path, {"r1": 10.0, "r2": 10.0})
    missing = runner.invoke(
        app, ["preprocess", "--strict", "--workers", "1", *overrides, 'data.eeg.channels=["Cz", "T7"]']
    )
    assert missing.exit_code == 2
    assert "channel(s) T7 (data.eeg.channels) not in the recording; it has: Fz, Cz, Pz, Oz" in missing.output
    short = runner.invoke(app, ["preprocess", *overrides, "data.eeg.resample_hz=64", "data.eeg.window_s=0.5"])
    assert short.exit_code == 2 and "shorter than n_fft = 64" in short.output
    nyquist = runner.invoke(app, ["preprocess", *overrides, "data.eeg.resample_hz=64", "data.eeg.h_freq=40"])
    assert nyquist.exit_code == 2 and "h_freq = 40 Hz is above Nyquist (32 Hz" in nyquist.output
    # without resampling, the file's own rate decides: recorded per file, named in data_errors.csv
    above = runner.invoke(app, ["preprocess", "--strict", "--workers", "1", *overrides, "data.eeg.fmax=80"])
    assert (
        above.exit_code == 2
        and "data.eeg.fmax = 80 Hz is not below Nyquist (64 Hz at 128 Hz)" in above.output
    )


def test_band_pass_reference_and_resampling(tmp_path):
    overrides = sine_study(tmp_path, {"r1": 30.0, "r2": 30.0})
    result = invoke("preprocess", "--workers", "1", *overrides, "data.eeg.resample_hz=64", "data.eeg.h_freq=20",
                    'data.eeg.reference="average"', "data.eeg.log_power=false", 'data.eeg.normalize="none"',
                    "data.eeg.n_fft=32", "data.eeg.stft_hop=8")  # fmt: skip
    assert result.exit_code == 0, result.output
    cache = only_cache(tmp_path / "cache")
    manifest = pd.read_parquet(cache / "manifest.parquet")
    row = manifest.iloc[0]
    assert row["sfreq"] == 64.0 and list(row["orig_shape"]) == [4, 640] and list(row["shape"]) == [4, 17, 13]
    image = np.load(cache / "images" / f"{row['id']}.npy")
    # the 30 Hz sine is removed by the 20 Hz low-pass: its bin keeps < 1% of the unfiltered power
    unfiltered = invoke("preprocess", "--workers", "1", *overrides, "data.eeg.resample_hz=64",
                        "data.eeg.log_power=false", 'data.eeg.normalize="none"', "data.eeg.n_fft=32",
                        "data.eeg.stft_hop=8")  # fmt: skip
    assert unfiltered.exit_code == 0
    other = next(p for p in (tmp_path / "cache").iterdir() if p != cache)
    raw_image = np.load(other / "images" / f"{row['id']}.npy")
    bin30 = 15  # 2 Hz bins
    assert image[:, bin30].mean() < 0.01 * raw_image[:, bin30].mean()


def test_array_formats_read_like_the_edf(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    data_uv = rng.normal(0, 10, (3, 512))
    write_edf(tmp_path / "r.edf", data_uv, SFREQ, ["A", "B", "C"])
    edf = read_recording(tmp_path / "r.edf", EEGConfig())
    volts = edf.get_data()  # (C, N), MNE's volts
    np.save(tmp_path / "r.npy", volts)
    savemat(tmp_path / "r.mat", {"eeg": volts, "fs": SFREQ})
    pd.DataFrame(volts.T, columns=["A", "B", "C"]).to_csv(tmp_path / "r.csv", index=False)
    arrays = EEGConfig(sfreq=SFREQ, variable="eeg", array_channels=["A", "B", "C"])
    for name in ("r.npy", "r.mat", "r.csv"):
        raw = read_recording(tmp_path / name, arrays)
        assert raw.ch_names == ["A", "B", "C"] and raw.info["sfreq"] == SFREQ, name
        np.testing.assert_allclose(raw.get_data(), volts, rtol=1e-6, err_msg=name)
    from medctl.errors import DataError

    with pytest.raises(DataError, match="set data.eeg.sfreq"):
        read_recording(tmp_path / "r.npy", EEGConfig())
    with pytest.raises(DataError, match=r"no variable 'x' \(data.eeg.variable\); the file has: eeg, fs"):
        read_recording(tmp_path / "r.mat", EEGConfig(sfreq=SFREQ, variable="x"))
    edf.save(tmp_path / "r_raw.fif", verbose="error")
    fif = read_recording(tmp_path / "r_raw.fif", EEGConfig())
    np.testing.assert_allclose(fif.get_data(), volts, rtol=1e-6)


def test_recordings_from_a_bucket(s3_server, tmp_path):
    import boto3
    import s3fs

    overrides = sine_study(tmp_path, {"b1": 8.0, "b2": 16.0, "b3": 8.0})
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="eeg-bucket")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for path in (tmp_path / "rec").iterdir():
        fs.put_file(str(path), f"eeg-bucket/rec/{path.name}")
    overrides = [o for o in overrides if not o.startswith("data.source.root")]
    result = invoke("preprocess", "--workers", "1", *overrides, 'data.source.root="s3://eeg-bucket/rec/"',
                    f'data.download_dir="{tmp_path / "dl"}"')  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(only_cache(tmp_path / "cache") / "manifest.parquet")
    assert (manifest.status == "ok").all() and len(manifest) == 27
    assert list(manifest.iloc[0]["channels"]) == ["Fz", "Cz", "Pz", "Oz"]
