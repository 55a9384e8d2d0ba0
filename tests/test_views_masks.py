"""Property tests for the MIM mirror masks and the JEPA multi-block masks."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medctl.pretrain.masks import (
    apply_pixel_mask,
    mirror_masks,
    mirror_masks_batch,
    multiblock_masks,
    multiblock_masks_batch,
    patch_mask_to_pixels,
)

FAST = settings(max_examples=60, deadline=None)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- mirror masks
@FAST
@given(
    grid_h=st.integers(1, 14),
    grid_w=st.integers(1, 10),
    ratio=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**31),
)
def test_mirror_masks_count_uniqueness_and_anti_mirror_rule(grid_h, grid_w, ratio, seed):
    total = grid_h * grid_w
    count = round(ratio * total)
    if count < 1 or 2 * count > total:
        with pytest.raises(ValueError, match="mask_ratio"):
            mirror_masks(grid_h, grid_w, ratio, generator(seed))
        return
    left, right = mirror_masks(grid_h, grid_w, ratio, generator(seed))
    assert left.shape == right.shape == (grid_h, grid_w) and left.dtype == torch.bool
    assert int(left.sum()) == count and int(right.sum()) == count  # exactly round(ratio * G), each unique
    for r, c in itertools.product(range(grid_h), range(grid_w)):
        if left[r, c]:
            assert not right[r, grid_w - 1 - c]


@FAST
@given(ratio=st.floats(0.5001, 0.99), seed=st.integers(0, 1000))
def test_ratios_above_one_half_are_refused_with_the_key_to_change(ratio, seed):
    with pytest.raises(ValueError, match=r"pretrain.mim_contrastive.mask_ratio <= 0.5"):
        mirror_masks(12, 6, ratio, generator(seed))


def test_mirror_masks_on_the_192x96_halves_grid_vary_across_a_batch():
    left, right = mirror_masks_batch(8, 12, 6, 0.35, generator(0))
    assert (
        left.shape == (8, 12, 6)
        and (left.sum(dim=(1, 2)) == 25).all()
        and (right.sum(dim=(1, 2)) == 25).all()
    )
    assert not torch.equal(left[0], left[1])
    assert not (left & right.flip(-1)).any()
    again, _ = mirror_masks_batch(8, 12, 6, 0.35, generator(0))
    assert torch.equal(left, again)


def test_patch_mask_to_pixels_and_applying_it():
    mask = torch.tensor([[True, False], [False, True]])
    pixels = patch_mask_to_pixels(mask, 3)
    assert (
        pixels.shape == (6, 6) and pixels[:3, :3].all() and not pixels[:3, 3:].any() and pixels[3:, 3:].all()
    )
    volume = patch_mask_to_pixels(torch.ones(2, 1, 2, 3, dtype=torch.bool), (2, 4, 4))
    assert volume.shape == (2, 2, 8, 12)
    image = torch.ones(1, 2, 6, 6)
    masked = apply_pixel_mask(image, pixels[None], fill=-1.0)
    assert (masked[:, :, :3, :3] == -1).all() and (masked[:, :, :3, 3:] == 1).all()


# ---------------------------------------------------------------------------------------- multiblock
def box_of(indices: torch.Tensor, grid: tuple[int, int, int]) -> tuple[int, ...] | None:
    """The (t, h, w) extent if ``indices`` fill a box completely, else None."""
    _, height, width = grid
    t, rem = indices // (height * width), indices % (height * width)
    h, w = rem // width, rem % width
    extent = tuple(int(a.max() - a.min() + 1) for a in (t, h, w))
    return extent if extent[0] * extent[1] * extent[2] == len(indices) == len(set(indices.tolist())) else None


@FAST
@given(
    grid=st.tuples(st.integers(1, 6), st.integers(2, 10), st.integers(2, 10)),
    n_blocks=st.integers(1, 4),
    low=st.floats(0.02, 0.3),
    span=st.floats(0.0, 0.2),
    aspect=st.tuples(st.floats(0.5, 1.0), st.floats(1.0, 2.0)),
    depth_low=st.floats(0.3, 1.0),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_multiblock_targets_are_boxes_disjoint_from_a_collatable_context(
    grid, n_blocks, low, span, aspect, depth_low, batch, seed
):
    total = grid[0] * grid[1] * grid[2]
    try:
        context, targets = multiblock_masks_batch(
            batch, grid, n_blocks, (low, low + span), aspect, generator(seed), depth_scale=(depth_low, 1.0)
        )
    except ValueError as exc:  # blocks that cover the whole grid are refused, naming the settings
        assert "mask_blocks" in str(exc)
        return
    assert context.shape[0] == batch and len(targets) == n_blocks
    for i in range(batch):
        ctx = context[i]
        assert (
            len(ctx) >= 1 and (ctx.diff() > 0).all() and 0 <= ctx.min() and ctx.max() < total
        )  # sorted, unique
        target_union = set()
        for target in targets:
            assert target.shape[0] == batch
            shape = box_of(target[i], grid)
            assert shape is not None and shape[0] >= max(1, round(depth_low * grid[0])) - 1
            target_union |= set(target[i].tolist())
        assert not target_union & set(ctx.tolist())  # context and targets never overlap
    # every sample's i-th block has the same shape (sizes are drawn once per batch)
    for target in targets:
        assert len({box_of(target[i], grid) for i in range(batch)}) == 1


def test_single_sample_multiblock_with_full_depth_blocks_and_2d_grids():
    context, targets = multiblock_masks((4, 8, 8), 4, (0.1, 0.2), (0.75, 1.5), generator(1))
    assert len(targets) == 4 and all(box_of(t, (4, 8, 8))[0] == 4 for t in targets)  # V-JEPA: whole depth
    covered = set(itertools.chain.from_iterable(t.tolist() for t in targets))
    assert set(context.tolist()) == set(range(256)) - covered  # a single sample keeps its whole context
    flat_context, flat_targets = multiblock_masks((8, 8), 2, (0.1, 0.2), (0.75, 1.5), generator(1))
    assert flat_context.max() < 64 and all(box_of(t, (1, 8, 8)) for t in flat_targets)
    with pytest.raises(ValueError, match="mask_block_scale"):
        multiblock_masks((4, 8, 8), 2, (0.3, 0.1), (0.75, 1.5))
    with pytest.raises(ValueError, match="lower pretrain.jepa.mask_blocks"):
        multiblock_masks((1, 2, 2), 4, (1.0, 1.0), (1.0, 1.0), generator(0))
