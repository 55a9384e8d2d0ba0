"""Masks for masked-image modelling (mim_contrastive) and JEPA.

- :func:`mirror_masks`: patch masks for the left and right halves of a slice, each masking exactly
  ``round(ratio * gh * gw)`` patches, with the anti-mirror rule: where the left half is masked at
  ``(r, c)`` the right half is visible at its mirror image ``(r, gw - 1 - c)``, so every masked region
  has its anatomical counterpart in view on the other side.
- :func:`multiblock_masks`: V-JEPA style multi-block masks on a (T, H, W) token grid: target blocks are
  contiguous boxes, the context is every token outside them. Tokens are numbered row-major,
  ``t * H * W + h * W + w``, as a ViT flattens its patch grid.

Randomness comes from ``generator`` (a ``torch.Generator``) or, when None, the global torch RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _rand(shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator)


# ----------------------------------------------------------------------------------- mirrored masks
def masked_patch_count(grid_h: int, grid_w: int, ratio: float) -> int:
    """``round(ratio * gh * gw)`` after checking the anti-mirror rule can hold (at most half masked)."""
    total = grid_h * grid_w
    count = round(ratio * total)
    if ratio > 0.5 or 2 * count > total:
        raise ValueError(
            f"mask_ratio {ratio} masks {count} of {total} patches per half, but the anti-mirror rule needs the "
            "left mask and the mirrored right mask to be disjoint; set pretrain.mim_contrastive.mask_ratio <= 0.5"
        )
    if count < 1:
        raise ValueError(
            f"mask_ratio {ratio} masks no patch of a {grid_h} x {grid_w} grid; raise pretrain.mim_contrastive.mask_ratio "
            "or lower pretrain.mim_contrastive.patch_size"
        )
    return count


def mirror_masks_batch(
    batch: int, grid_h: int, grid_w: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent :func:`mirror_masks` for ``batch`` slices: two bool (B, gh, gw) masks."""
    count = masked_patch_count(grid_h, grid_w, ratio)
    total = grid_h * grid_w
    order = _rand((batch, total), generator).argsort(dim=1)  # (B, G) a random permutation per slice
    left = torch.zeros(batch, total, dtype=torch.bool)
    left.scatter_(1, order[:, :count], True)
    right_mirrored = torch.zeros(batch, total, dtype=torch.bool)  # the right mask seen in a mirror
    right_mirrored.scatter_(1, order[:, count : 2 * count], True)  # disjoint from the left mask
    right = right_mirrored.reshape(batch, grid_h, grid_w).flip(-1)
    return left.reshape(batch, grid_h, grid_w), right


def mirror_masks(
    grid_h: int, grid_w: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (gh, gw) masks for the left and right half (True = masked); e.g. 16x16 patches on 192x96
    halves make a 12x6 grid. Raises when ``ratio`` makes the anti-mirror rule impossible (> 0.5)."""
    left, right = mirror_masks_batch(1, grid_h, grid_w, ratio, generator)
    return left[0], right[0]


def patch_mask_to_pixels(mask: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Blow a patch mask up to pixels: (..., gh, gw) -> (..., gh * p, gw * p).

    An int patch size applies to the last two axes; a sequence gives one size per trailing axis
    (e.g. ``(2, 16, 16)`` for a (..., gt, gh, gw) token mask).
    """
    sizes = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    out = mask
    for offset, size in enumerate(sizes):
        out = out.repeat_interleave(size, dim=mask.ndim - len(sizes) + offset)
    return out


def apply_pixel_mask(x: torch.Tensor, pixel_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Replace the masked pixels of (B, C, *spatial) by ``fill``; ``pixel_mask`` is bool (B, *spatial)."""
    return x.masked_fill(pixel_mask.unsqueeze(1).to(x.device), fill)


# ------------------------------------------------------------------------------------ JEPA multiblock
def _check_range(name: str, values: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(values) != 2 or not low < values[0] <= values[1] <= high:
        raise ValueError(f"pretrain.{name} = {list(values)}: needs two numbers a <= b in ({low}, {high}]")
    return float(values[0]), float(values[1])


def _block_shape(
    grid: tuple[int, int, int],
    block_scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    depth_scale: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int]:
    """A (t, h, w) box of about ``scale * T * H * W`` tokens, ``h / w ~ aspect``, ``t ~ depth_scale * T``."""
    depth, height, width = grid
    u_scale, u_aspect, u_depth = _rand((3,), generator).tolist()
    scale = block_scale[0] + (block_scale[1] - block_scale[0]) * u_scale
    log_low, log_high = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    aspect = math.exp(log_low + (log_high - log_low) * u_aspect)
    t = min(depth, max(1, round((depth_scale[0] + (depth_scale[1] - depth_scale[0]) * u_depth) * depth)))
    area = scale * depth * height * width / t  # tokens per slice of the block
    h = min(height, max(1, round(math.sqrt(area * aspect))))
    w = min(width, max(1, round(math.sqrt(area / aspect))))
    return t, h, w


def _box_indices(start: Sequence[int], shape: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Sorted flat indices of the box at ``start`` of ``shape`` in a (T, H, W) grid."""
    axes = [torch.arange(s, s + n) for s, n in zip(start, shape, strict=True)]
    t, h, w = torch.meshgrid(*axes, indexing="ij")
    return (t * grid[1] * grid[2] + h * grid[2] + w).reshape(-1)


def multiblock_masks_batch(
    batch: int,
    grid: Sequence[int],
    n_blocks: int,
    block_scale: Sequence[float],
    aspect_ratio: Sequence[float],
    generator: torch.Generator | None = None,
    *,
    depth_scale: Sequence[float] = (1.0, 1.0),
    min_context: int = 1,
    max_tries: int = 20,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Collate-ready JEPA masks: context (B, Nc) and ``n_blocks`` target index tensors (B, Nt).

    Block sizes are drawn once per batch (so every sample has the same target counts), positions per
    sample. Each sample's context is every token outside its targets; contexts are cut to the
    batch's smallest by a random subset, kept in ascending order. A 2-d grid (H, W) is (1, H, W).
    """
    grid3 = (1, *grid) if len(grid) == 2 else tuple(grid)
    if len(grid3) != 3 or min(grid3) < 1:
        raise ValueError(f"token grid {tuple(grid)}: needs (T, H, W) or (H, W) positive sizes")
    if n_blocks < 1:
        raise ValueError(f"pretrain.jepa.mask_blocks = {n_blocks}: needs at least one target block")
    scale = _check_range("mask_block_scale", block_scale, 0.0, 1.0)
    aspect = _check_range("mask_aspect_ratio", aspect_ratio, 0.0, math.inf)
    depth = _check_range("mask_depth_scale", depth_scale, 0.0, 1.0)
    total = math.prod(grid3)
    shapes = [_block_shape(grid3, scale, aspect, depth, generator) for _ in range(n_blocks)]

    contexts, targets = [], []
    for _ in range(batch):
        for _ in range(max_tries):
            blocks = []
            for shape in shapes:
                start = [
                    int(_rand((1,), generator).item() * (g - s + 1))
                    for g, s in zip(grid3, shape, strict=True)
                ]
                blocks.append(_box_indices(start, shape, grid3))
            visible = torch.ones(total, dtype=torch.bool)
            for block in blocks:
                visible[block] = False
            if int(visible.sum()) >= min_context:
                break
        else:
            raise ValueError(
                f"{n_blocks} target blocks of shapes {shapes} leave fewer than {min_context} context tokens of the "
                f"{grid3} grid; lower pretrain.jepa.mask_blocks or pretrain.jepa.mask_block_scale"
            )
        contexts.append(torch.nonzero(visible).squeeze(1))
        targets.append(blocks)

    keep = min(len(c) for c in contexts)
    contexts = [c[_rand((len(c),), generator).argsort()[:keep].sort().values] for c in contexts]
    context = torch.stack(contexts)  # (B, Nc)
    target_list = [
        torch.stack([sample[i] for sample in targets]) for i in range(n_blocks)
    ]  # n_blocks x (B, Nt_i)
    return context, target_list


def multiblock_masks(
    grid: Sequence[int],
    n_blocks: int,
    block_scale: Sequence[float],
    aspect_ratio: Sequence[float],
    generator: torch.Generator | None = None,
    *,
    depth_scale: Sequence[float] = (1.0, 1.0),
    min_context: int = 1,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One sample's JEPA masks: context indices (Nc,) and ``n_blocks`` target index tensors (Nt_i,).

    Targets are contiguous (t, h, w) boxes covering a share ``U(block_scale)`` of the grid each, with
    ``h / w`` log-uniform in ``aspect_ratio`` and depth a share ``U(depth_scale)`` of T (V-JEPA: the
    full depth); the context excludes every target token.
    """
    context, targets = multiblock_masks_batch(
        1,
        grid,
        n_blocks,
        block_scale,
        aspect_ratio,
        generator,
        depth_scale=depth_scale,
        min_context=min_context,
    )
    return context[0], [target[0] for target in targets]
