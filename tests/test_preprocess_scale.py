"""Real-size volumes in bounded memory, the same anti-aliased resize as MONAI, impossible headers, 4D."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import Resize

from medctl.config import PreprocessConfig, load_config
from medctl.data.checks import check_data
from medctl.data.preprocess import preprocess
from medctl.data.readers import Image, declared_size_problem, default_direction, read_image, write_nrrd
from medctl.data.transforms import preprocess_image, resize_antialiased, resize_nearest


def volume(shape, seed=0) -> np.ndarray:
    """An int16 CT-like volume: smooth structure plus noise, so anti-aliasing has work to do."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    body = 800 * (d**2 + h**2 + w**2 < 0.8) + 300 * np.sin(9 * h) * np.cos(7 * w)
    return (body + rng.normal(0, 60, shape)).astype(np.int16)


def one_volume_config(tmp_path, array: np.ndarray, size, name="ct", *extra):
    write_nrrd(tmp_path / "images" / f"{name}.nrrd", array, spacing=(1.0, 1.0, 1.0), compress=False)
    pd.DataFrame({"participant_id": [name], "label": ["a"]}).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    return load_config(
        None,
        [
            f"data.table={json.dumps(str(tmp_path / 't.tsv'))}",
            f"data.source.root={json.dumps(str(tmp_path / 'images'))}",
            'data.source.pattern="{participant_id}.nrrd"',
            "data.split_ratios=[1.0, 0.0, 0.0]",
            'data.targets=[{name="label", classes=["a", "b"]}]',
            f"data.preprocess.spatial_size={json.dumps(size)}",
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            *extra,
        ],
        env={},
    )


MEASURE = """
import json, resource, sys
from medctl.config import DataConfig
from medctl.data.preprocess import preprocess

warm, big = (DataConfig.model_validate_json(text) for text in sys.argv[1:3])
preprocess(warm, workers=1)  # imports and allocator pools first, so the growth below is the volume's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = preprocess(big, workers=1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps([before, after, result.n_new, str(result.cache_dir)]))
"""


def test_a_200x256x256_ct_preprocesses_within_the_memory_bound(tmp_path):
    source = volume((200, 256, 256))
    warm = one_volume_config(tmp_path / "warm", source[:20, :32, :32], [8, 16, 16])
    config = one_volume_config(tmp_path / "big", source, [32, 64, 64])
    # a fresh interpreter, not a fork: a forked child of a process with torch's thread pools can deadlock
    child = subprocess.run(
        [sys.executable, "-c", MEASURE, warm.data.model_dump_json(), config.data.model_dump_json()],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    before, after, n_new, cache = json.loads(child.stdout.strip().splitlines()[-1])
    as_float32 = source.size * 4  # 50 MiB
    assert n_new == 1
    # the bound: peak <= 3 x the source as float32 + 1 GB for the interpreter; the growth alone is
    # what the volume costs (MONAI's Resize(anti_aliasing=True) grows by ~30x here)
    assert after - before <= 3 * as_float32, f"grew {(after - before) / 2**20:.0f} MiB"
    cached = np.load(f"{cache}/images/ct.npy")
    assert cached.shape == (1, 32, 64, 64) and cached.dtype == np.float32


@pytest.mark.parametrize(
    ("shape", "size"),
    [((1, 40, 50, 60), [16, 32, 32]), ((2, 30, 64, 48), [30, 16, 40]), ((1, 30, 40), [16, 16])],
)
def test_lean_resize_matches_monai_anti_aliased_resize(shape, size):
    array = np.random.default_rng(0).normal(0, 300, shape).astype(np.int16)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    reference = torch.as_tensor(
        Resize(size, mode=mode, anti_aliasing=True)(torch.from_numpy(array.astype(np.float32)))
    )
    ours = resize_antialiased(array, size)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-3, rtol=1e-5)  # float32 rounding only
    labels = np.random.default_rng(1).integers(0, 4, shape).astype(np.uint8)
    nearest = torch.as_tensor(Resize(size, mode="nearest-exact")(torch.from_numpy(labels.astype(np.float32))))
    assert torch.equal(resize_nearest(labels, size), nearest)


@pytest.mark.slow
def test_full_size_output_matches_monai_resize(tmp_path):
    source = volume((200, 256, 256))
    image = Image(source[None], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), default_direction(3))
    ours = preprocess_image(image, None, PreprocessConfig(spatial_size=[32, 64, 64], intensity="none"))[
        0
    ].array
    reference = Resize([32, 64, 64], mode="trilinear", anti_aliasing=True)(
        torch.from_numpy(source[None].astype(np.float32))
    )
    np.testing.assert_allclose(ours, torch.as_tensor(reference).numpy(), atol=1e-2, rtol=1e-5)


def test_a_header_declaring_more_voxels_than_the_file_holds_is_a_recorded_skip(tmp_path):
    config = one_volume_config(tmp_path, volume((8, 16, 16)), [4, 8, 8], "good")
    liar = tmp_path / "images" / "liar.nrrd"  # says 600x512x512 int16 (300 MiB) in a few hundred bytes
    liar.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 600\nencoding: raw\nendian: little\n\n"
        + b"\0" * 512
    )
    pd.DataFrame({"participant_id": ["good", "liar"], "label": ["a", "b"]}).to_csv(
        tmp_path / "t.tsv", sep="\t", index=False
    )
    result = preprocess(config.data, workers=1)
    failed = result.manifest.set_index("id").loc["liar"]
    assert failed["status"] == "failed" and failed["stage"] == "read"
    assert "declares 600x512x512 int16 (300.0 MiB)" in failed["error"] and "truncated" in failed["error"]
    assert result.n_new == 1
    assert declared_size_problem(tmp_path / "images" / "good.nrrd") is None
    header = nib.Nifti1Header()  # a gzip NIfTI: deflate cannot expand 1032x, so 2 GiB from 1 KB is a lie
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    (tmp_path / "liar.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 1000))
    assert "declares 512x1024x1024 float32" in declared_size_problem(tmp_path / "liar.nii.gz")


def test_check_data_flags_impossible_and_too_large_headers(tmp_path):
    config = one_volume_config(
        tmp_path, volume((8, 16, 16)), [4, 8, 8], "good", "data.preprocess.memory_gb=1.5"
    )
    (tmp_path / "images" / "liar.nrrd").write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 600\nencoding: raw\nendian: little\n\n"
        + b"\0" * 64
    )
    huge = tmp_path / "images" / "huge.nrrd"  # a real header of a volume too large for 1.5 GB
    huge.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 300\nencoding: gzip\nendian: little\n\n"
    )
    with open(huge, "ab") as fh:
        fh.write(gzip.compress(np.zeros((300, 512, 512), np.int16).tobytes(), compresslevel=1))
    ids = ["good", "liar", "huge"]
    pd.DataFrame({"participant_id": ids, "label": ["a", "b", "a"]}).to_csv(
        tmp_path / "t.tsv", sep="\t", index=False
    )
    rows = {row.name: row for row in check_data(config.data).rows}
    assert (
        not rows["readable"].ok
        and "liar" in rows["readable"].detail
        and "declares 600x512x512" in rows["readable"].detail
    )
    assert (
        not rows["memory"].ok
        and "huge" in rows["memory"].detail
        and "data.preprocess.memory_gb" in rows["memory"].detail
    )


def test_4d_nifti_stacks_channels_or_keeps_the_volume_asked_for(tmp_path):
    series = np.stack(
        [np.full((6, 8, 10), t, np.float32) + np.arange(10) for t in range(3)], axis=-1
    )  # (I, J, K, T)
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(series, np.eye(4)), str(path))
    image = read_image(path)
    assert image.array.shape == (3, 10, 8, 6)  # T stacked as channels by default
    stacked = preprocess_image(image, None, PreprocessConfig(spatial_size=[5, 4, 3], intensity="none"))[0]
    assert stacked.array.shape == (3, 5, 4, 3)
    second = preprocess_image(
        image, None, PreprocessConfig(spatial_size=[5, 4, 3], intensity="none", volume_index=2)
    )[0]
    np.testing.assert_allclose(second.array, stacked.array[2:3], atol=1e-5)
    with pytest.raises(
        Exception, match=r"3 volume\(s\) along its 4th axis; data.preprocess.volume_index=5 is out of range"
    ):
        preprocess_image(image, None, PreprocessConfig(spatial_size=[5, 4, 3], volume_index=5))


def test_worker_count_follows_memory_and_the_largest_header(tmp_path):
    from medctl.data.preprocess import SampleTask, worker_count
    from medctl.storage import FileInfo

    def task(name, array):
        path = write_nrrd(tmp_path / f"{name}.nrrd", array, spacing=(1.0, 1.0, 1.0), compress=False)
        info = FileInfo(path.name, str(path), path.stat().st_size, "x")
        return SampleTask(name, [info], [], "f", str(tmp_path), {}, "", "", 0)

    tasks = [task(f"s{i}", np.zeros((8, 16, 16), np.int16)) for i in range(16)]
    tasks.append(task("big", np.zeros((100, 256, 256), np.int16)))  # 25 MiB as float32 -> ~1.07 GiB a worker
    workers, line = worker_count(4, tasks, memory_gb=2.0)
    assert workers == 1
    assert line.startswith("1 worker(s) (asked 4; fewer: ")  # the cores (machine-dependent), 17 samples, memory
    assert "17 sample(s) to process, one worker per 8, memory for 1); largest volume 100x256x256 needs ~1.1 GB" in line
    workers, line = worker_count(4, tasks, memory_gb=64.0)
    assert workers == min(2, os.cpu_count() or 1)  # 17 tasks // 8 per worker, and the cores
