"""``[train.augment]``: MONAI array transforms applied on the fly to cached training images, 2D and 3D alike.

Order: random crop (keeping at least ``crop_scale`` of each axis) resized back to the cached size, flips
per listed axis, small rotations, intensity scale and shift, Gaussian blur, Gaussian noise. Each
transform is MONAI's (``RandSpatialCrop`` + ``Resize``, ``RandFlip``, ``RandRotate``,
``RandScaleIntensity`` / ``RandShiftIntensity``, ``RandGaussianSmooth``, ``RandGaussianNoise``); medctl
only chooses them from the config and seeds them.

Seeding: MONAI transforms draw from their own ``RandomState``, which checkpoints do not capture. So the
stage calls :meth:`ImageAugment.set_epoch` at the start of every epoch (the draws of epoch ``e`` depend
only on ``(seed, e)``, which keeps resumed runs identical), and inside DataLoader workers each worker
reseeds from its own torch seed, so workers never repeat each other's draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Identity,
    OneOf,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandRotate,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
)
from torch.utils.data import get_worker_info

from medctl.config import AugmentConfig
from medctl.errors import ConfigError

MAX_SEED = 2**32


class ImageAugment:
    """Random transforms of ``item["image"]`` (C, *spatial); a CacheDataset ``transform``.

    ``transforms`` is a MONAI ``Compose`` over channel-first tensors; the other keys of the item pass
    through unchanged (labels, id).
    """

    def __init__(self, transforms: Compose, seed: int):
        self.transforms = transforms
        self.seed = int(seed)
        self._worker_seed: int | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch``: the same (seed, epoch) always gives the same draws (in-process loading)."""
        self.transforms.set_random_state(seed=(self.seed * 1_000_003 + epoch) % MAX_SEED)
        self._worker_seed = None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        worker = get_worker_info()
        if worker is not None and self._worker_seed != worker.seed:  # a fresh worker: its own stream
            self.transforms.set_random_state(seed=worker.seed % MAX_SEED)
            self._worker_seed = worker.seed
        image = self.transforms(item["image"])  # (C, *spatial)
        if isinstance(image, MetaTensor):
            image = image.as_tensor()
        return {**item, "image": torch.as_tensor(image, dtype=torch.float32).contiguous()}


def build_augment(settings: AugmentConfig, spatial_size: Sequence[int], seed: int) -> ImageAugment | None:
    """The transforms ``settings`` asks for on images of ``spatial_size``, or None when disabled or empty."""
    if not settings.enabled:
        return None
    dims = len(spatial_size)
    check_augment(settings, dims)
    size = [int(s) for s in spatial_size]
    transforms: list[Any] = []
    if settings.crop_scale < 1.0:
        smallest = [max(1, math.ceil(s * settings.crop_scale)) for s in size]
        crop = Compose(
            [RandSpatialCrop(smallest, max_roi_size=size, random_size=True), Resize(size, mode="area")]
        )
        transforms.append(OneOf([crop, Identity()], weights=[settings.crop_prob, 1.0 - settings.crop_prob]))
    for axis in sorted(set(settings.flip_axes)):
        transforms.append(RandFlip(prob=settings.flip_prob, spatial_axis=axis))
    if settings.rotate_degrees > 0:
        angle = math.radians(settings.rotate_degrees)
        ranges = {"range_x": angle} if dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
        transforms.append(
            RandRotate(**ranges, prob=settings.rotate_prob, keep_size=True, padding_mode="border")
        )
    if settings.intensity_jitter > 0:
        jitter = settings.intensity_jitter
        transforms.append(RandScaleIntensity(factors=jitter, prob=settings.intensity_prob))
        transforms.append(RandShiftIntensity(offsets=jitter, prob=settings.intensity_prob))
    if settings.blur_sigma > 0:
        sigma = (settings.blur_sigma / 2, settings.blur_sigma)
        transforms.append(
            RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=settings.blur_prob)
        )
    if settings.noise_std > 0:
        transforms.append(RandGaussianNoise(prob=settings.noise_prob, std=settings.noise_std))
    if not transforms:
        return None
    return ImageAugment(Compose(transforms), seed)


def check_augment(settings: AugmentConfig, spatial_dims: int) -> None:
    """Reject flip axes that the images do not have (every problem at once)."""
    bad = [axis for axis in settings.flip_axes if not 0 <= axis < spatial_dims]
    if bad:
        axes = "0 (D), 1 (H), 2 (W)" if spatial_dims == 3 else "0 (H), 1 (W)"
        raise ConfigError(
            [
                f"`train.augment.flip_axes` = {settings.flip_axes}: {spatial_dims}D images have spatial axes {axes}"
            ]
        )
