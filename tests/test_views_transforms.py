"""Halves, photometric jitter, rotations, jigsaw puzzles and BYOL views."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medctl.pretrain.views import (
    ViewSettings,
    byol_view,
    byol_views,
    gaussian_blur,
    halves_views,
    jigsaw_permutations,
    photometric,
    random_bias_field,
    random_jigsaw,
    random_rotation,
    rotate_volume,
    split_halves,
    unsharp,
)

NO_PHOTOMETRIC = dict(intensity_jitter=0.0, noise_std=0.0, blur_prob=0.0, blur_sigma=0.0)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ halves
def test_split_halves_cuts_the_width_in_two(seed):
    x = torch.randn(2, 1, 8, 12)  # (B, C, H, W)
    left, right = split_halves(x)
    assert left.shape == right.shape == (2, 1, 8, 6)
    assert torch.equal(torch.cat([left, right], dim=-1), x)
    with pytest.raises(ValueError, match="odd width"):
        split_halves(torch.zeros(1, 1, 4, 5))


def test_unsharp_sharpens_edges_and_leaves_flat_regions(seed):
    flat = torch.full((1, 1, 8, 8), 3.0)
    assert torch.allclose(unsharp(flat, 1.0, 2.0), flat)
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    sharpened = unsharp(step, 1.0, 1.0)
    assert sharpened[..., 4].mean() > 1.0 and sharpened[..., 3].mean() < 0.0  # overshoot on both sides
    assert torch.equal(unsharp(step, 1.0, 0.0), step)
    blurred = gaussian_blur(step, 1.0)
    assert 0 < blurred[..., 3].mean() < blurred[..., 4].mean() < 1


def test_photometric_changes_intensities_only_and_follows_the_generator(seed):
    x = torch.rand(3, 1, 8, 8)
    settings_ = dict(intensity_jitter=0.3, noise_std=0.0, blur_prob=0.0, blur_sigma=0.0)
    out = photometric(x, **settings_, generator=generator(0))
    for i in range(3):  # each sample is an affine function of itself: no pixel moved
        a, b = torch.linalg.lstsq(
            torch.stack([x[i].flatten(), torch.ones(64)], 1), out[i].flatten()[:, None]
        ).solution
        assert torch.allclose(a * x[i] + b, out[i], atol=1e-5) and abs(a.item() - 1) <= 0.3
    assert torch.equal(out, photometric(x, **settings_, generator=generator(0)))
    noisy = photometric(
        x, intensity_jitter=0.0, noise_std=0.1, blur_prob=1.0, blur_sigma=1.0, generator=generator(1)
    )
    assert 0.05 < (noisy - gaussian_blur(x, 1.0)).std() < 0.15


def test_halves_views_augment_each_half_independently(seed):
    x = torch.rand(2, 1, 16, 16)
    left, right = halves_views(
        x,
        unsharp_sigma=1.0,
        unsharp_amount=0.5,
        intensity_jitter=0.2,
        noise_std=0.01,
        blur_prob=0.0,
        blur_sigma=1.0,
    )
    assert left.shape == right.shape == (2, 1, 16, 8)
    plain_left, plain_right = halves_views(x, unsharp_sigma=1.0, unsharp_amount=0.0, **NO_PHOTOMETRIC)
    assert torch.equal(plain_left, x[..., :8]) and torch.equal(plain_right, x[..., 8:])


# --------------------------------------------------------------------------------------- rotations
def test_rotations_in_each_plane_invert_and_labels_say_which(seed):
    x = torch.randn(5, 1, 4, 6, 6)  # (B, C, D, H, W)
    assert torch.equal(rotate_volume(rotate_volume(x, 1, "axial"), 3, "axial"), x)
    assert rotate_volume(x, 1, "coronal").shape == (5, 1, 6, 6, 4)
    rotated, labels = random_rotation(x, generator=generator(3))
    assert labels.shape == (5,) and labels.dtype == torch.long and ((labels >= 0) & (labels <= 3)).all()
    for i in range(5):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(labels[i]), dims=(-2, -1)))
    cube = torch.randn(3, 1, 4, 4, 4)
    rotated, labels = random_rotation(cube, plane="sagittal", generator=generator(4))
    assert all(torch.equal(rotated[i], rotate_volume(cube[i], int(labels[i]), "sagittal")) for i in range(3))
    slices, _ = random_rotation(torch.randn(2, 1, 8, 8))
    assert slices.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="square"):
        random_rotation(torch.randn(2, 1, 4, 6, 8))


# ------------------------------------------------------------------------------------------ jigsaw
def hamming(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_jigsaw_permutations_are_valid_distinct_and_far_apart(k, seed):
    perms = jigsaw_permutations(k, seed)
    assert perms.shape == (k, 8) and perms.dtype == torch.long
    for row in perms:
        assert sorted(row.tolist()) == list(range(8))
    distances = [hamming(a, b) for a, b in itertools.combinations(perms, 2)]
    assert min(distances) >= (8 if k <= 8 else 6)  # greedy max-min: maximal spread for small k
    assert torch.equal(perms, jigsaw_permutations(k, seed))  # fixed for a seed


def apply_jigsaw(x: torch.Tensor, perm) -> torch.Tensor:
    """Reference, by slicing: output block ``b`` of the 2x2x2 split (b = 4 * d + 2 * h + w) is input block ``perm[b]``."""
    d, h, w = (size // 2 for size in x.shape[-3:])

    def block(b: int) -> tuple[slice, ...]:
        i, j, k = b // 4, b // 2 % 2, b % 2
        return (..., slice(i * d, (i + 1) * d), slice(j * h, (j + 1) * h), slice(k * w, (k + 1) * w))

    out = torch.empty_like(x)
    for b, source in enumerate(perm):
        out[block(b)] = x[block(int(source))]
    return out


def test_jigsaw_moves_whole_blocks_and_random_jigsaw_labels_the_permutation(seed):
    x = torch.arange(2 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 1, 4, 6, 8)  # (B, C, D, H, W)
    assert torch.equal(apply_jigsaw(x, list(range(8))), x)
    perm = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    shuffled = apply_jigsaw(x, perm)
    # block 0 (front-top-left) of the output is the input's block 7 (back-bottom-right)
    assert torch.equal(shuffled[..., :2, :3, :4], x[..., 2:, 3:, 4:])
    inverse = torch.argsort(perm)
    assert torch.equal(apply_jigsaw(shuffled, inverse), x)
    perms = jigsaw_permutations(6, 0)
    puzzles, labels = random_jigsaw(x, perms, generator=generator(2))
    for i in range(2):
        assert torch.equal(puzzles[i], apply_jigsaw(x[i], perms[labels[i]]))
    with pytest.raises(ValueError, match="even"):
        random_jigsaw(torch.zeros(1, 1, 3, 4, 4), perm[None])


# -------------------------------------------------------------------------------------- BYOL views
BYOL = ViewSettings(
    crop_scale=(0.4, 1.0), flip_prob=0.5, intensity_jitter=0.2, noise_std=0.05, blur_prob=0.5, blur_sigma=1.0
)


def plain_view(crop_scale: tuple[float, float], flip_prob: float) -> ViewSettings:
    """A crop and flips only: no photometric change."""
    return ViewSettings(crop_scale, flip_prob, **NO_PHOTOMETRIC)


def test_byol_views_keep_the_shape_differ_and_repeat_with_a_generator(seed):
    x = torch.randn(3, 1, 8, 16, 16)  # (B, C, D, H, W)
    one, two = byol_views(x, BYOL, generator(0))
    assert one.shape == two.shape == x.shape and torch.isfinite(one).all()
    assert not torch.allclose(one, two)
    again, _ = byol_views(x, BYOL, generator(0))
    assert torch.equal(one, again)
    flat = byol_view(torch.randn(2, 1, 16, 16), BYOL)  # 2D slices too
    assert flat.shape == (2, 1, 16, 16)


def test_a_full_crop_without_flips_or_jitter_is_the_identity(seed):
    x = torch.randn(2, 1, 4, 8, 8)
    same = byol_view(x, plain_view((1.0, 1.0), 0.0))
    assert torch.allclose(same, x, atol=1e-5)
    flipped = byol_view(x, plain_view((1.0, 1.0), 1.0))
    assert torch.allclose(flipped, x.flip(2, 3, 4), atol=1e-5)


def test_a_small_crop_zooms_in(seed):
    x = torch.zeros(1, 1, 8, 8, 8)
    x[..., 2:6, 2:6, 2:6] = 1.0  # a bright cube in the middle
    zoomed = byol_view(x, plain_view((0.125, 0.125), 0.0), generator(0))
    assert zoomed.mean() > x.mean()  # half of each axis, resized back: the cube fills more of the view
    with pytest.raises(ValueError, match="view_crop_scale"):
        byol_view(x, plain_view((0.0, 1.0), 0.0))


def test_random_bias_field_is_a_smooth_positive_field_that_differs_per_view(seed):
    x = torch.rand(2, 1, 8, 16, 16) + 0.5  # (B, C, D, H, W), all above the background
    floor = x.amin(dim=(1, 2, 3, 4), keepdim=True)
    view_a, view_b = (random_bias_field(x, 0.3, generator(s)) for s in (seed, seed + 1))
    field_a, field_b = (((view - floor) / (x - floor)).log() for view in (view_a, view_b))
    inside = (x - floor) > 0.1  # the ratio is ill-defined at the minimum itself
    assert view_a.shape == x.shape
    assert torch.allclose(view_a.amin(dim=(1, 2, 3, 4), keepdim=True), floor)  # the background stays put
    # a quadratic in each axis: neighbouring voxels differ by far less than the field's range
    both = inside[..., 1:] & inside[..., :-1]
    assert (field_a[..., 1:] - field_a[..., :-1])[both].abs().max() < 0.2
    assert field_a[inside].std() > 0.05 and (field_a - field_b)[inside].abs().mean() > 0.05
    assert torch.equal(random_bias_field(x, 0.3, generator(seed)), view_a)  # the generator decides
    biased = byol_view(x, dataclasses.replace(plain_view((1.0, 1.0), 0.0), bias_field=0.3), generator(seed))
    assert not torch.allclose(biased, x, atol=1e-2)  # the view setting reaches the view
