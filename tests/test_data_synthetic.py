"""Synthetic datasets: files, table, seeding, lesions under the masks, classes a probe can separate."""

from __future__ import annotations

import nrrd
import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from scipy.ndimage import gaussian_filter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score

from medctl.config import load_config
from medctl.data.preprocess import preprocess
from medctl.data.readers import read_image
from medctl.data.synthetic import make_synthetic_dataset


def test_files_table_and_config_overrides(synthetic_3d):
    ds = synthetic_3d
    table = pd.read_csv(ds.table, sep="\t", dtype=str)
    assert list(table.columns) == [
        "participant_id",
        "label",
        "recommended_split",
        "retinal_oct",
        "subject_id",
    ]
    assert len(table) == 24 and (table.retinal_oct == "FALSE").sum() == 2
    kept = table[table.retinal_oct == "TRUE"]
    for split in ("train", "val", "test"):  # every class in every split
        assert set(kept.loc[kept.recommended_split == split, "label"]) == {"healthy", "edema"}
    assert (table.groupby("subject_id")[["label", "recommended_split"]].nunique() == 1).all().all()
    data, header = nrrd.read(str(ds.image_root / "sub-001.nrrd"))
    assert data.dtype == np.int16 and header["encoding"] == "gzip"
    image = read_image(ds.image_root / "sub-001.nrrd")
    assert image.array.shape == (1, 16, 32, 32) and image.spacing == (2.0, 1.0, 1.0)
    config = load_config(None, ds.config_overrides(), env={})
    assert (
        config.data.source.pattern == "{participant_id}.nrrd" and config.data.filter == "retinal_oct == True"
    )
    assert config.data.targets[0].kind == "binary" and config.data.targets[0].classes == ["healthy", "edema"]
    assert config.data.preprocess.spatial_size == [16, 32, 32] and config.data.cache_dir == str(
        ds.root / "cache"
    )


def test_seeded(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n=6, seed=7)
    b = make_synthetic_dataset(tmp_path / "b", n=6, seed=7)
    c = make_synthetic_dataset(tmp_path / "c", n=6, seed=8)
    first = read_image(a.image_root / "sub-002.nrrd").array
    np.testing.assert_array_equal(first, read_image(b.image_root / "sub-002.nrrd").array)
    assert not np.array_equal(first, read_image(c.image_root / "sub-002.nrrd").array)
    assert a.table.read_text() == b.table.read_text()


def test_lesions_grow_with_the_class_and_sit_under_the_masks(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "three", n=30, n_classes=3, seed=1)
    assert ds.classes == ["healthy", "mild", "severe"]
    table = pd.read_csv(ds.table, sep="\t")
    volume_by_class: dict[str, list[int]] = {c: [] for c in ds.classes}
    for row in table.itertuples():
        image = read_image(ds.image_root / f"{row.participant_id}.nrrd").array[0].astype(float)
        mask = read_image(ds.mask_root / f"{row.participant_id}.nrrd").array[0] > 0
        volume_by_class[row.label].append(int(mask.sum()))
        if mask.any():  # lesions are brighter than the organ around them
            ring = (gaussian_filter(mask.astype(float), 1.5) > 0.05) & ~mask
            assert image[mask].mean() > 1.4 * image[ring].mean()
    assert max(volume_by_class["healthy"]) == 0
    assert 0 < np.mean(volume_by_class["mild"]) < np.mean(volume_by_class["severe"])


def test_distractors_are_the_brightest_structure_in_every_class_and_outside_the_masks(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "distract", n=8, seed=3, distractors=2)
    table = pd.read_csv(ds.table, sep="\t")
    for row in table.itertuples():
        name = f"{row.participant_id}.nrrd"
        image = read_image(ds.image_root / name).array[0].astype(float)
        mask = read_image(ds.mask_root / name).array[0] > 0
        assert mask.any() == (row.label != "healthy")  # the masks hold the lesions only
        # the brightest voxel -- where the image's own intensity map points -- is never on a lesion
        assert not mask[np.unravel_index(np.argmax(image), image.shape)], row.participant_id
        # every class carries them, so they say nothing of the class: a structure far above the organ
        assert image.max() > 1.6 * np.percentile(image, 90), row.participant_id
    with pytest.raises(ValueError, match="distractors"):
        make_synthetic_dataset(tmp_path / "bad", n=8, distractors=-1)


def test_two_dimensional_distractors_are_not_clipped_to_the_lesions_level(tmp_path):
    """2D images live in [0, 1]: at the plain scale the distractors would saturate together with bright
    lesions, and the intensity map's peak could land on a lesion by a tie."""
    ds = make_synthetic_dataset(tmp_path / "distract2d", n=24, dims=2, size=(32, 32), seed=0, distractors=2)
    for sample_id in ds.ids:
        image = read_image(ds.image_root / f"{sample_id}.png").array[0].astype(float)
        mask = read_image(ds.mask_root / f"{sample_id}.png").array[0] > 0
        assert image.max() < 255, sample_id  # nothing clipped
        if mask.any():
            assert image[mask].max() < image[~mask].max(), sample_id  # a distractor is strictly brighter


def distractor_level_auroc(ds, intensity: str, tmp_path) -> float:
    """AUROC of the class against the cached level of the distractors (the 4 brightest pixels outside the
    lesion mask), folded so that 0.5 is no information and 1.0 is all of it."""
    overrides = [*ds.config_overrides(), f'data.preprocess.intensity="{intensity}"', "data.preprocess.workers=1"]
    config = load_config(None, [*overrides, f'data.cache_dir="{tmp_path / intensity}"'], env={})
    cache = preprocess(config.data, workers=1).cache_dir
    manifest = pd.read_parquet(cache / "manifest.parquet").query("status == 'ok'")
    labels = pd.read_csv(ds.table, sep="\t").set_index("participant_id")["label"]
    levels, lesion = [], []
    for sample_id in manifest["id"]:
        image = np.load(cache / "images" / f"{sample_id}.npy")[0]
        mask = np.load(cache / "masks" / f"{sample_id}.npy")[0] > 0
        levels.append(np.sort(image[~mask])[-4:].mean())
        lesion.append(labels[sample_id] != "healthy")
    auroc = roc_auc_score(lesion, levels)
    return max(auroc, 1 - auroc)


def test_z_scoring_hands_the_class_to_the_distractors_and_min_max_does_not(tmp_path):
    """A lesion widens the image's intensity spread, so dividing by each image's standard deviation dims
    everything else in lesion images, the distractors included: their z-scored level tells the class
    (AUROC 0.94 on these 80 images; 0.93 on 200, 0.74 on 100 volumes of 16x32x32), and a classifier can
    learn the class from them without looking at a lesion. Min-max scaling takes its range from the
    background and the distractors, which every class shares, and leaves them little to tell (0.60 here,
    0.51 on 200 images). So the saliency fixture on distractor data preprocesses with
    ``intensity = "minmax"``."""
    ds = make_synthetic_dataset(tmp_path / "data", n=80, dims=2, size=(32, 32), seed=0, distractors=2)
    assert distractor_level_auroc(ds, "zscore", tmp_path) > 0.85
    assert distractor_level_auroc(ds, "minmax", tmp_path) < 0.7


def test_a_linear_probe_on_local_features_separates_the_classes(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "probe", n=40, seed=4)
    table = pd.read_csv(ds.table, sep="\t")
    local, global_mean = [], []
    for id_ in table.participant_id:
        volume = read_image(ds.image_root / f"{id_}.nrrd").array[0].astype(float)
        z = (volume - volume.mean()) / volume.std()
        smooth = gaussian_filter(z, 1.0)  # a blob detector: what a decent encoder's filters pick up
        local.append([smooth.max(), np.percentile(smooth, 99.5)])
        global_mean.append([volume.mean()])
    labels = (table.label == "edema").to_numpy()
    probe = cross_val_score(LogisticRegression(), np.asarray(local), labels, cv=4).mean()
    assert probe >= 0.9
    mean_only = cross_val_score(LogisticRegression(), np.asarray(global_mean), labels, cv=4).mean()
    assert mean_only < probe  # the class is not in the global intensity


def test_2d_png_variant_and_png_slices_of_volumes(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "png16", n=8, dims=2, size=(48, 40), png_bits=16)
    with PILImage.open(ds.image_root / "sub-001.png") as img:
        assert img.size == (40, 48) and np.asarray(img).dtype == np.uint16
    mask = np.asarray(PILImage.open(ds.mask_root / "sub-001.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert ds.pattern == "{participant_id}.png" and ds.dims == 2
    vol = make_synthetic_dataset(tmp_path / "vol", n=4, slices_png=True)
    assert sorted(p.name for p in vol.png_root.iterdir()) == [f"sub-00{i}.png" for i in range(1, 5)]
    assert np.asarray(PILImage.open(vol.png_mask_root / "sub-002.png")).shape == (32, 32)
