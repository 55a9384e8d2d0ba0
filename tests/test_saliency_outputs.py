"""Geometry of the written maps (NRRD headers, resampling to the source grid) and the PNG panels."""

from __future__ import annotations

import nrrd
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medctl.data.readers import read_image
from medctl.data.readers import write_nrrd as write_source_nrrd
from medctl.errors import DataError
from medctl.saliency import Geometry, cache_geometry, resample_to_grid, resample_to_shape, source_geometry
from medctl.saliency.outputs import safe_name, save_panel, write_nrrd

# an oblique source scan: axis 0 along -x, axes 1 and 2 rotated 30 degrees about x (columns = axes)
C, S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, C, -S], [0.0, S, C]])
SPACING, ORIGIN = (0.5, 1.0, 2.0), (10.0, -20.0, 30.0)
SOURCE = Geometry.from_spacing((40, 30, 20), SPACING, ORIGIN, DIRECTION)


def world(geometry: Geometry, index) -> np.ndarray:
    """World position of a voxel centre."""
    return (geometry.matrix @ np.append(np.asarray(index, dtype=float), 1.0))[:-1]


def test_source_geometry_follows_the_readers_convention():
    np.testing.assert_allclose(world(SOURCE, (1, 0, 0)) - world(SOURCE, (0, 0, 0)), 0.5 * DIRECTION[:, 0])
    np.testing.assert_allclose(world(SOURCE, (0, 0, 1)) - world(SOURCE, (0, 0, 0)), 2.0 * DIRECTION[:, 2])
    np.testing.assert_allclose(SOURCE.spacing, SPACING)
    np.testing.assert_allclose(SOURCE.origin, ORIGIN)


def test_preprocessed_spacing_scales_with_the_shape_and_keeps_the_field_of_view():
    grid = SOURCE.resized((8, 16, 16))
    np.testing.assert_allclose(grid.spacing, (0.5 * 40 / 8, 1.0 * 30 / 16, 2.0 * 20 / 16))
    # the outer corners of the two grids (voxel centre -/+ half a voxel) coincide in world space
    for corner in ((-0.5, -0.5, -0.5), (7.5, 15.5, 15.5)):
        source_corner = (np.asarray(corner) + 0.5) * np.asarray(SOURCE.shape) / np.asarray(grid.shape) - 0.5
        np.testing.assert_allclose(world(grid, corner), world(SOURCE, source_corner), atol=1e-9)


def test_map_nrrd_reads_back_through_the_data_readers_with_its_geometry(tmp_path):
    grid = SOURCE.resized((8, 16, 16))
    volume = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    path = write_nrrd(tmp_path / "map.nrrd", volume, grid)

    _data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    image = read_image(path)  # the reader every medctl stage uses: (C, D, H, W), LPS
    np.testing.assert_array_equal(image.array[0], volume)
    np.testing.assert_allclose(image.spacing, grid.spacing)
    np.testing.assert_allclose(image.origin, grid.origin)
    np.testing.assert_allclose(image.direction, DIRECTION, atol=1e-12)


def test_two_dimensional_nrrd_has_a_two_dimensional_space(tmp_path):
    grid = Geometry.from_spacing((10, 12), (0.7, 0.3), (1.0, 2.0))
    path = write_nrrd(tmp_path / "map2d.nrrd", np.ones((10, 12), np.float32), grid)
    _data, header = nrrd.read(str(path))
    assert int(header["space dimension"]) == 2
    image = read_image(path)
    np.testing.assert_allclose(image.spacing, (0.7, 0.3))
    np.testing.assert_allclose(image.origin, (1.0, 2.0))


def test_resampling_back_gives_the_original_grid(tmp_path):
    # a map that is a linear function of world position stays that function on the source grid
    grid = SOURCE.resized((8, 16, 16))
    index = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)  # (8, 16, 16, 3)
    positions = index @ grid.matrix[:3, :3].T + grid.matrix[:3, 3]  # world of each cached voxel
    weights = np.array([0.3, -0.2, 0.1])
    preprocessed = (positions @ weights).astype(np.float32)

    original = resample_to_grid(preprocessed, grid, SOURCE)
    assert original.shape == SOURCE.shape
    source_index = np.stack(np.meshgrid(*[np.arange(s) for s in SOURCE.shape], indexing="ij"), -1)
    expected = (source_index @ SOURCE.matrix[:3, :3].T + SOURCE.matrix[:3, 3]) @ weights
    inner = (slice(5, 35), slice(2, 28), slice(2, 18))  # away from the border, where edges are extended
    np.testing.assert_allclose(original[inner], expected[inner], atol=1e-3)

    path = write_nrrd(tmp_path / "original.nrrd", original, SOURCE)
    source_path = write_source_nrrd(
        tmp_path / "source.nrrd", expected, spacing=SPACING, origin=ORIGIN, direction=DIRECTION
    )
    written, source = read_image(path), read_image(source_path)
    assert written.array.shape == source.array.shape
    np.testing.assert_allclose(written.spacing, source.spacing)
    np.testing.assert_allclose(written.origin, source.origin)
    np.testing.assert_allclose(written.direction, source.direction, atol=1e-12)


def test_resampling_leaves_what_preprocessing_cropped_away_empty():
    source = Geometry.from_spacing((10, 10), (1.0, 1.0))
    crop = Geometry(shape=(4, 4), affine=((1.0, 0.0, 3.0), (0.0, 1.0, 3.0), (0.0, 0.0, 1.0)))  # voxels 3..6
    original = resample_to_grid(np.ones((4, 4), np.float32), crop, source)
    assert original[3:7, 3:7].min() == 1.0
    assert original[:2].max() == 0.0 and original[:, 8:].max() == 0.0


def test_resampling_an_odd_factor_keeps_the_exact_shape():
    assert resample_to_shape(np.ones((7, 9, 11), np.float32), (23, 5, 101)).shape == (23, 5, 101)
    assert resample_to_shape(np.ones((7, 9), np.float32), (3, 31)).shape == (3, 31)


def test_geometry_from_manifest_like_records():
    row = pd.Series(
        {
            "spacing": np.array(SPACING),
            "origin": list(ORIGIN),
            "direction": DIRECTION.ravel(),  # row-major, as the manifest stores it
            "orig_shape": np.array([1, 40, 30, 20]),  # (C, *spatial)
        }
    )
    assert source_geometry(row, 3) == SOURCE
    assert cache_geometry(row, (8, 16, 16), SOURCE) == SOURCE.resized((8, 16, 16))
    recorded = {**row, "cache_affine": np.diag([2.0, 3.0, 4.0, 1.0]).ravel().tolist()}
    assert cache_geometry(recorded, (8, 16, 16), SOURCE).spacing == (2.0, 3.0, 4.0)  # the recorded one wins
    nested = {"spacing": "[0.5, 1.0, 2.0]", "orig_shape": [40, 30, 20]}
    geometry = source_geometry(nested, 3)
    assert geometry.origin == (0.0, 0.0, 0.0) and np.allclose(geometry.matrix[:3, :3], np.diag(SPACING))
    assert source_geometry({"spacing": [1.0, 1.0]}, 2) is None  # no orig_shape: unknown
    assert source_geometry({"spacing": np.nan, "orig_shape": [3, 3]}, 2) is None
    assert (
        source_geometry({"spacing": [1.0, 1.0, 1.0], "orig_shape": [1, 9, 9, 9]}, 2) is None
    )  # a slice's volume
    assert source_geometry(None, 3) is None and cache_geometry(None, (4, 4), None) is None
    with pytest.raises(DataError, match="direction"):
        source_geometry({"spacing": [1, 1, 1], "orig_shape": [2, 2, 2], "direction": [1, 0, 0, 1]}, 3)


def test_a_slice_of_a_volume_is_placed_in_the_volume_s_world(tmp_path):
    slice_affine = np.array([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # (4, 3)
    record = {"spacing": [2.0, 1.0, 1.0], "orig_shape": [1, 9, 16, 16], "cache_affine": slice_affine.ravel()}
    grid = cache_geometry(record, (16, 16), source_geometry(record, 2))
    path = write_nrrd(tmp_path / "slice.nrrd", np.ones((16, 16), np.float32), grid)
    _data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space origin"], [5.0, 0.0, 0.0])
    np.testing.assert_allclose(header["space directions"], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def test_impossible_geometry_is_a_data_error():
    with pytest.raises(DataError, match="3 spacings"):
        Geometry.from_spacing((4, 4, 4), (1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(DataError, match="positive spacing"):
        Geometry.from_spacing((4, 4), (1.0, 0.0))
    with pytest.raises(DataError, match="affine"):
        Geometry((4, 4), ((1.0, 0.0), (0.0, 1.0)))


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_three_dimensional_panel_shows_the_peak_and_the_mask(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 16, 16)).astype(np.float32)
    amap = np.zeros((8, 16, 16), np.float32)
    amap[3:5, 6:9, 10:13] = 1.0
    amap[0, 0, 0] = -0.5  # signed map: diverging colours
    mask = np.zeros((8, 16, 16), bool)
    mask[3:5, 6:9, 10:13] = True
    path = save_panel(tmp_path / "panel.png", image, amap, mask=mask, spacing=(2.0, 1.0, 1.0), title="s1")
    pixels = _pixels(path)
    assert pixels.shape[1] > 3 * pixels.shape[0]  # four views side by side
    assert pixels.std() > 10
    assert (np.abs(pixels - [0, 255, 0]).sum(-1) < 60).any()  # the lime mask contour is drawn


def test_two_dimensional_panel_and_a_flat_map(tmp_path):
    image = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    path = save_panel(tmp_path / "p2.png", image, np.zeros((16, 16), np.float32))
    assert _pixels(path).std() > 10
    with pytest.raises(ValueError, match="shapes differ"):
        save_panel(tmp_path / "bad.png", image, np.zeros((8, 8), np.float32))


def test_unknown_geometry_writes_plain_arrays(tmp_path):
    path = write_nrrd(tmp_path / "plain.nrrd", np.ones((4, 5, 6), np.float32), None)
    data, header = nrrd.read(str(path), index_order="C")
    assert data.shape == (4, 5, 6) and "space origin" not in header


def test_safe_names():
    assert safe_name("sub-01/ses 2") == "sub-01_ses_2"
    assert safe_name("../..") == "sample"
