"""BrainVision (.vhdr + the .eeg / .vmrk its header names) and EEGLAB (.set + .fdt) recordings from a bucket
(moto's real server), written by MNE: the side files come with the header, a missing one is a recorded skip
naming it, and an outage while fetching one stops the run with what finished kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mne
import numpy as np
import pandas as pd
from scipy.io import loadmat, savemat
from typer.testing import CliRunner

import medctl.data.eeg as eeg_module
from medctl.cli.app import app
from medctl.config import load_config
from medctl.data.eeg import side_files
from medctl.data.preprocess import cache_dir_for
from medctl.data.synthetic_eeg import make_eeg_dataset
from medctl.storage import filesystem

runner = CliRunner()
PATTERN = 'data.source.pattern="{recording_id}.[sv][eh]*"'  # the .set or the .vhdr, not their side files


def write_brainvision(raw: mne.io.BaseRaw, header: Path, data_name: str) -> None:
    """A BrainVision triplet (pybv through MNE) whose samples file is ``data_name``, as the header says."""
    mne.export.export_raw(header, raw, fmt="brainvision", verbose="error")
    written = header.with_suffix(".eeg")
    if data_name != written.name:
        written.rename(header.parent / data_name)
        text = header.read_text().replace(f"DataFile={written.name}", f"DataFile={data_name}")
        header.write_text(text)


def write_eeglab_with_fdt(raw: mne.io.BaseRaw, path: Path) -> None:
    """An EEGLAB .set (eeglabio through MNE) whose samples move to a .fdt, as EEGLAB saves large datasets."""
    mne.export.export_raw(path, raw, fmt="eeglab", verbose="error")
    fields = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
    np.asarray(fields["data"], dtype="<f4").T.tofile(
        path.with_suffix(".fdt")
    )  # (N, C): a sample's channels in a row
    fields["data"] = path.with_suffix(".fdt").name
    savemat(path, fields, appendmat=False)


def side_file_study(tmp_path: Path):
    """The synthetic EEG study with its EDFs turned into BrainVision (even ids) and EEGLAB + .fdt (odd ids)."""
    study = make_eeg_dataset(tmp_path / "study", n_subjects=6, recordings_per_subject=1, seconds=8)
    folder = tmp_path / "converted"
    folder.mkdir()
    for i, id_ in enumerate(study.ids):
        raw = mne.io.read_raw_edf(study.recording_root / f"{id_}.edf", preload=True, verbose="error")
        if i % 2 == 0:
            write_brainvision(raw, folder / f"{id_}.vhdr", f"{id_}_samples.eeg")
        else:
            write_eeglab_with_fdt(raw, folder / f"{id_}.set")
    return study, folder


def upload(folder: Path, bucket: str, endpoint: str, skip: tuple[str, ...] = ()) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    fs = filesystem(f"s3://{bucket}")
    for path in sorted(folder.iterdir()):
        if path.name not in skip:
            fs.put_file(str(path), f"{bucket}/rec/{path.name}")


def overrides_for(study, root: str, cache: Path, downloads: Path) -> list[str]:
    kept = [
        o for o in study.config_overrides() if not o.startswith(("data.source.root", "data.source.pattern"))
    ]
    return [*kept, f"data.source.root={json.dumps(root)}", PATTERN, f"data.cache_dir={json.dumps(str(cache))}",
            f"data.download_dir={json.dumps(str(downloads))}", "data.source.retries=1"]  # fmt: skip


def only_cache(root: Path) -> Path:
    (cache,) = [p for p in root.iterdir() if p.is_dir()]
    return cache


def test_side_files_are_read_from_the_header(tmp_path):
    study, folder = side_file_study(tmp_path)
    header = folder / f"{study.ids[0]}.vhdr"
    (data, markers) = side_files(header)
    assert (data.what, data.names, data.required) == ("DataFile", (f"{study.ids[0]}_samples.eeg",), True)
    assert markers.names == (f"{study.ids[0]}.vmrk",) and not markers.required
    (fdt,) = side_files(folder / f"{study.ids[1]}.set")
    assert fdt.names == (f"{study.ids[1]}.fdt",) and fdt.required
    assert side_files(study.recording_root / f"{study.ids[0]}.edf") == []


def test_brainvision_and_eeglab_from_a_bucket_read_as_locally_and_a_missing_side_file_is_a_named_skip(
    s3_server, tmp_path
):
    study, folder = side_file_study(tmp_path)
    no_eeg, no_fdt = study.ids[2], study.ids[3]
    upload(folder, "eeg-sides", s3_server, skip=(f"{no_eeg}_samples.eeg", f"{no_fdt}.fdt"))

    remote = overrides_for(study, "s3://eeg-sides/rec/", tmp_path / "cache_s3", tmp_path / "dl")
    result = runner.invoke(app, ["preprocess", "--workers", "1", *remote])
    assert result.exit_code == 0, result.output
    cache = only_cache(tmp_path / "cache_s3")
    manifest = pd.read_parquet(cache / "manifest.parquet")
    ok = manifest[manifest.status == "ok"]
    recordings = set(ok["id"].str.rsplit("_w", n=1).str[0])  # window ids are <recording>_w<k>
    assert recordings == set(study.ids) - {no_eeg, no_fdt} and len(ok) == 4 * 3  # 3 windows of 4 s in 8 s
    errors = pd.read_csv(cache / "data_errors.csv").set_index("id")
    assert sorted(errors.index) == sorted([no_eeg, no_fdt])
    assert (
        f"s3://eeg-sides/rec/{no_eeg}.vhdr: the header names DataFile '{no_eeg}_samples.eeg', which is not in "
        "s3://eeg-sides/rec/" in errors.loc[no_eeg, "error"]
    )
    assert (
        f"names its .fdt data file '{no_fdt}.fdt', which is not in s3://eeg-sides/rec/"
        in errors.loc[no_fdt, "error"]
    )

    checked = runner.invoke(app, ["check", "data", *remote])  # `check data` reads the headers the same way
    assert "2 unreadable (6 of 6 headers read)" in checked.output, checked.output
    assert f"{no_fdt}: s3://eeg-sides/rec/{no_fdt}.set: the header names its .fdt data file" in checked.output

    # the same recordings from the local folder (side files beside them) give the same spectrograms
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    for path in folder.iterdir():
        if path.name not in (f"{no_eeg}_samples.eeg", f"{no_fdt}.fdt"):
            (local_dir / path.name).write_bytes(path.read_bytes())
    local = overrides_for(study, str(local_dir), tmp_path / "cache_local", tmp_path / "dl_local")
    result = runner.invoke(app, ["preprocess", "--workers", "1", *local])
    assert result.exit_code == 0, result.output
    local_cache = only_cache(tmp_path / "cache_local")
    local_manifest = pd.read_parquet(local_cache / "manifest.parquet")
    assert sorted(local_manifest.loc[local_manifest.status == "ok", "id"]) == sorted(ok["id"])
    for id_ in ok["id"]:
        np.testing.assert_array_equal(np.load(cache / "images" / f"{id_}.npy"),
                                      np.load(local_cache / "images" / f"{id_}.npy"))  # fmt: skip
    local_errors = pd.read_csv(local_cache / "data_errors.csv").set_index("id")
    assert (
        f"the header names DataFile '{no_eeg}_samples.eeg', which is not in {local_dir}/"
        in local_errors.loc[no_eeg, "error"]
    )


def test_an_outage_while_fetching_a_side_file_exits_1_and_keeps_what_finished(
    flaky_endpoint, tmp_path, monkeypatch
):
    study, folder = side_file_study(tmp_path)
    upload(folder, "eeg-outage", flaky_endpoint.url)
    overrides = overrides_for(study, "s3://eeg-outage/rec/", tmp_path / "cache", tmp_path / "dl")
    real, headers = eeg_module.sibling_copy, []

    def stop_at_the_fourth_recording(info, name, beside, **kwargs):
        if info.url not in headers:
            headers.append(info.url)
        if len(headers) == 4:
            flaky_endpoint.stop()  # the header is here, its side file is not: connections are refused
        return real(info, name, beside, **kwargs)

    monkeypatch.setattr(eeg_module, "sibling_copy", stop_at_the_fourth_recording)
    result = runner.invoke(app, ["preprocess", "--workers", "1", *overrides])
    assert result.exit_code == 1, result.output
    line = (
        rf"3 of 6 samples could not be fetched from {re.escape(flaky_endpoint.url)}: [^\n]*; "
        r"rerun `medctl preprocess` to fetch the rest"
    )
    assert re.search(rf"^error: {line}$", result.output, re.M), result.output
    cache = cache_dir_for(load_config(None, overrides, env={}).data)
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert (manifest.status == "ok").all() and len(manifest) == 3 * 3  # 3 recordings, 3 windows each
    assert (cache / "data_errors.csv").read_text().strip() == "id,key,stage,error"  # an outage is no bad file

    flaky_endpoint.restart()
    monkeypatch.setattr(eeg_module, "sibling_copy", real)
    again = runner.invoke(app, ["preprocess", "--workers", "1", *overrides])
    assert again.exit_code == 0, again.output
    assert "3 new, 3 cached, 0 failed" in again.output
    assert len(pd.read_parquet(cache / "manifest.parquet")) == 6 * 3
