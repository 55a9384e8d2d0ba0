"""The views self-supervised pretraining learns from: halves, rotations, jigsaw puzzles, BYOL crops.

Pure batched torch functions on channel-first tensors, ``(B, C, H, W)`` slices or ``(B, C, D, H, W)``
volumes, usable inside a ``train_step`` on the training device. Randomness comes from ``generator``
(a ``torch.Generator``, for reproducible tests) or, when it is None, the global torch RNG that
training checkpoints save and restore. Gaussian blurs use MONAI's separable filtering.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import gaussian_1d, separable_filtering

# spatial dims of a (..., D, H, W) volume each plane rotates in; slices (..., H, W) use "axial"
PLANES = {"axial": (-2, -1), "coronal": (-3, -1), "sagittal": (-3, -2)}
JIGSAW_BLOCKS = 8  # a 2 x 2 x 2 split of the volume


# ------------------------------------------------------------------------------------- randomness
def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn from ``generator`` (or the global RNG), placed on ``device``."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``x``."""
    return values.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------- filtering
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of every spatial axis of ``x`` (B, C, *spatial), edges replicated."""
    if sigma <= 0:
        return x
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, normalize=True)  # sums to 1
    return separable_filtering(x, [kernel.to(x)] * (x.ndim - 2), mode="replicate")


def unsharp(x: torch.Tensor, sigma: float, amount: float) -> torch.Tensor:
    """Unsharp mask ``x + amount * (x - blur(x, sigma))``, sharpening edges; ``amount=0`` is identity."""
    if amount < 0 or sigma <= 0:
        raise ValueError(f"unsharp needs sigma > 0 and amount >= 0 (got {sigma}, {amount})")
    return x + amount * (x - gaussian_blur(x, sigma))


def photometric(
    x: torch.Tensor,
    *,
    intensity_jitter: float,
    noise_std: float,
    blur_prob: float,
    blur_sigma: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Intensity-only augmentation of (B, C, *spatial), nothing moves: per sample, a scale in
    ``[1 - j, 1 + j]`` and a shift in ``[-j, j]``, then a Gaussian blur with probability ``blur_prob``,
    then Gaussian noise of ``noise_std``."""
    batch = x.shape[0]
    scale = 1.0 + intensity_jitter * (2.0 * _rand((batch,), generator, x.device) - 1.0)
    shift = intensity_jitter * (2.0 * _rand((batch,), generator, x.device) - 1.0)
    out = x * _per_sample(scale, x) + _per_sample(shift, x)
    if blur_prob > 0 and blur_sigma > 0:
        blurred = _rand((batch,), generator, x.device) < blur_prob
        out = torch.where(_per_sample(blurred, x), gaussian_blur(out, blur_sigma), out)
    if noise_std > 0:
        out = out + noise_std * _randn(x.shape, generator, x.device)
    return out


def random_bias_field(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample's intensity above its minimum times a random smooth field, (B, C, *spatial) -> same.

    The field is ``exp(sum_k c_k * P_k)`` over the centred coordinates' monomials of degree 1 and 2 (a receive
    coil's profile; MONAI's ``RandBiasField`` draws the same family from Legendre polynomials, one sample at a
    time), ``c_k ~ U(-strength, strength)`` per sample. Two views then disagree on the bias field, so a volume's
    own field stops being a fingerprint that the views share.
    """
    batch, ndim = x.shape[0], x.ndim - 2
    ramps = _ramps(x)  # (ndim, *S)
    monomials = [*ramps] + [ramps[i] * ramps[j] for i in range(ndim) for j in range(i, ndim)]
    basis = torch.stack(monomials)  # (K, *S)
    coefficients = strength * (2.0 * _rand((batch, len(monomials)), generator, x.device) - 1.0)  # (B, K)
    log_field = torch.einsum("bk,k...->b...", coefficients.to(x.dtype), basis).unsqueeze(1)  # (B, 1, *S)
    floor = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)  # (B, 1, 1, ...)
    return floor + (x - floor) * log_field.exp()


# ------------------------------------------------------------------------------------------ halves
def split_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right halves of slices (B, C, H, W) -> two (B, C, H, W / 2); the right is not mirrored."""
    width = x.shape[-1]
    if width % 2:
        raise ValueError(
            f"slices of odd width {width} cannot be halved; use an even data.preprocess.spatial_size"
        )
    return x[..., : width // 2], x[..., width // 2 :]


def halves_views(
    x: torch.Tensor,
    *,
    unsharp_sigma: float,
    unsharp_amount: float,
    intensity_jitter: float,
    noise_std: float,
    blur_prob: float,
    blur_sigma: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mim_contrastive pair: unsharp mask on the whole slice, split into halves, then photometric
    augmentation of each half independently (no geometric change, so left/right stay aligned)."""
    if unsharp_amount > 0:
        x = unsharp(x, unsharp_sigma, unsharp_amount)
    left, right = split_halves(x)  # (B, C, H, W/2) each
    settings = dict(
        intensity_jitter=intensity_jitter, noise_std=noise_std, blur_prob=blur_prob, blur_sigma=blur_sigma
    )
    return photometric(left, **settings, generator=generator), photometric(
        right, **settings, generator=generator
    )


# --------------------------------------------------------------------------------------- rotations
def _plane_dims(x: torch.Tensor, plane: str | tuple[int, int]) -> tuple[int, int]:
    if not isinstance(plane, str):
        return plane
    if plane not in PLANES:
        raise ValueError(f"rotation plane {plane!r}: use one of {', '.join(PLANES)} or a pair of dims")
    if plane != "axial" and x.ndim < 4:
        raise ValueError(f"plane {plane!r} needs a volume (..., D, H, W); slices only rotate in 'axial'")
    return PLANES[plane]


def rotate_volume(x: torch.Tensor, k: int, plane: str | tuple[int, int] = "axial") -> torch.Tensor:
    """Rotate by ``k * 90`` degrees in ``plane`` ("axial" (H, W), "coronal" (D, W), "sagittal" (D, H))."""
    return torch.rot90(x, k, dims=_plane_dims(x, plane))


def random_rotation(
    x: torch.Tensor, *, plane: str | tuple[int, int] = "axial", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample of (B, C, *spatial) by a random multiple of 90 degrees; labels (B,) in 0..3."""
    dims = _plane_dims(x, plane)
    if x.shape[dims[0]] != x.shape[dims[1]]:
        raise ValueError(
            f"rotations in plane {plane} need equal sizes there (got {x.shape[dims[0]]} x {x.shape[dims[1]]}); "
            "use a square data.preprocess.spatial_size in that plane"
        )
    labels = (_rand((x.shape[0],), generator, x.device) * 4).long().clamp(max=3)  # (B,)
    out = x.clone()
    for k in (1, 2, 3):
        chosen = labels == k
        if chosen.any():
            out[chosen] = rotate_volume(x[chosen], k, dims)
    return out, labels


# ------------------------------------------------------------------------------------------ jigsaw
@functools.cache
def _jigsaw_table(k: int, seed: int) -> np.ndarray:
    perms = np.array(list(itertools.permutations(range(JIGSAW_BLOCKS))), dtype=np.int8)  # (40320, 8)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(perms)))]
    min_dist = (perms != perms[chosen[0]]).sum(axis=1)  # Hamming distance to the chosen set
    for _ in range(k - 1):
        best = np.flatnonzero(min_dist == min_dist.max())
        pick = int(rng.choice(best))
        chosen.append(pick)
        min_dist = np.minimum(min_dist, (perms != perms[pick]).sum(axis=1))
    return perms[chosen].astype(np.int64)


def jigsaw_permutations(k: int, seed: int) -> torch.Tensor:
    """K fixed permutations (K, 8) of the blocks of a 2x2x2 split, far apart in Hamming distance.

    Greedy max-min selection over all 8! permutations (Noroozi & Favaro, ECCV 2016): each new one
    maximises its smallest Hamming distance to those already chosen; ties are broken by ``seed``.
    """
    total = math.factorial(JIGSAW_BLOCKS)
    if not 2 <= k <= total:
        raise ValueError(f"pretrain.byol.jigsaw_permutations = {k}: must be between 2 and {total}")
    return torch.from_numpy(_jigsaw_table(k, seed).copy())


def _to_blocks(x: torch.Tensor) -> torch.Tensor:
    """(..., D, H, W) -> (..., 8, D/2, H/2, W/2), block b = 4 * d + 2 * h + w."""
    *lead, depth, height, width = x.shape
    if depth % 2 or height % 2 or width % 2:
        raise ValueError(
            f"jigsaw needs even D, H, W (got {depth}, {height}, {width}); adjust data.preprocess.spatial_size"
        )
    n = len(lead)
    x = x.reshape(*lead, 2, depth // 2, 2, height // 2, 2, width // 2)
    x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)
    return x.reshape(*lead, JIGSAW_BLOCKS, depth // 2, height // 2, width // 2)


def _from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`."""
    *lead, _, depth, height, width = blocks.shape
    n = len(lead)
    x = blocks.reshape(*lead, 2, 2, 2, depth, height, width)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5)
    return x.reshape(*lead, 2 * depth, 2 * height, 2 * width)


def random_jigsaw(
    x: torch.Tensor, perms: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle each volume of (B, C, D, H, W) by a random one of ``perms`` (K, 8); labels (B,) in 0..K-1."""
    labels = (_rand((x.shape[0],), generator, x.device) * len(perms)).long().clamp(max=len(perms) - 1)  # (B,)
    blocks = _to_blocks(x)  # (B, C, 8, d, h, w)
    order = perms.to(x.device)[labels]  # (B, 8)
    index = order[:, None, :, None, None, None].expand_as(blocks)
    return _from_blocks(blocks.gather(2, index)), labels


# -------------------------------------------------------------------------------------- BYOL views
@dataclass(frozen=True)
class ViewSettings:
    """How a BYOL view is drawn (``[pretrain.byol] view_*``): crop-resize, flips, a bias field, then
    :func:`photometric`."""

    crop_scale: tuple[float, float]  # share of the volume a crop keeps before resizing back
    flip_prob: float  # per spatial axis
    intensity_jitter: float  # scale in [1-j, 1+j], shift in [-j, j]
    noise_std: float
    blur_prob: float
    blur_sigma: float  # voxels
    bias_field: float = 0.0  # a random smooth field per view (:func:`random_bias_field`); 0: none


def byol_view(x: torch.Tensor, views: ViewSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of (B, C, *spatial), same shape: crop-resize, flips, then :func:`photometric`.

    The crop keeps a share ``s ~ U(views.crop_scale)`` of the volume (each axis ``s ** (1 / ndim)`` of its
    length) at a random place and resamples it back to the full size (one batched ``grid_sample``);
    each spatial axis is flipped with probability ``views.flip_prob``.
    """
    low, high = views.crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"pretrain.byol.view_crop_scale = {list(views.crop_scale)}: needs 0 < low <= high <= 1")
    batch, ndim = x.shape[0], x.ndim - 2
    share = low + (high - low) * _rand((batch,), generator, x.device)  # (B,)
    side = share ** (1.0 / ndim)  # (B,) fraction of each axis
    centre = (1.0 - side)[:, None] * (2.0 * _rand((batch, ndim), generator, x.device) - 1.0)  # (B, ndim)
    theta = torch.zeros(batch, ndim, ndim + 1, device=x.device, dtype=x.dtype)  # (B, ndim, ndim + 1)
    theta[:, range(ndim), range(ndim)] = side[:, None].to(x.dtype)
    theta[:, :, ndim] = centre.to(x.dtype)  # affine_grid orders axes (W, H[, D])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    for axis in range(2, x.ndim):
        flipped = _rand((batch,), generator, x.device) < views.flip_prob
        out = torch.where(_per_sample(flipped, out), out.flip(axis), out)
    if views.bias_field > 0:
        out = random_bias_field(out, views.bias_field, generator)
    return photometric(
        out,
        intensity_jitter=views.intensity_jitter,
        noise_std=views.noise_std,
        blur_prob=views.blur_prob,
        blur_sigma=views.blur_sigma,
        generator=generator,
    )


def byol_views(
    x: torch.Tensor, views: ViewSettings, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent :func:`byol_view` s of the same batch (B, C, *spatial), drawn with the same settings."""
    return byol_view(x, views, generator), byol_view(x, views, generator)


# --------------------------------------------------------------------------------- pretext shortcuts
def _ramps(x: torch.Tensor) -> torch.Tensor:
    """The centred linear coordinates of ``x``'s spatial grid, one per axis: (ndim, *spatial) in [-1, 1]."""
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in x.shape[2:]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *S)


def reorient_intensity(
    x: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Remove each sample's own linear intensity trend and put a random one in its place, (B, C, *S) -> same.

    The trend is the least-squares fit ``x ~ a + sum_i b_i * coord_i`` per sample and channel (a bias field's
    orientation, a brighter side near a receive coil); the new one has a uniformly random direction and a
    slope up to ``strength`` times the sample's std from one side to the centre. Rotations and block orders
    can then no longer be read off the global gradient, only off the anatomy.
    """
    batch, channels, ndim = x.shape[0], x.shape[1], x.ndim - 2
    ramps = _ramps(x).reshape(ndim, -1)  # (ndim, N), each zero-mean over the grid
    flat = x.reshape(batch, channels, -1)  # (B, C, N)
    slopes = flat @ ramps.T / (ramps * ramps).sum(dim=1)  # (B, C, ndim): the axes are orthogonal on the grid
    detrended = flat - slopes @ ramps  # (B, C, N)
    direction = F.normalize(_randn((batch, ndim), generator, x.device).to(x.dtype), dim=1)  # (B, ndim)
    size = (
        strength * _rand((batch, 1), generator, x.device).to(x.dtype) * flat.std(dim=(1, 2))[:, None]
    )  # (B, 1)
    trend = (size * direction) @ ramps  # (B, N)
    return (detrended + trend[:, None, :]).reshape(x.shape)
