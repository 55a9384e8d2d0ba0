"""Synthetic task families: the class evidence of each is what its docstring says, and nothing global."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medctl.data.readers import read_image
from medctl.data.synthetic import make_synthetic_dataset
from medctl.data.synthetic_families import ELONGATION, read_count


def samples(ds):
    table = pd.read_csv(ds.table, sep="\t")
    for row in table.itertuples():
        image = read_image(ds.image_root / f"{row.participant_id}.nrrd").array[0].astype(float)
        mask = read_image(ds.mask_root / f"{row.participant_id}.nrrd").array[0] > 0
        yield row.label, image, mask


def test_count_family_has_one_to_four_separate_blobs_by_class(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "count", n=16, size=(16, 32, 32), family="count", seed=1)
    assert ds.classes == ["one", "two", "three", "four"]
    seen = set()
    for label, image, mask in samples(ds):
        _, blobs = ndimage.label(mask)
        assert blobs == ds.classes.index(label) + 1, label  # the count is the class, blobs never merge
        ring = (ndimage.binary_dilation(mask, iterations=2)) & ~mask
        assert image[mask].mean() > 1.4 * image[ring].mean()  # bright against the organ around them
        seen.add(label)
    assert seen == set(ds.classes)
    with pytest.raises(ValueError, match="4 classes"):
        make_synthetic_dataset(tmp_path / "bad", n=16, family="count", n_classes=2)


def test_shape_family_differs_by_elongation_not_brightness(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "shape", n=16, size=(16, 32, 32), family="shape", seed=2)
    spacing = np.asarray(ds.spacing)
    elongation, brightness = {"round": [], "elongated": []}, {"round": [], "elongated": []}
    for label, image, mask in samples(ds):
        points = np.argwhere(mask) * spacing  # mm
        eigen = np.sort(np.linalg.eigvalsh(np.cov(points.T)))
        elongation[label].append(np.sqrt(eigen[-1] / eigen[0]))
        brightness[label].append(image[mask].mean() / np.median(image[image > 0.5 * image.max()]))
        assert ndimage.label(image > image[mask].min())[1] >= 1
    assert max(elongation["round"]) < 1.6 < ELONGATION * 0.8 < min(elongation["elongated"])
    # brightness is drawn apart from the class: the ranges of the two classes overlap
    assert min(brightness["elongated"]) < max(brightness["round"]) and min(brightness["round"]) < max(brightness["elongated"])


@pytest.mark.parametrize(("dims", "size"), [(3, (16, 48, 48)), (2, (32, 32))])
def test_rod_family_is_a_thin_rod_dimmer_than_every_distractor(tmp_path, dims, size):
    """Class "present" holds one thin rod (the mask), "absent" none; in every image the brightest structures are
    the three round distractors, so the image's own peak never falls on the evidence."""
    ds = make_synthetic_dataset(tmp_path / "rod", n=12, dims=dims, size=size, family="rod", seed=5)
    assert ds.classes == ["absent", "present"]
    table = pd.read_csv(ds.table, sep="\t")
    for row in table.itertuples():
        name = ds.pattern.format(participant_id=row.participant_id)
        image = read_image(ds.image_root / name).array[0].astype(float)
        mask = read_image(ds.mask_root / name).array[0] > 0
        assert bool(mask.any()) is (row.label == "present"), name
        organ = np.percentile(image, 90)  # the organ fills a fifth of a volume, two fifths of an image
        bright = (image > organ + 0.4 * (image.max() - organ)) & ~mask
        assert ndimage.label(bright)[1] == 3  # the distractors, in both classes, apart
        assert not mask.flat[int(np.argmax(image))]  # the brightest voxel is a distractor
        if mask.any():
            points = np.argwhere(mask) * np.asarray(ds.spacing)  # mm
            eigen = np.sort(np.linalg.eigvalsh(np.cov(points.T)))
            assert np.sqrt(eigen[-1] / eigen[-2]) > 3  # long against its width: a rod, not a ball
            ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
            assert image[mask].mean() > 1.5 * image[ring].mean()  # yet visible against the organ


def test_texture_family_differs_by_spatial_frequency(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "texture", n=12, size=(16, 32, 32), family="texture", seed=3)
    lag3 = {"coarse": [], "fine": []}  # the correlation of the texture with itself 3 voxels along W
    for label, image, organ in samples(ds):
        detail = image - ndimage.gaussian_filter(image, 3.0)  # the bias field and the organ's edge off
        both = ndimage.binary_erosion(organ, iterations=2)
        both = both[:, :, :-3] & both[:, :, 3:]
        lag3[label].append(np.corrcoef(detail[:, :, :-3][both], detail[:, :, 3:][both])[0, 1])
    assert min(lag3["coarse"]) > 0.3 and max(lag3["fine"]) < 0.0


def test_oriented_bias_brightens_one_side_in_every_sample_and_lesion_default_is_unchanged(tmp_path):
    plain = make_synthetic_dataset(tmp_path / "plain", n=8, seed=4)
    again = make_synthetic_dataset(tmp_path / "again", n=8, seed=4, family="lesion", oriented_bias=0.0)
    np.testing.assert_array_equal(
        read_image(plain.image_root / "sub-003.nrrd").array, read_image(again.image_root / "sub-003.nrrd").array
    )
    ramped = make_synthetic_dataset(tmp_path / "ramped", n=8, seed=4, oriented_bias=0.8)
    for _, image, _ in samples(ramped):
        rows = image.shape[1]
        assert image[:, rows // 2 :].mean() > 1.3 * image[:, : rows // 2].mean()  # brighter towards +H
    with pytest.raises(ValueError, match="family"):
        make_synthetic_dataset(tmp_path / "bad", n=8, family="stripes")


def test_the_count_is_in_the_image_for_a_reader_without_masks_or_labels(tmp_path):
    """The family's reference reader counts the blobs from the image alone, so a network at chance on this
    family has not been handed an impossible task (benchmarks/bench_count_ceiling.py)."""
    ds = make_synthetic_dataset(tmp_path / "count", n=24, size=(16, 64, 64), family="count", seed=5)
    truth, read = [], []
    for label, image, _ in samples(ds):
        truth.append(ds.classes.index(label) + 1)
        read.append(read_count(image, ds.spacing))
    truth, read = np.asarray(truth), np.asarray(read)
    assert (truth == read).mean() >= 0.7 and (np.abs(truth - read) <= 1).mean() >= 0.85  # chance: 0.25 exact
    flat = np.full((16, 64, 64), 1000.0)  # no organ, no blobs
    assert read_count(flat, ds.spacing) == 0
