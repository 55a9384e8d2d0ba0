"""Readers on real sample files shipped with pydicom and nibabel, and on files written here."""

from __future__ import annotations

import copy
import os

import nibabel as nib
import nibabel.testing
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from medctl.data.readers import image_format, read_header, read_image, write_nrrd
from medctl.errors import DataError

NIBABEL_DATA = nibabel.testing.data_path


def ct_series(folder, positions, shuffle_names=True):
    """Copies of pydicom's CT_small.dcm as one series: slice k at z = positions[k], pixels + 100*k."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = source.pixel_array.astype(np.int16)
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"slice_{k:02d}.dcm" for k in range(len(positions))]
    if shuffle_names:
        names = names[::-1]  # file order is the reverse of the position order
    for k, (z, name) in enumerate(zip(positions, names, strict=True)):
        ds = copy.deepcopy(source)
        x, y, _ = (float(v) for v in source.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, float(z)]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.PixelData = (base + 100 * k).astype(np.int16).tobytes()
        ds.save_as(folder / name)
    return base


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_series_is_ordered_by_position_on_the_slice_normal(tmp_path):
    positions = [-60.0, -55.0, -50.0, -45.0]
    base = ct_series(tmp_path / "series", positions)
    paths = sorted((tmp_path / "series").glob("*.dcm"))  # names sort opposite to positions
    image = read_image(paths)
    assert image.array.shape == (1, 4, 128, 128)
    assert image.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    assert image.origin[2] == pytest.approx(-60.0)  # the lowest slice first
    # columns: D along the slice normal (+z), H down the rows (+y), W along the columns (+x)
    np.testing.assert_allclose(image.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-6)
    for k in range(4):  # slice k carries +100*k, and the CT rescale (slope 1, intercept -1024)
        np.testing.assert_allclose(image.array[0, k], base + 100 * k - 1024)


def test_dicom_multiframe_rt_dose_uses_frame_offsets():
    image = read_image(get_testdata_file("rtdose.dcm"))
    raw = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    assert image.array.shape == (1, 15, 10, 10)
    assert image.spacing == pytest.approx((5.0, 10.0, 10.0))
    assert image.origin == pytest.approx(tuple(float(v) for v in raw.ImagePositionPatient))
    np.testing.assert_allclose(image.array[0], raw.pixel_array * float(raw.DoseGridScaling), rtol=1e-6)


def test_enhanced_multiframe_mr_frames_sorted_by_plane_position(tmp_path):
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frames = np.stack([mr.pixel_array + 1000 * k for k in range(4)]).astype(np.int16)  # (F, H, W)
    z = [30.0, 0.0, 20.0, 10.0]  # stored out of order
    ds = copy.deepcopy(mr)
    del ds.ImagePositionPatient
    ds.NumberOfFrames = 4
    ds.PixelData = frames.tobytes()
    per_frame = []
    for zk in z:
        plane = Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, zk]
        item = Dataset()
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enhanced.dcm")
    image = read_image(tmp_path / "enhanced.dcm")
    assert image.array.shape == (1, 4, 64, 64)
    assert image.spacing[0] == pytest.approx(10.0)
    order = np.argsort(z)
    np.testing.assert_array_equal(image.array[0], frames[order])


def test_single_dicom_slice_is_a_2d_image():
    image = read_image(get_testdata_file("MR_small.dcm"))
    assert image.array.shape == (1, 64, 64) and image.spacing == pytest.approx((0.3125, 0.3125))


def test_dicom_without_pixel_data_is_a_clear_error(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(DataError, match="without pixel data"):
        read_image(tmp_path / "nopixels.dcm")
    with pytest.raises(DataError, match="without pixel data"):
        read_header(tmp_path / "nopixels.dcm")


def test_two_series_in_one_folder_are_refused(tmp_path):
    ct_series(tmp_path / "a", [0.0, 5.0])
    ct_series(tmp_path / "a2", [10.0, 15.0])
    for p in (tmp_path / "a2").glob("*.dcm"):
        p.rename(tmp_path / "a" / f"other_{p.name}")
    with pytest.raises(DataError, match="2 DICOM series"):
        read_image(sorted((tmp_path / "a").glob("*.dcm")))


# ------------------------------------------------------------------------------------------ NIfTI
def test_nifti_anatomical_axes_spacing_and_lps_geometry():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")
    image = read_image(path)
    data = np.asanyarray(nib.load(path).dataobj)  # (I, J, K)
    assert image.array.shape == (1, *data.shape[::-1])
    np.testing.assert_array_equal(image.array[0], data.transpose(2, 1, 0))
    assert image.spacing == pytest.approx((2.0, 2.0, 2.0))
    # RAS affine x = -2 i + 32 -> LPS x = 2 i - 32: the W axis (i) points +x in LPS
    np.testing.assert_allclose(image.direction[:, 2], [1.0, 0.0, 0.0], atol=1e-6)
    assert image.origin == pytest.approx((-32.0, 40.0, -16.0))
    world = image.affine() @ np.array([3, 5, 7, 1.0])  # voxel (k=3, j=5, i=7)
    ras = nib.load(path).affine @ np.array([7, 5, 3, 1.0])
    np.testing.assert_allclose(world[:3], ras[:3] * np.array([-1, -1, 1]), atol=1e-5)


def test_nifti_4d_time_axis_becomes_channels():
    image = read_image(os.path.join(NIBABEL_DATA, "example4d.nii.gz"))
    assert image.array.shape == (2, 24, 96, 128)
    assert image.spacing == pytest.approx((2.2, 2.0, 2.0), rel=1e-5)


# ----------------------------------------------------------------------------------- NRRD / others
def test_nrrd_round_trip_keeps_array_order_and_geometry(tmp_path):
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    write_nrrd(tmp_path / "a.nrrd", array, spacing=(2.5, 1.0, 0.5), origin=(1, 2, 3), direction=direction)
    image = read_image(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(image.array[0], array)
    assert image.array.dtype == np.int16
    assert image.spacing == pytest.approx((2.5, 1.0, 0.5))
    assert image.origin == pytest.approx((1.0, 2.0, 3.0))
    np.testing.assert_allclose(image.direction, direction)
    assert read_header(tmp_path / "a.nrrd").shape == (3, 4, 5)


def test_nrrd_vector_axis_becomes_channels(tmp_path):
    import nrrd

    data = np.random.default_rng(0).random((3, 6, 7, 2)).astype(np.float32)  # (D, H, W, C) in C order
    header = {
        "space": "left-posterior-superior",
        "space directions": np.array(
            [[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]]
        ),  # file axes: C, W, H, D
        "kinds": ["vector", "domain", "domain", "domain"],
    }
    nrrd.write(str(tmp_path / "v.nrrd"), data, header, index_order="C")
    image = read_image(tmp_path / "v.nrrd")
    assert image.array.shape == (2, 3, 6, 7)
    np.testing.assert_array_equal(image.array[1], data[..., 1])
    assert image.spacing == pytest.approx((2.0, 1.0, 1.0))


def test_numpy_png_and_tiff(tmp_path):
    from PIL import Image as PILImage

    volume = np.random.default_rng(0).random((4, 6, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    np.savez(tmp_path / "v.npz", image=volume, spacing=np.array([3.0, 1.0, 1.0]))
    assert read_image(tmp_path / "v.npy").array.shape == (1, 4, 6, 8)
    assert read_image(tmp_path / "v.npz").spacing == (3.0, 1.0, 1.0)
    gray16 = (np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)
    PILImage.fromarray(gray16).save(tmp_path / "g.png")
    png = read_image(tmp_path / "g.png")
    assert png.array.shape == (1, 6, 8) and png.array.dtype == np.uint16
    np.testing.assert_array_equal(png.array[0], gray16)
    rgb = np.random.default_rng(1).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    PILImage.fromarray(rgb).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png").array.shape == (3, 6, 8)
    pages = [PILImage.fromarray((volume[k] * 255).astype(np.uint8)) for k in range(4)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert read_image(tmp_path / "stack.tif").array.shape == (1, 4, 6, 8)


def test_unknown_extension_names_the_file_and_the_known_formats(tmp_path):
    with pytest.raises(DataError, match=r"x\.xyz: unknown image format '\.xyz'"):
        image_format(tmp_path / "x.xyz")
    assert image_format("a/b/scan.nii.gz") == "nifti"
    assert image_format("a/b/IM0001") == "dicom"
