"""Real files no one here wrote, through `medctl preprocess`, checked against the package's own reader.

The files are those the installed packages ship for their own tests: pydicom's test data (little- and
big-endian, implicit VR, deflated, multi-frame, RLE, JPEG, JPEG 2000), nibabel's (big-endian NIfTI-1,
NIfTI-2, 4D series, a two-slice Siemens DICOM series) and pyedflib's EDFbrowser-generated EDF/BDF files
(per-channel rates, 0.5 s and 2 s records, legacy EDF, UTF-8 labels, sub-second records). A file a
package does not ship is skipped with the reason; a file medctl skips must be one a user calls broken.

Images are cached at their own size with ``intensity = "none"``, so the cached array must equal the
package's reading voxel for voxel, and the cached affine the file's own geometry. EEG sine channels
must peak, in the cached spectrogram, at the frequency their label states. Each modality is one table
and one preprocess run (two for volumes: whole and cut into axial slices).
"""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

runner = CliRunner()
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class RealFile:
    id: str
    package: str  # pydicom | nibabel | pyedflib
    names: tuple[str, ...]  # one file, or the slices of one DICOM series
    broken: str = ""  # a file a user would call broken: what its data_errors.csv row must say


# 3D volumes, one channel (volume_index = 0 keeps the first of a 4D series)
VOLUMES = [
    RealFile("nib_anatomical_be", "nibabel", ("anatomical.nii",)),  # big-endian int16
    RealFile("nib_reoriented_be", "nibabel", ("reoriented_anat_moved.nii",)),  # big-endian float32, oblique
    # big-endian float32, NaN outside the resampled field of view: medctl skips NaN images by design
    RealFile("nib_resampled_be", "nibabel", ("resampled_anat_moved.nii",), broken="NaN or infinite"),
    RealFile("nib_standard", "nibabel", ("standard.nii.gz",)),
    RealFile("nib_example4d", "nibabel", ("example4d.nii.gz",)),
    RealFile("nib_nifti2", "nibabel", ("example_nifti2.nii.gz",)),
    RealFile("nib_functional", "nibabel", ("functional.nii",)),
    RealFile("nib_siemens_series", "nibabel", ("0.dcm", "1.dcm")),  # a two-slice DICOM series folder
    RealFile("dcm_rtdose", "pydicom", ("rtdose.dcm",)),  # 15 frames
    RealFile("dcm_rtdose_be", "pydicom", ("rtdose_expb.dcm",)),  # big-endian multi-frame
    RealFile("dcm_rtdose_rle", "pydicom", ("rtdose_rle.dcm",)),
    RealFile("dcm_emri_be", "pydicom", ("emri_small_big_endian.dcm",)),  # pydicom-data only: may be absent
]
# 2D images, one channel
SLICES = [
    RealFile("dcm_ct", "pydicom", ("CT_small.dcm",)),
    RealFile("dcm_mr", "pydicom", ("MR_small.dcm",)),
    RealFile("dcm_mr_be", "pydicom", ("MR_small_bigendian.dcm",)),
    RealFile("dcm_mr_expb", "pydicom", ("MR_small_expb.dcm",)),
    RealFile("dcm_mr_implicit", "pydicom", ("MR_small_implicit.dcm",)),
    RealFile("dcm_mr_padded", "pydicom", ("MR_small_padded.dcm",)),
    RealFile("dcm_mr_rle", "pydicom", ("MR_small_RLE.dcm",)),
    RealFile("dcm_mr_j2k", "pydicom", ("MR_small_jp2klossless.dcm",)),
    RealFile("dcm_j2k", "pydicom", ("JPEG2000.dcm",)),
    RealFile("dcm_liver", "pydicom", ("liver_1frame.dcm",)),
    RealFile("dcm_liver_be", "pydicom", ("liver_expb_1frame.dcm",)),
    RealFile("dcm_deflated", "pydicom", ("image_dfl.dcm",)),
    RealFile("dcm_rtdose_1", "pydicom", ("rtdose_1frame.dcm",)),
    RealFile("dcm_rtdose_1_be", "pydicom", ("rtdose_expb_1frame.dcm",)),
    RealFile("dcm_truncated", "pydicom", ("MR_truncated.dcm",), broken="pixel data is less than expected"),
    # decodable only with a JPEG-LS plugin; without one the row must say what to install
    RealFile("dcm_mr_jpegls", "pydicom", ("MR_small_jpeg_ls_lossless.dcm",), broken="dependencies: gdcm - requires"),
]
# 2D colour images, three channels
COLOUR = [
    RealFile("dcm_rgb_be", "pydicom", ("ExplVR_BigEnd.dcm",)),
    RealFile("dcm_rgb_odd_be", "pydicom", ("SC_rgb_small_odd_big_endian.dcm",)),
    RealFile("dcm_rgb_rle", "pydicom", ("SC_rgb_rle.dcm",)),
    RealFile("dcm_rgb_jpeg", "pydicom", ("SC_rgb_jpeg_dcmtk.dcm",)),
    RealFile("dcm_rgb_j2k", "pydicom", ("SC_rgb_gdcm_KY.dcm",)),
    RealFile("dcm_rgb", "pydicom", ("examples_rgb_color.dcm",)),
]
RECORDINGS = [
    RealFile("edf_generator", "pyedflib", ("test_generator.edf",)),  # 11 signals at 200 Hz, 8 of them sines
    RealFile("edf_legacy", "pyedflib", ("test_legacy.edf",)),  # EDF (not EDF+) with an annotation signal
    RealFile("bdf_generator", "pyedflib", ("test_generator.bdf",)),  # 5 signals at 5 rates, 500..1000 Hz
    RealFile("bdf_records_0_5s", "pyedflib", ("test_generator_datarec_generator_0_5.bdf",)),
    RealFile("bdf_records_2s", "pyedflib", ("test_generator_datarec_generator_2.bdf",)),
    RealFile("edf_utf8", "pyedflib", ("test_utf8.edf",)),
    RealFile("edf_subsecond", "pyedflib", ("test_subsecond.edf",)),
]


def shipped(file: RealFile) -> list[Path] | None:
    """The package's copies of ``file``, or None when this install does not ship them (never a download)."""
    if file.package == "pydicom":
        from pydicom.data import get_testdata_file

        paths = [get_testdata_file(name, download=False) for name in file.names]
        found = [Path(p) for p in paths if p]
    else:
        folder = nibabel_data() if file.package == "nibabel" else pyedflib_data()
        found = [folder / name for name in file.names if folder is not None and (folder / name).is_file()]
    return found if len(found) == len(file.names) else None


def nibabel_data() -> Path:
    from nibabel.testing import data_path

    return Path(data_path)


def pyedflib_data() -> Path | None:
    try:
        import pyedflib
    except ImportError:
        return None
    return Path(pyedflib.__file__).parent / "tests" / "data"


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@dataclass
class Study:
    root: Path
    overrides: list[str]
    files: dict[str, list[Path]]  # id -> the package's files (only those shipped)
    absent: list[str]  # ids whose files this install does not ship


def make_study(root: Path, files: list[RealFile], modality: str = "image") -> Study:
    """Each file copied into ``root/scans/<id>/`` (a DICOM series keeps its folder), and one table."""
    found, absent, rows = {}, [], []
    for i, file in enumerate(files):
        paths = shipped(file)
        if paths is None:
            absent.append(file.id)
            continue
        for path in paths:
            target = root / "scans" / file.id / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        found[file.id] = paths
        rows.append(f"{file.id}\t{'ab'[i % 2]}\t{['train', 'val', 'test'][i % 3]}")
    (root / "table.tsv").write_text("id\tlabel\tsplit\n" + "\n".join(rows) + "\n")
    overrides = [
        f'data.modality="{modality}"',
        f'data.table="{root / "table.tsv"}"',
        'data.id_column="id"',
        'data.split_column="split"',
        f'data.source.root="{root / "scans"}"',
        'data.source.pattern="{id}/*"',
        'data.targets=[{name="label", kind="binary", classes=["a", "b"]}]',
    ]
    return Study(root, overrides, found, absent)


def preprocessed(study: Study, run: str, *settings: str) -> tuple[Path, pd.DataFrame, dict[str, dict]]:
    """One `medctl preprocess` run into ``<root>/<run>``: (cache, manifest, data_errors.csv rows by id)."""
    result = invoke(
        "preprocess", "--workers", "1", *study.overrides, f'data.cache_dir="{study.root / run}"', *settings
    )
    assert result.exit_code == 0, result.output
    (cache,) = (study.root / run).iterdir()
    with open(cache / "data_errors.csv") as fh:
        errors = {row["id"]: row for row in csv.DictReader(fh)}
    return cache, pd.read_parquet(cache / "manifest.parquet"), errors


def check_skips(study: Study, files: list[RealFile], errors: dict[str, dict]) -> None:
    """Only broken files are skipped, each with the reason it states; every other shipped file is cached."""
    broken = {f.id: f.broken for f in files if f.broken and f.id in study.files}
    assert set(errors) <= set(broken), {k: v["error"] for k, v in errors.items() if k not in broken}
    for id_, words in broken.items():
        if id_ in errors:
            assert errors[id_]["stage"] in ("read", "validate") and words in errors[id_]["error"], errors[id_]


# ------------------------------------------------------------------------------- independent reading
def dicom_pixels(path: Path) -> np.ndarray:
    """pydicom's reading: stored values through the modality LUT (and the RT dose grid scaling)."""
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = apply_modality_lut(pixels, ds) * float(ds.get("DoseGridScaling", 1.0))
    return pixels


def dicom_volume_affine(path: Path, n_frames: int) -> np.ndarray:
    """(4, 4) voxel (frame, row, column) -> LPS from the tags, for a multi-frame file with frame offsets."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    row_dir, col_dir = (
        np.asarray(ds.ImageOrientationPatient[:3], float),
        np.asarray(ds.ImageOrientationPatient[3:], float),
    )
    offsets = np.asarray(ds.GridFrameOffsetVector, float)
    assert len(offsets) == n_frames and np.all(np.diff(offsets) > 0)
    affine = np.eye(4)
    affine[:3, 0] = np.cross(row_dir, col_dir) * (offsets[1] - offsets[0])
    affine[:3, 1] = col_dir * float(ds.PixelSpacing[0])  # down the rows
    affine[:3, 2] = row_dir * float(ds.PixelSpacing[1])  # along a row
    affine[:3, 3] = np.asarray(ds.ImagePositionPatient, float) + offsets[0] * np.cross(row_dir, col_dir)
    return affine


def along_normal(path: Path) -> float:
    """A slice's position projected on its plane's normal (the order a series is stacked in)."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    normal = np.cross(
        np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    )
    return float(np.asarray(ds.ImagePositionPatient, float) @ normal)


def nifti_expected(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """nibabel's reading of volume 0 as (K, J, I), and its affine for those axes in LPS."""
    img = nibabel.load(str(path))
    data = np.asanyarray(img.dataobj)
    volume = data if data.ndim == 3 else data[..., 0]
    reverse_axes = np.eye(4)[[2, 1, 0, 3]].T  # (k, j, i, 1) -> (i, j, k, 1)
    return np.transpose(volume, (2, 1, 0)), LPS_FROM_RAS @ img.affine @ reverse_axes


def cached(cache: Path, row) -> np.ndarray:
    return np.load(cache / "images" / f"{row.id}.npy")


def affine_of(row) -> np.ndarray:
    flat = np.asarray(row.cache_affine, dtype=float)
    return flat.reshape(int(round(np.sqrt(flat.size))), -1)


# ----------------------------------------------------------------------------------------- volumes
# the arrays as the files hold them: no resize, no intensity normalisation, a 4D file's first volume
AS_STORED = ("data.preprocess.spatial_size=[]", 'data.preprocess.intensity="none"', "data.preprocess.volume_index=0")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("real_volumes"), VOLUMES)


def test_real_volumes_are_cached_as_their_packages_read_them(volumes):
    cache, manifest, errors = preprocessed(volumes, "whole", *AS_STORED)
    check_skips(volumes, VOLUMES, errors)
    assert set(manifest.source_id) == set(volumes.files)
    rows = {row.id: row for row in manifest[manifest.status == "ok"].itertuples()}
    for id_, paths in volumes.files.items():
        if id_ in errors:
            continue
        row, array = rows[id_], cached(cache, rows[id_])
        if id_.startswith("nib_") and paths[0].suffix != ".dcm":
            expected, affine = nifti_expected(paths[0])
        elif len(paths) > 1:  # the series: slices stacked along the normal, first the lowest position
            slices = sorted(paths, key=along_normal)
            expected = np.stack([dicom_pixels(p) for p in slices])
            first = pydicom.dcmread(str(slices[0]))
            affine = np.asarray(affine_of(row))  # direction and spacing checked below from the tags
            assert np.allclose(affine[:3, 3], np.asarray(first.ImagePositionPatient, float))
            step = along_normal(slices[1]) - along_normal(slices[0])
            assert np.allclose(
                np.linalg.norm(affine[:3, :3], axis=0), [step, *map(float, first.PixelSpacing)]
            )
        else:
            expected = dicom_pixels(paths[0])
            affine = dicom_volume_affine(paths[0], expected.shape[0])
        assert array.shape == (1, *expected.shape), id_
        np.testing.assert_allclose(array[0], expected.astype(np.float32), rtol=1e-6, err_msg=id_)
        np.testing.assert_allclose(affine_of(row), affine, atol=1e-4, err_msg=id_)
    assert volumes.absent == [] or all(f.startswith("dcm_emri") for f in volumes.absent)


def test_real_volumes_cut_into_axial_slices(volumes):
    cache, manifest, errors = preprocessed(
        volumes,
        "axial",
        'data.preprocess.slices="axial"',
        *AS_STORED,
    )
    check_skips(volumes, VOLUMES, errors)
    assert set(manifest.source_id) == set(volumes.files)
    for row in manifest[manifest.status == "ok"].itertuples():
        path = volumes.files[row.source_id][0]
        if path.suffix == ".dcm":
            continue  # DICOM frames are checked whole above
        volume, _ = nifti_expected(path)
        np.testing.assert_allclose(cached(cache, row)[0], volume[row.slice_index], rtol=1e-6, err_msg=row.id)


# ------------------------------------------------------------------------------------ 2D, colour
@pytest.mark.parametrize("files", [SLICES, COLOUR], ids=["grey", "colour"])
def test_real_2d_dicoms_are_cached_as_pydicom_reads_them(files, tmp_path):
    study = make_study(tmp_path, files)
    cache, manifest, errors = preprocessed(
        study, "cache", "data.preprocess.spatial_size=[]", 'data.preprocess.intensity="none"'
    )
    check_skips(study, files, errors)
    assert set(manifest.source_id) == set(study.files)
    for row in manifest[manifest.status == "ok"].itertuples():
        (path,) = study.files[row.id]
        pixels = dicom_pixels(path)
        expected = np.moveaxis(pixels, -1, 0) if pixels.ndim == 3 else pixels[None]  # (C, H, W)
        np.testing.assert_allclose(cached(cache, row), expected.astype(np.float32), rtol=1e-6, err_msg=row.id)
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        if "PixelSpacing" in ds:
            assert list(row.spacing) == [float(v) for v in ds.PixelSpacing], row.id
    assert len(manifest[manifest.status == "ok"]) >= len(files) - 2


# ----------------------------------------------------------------------------------------------- EEG
SINE = re.compile(r"^sine ([0-9.]+) ?Hz$")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    pytest.importorskip("pyedflib")
    study = make_study(tmp_path_factory.mktemp("real_eeg"), RECORDINGS, modality="eeg")
    study.overrides = [o.replace('"{id}/*"', '"{id}/*.?df"') for o in study.overrides]
    return study


def test_real_edf_and_bdf_sines_peak_at_their_labelled_frequency(recordings):
    import pyedflib

    cache, manifest, errors = preprocessed(
        recordings,
        "resampled",
        "data.eeg.resample_hz=200",
        'data.eeg.layout="tiled"',  # recordings with 1, 5 and 11 signals in one cache
        "data.eeg.window_s=4",
        "data.eeg.hop_s=100",
        "data.eeg.n_fft=256",
    )
    assert errors == {}
    assert set(manifest.source_id) == set(recordings.files)
    sines = 0
    for row in manifest.itertuples():
        with pyedflib.EdfReader(str(recordings.files[row.source_id][0])) as edf:
            labels = [label for label in edf.getSignalLabels() if label != "EDF Annotations"]
            duration = edf.file_duration
        assert list(row.channels) == labels and row.sfreq == 200.0, row.id
        image = cached(cache, row)[0]  # (C*F, T)
        n_freqs = image.shape[0] // len(labels)
        df = row.spacing[0]
        for c, label in enumerate(labels):
            match = SINE.match(label)
            if not match:
                continue
            peak_row = int(image[c * n_freqs : (c + 1) * n_freqs].mean(axis=1).argmax())
            peak_hz = row.origin[0] + peak_row * df
            assert abs(peak_hz - float(match[1])) <= df / 2 + 1e-6, (row.id, label, peak_hz)
            sines += 1
        windows = manifest[manifest.source_id == row.source_id]
        assert len(windows) == 1 + int((duration - 4) // 100), row.id
    assert sines >= 8 + 8 + 3 * 4  # two generator EDFs (8 sines each), three BDFs (1 sine each, every window)


def test_real_recordings_at_several_rates_are_refused_before_any_work(recordings):
    cache = recordings.root / "native_rates"
    result = invoke(
        "preprocess",
        "--workers",
        "1",
        *recordings.overrides,
        f'data.cache_dir="{cache}"',
        "data.eeg.resample_hz=0",
    )
    line = one_error_line(result)
    assert "data.eeg.resample_hz = 0" in line
    assert "200 Hz" in line and "1000 Hz" in line and "2000 Hz" in line and "128 Hz" in line
    assert "test_generator_datarec_generator_0_5.bdf" in line
    assert not any(cache.glob("*/images/*.npy"))


@pytest.mark.parametrize("file", VOLUMES + SLICES + COLOUR + RECORDINGS, ids=lambda f: f.id)
def test_each_listed_file_is_shipped_and_readable_by_its_package_or_skipped_with_the_reason(file):
    paths = shipped(file)
    if paths is None:
        pytest.skip(f"this install of {file.package} does not ship {', '.join(file.names)}")
    for path in paths:
        if file.package == "pydicom" or path.suffix == ".dcm":
            assert "PixelData" in pydicom.dcmread(str(path), stop_before_pixels=False), path
        elif file.package == "nibabel":
            assert len(nibabel.load(str(path)).shape) >= 3, path
        else:
            import pyedflib

            with pyedflib.EdfReader(str(path)) as edf:
                assert edf.signals_in_file >= 1, path
