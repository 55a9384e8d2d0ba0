"""preprocess(): the cache contract, reruns without decoding, bad files recorded, slices, masks."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

import medctl.data.cache.pool as pool_module
import medctl.data.modality as modality_module
from medctl.config import load_config
from medctl.data.dataset import CacheDataset, read_summary, target_specs
from medctl.data.preprocess import cache_dir_for, ensure_cache, preprocess
from medctl.data.readers import read_image, write_nrrd
from medctl.data.synthetic import make_synthetic_dataset, synthetic_sample
from medctl.errors import DataError

MANIFEST_COLUMNS = {
    "id", "source_key", "fingerprint", "split", "status", "shape", "spacing", "origin", "direction",
    "orig_shape", "has_mask", "cache_affine", "source_id", "slice_index", "group", "label",
}  # fmt: skip


def config_for(ds, cache, *extra):
    return load_config(
        None, [*ds.config_overrides(), f"data.cache_dir={json.dumps(str(cache))}", *extra], env={}
    )


def test_cache_layout_manifest_and_summary(synthetic_3d, tmp_path):
    config = config_for(synthetic_3d, tmp_path / "cache")
    result = preprocess(config.data, workers=1)
    cache = result.cache_dir
    assert cache == cache_dir_for(config.data) and cache.parent == tmp_path / "cache"
    assert (result.n_new, result.n_cached, result.n_failed) == (22, 0, 0)  # 24 rows, 2 filtered out
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert MANIFEST_COLUMNS <= set(manifest.columns)
    assert len(manifest) == 22 and (manifest.status == "ok").all()
    table = pd.read_csv(synthetic_3d.table, sep="\t")
    kept = table[table.retinal_oct]
    assert manifest["id"].tolist() == kept["participant_id"].tolist()
    assert manifest["split"].tolist() == kept["recommended_split"].tolist()
    assert manifest["label"].tolist() == [synthetic_3d.classes.index(v) for v in kept["label"]]
    image = np.load(cache / "images" / "sub-001.npy")
    mask = np.load(cache / "masks" / "sub-001.npy")
    assert image.shape == (1, 16, 32, 32) and image.dtype == np.float32
    assert mask.shape == (1, 16, 32, 32) and mask.dtype == np.uint8
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3  # z-score
    row = manifest.iloc[0]
    assert list(row["spacing"]) == [2.0, 1.0, 1.0] and list(row["orig_shape"]) == [1, 16, 32, 32]
    # an axial stack: D along z (2 mm), H along y, W along x
    np.testing.assert_allclose(np.reshape(row["cache_affine"], (4, 4))[:3, :3], [[0, 0, 1], [0, 1, 0], [2, 0, 0]])
    assert list(row["direction"]) == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    summary = read_summary(cache)
    assert (
        summary["spatial_dims"] == 3
        and summary["in_channels"] == 1
        and summary["spatial_size"] == [16, 32, 32]
    )
    assert summary["targets"] == [{"name": "label", "kind": "binary", "classes": ["healthy", "edema"]}]
    counts = summary["counts"]
    assert counts["splits"] == {s: int((kept.recommended_split == s).sum()) for s in ("train", "val", "test")}
    assert sum(counts["classes"]["label"]["test"].values()) == counts["splits"]["test"]
    assert summary["fingerprint"] == cache.name and summary["settings"]["preprocess"]["spatial_size"] == [
        16,
        32,
        32,
    ]
    assert (cache / "data_errors.csv").read_text().strip() == "id,key,stage,error"
    assert target_specs(cache)[0].num_outputs == 1


def test_rerun_decodes_nothing_and_a_changed_file_is_redone(synthetic_3d, tmp_path, monkeypatch):
    ds = make_synthetic_dataset(tmp_path / "ds", n=8, seed=5)
    config = config_for(ds, tmp_path / "cache")
    first = preprocess(config.data, workers=1)
    assert first.n_new == 6  # 8 rows, 2 with retinal_oct FALSE
    decoded = []
    real_read = modality_module.read_image  # the image modality decodes through it
    monkeypatch.setattr(
        modality_module, "read_image", lambda paths: decoded.append(paths) or real_read(paths)
    )
    again = preprocess(config.data, workers=1)
    assert (again.n_new, again.n_cached, again.n_failed) == (0, first.n_new, 0) and decoded == []
    image, _ = synthetic_sample((16, 32, 32), (2.0, 1.0, 1.0), 1, np.random.default_rng(99))
    write_nrrd(ds.image_root / "sub-001.nrrd", image, spacing=(2.0, 1.0, 1.0))
    third = preprocess(config.data, workers=1)
    assert third.n_new == 1 and len(decoded) == 2  # the image and its mask, of sub-001 only
    assert np.load(third.cache_dir / "images" / "sub-001.npy").shape == (1, 16, 32, 32)


def write_bad_corpus(root):
    """Good NRRDs beside every kind of bad file; returns the table path."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        image, _ = synthetic_sample((16, 32, 32), (2.0, 1.0, 1.0), i % 2, rng)
        write_nrrd(images / f"good{i}.nrrd", image, spacing=(2.0, 1.0, 1.0))
    full = (images / "good0.nrrd").read_bytes()
    (images / "truncated.nrrd").write_bytes(full[: len(full) // 2])
    (images / "garbage.nii.gz").write_bytes(gzip.compress(b"\x00") + os.urandom(300))
    header = full[: full.index(b"\n\n") + 2]  # a valid gzip NRRD header over bytes that are not gzip
    (images / "gzbad.nrrd").write_bytes(header + os.urandom(400))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(images / "nopixels.dcm")
    np.save(images / "nan.npy", np.full((16, 32, 32), np.nan, dtype=np.float32))
    np.save(images / "flat.npy", np.zeros((32, 32), dtype=np.float32))
    np.save(images / "empty.npy", np.zeros((0, 32, 32), dtype=np.float32))
    ids = [
        "good0",
        "truncated",
        "good1",
        "garbage",
        "gzbad",
        "nopixels",
        "nan",
        "good2",
        "flat",
        "empty",
        "ghost",
        "good3",
    ]
    lines = ["participant_id\tlabel"] + [
        f"{id_}\t{'healthy' if k % 2 else 'edema'}" for k, id_ in enumerate(ids)
    ]
    (root / "table.tsv").write_text("\n".join(lines) + "\n")
    return root / "table.tsv", images


def bad_corpus_config(root, table, images, *extra):
    return load_config(
        None,
        [
            f"data.table={json.dumps(str(table))}",
            f"data.source.root={json.dumps(str(images))}",
            'data.source.pattern="{participant_id}.*"',
            'data.targets=[{name="label", kind="binary", classes=["healthy", "edema"]}]',
            "data.preprocess.spatial_size=[8, 16, 16]",
            f"data.cache_dir={json.dumps(str(root / 'cache'))}",
            *extra,
        ],
        env={},
    )


def test_bad_files_are_recorded_and_the_good_ones_cached(tmp_path):
    table, images = write_bad_corpus(tmp_path)
    config = bad_corpus_config(tmp_path, table, images)
    result = preprocess(config.data, workers=1)
    manifest = result.manifest.set_index("id")
    assert len(manifest) == 12  # every id, with its status
    good = [f"good{i}" for i in range(4)]
    assert (manifest.loc[good, "status"] == "ok").all() and result.n_new == 4 and result.n_failed == 8
    for id_ in good:
        assert np.load(result.cache_dir / "images" / f"{id_}.npy").shape == (1, 8, 16, 16)
    stages = manifest.loc[manifest.status == "failed", "stage"].to_dict()
    assert stages == {
        "truncated": "read", "garbage": "read", "gzbad": "read", "nopixels": "read", "nan": "validate", "flat": "validate",
        "empty": "validate", "ghost": "locate",
    }  # fmt: skip
    errors = pd.read_csv(result.cache_dir / "data_errors.csv", keep_default_na=False).set_index("id")
    assert list(errors.columns) == ["key", "stage", "error"] and len(errors) == 8
    assert "without pixel data" in errors.loc["nopixels", "error"]
    assert "NaN" in errors.loc["nan", "error"]
    assert (
        "2 spatial dimensions" in errors.loc["flat", "error"] and "expected 3" in errors.loc["flat", "error"]
    )
    assert "empty" in errors.loc["empty", "error"]
    assert "no key matches pattern 'ghost.*'" in errors.loc["ghost", "error"]
    assert errors.loc["truncated", "key"] == "truncated.nrrd"
    assert set(CacheDataset(result.cache_dir, None).ids) == set(good)
    again = preprocess(config.data, workers=1)  # failures with unchanged files are not retried
    assert (again.n_new, again.n_cached, again.n_failed) == (0, 4, 8)


def test_strict_stops_at_the_first_bad_file_with_one_line(tmp_path):
    table, images = write_bad_corpus(tmp_path)
    with pytest.raises(DataError) as info:  # ids without a file are known before anything is read
        preprocess(bad_corpus_config(tmp_path, table, images).data, strict=True, workers=1)
    assert str(info.value).startswith("ghost (") and "no key matches pattern 'ghost.*'" in str(info.value)
    config = bad_corpus_config(tmp_path, table, images, "data.filter=\"participant_id != 'ghost'\"")
    with pytest.raises(DataError) as info:
        preprocess(config.data, strict=True, workers=1)
    message = str(info.value)
    assert message.startswith("truncated (truncated.nrrd): read:")
    assert message.endswith("rerun without --strict to record and skip bad files") and "\n" not in message
    manifest = pd.read_parquet(cache_dir_for(config.data) / "manifest.parquet")
    assert manifest.set_index("id")["status"].to_dict() == {"good0": "ok", "truncated": "failed"}  # work kept


def test_slices_cut_from_volumes_share_split_and_targets(synthetic_3d, tmp_path):
    config = config_for(
        synthetic_3d, tmp_path / "cache",
        'data.preprocess.slices="axial"', "data.preprocess.slice_count=3", "data.preprocess.spatial_size=[24, 24]",
    )  # fmt: skip
    result = preprocess(config.data, workers=1)
    manifest = result.manifest
    assert len(manifest) == 22 * 3
    rows = manifest[manifest.source_id == "sub-002"]
    assert rows["id"].tolist() == ["sub-002_s4", "sub-002_s8", "sub-002_s12"]
    assert rows["split"].nunique() == 1 and rows["label"].nunique() == 1
    assert np.load(result.cache_dir / "images" / "sub-002_s8.npy").shape == (1, 24, 24)
    assert np.load(result.cache_dir / "masks" / "sub-002_s8.npy").shape == (1, 24, 24)
    affine = np.reshape(rows.iloc[1]["cache_affine"], (4, 3))  # slice pixel (p, q, 1) -> world
    np.testing.assert_allclose(affine[:3, 0], [0.0, 32 / 24, 0.0])  # rows: 32 -> 24 pixels of 1 mm
    np.testing.assert_allclose(
        affine[:3, 2], [1 / 6, 1 / 6, 16.0], atol=1e-6
    )  # slice 8 at 2 mm; pixel centres
    summary = read_summary(result.cache_dir)
    assert summary["spatial_dims"] == 2 and summary["spatial_size"] == [24, 24]
    item = CacheDataset(result.cache_dir, "train", with_mask=True)[0]
    assert item["image"].shape == (1, 24, 24) and item["mask"].shape == (1, 24, 24)


def test_masks_stay_aligned_through_resampling(synthetic_3d, tmp_path):
    config = config_for(
        synthetic_3d, tmp_path / "cache", "data.preprocess.spacing=[2.0, 2.0, 2.0]",
        "data.preprocess.spatial_size=[12, 12, 12]", 'data.preprocess.intensity="percentile"',
    )  # fmt: skip
    result = preprocess(config.data, workers=1)
    data = CacheDataset(result.cache_dir, None, with_mask=True)
    lesion, other = [], []
    for item in data:
        assert item["image"].shape == (1, 12, 12, 12)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0  # percentile -> [0, 1]
        inside = item["mask"] > 0
        if inside.any():
            lesion.append(float(item["image"][inside].mean()))
            other.append(float(item["image"][~inside].mean()))
    assert len(lesion) >= 8 and np.mean(lesion) > np.mean(other) + 0.25  # bright lesions under their masks
    affine = np.reshape(result.manifest.iloc[0]["cache_affine"], (4, 4))
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [2.0, 2.0, 2.0])


def test_orientation_reorders_axes_by_monai_codes(synthetic_3d, tmp_path):
    config = config_for(
        synthetic_3d, tmp_path / "cache", 'data.preprocess.orientation="RAS"',
        "data.preprocess.spatial_size=[32, 32, 16]", 'data.preprocess.intensity="none"',
    )  # fmt: skip
    result = preprocess(config.data, workers=1)
    source = read_image(synthetic_3d.image_root / "sub-001.nrrd").array[0].astype(np.float32)  # (D, H, W)
    cached = np.load(result.cache_dir / "images" / "sub-001.npy")[0]
    # stored as D -> S, H -> P, W -> L; RAS puts W first flipped to R, H flipped to A, D last
    np.testing.assert_allclose(cached, source.transpose(2, 1, 0)[::-1, ::-1, :], atol=1e-3)
    affine = np.reshape(result.manifest.iloc[0]["cache_affine"], (4, 4))
    np.testing.assert_allclose(affine[:3, :3], np.diag([-1.0, -1.0, 2.0]))  # LPS world: R and A are -x, -y


def test_2d_png_dataset_and_float16(synthetic_2d, tmp_path):
    config = config_for(
        synthetic_2d,
        tmp_path / "cache",
        'data.preprocess.dtype="float16"',
        'data.preprocess.intensity="minmax"',
    )
    result = preprocess(config.data, workers=1)
    assert result.n_new == 22
    array = np.load(result.cache_dir / "images" / "sub-003.npy")
    assert array.shape == (1, 32, 32) and array.dtype == np.float16
    assert float(array.min()) == 0.0 and float(array.max()) == 1.0
    item = CacheDataset(result.cache_dir, "val", with_mask=True)[0]
    assert item["image"].dtype == torch.float32 and item["mask"].max() <= 1


def test_cache_dataset_items_labels_and_errors(synthetic_3d, tmp_path):
    config = config_for(synthetic_3d, tmp_path / "cache")
    cache = ensure_cache(config.data, workers=1)
    assert ensure_cache(config.data) == cache  # built once
    flips = []

    def transform(item):
        flips.append(item["id"])
        item["image"] = torch.flip(item["image"], dims=[-1])
        return item

    train = CacheDataset(cache, "train", targets=["label"], transform=transform)
    item = train[0]
    assert set(item) == {"image", "id", "label"} and flips == [item["id"]]
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    assert train.labels("label").tolist() == train.manifest["label"].tolist()
    loader = torch.utils.data.DataLoader(CacheDataset(cache, "test", with_mask=True), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 16, 32, 32) and batch["mask"].shape == (2, 1, 16, 32, 32)
    assert len(CacheDataset(cache, None)) == 22
    with pytest.raises(DataError, match="split 'validation' is not one of train, val, test"):
        CacheDataset(cache, "validation")
    with pytest.raises(DataError, match="target 'grade' is not in the cache"):
        CacheDataset(cache, "train", targets=["grade"])
    with pytest.raises(DataError, match="no summary.json"):
        CacheDataset(tmp_path / "nowhere", "train")


def test_multilabel_targets_in_the_cache(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=8, seed=2)
    table = pd.read_csv(ds.table, sep="\t")
    table["crack"] = [1, 0, 1, 0, 1, 1, 0, 0]
    table["rust"] = ["TRUE", "TRUE", "FALSE", "FALSE", "TRUE", "FALSE", "TRUE", "FALSE"]
    table.to_csv(ds.table, sep="\t", index=False)
    config = config_for(
        ds,
        tmp_path / "cache",
        'data.targets=[{name="defects", kind="multilabel", columns=["crack", "rust"]}]',
    )
    result = preprocess(config.data, workers=1)
    data = CacheDataset(result.cache_dir, None)
    first = data[0]["defects"]
    assert first.dtype == torch.float32 and first.tolist() == [1.0, 1.0]
    assert read_summary(result.cache_dir)["targets"][0] == {
        "name": "defects",
        "kind": "multilabel",
        "classes": ["crack", "rust"],
    }


@pytest.mark.slow
def test_worker_pool_gives_the_same_cache(synthetic_3d, tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "MIN_SAMPLES_PER_WORKER", 1)
    inline = preprocess(config_for(synthetic_3d, tmp_path / "a").data, workers=1)
    pooled = preprocess(config_for(synthetic_3d, tmp_path / "b").data, workers=2)
    assert pooled.n_new == inline.n_new == 22
    for id_ in inline.manifest["id"]:
        np.testing.assert_array_equal(
            np.load(inline.cache_dir / "images" / f"{id_}.npy"),
            np.load(pooled.cache_dir / "images" / f"{id_}.npy"),
        )
