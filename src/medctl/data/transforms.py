"""Preprocessing of one image (and its mask): MONAI geometry, slicing, intensity.

Order, each step optional as configured in ``[data.preprocess]``:
0. ``volume_index``: a 4D image (NIfTI time series, echoes) has its 4th axis as channels; ``k >= 0``
   keeps volume ``k`` only, ``-1`` (default) keeps them all as channels.
1. ``orientation``: MONAI ``Orientation`` with axis codes for the array axes (D, H, W), in MONAI's RAS
   labels (e.g. "SPL": D runs inferior->superior, H anterior->posterior, W right->left).
2. ``spacing``: MONAI ``Spacing`` to that voxel size (mm, per array axis).
3. ``slices``: cut 2D slices along D ("axial"), H ("coronal") or W ("sagittal"); ``slice_count`` of
   them, evenly spaced and centred.
4. size: with ``spacing`` too, ``ResizeWithPadOrCrop`` to ``spatial_size`` (keeps the physical scale,
   pads with the image minimum); without, :func:`resize_antialiased`: MONAI ``Resize``'s result
   (Gaussian anti-aliasing with its erf kernel and zero padding, then trilinear/bilinear) computed one
   channel at a time in place, so it holds one float32 channel instead of MONAI's padded conv copies
   (which need ~25x the volume: 195 GiB for a 512^3 CT).
5. ``unsharp``: ``x + amount * (x - gaussian(x, sigma))`` with MONAI ``GaussianSmooth`` (sigma in voxels).
6. ``intensity``: per channel, "zscore" (NormalizeIntensity), "percentile" (clip to the percentiles and
   scale to [0, 1], ScaleIntensityRangePercentiles) or "minmax" (ScaleIntensity to [0, 1]).
Masks follow every geometric step with nearest-neighbour interpolation ("nearest-exact", so they stay
aligned with the image) and keep their integer labels; they skip 5 and 6.

Memory: without ``spacing`` the source stays in its own dtype until each channel is resized, so a
worker holds the decoded source plus one float32 channel (see ``tests/test_preprocess_scale.py``).

Each output carries the affine of the cached array (voxel index -> LPS world), so maps computed on the
cache can be put back into the source's space.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from medctl.config import PreprocessConfig
from medctl.data.readers import Image
from medctl.errors import DataError

_RAS_FLIP = {3: np.diag([-1.0, -1.0, 1.0, 1.0]), 2: np.diag([-1.0, -1.0, 1.0])}  # LPS <-> RAS, involutive
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


@dataclass
class Processed:
    array: np.ndarray  # (C, *spatial), float32 or float16
    mask: np.ndarray | None  # (1, *spatial) uint8
    affine: np.ndarray  # cache voxel index -> LPS world: (S+1, S+1), or (4, 3) for a slice of a volume
    slice_index: int  # -1 for a whole image


def expected_spatial_dims(settings: PreprocessConfig) -> int | None:
    """What the source images must be: 3D when slicing, else the size/spacing length, else any."""
    if settings.slices:
        return 3
    if settings.spatial_size:
        return len(settings.spatial_size)
    if settings.spacing:
        return len(settings.spacing)
    return None


def validate_image(image: Image, settings: PreprocessConfig, what: str = "image") -> None:
    """Bad files: empty arrays, NaN/inf values, the wrong number of dimensions (DataError)."""
    if image.array.size == 0 or 0 in image.array.shape:
        raise DataError(f"{what} is empty (shape {tuple(image.array.shape)})")
    if image.array.ndim not in (3, 4):
        raise DataError(
            f"{what} has {image.array.ndim - 1} spatial dimensions; medctl reads 2D and 3D images"
        )
    expected = expected_spatial_dims(settings)
    if expected is not None and image.spatial_dims != expected:
        why = (
            "data.preprocess.slices cuts volumes"
            if settings.slices
            else "data.preprocess.spatial_size/spacing"
        )
        raise DataError(
            f"{what} has {image.spatial_dims} spatial dimensions (shape {tuple(image.array.shape[1:])}), "
            f"expected {expected} ({why})"
        )
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise DataError(f"{what} contains NaN or infinite values")


def preprocess_image(image: Image, mask: Image | None, settings: PreprocessConfig) -> list[Processed]:
    """One image (+ mask) -> one processed array, or one per slice."""
    from monai.data import MetaTensor

    image = pick_volume(image, settings.volume_index)
    if mask is not None and mask.spatial_shape != image.spatial_shape:
        raise DataError(f"mask shape {mask.spatial_shape} differs from image shape {image.spatial_shape}")
    if mask is not None and mask.array.shape[0] != 1:
        raise DataError(f"mask has {mask.array.shape[0]} channels; a mask is one label map")
    n = image.spatial_dims
    affine = torch.as_tensor(_RAS_FLIP[n] @ image.affine())  # MONAI works in RAS
    dtype = np.float32 if settings.spacing else None  # only Spacing needs float; resize converts per channel
    img = MetaTensor(_as_tensor(image.array, dtype), affine=affine)
    msk = MetaTensor(_as_tensor(mask.array, dtype), affine=affine.clone()) if mask is not None else None
    img, msk = _geometry(img, msk, settings)
    if not settings.slices:
        img, msk = _resize(img, msk, settings)
        return [_finish(img, msk, _RAS_FLIP[n] @ img.affine.numpy(), -1, settings)]
    outputs = []
    axis = SLICE_AXES[settings.slices]
    volume_affine = _RAS_FLIP[3] @ img.affine.numpy()
    for k in slice_positions(img.shape[1 + axis], settings.slice_count):
        plane = _take(img, axis, k)
        plane_mask = _take(msk, axis, k) if msk is not None else None
        plane, plane_mask = _resize(plane, plane_mask, settings)
        embed = _slice_affine(volume_affine, axis, k, plane.affine.numpy())
        outputs.append(_finish(plane, plane_mask, embed, k, settings))
    return outputs


def _as_tensor(array: np.ndarray, dtype) -> torch.Tensor:
    """The array as a tensor, sharing memory where it can (read-only arrays, e.g. Pillow's, are copied)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def pick_volume(image: Image, index: int) -> Image:
    """Volume ``index`` of a multi-volume image (channels), or the image itself for ``index == -1``."""
    if index < 0:
        return image
    count = image.array.shape[0]
    if index >= count:
        raise DataError(
            f"image has {count} volume(s) along its 4th axis; data.preprocess.volume_index={index} is out of range "
            f"(0..{count - 1}, or -1 to keep all as channels)"
        )
    return replace(image, array=image.array[index : index + 1])


def slice_positions(length: int, count: int) -> list[int]:
    """``count`` indices evenly spaced and centred along an axis (the centre for one); all if fewer."""
    if count >= length:
        return list(range(length))
    return sorted({int((i + 1) * length / (count + 1)) for i in range(count)})


def _geometry(img, msk, settings: PreprocessConfig):
    from monai.transforms import Orientation, Spacing

    if settings.orientation:
        if img.ndim != 4:
            raise DataError('data.preprocess.orientation applies to 3D volumes; set it to "" for 2D images')
        orient = Orientation(axcodes=settings.orientation)
        img = orient(img)
        msk = orient(msk) if msk is not None else None
    if settings.spacing:
        if len(settings.spacing) != img.ndim - 1:
            raise DataError(
                f"data.preprocess.spacing has {len(settings.spacing)} values for a {img.ndim - 1}D image"
            )
        img = Spacing(pixdim=settings.spacing, mode="bilinear")(img)
        msk = Spacing(pixdim=settings.spacing, mode="nearest")(msk) if msk is not None else None
    return img, msk


def _resize(img, msk, settings: PreprocessConfig):
    from monai.data import MetaTensor
    from monai.transforms import ResizeWithPadOrCrop
    from monai.transforms.utils import scale_affine

    size = settings.spatial_size
    if not size:
        return img, msk
    if len(size) != img.ndim - 1:
        raise DataError(f"data.preprocess.spatial_size {size} does not fit a {img.ndim - 1}D image")
    if settings.spacing and not settings.slices:
        fill = float(img.min())
        img = ResizeWithPadOrCrop(size, mode="constant", value=fill)(img)
        msk = ResizeWithPadOrCrop(size, mode="constant", value=0)(msk) if msk is not None else None
        return img, msk
    affine = img.affine @ scale_affine(img.shape[1:], size, align_corners=False)
    resized = MetaTensor(resize_antialiased(img.as_tensor().numpy(), size), affine=affine)
    if msk is not None:
        msk = MetaTensor(resize_nearest(msk.as_tensor().numpy(), size), affine=affine.clone())
    return resized, msk


def resize_antialiased(array: np.ndarray, size: list[int]) -> torch.Tensor:
    """(C, *spatial) of any dtype -> (C, *size) float32, equal to MONAI ``Resize(size, anti_aliasing=True)``.

    Per channel: a float32 copy, smoothed in place along each downsampled axis with MONAI's erf
    Gaussian kernel (sigma = (factor - 1) / 2, truncated at 4 sigma, zeros outside) by
    ``scipy.ndimage.correlate1d`` (one line buffer, no padded copy), then trilinear/bilinear
    interpolation (``align_corners=False``). Peak: the source + one float32 channel + the output.
    """
    import scipy.ndimage as ndi
    from monai.networks.layers.convutils import gaussian_1d

    spatial = array.shape[1:]
    mode = "trilinear" if len(size) == 3 else "bilinear"
    channels = []
    for channel in array:
        x = np.array(channel, dtype=np.float32)  # (*spatial) float32 copy, smoothed in place
        for axis, (n_in, n_out) in enumerate(zip(spatial, size, strict=True)):
            if n_out >= n_in:
                continue
            sigma = (n_in / n_out - 1) / 2
            kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf").numpy()
            ndi.correlate1d(x, kernel, axis=axis, output=x, mode="constant", cval=0.0)
        out = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=list(size), mode=mode)
        channels.append(out[0, 0])  # (*size)
        del x
    return torch.stack(channels)  # (C, *size)


def resize_nearest(array: np.ndarray, size: list[int]) -> torch.Tensor:
    """(C, *spatial) label map -> (C, *size) float32 with PyTorch's "nearest-exact" index rule."""
    for axis, n_out in enumerate(size, start=1):
        n_in = array.shape[axis]
        index = np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
        array = np.take(array, index, axis=axis)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _take(tensor, axis: int, index: int):
    """A 2D slice as its own MetaTensor with an in-plane identity affine (tracked through resize)."""
    from monai.data import MetaTensor

    plane = tensor.as_tensor().select(1 + axis, index)  # (C, P, Q)
    return MetaTensor(plane.clone(), affine=torch.eye(3, dtype=torch.float64))


def _slice_affine(volume_affine: np.ndarray, axis: int, index: int, plane_affine: np.ndarray) -> np.ndarray:
    """(4, 3): slice pixel (p, q, 1) -> LPS world, through the volume's affine."""
    in_plane = [a for a in range(3) if a != axis]
    embed = np.zeros((4, 3))
    embed[in_plane[0]] = plane_affine[0]  # resized pixel -> pre-resize in-plane index
    embed[in_plane[1]] = plane_affine[1]
    embed[axis, 2] = index
    embed[3, 2] = 1.0
    return volume_affine @ embed


def _finish(img, msk, affine: np.ndarray, slice_index: int, settings: PreprocessConfig) -> Processed:
    from monai.transforms import (
        GaussianSmooth,
        NormalizeIntensity,
        ScaleIntensity,
        ScaleIntensityRangePercentiles,
    )

    x = img.as_tensor().float()  # (C, *spatial)
    if settings.unsharp:
        blurred = GaussianSmooth(sigma=settings.unsharp_sigma)(x)
        x = x + settings.unsharp_amount * (x - torch.as_tensor(blurred))
    if settings.intensity == "zscore":
        x = NormalizeIntensity(channel_wise=True)(x)
    elif settings.intensity == "percentile":
        low, high = settings.percentiles
        x = ScaleIntensityRangePercentiles(low, high, 0.0, 1.0, clip=True, channel_wise=True)(x)
    elif settings.intensity == "minmax":
        x = ScaleIntensity(minv=0.0, maxv=1.0, channel_wise=True)(x)
    array = torch.as_tensor(x).numpy().astype(settings.dtype)
    if not np.isfinite(array).all():
        raise DataError(
            "preprocessing produced NaN or infinite values (is the image constant or overflowing?)"
        )
    mask = None
    if msk is not None:
        labels = msk.as_tensor().float().round().clamp(0, 255)
        mask = labels.numpy().astype(np.uint8)
    return Processed(np.ascontiguousarray(array), mask, affine, slice_index)
