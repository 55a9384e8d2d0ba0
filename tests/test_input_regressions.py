"""Bad-input and fault findings kept as regression tests through the CLI, each with its input generator.

Issue 15 (items 4, 8, 9, 10, 12): class names that look like NA, credentials inside an endpoint URL,
environment overrides in `evaluate`/`saliency`, declared dependency bounds, and axis order of NRRD volumes.
Issue 25: NaN EEG samples, EEG rates mixed without resampling, a recording lacking a channel, the failing
slice of a DICOM series, the empty-split advice of an incomplete cache, an all-failed sweep, a spatial_size
beyond memory, refusals before the preprocess pass, and errors naming the override layer that caused them."""

from __future__ import annotations

import ast
import csv
import importlib.metadata
import json
import re
import socket
import tomllib
from pathlib import Path

import nrrd
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), catch_exceptions=False, env=env)


# ------------------------------------------------------------------------ item 4: "None" is a class
def test_a_class_named_none_or_na_is_a_value_not_an_empty_cell(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=18, n_classes=3, size=(8, 16, 16), seed=4)
    table = pd.read_csv(ds.table, sep="\t", dtype=str, keep_default_na=False)
    table["label"] = table["label"].map({"healthy": "None", "mild": "NA", "severe": "severe"})
    table.to_csv(ds.table, sep="\t", index=False)
    classes = 'data.targets=[{name="label", kind="multiclass", classes=["None", "NA", "severe"]}]'
    overrides = [o for o in ds.config_overrides() if not o.startswith("data.targets=")] + [classes]

    checked = invoke("check", "data", *overrides)
    assert checked.exit_code == 0, checked.output
    assert "classes: None, NA, severe" in checked.output

    built = invoke("preprocess", "--workers", "1", *overrides)
    assert built.exit_code == 0, built.output
    summary = json.loads(next(Path(ds.cache_dir).rglob("summary.json")).read_text())
    assert summary["targets"][0]["classes"] == ["None", "NA", "severe"]
    written = dict(zip(table["participant_id"], table["label"], strict=True))
    manifest = pd.read_parquet(next(Path(ds.cache_dir).rglob("manifest.parquet")))
    for sample_id, index in zip(manifest["id"], manifest["label"], strict=True):
        assert ["None", "NA", "severe"][int(index)] == written[sample_id]


def test_an_empty_label_cell_is_still_missing(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, size=(8, 16, 16), seed=4)
    table = pd.read_csv(ds.table, sep="\t", dtype=str, keep_default_na=False)
    table.loc[0, "label"] = ""
    table.loc[0, "retinal_oct"] = "TRUE"
    table.to_csv(ds.table, sep="\t", index=False)
    checked = invoke("check", "data", *ds.config_overrides())
    assert checked.exit_code == 2
    assert f"column 'label' (data.targets[0].column) is empty for 1 id(s) ({table.loc[0, 'participant_id']})" in (
        " ".join(checked.output.split())
    )


# ------------------------------------------------------------- item 8: passwords in endpoint URLs
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_password_in_s3_endpoint_url_is_never_printed(s3_server, tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=6, size=(8, 16, 16), seed=5)
    overrides = [
        *(o for o in ds.config_overrides() if not o.startswith("data.source.root=")),
        'data.source.root="s3://never-made/images/"',
    ]
    port = s3_server.rsplit(":", 1)[1]
    for url in (f"http://alice:s3cr3t-pass@127.0.0.1:{port}", f"http://alice:s3cr3t-pass@127.0.0.1:{closed_port()}"):
        result = invoke("check", "bucket", *overrides, env={"S3_ENDPOINT_URL": url})
        assert "s3cr3t-pass" not in result.output, result.output
        assert "alice:***@127.0.0.1" in result.output


def test_a_password_in_the_config_endpoint_is_refused_without_echoing_it(tmp_path):
    result = invoke("check", "config", 'data.source.endpoint_url="https://bob:hunter2-xyz@minio.lab:9000"')
    assert result.exit_code == 2
    assert "hunter2-xyz" not in result.output
    assert "data.source.endpoint_url" in result.output and "AWS_SECRET_ACCESS_KEY" in result.output


# ------------------------------------------------------ item 9: evaluate/saliency read MEDCTL_* too
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("env_layers")
    ds = make_synthetic_dataset(root / "ds", n=12, size=(8, 16, 16), seed=6)
    result = invoke(
        "finetune", *ds.config_overrides(), 'model.encoder="vit3d_test"', "train.epochs=1", "data.batch_size=4",
        'run.device="cpu"', f"run.root={json.dumps(str(root / 'runs'))}", 'run.name="env"',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "runs" / "env" / "checkpoints" / "best.ckpt"


def test_evaluate_reads_environment_overrides(classifier, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", "--ckpt", str(classifier), "--out", str(out), env={"MEDCTL_TRAIN__BOOTSTRAP": "7"})
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n_bootstrap"] == 7


def test_saliency_reads_environment_overrides(classifier, tmp_path):
    out = tmp_path / "maps"
    result = invoke(
        "saliency", "--ckpt", str(classifier), "--out", str(out), "--method", "gradients",
        env={"MEDCTL_SALIENCY__MAX_SAMPLES": "1", "MEDCTL_SALIENCY__RANDOMISATION_CHECK": "false"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    index = pd.read_csv(out / "index.csv")  # every lesion sample is scored; max_samples caps the maps written
    assert index["map_nrrd"].notna().sum() == 1 and len(list(out.rglob("*.nrrd"))) >= 1


def test_evaluate_names_a_bad_environment_value(classifier, tmp_path):
    result = invoke("evaluate", "--ckpt", str(classifier), "--out", str(tmp_path), env={"MEDCTL_TRAIN__BOOTSTRAP": "-3"})
    assert result.exit_code == 2
    assert "train.bootstrap" in result.output


# ------------------------------------------------------------ item 10: real, declared dependencies
def _declared() -> dict[str, str]:
    """Distribution name (normalised) -> its requirement string in pyproject.toml (an optional extra, such as
    `tracking`'s mlflow and wandb, declares what only its own code path imports)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [req for group in project.get("optional-dependencies", {}).values() for req in group]
    declared = {}
    for requirement in [*project["dependencies"], *extras]:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        declared[name.lower().replace("_", "-")] = requirement
    return declared


def _imported_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "src" / "medctl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_imported_package_is_declared():
    import sys

    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = []
    for module in sorted(_imported_modules() - set(sys.stdlib_module_names) - {"medctl", "__future__"}):
        names = [d.lower().replace("_", "-") for d in distributions.get(module, [module])]
        if not any(name in declared for name in names):
            undeclared.append(f"{module} ({', '.join(names)})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_declared_lower_bounds_cover_the_apis_the_code_uses():
    declared = _declared()
    assert re.search(r">=\s*3", declared["pydicom"]), declared["pydicom"]  # pydicom.pixels is 3.0+
    source = (ROOT / "src" / "medctl" / "data" / "formats" / "dicom.py").read_text()
    assert "from pydicom.pixels import" in source or "pydicom.pixels." in source


def test_check_env_names_every_dependency_and_whether_it_meets_its_bound(tmp_path):
    result = invoke("check", "env", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"pydicom \S+ \(>=3\.0\)", text), text
    assert "dependencies" in text and "meet the lower bounds" in text


# -------------------------------------------------------------------------- item 12: axis order
@pytest.fixture
def numpy_order_nrrds(tmp_path):
    """NRRDs written from numpy (16, 64, 64) arrays with pynrrd's defaults (file axes = numpy axes)."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(8):
        sid = f"s{i:02d}"
        nrrd.write(str(images / f"{sid}.nrrd"), rng.normal(size=(16, 64, 64)).astype(np.float32))
        rows.append({"participant_id": sid, "label": ["a", "b"][i % 2], "split": ["train", "val", "test", "train"][i % 4]})
    pd.DataFrame(rows).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    return [
        f"data.table={json.dumps(str(tmp_path / 't.tsv'))}",
        f"data.source.root={json.dumps(str(images))}",
        'data.source.pattern="{participant_id}.nrrd"',
        'data.split_column="split"',
        'data.targets=[{name="label", kind="binary", classes=["a", "b"]}]',
        f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
    ]


def test_check_bucket_names_the_axes_and_spacing_of_the_shape(numpy_order_nrrds):
    result = invoke("check", "bucket", *numpy_order_nrrds)
    text = " ".join(result.output.split())
    assert "shape (C=1, D=64, H=64, W=16)" in text, text
    assert "spacing (D 1, H 1, W 1) mm" in text


def test_a_spatial_size_that_distorts_the_aspect_ratio_is_warned(numpy_order_nrrds):
    distorting = [*numpy_order_nrrds, "data.preprocess.spatial_size=[16, 64, 64]"]
    checked = invoke("check", "data", *distorting)
    text = " ".join(checked.output.split())
    assert "spatial_size [16, 64, 64]" in text and "16x" in text, text
    assert "D=64, H=64, W=16" in text and "[64, 64, 16]" in text  # the size that keeps the aspect
    built = invoke("preprocess", "--workers", "1", *distorting)
    assert built.exit_code == 0, built.output
    assert "spatial_size [16, 64, 64]" in " ".join(built.output.split())

    faithful = invoke("check", "data", *numpy_order_nrrds, "data.preprocess.spatial_size=[32, 32, 8]")
    assert faithful.exit_code == 0, faithful.output
    assert "aspect" not in faithful.output


# ================================================================ issue 25: the fault corpus, kept
def eeg_study(tmp_path: Path, recordings: dict[str, tuple[np.ndarray, float, list[str]]], suffix: str = "edf"):
    """One recording per id (data (C, N) in microvolts, rate, channel names): EDF, or BrainVision (``vhdr``)."""
    import pybv

    from medctl.data.synthetic_eeg import write_edf

    rows = []
    for i, (id_, (data, sfreq, channels)) in enumerate(recordings.items()):
        if suffix == "vhdr":
            pybv.write_brainvision(data=data, sfreq=sfreq, ch_names=channels, fname_base=id_,
                                   folder_out=tmp_path / "rec", unit="µV")  # fmt: skip
        else:
            write_edf(tmp_path / "rec" / f"{id_}.edf", data, sfreq, channels)
        rows.append(f"{id_}\t{'ab'[i % 2]}\t{['train', 'val', 'test'][i % 3]}")
    (tmp_path / "table.tsv").write_text("id\tlabel\tsplit\n" + "\n".join(rows) + "\n")
    return [
        'data.modality="eeg"', f'data.table="{tmp_path / "table.tsv"}"', 'data.id_column="id"',
        'data.split_column="split"', f'data.source.root="{tmp_path / "rec"}"', f'data.source.pattern="{{id}}.{suffix}"',
        'data.targets=[{name="label", kind="binary", classes=["a", "b"]}]', f'data.cache_dir="{tmp_path / "cache"}"',
        "data.eeg.window_s=2", "data.eeg.hop_s=2", "data.eeg.n_fft=64", "data.eeg.stft_hop=16",
    ]  # fmt: skip


def noise(channels: int, seconds: float, sfreq: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 20, (channels, int(seconds * sfreq)))  # (C, N) microvolts


def errors_of(cache_root: Path) -> dict[str, dict]:
    (cache,) = cache_root.iterdir()
    with open(cache / "data_errors.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["id"] for r in rows}) == len(rows), rows  # one row per recording
    return {r["id"]: r for r in rows}


def test_eeg_nan_samples_are_a_recorded_skip_naming_the_channel(tmp_path):
    gaps, dead = noise(2, 10, 128), noise(2, 10, 128)
    gaps[1, 100:500] = np.nan
    dead[:] = np.nan
    overrides = eeg_study(tmp_path, {"clean": (noise(2, 10, 128), 128.0, ["Fz", "Cz"]),
                                     "gaps": (gaps, 128.0, ["Fz", "Cz"]), "dead": (dead, 128.0, ["Fz", "Cz"])},
                          suffix="vhdr")  # fmt: skip
    result = invoke("preprocess", "--workers", "1", *overrides)
    assert result.exit_code == 0, result.output
    errors = errors_of(tmp_path / "cache")
    assert set(errors) == {"gaps", "dead"}
    assert errors["gaps"]["stage"] == "validate"
    assert "NaN or infinite samples in channel(s) Cz (400 of 1280 samples, from 0.78 s)" in errors["gaps"]["error"]
    assert "Fz (all samples, from 0.00 s), Cz (all samples" in errors["dead"]["error"]
    manifest = pd.read_parquet(next((tmp_path / "cache").iterdir()) / "manifest.parquet")
    assert set(manifest.loc[manifest.status == "ok", "source_id"]) == {"clean"}
    # a NaN channel left out of data.eeg.channels harms nothing
    kept = invoke("preprocess", "--workers", "1", *overrides, 'data.eeg.channels=["Fz"]')
    assert kept.exit_code == 0 and "2 new, 0 cached, 1 failed" in kept.output, kept.output


def test_eeg_recordings_at_two_rates_are_refused_before_any_work(tmp_path):
    recordings = {f"r{i}": (noise(2, 6, 256, i), 256.0, ["Fz", "Cz"]) for i in range(3)}
    recordings["odd"] = (noise(2, 6, 200), 200.0, ["Fz", "Cz"])
    overrides = eeg_study(tmp_path, recordings)
    line = one_error_line(invoke("preprocess", "--workers", "1", *overrides))
    assert "the recordings have 2 rates: 256 Hz (3 files: r0.edf, r1.edf, r2.edf); 200 Hz (1 file: odd.edf)" in line
    assert "set data.eeg.resample_hz (e.g. 256)" in line
    assert not list((tmp_path / "cache").rglob("*.npy"))
    resampled = invoke("preprocess", "--workers", "1", *overrides, "data.eeg.resample_hz=128")
    assert resampled.exit_code == 0 and "4 new, 0 cached, 0 failed" in resampled.output, resampled.output


def test_a_recording_without_a_channel_is_one_row_naming_it(tmp_path):
    eight = ["Fp1", "Fp2", "C3", "C4", "Pz", "O1", "O2", "Cz"]
    recordings = {f"r{i}": (noise(8, 10, 128, i), 128.0, eight) for i in range(4)}
    recordings["seven"] = (noise(7, 10, 128), 128.0, [c for c in eight if c != "Pz"])
    result = invoke("preprocess", "--workers", "2", *eeg_study(tmp_path, recordings))
    assert result.exit_code == 0, result.output
    errors = errors_of(tmp_path / "cache")
    assert list(errors) == ["seven"]
    assert "7 channel(s) where most recordings have 8: lacks Pz; set data.eeg.channels" in errors["seven"]["error"]
    assert "largest recording 8 ch x 1280 samples needs" in result.output and "?" not in result.output
    assert "1 worker(s) (asked 2; fewer: " in result.output and "5 sample(s) to process, one worker per 8" in result.output


def dicom_series(folder: Path) -> list[Path]:
    """nibabel's two-slice Siemens series plus a third slice 3 mm on (a real series, not one of ours)."""
    import pydicom
    from nibabel.testing import data_path

    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        (folder / name).write_bytes((Path(data_path) / name).read_bytes())
    third = pydicom.dcmread(folder / "1.dcm")
    third.ImagePositionPatient[2] += 3
    third.save_as(folder / "2.dcm")
    return sorted(folder.glob("*.dcm"))


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_a_dicom_series_error_names_the_failing_slice(tmp_path, damage):
    from medctl.data.readers import read_header, read_image
    from medctl.errors import DataError

    paths = dicom_series(tmp_path / "series")
    whole = paths[2].read_bytes()
    paths[2].write_bytes(b"junk" * 100 if damage == "junk" else whole[:-20000])
    with pytest.raises(DataError, match=r"series/2\.dcm: not a readable DICOM file"):
        read_image(paths)
    if damage == "junk":
        with pytest.raises(DataError, match=r"series/2\.dcm: not a readable DICOM file"):
            read_header(paths)


def test_the_empty_split_advice_names_the_rows_storage_did_not_serve(tmp_path, monkeypatch):
    import medctl.data.preprocess as preprocess_module
    from medctl.data.preprocess import SampleOutcome

    ds = make_synthetic_dataset(tmp_path / "ds", n=12, size=(8, 16, 16), seed=6)
    table = pd.read_csv(ds.table, sep="\t", dtype=str, keep_default_na=False)
    table = table.sort_values("recommended_split", key=lambda s: s.map({"train": 0, "test": 1, "val": 2}))
    table.to_csv(ds.table, sep="\t", index=False)  # val rows last: the outage strikes at the first of them
    val_ids = set(table.loc[(table["recommended_split"] == "val") & (table["retinal_oct"] == "TRUE"), "participant_id"])
    real = preprocess_module.process_sample

    def outage_from_first_val(task):
        if task.id in val_ids:
            return SampleOutcome(task.id, [], "fetch", "EndpointConnectionError", task.image[0].key,
                                 unreachable="http://127.0.0.1:9")  # fmt: skip
        return real(task)

    monkeypatch.setattr(preprocess_module, "process_sample", outage_from_first_val)
    overrides = [*ds.config_overrides(), "data.allow_incomplete=true", f'run.root="{tmp_path / "runs"}"']
    result = invoke("finetune", "-c", "config/finetune/linear_probe.toml", *overrides, 'model.encoder="vit3d_test"')
    line = one_error_line(result)
    assert "the validation split is empty; the table has val rows, but none is in the cache:" in line
    assert f"{len(val_ids)} not fetched while storage was unreachable" in line
    assert "mark some rows" not in line


def test_a_sweep_whose_every_entry_failed_exits_1(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, size=(8, 16, 16), seed=10)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.pt").write_bytes(b"not a checkpoint")
    result = invoke(
        "sweep", "-c", "config/sweep.toml", *ds.config_overrides(), "data.preprocess.workers=1", 'model.encoder="vit3d_test"',
        "sweep.random_baseline=false", f"sweep.checkpoint_dir={json.dumps(str(folder))}",
        f"run.root={json.dumps(str(tmp_path / 'runs'))}", 'run.name="all_failed"', 'run.device="cpu"',
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "✗ 2 entries (0 already finished, 2 failed)" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "every sweep entry failed (2); the first, a: " in errors[0], result.output
    assert (tmp_path / "runs" / "all_failed" / "leaderboard.md").is_file()


def test_a_spatial_size_that_cannot_fit_is_refused_before_any_sample(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=6, size=(8, 16, 16), seed=7)
    result = invoke("preprocess", "--workers", "1", *ds.config_overrides(),
                    "data.preprocess.spatial_size=[2048, 2048, 2048]", "data.preprocess.memory_gb=16")  # fmt: skip
    line = one_error_line(result)
    assert "data.preprocess.spatial_size [2048, 2048, 2048] makes each cached volume 8,589,934,592 voxels" in line
    assert "(32.0 GiB as float32; ~97.0 GiB while it is made), more than the 16.0 GiB data.preprocess.memory_gb" in line
    assert not list(Path(ds.cache_dir).rglob("*.npy"))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("finished", "already holds a run"),
        ("auto", '`model.encoder` = "auto" reads the architecture from model.checkpoint, which is empty'),
        ("resume", "holds no checkpoints/last.ckpt to continue; start the run without --resume"),
    ],
)
def test_refusals_that_need_no_data_come_before_preprocessing(tmp_path, case, expected):
    ds = make_synthetic_dataset(tmp_path / "ds", n=6, size=(8, 16, 16), seed=8)
    runs = tmp_path / "runs"
    if case == "finished":
        (runs / "done").mkdir(parents=True)
        (runs / "done" / "results.json").write_text("{}")
    encoder = '"auto"' if case == "auto" else '"vit3d_test"'
    args = ["finetune", "-c", "config/finetune/linear_probe.toml", *ds.config_overrides(), f"model.encoder={encoder}",
            'model.checkpoint=""', f"run.root={json.dumps(str(runs))}", 'run.name="done"']  # fmt: skip
    line = one_error_line(invoke(*args, *(["--resume"] if case == "resume" else [])))
    assert expected in line
    assert not Path(ds.cache_dir).exists()  # refused before the preprocess pass
    assert (runs / "done").exists() == (case == "finished")  # --resume of nothing leaves no empty folder


def test_an_override_or_environment_error_names_its_layer(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=4, size=(8, 16, 16), seed=9)
    base = ["preprocess", "-c", "config/finetune/linear_probe.toml", *ds.config_overrides()]
    line = one_error_line(invoke(*base, "train.lr_head=fast"))
    assert line.startswith("error: override `train.lr_head=fast`: `train.lr_head` = 'fast'"), line
    line = one_error_line(runner.invoke(app, base, env={"MEDCTL_TRAIN__EPOCHS": "many"}))
    assert line.startswith("error: environment MEDCTL_TRAIN__EPOCHS: `train.epochs` = 'many'"), line
    assert "linear_probe.toml" not in line
