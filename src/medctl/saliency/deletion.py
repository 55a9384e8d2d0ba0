"""Deletion curves: does the model need what the map points at? (faithfulness, in 2D and 3D)

The pointing game says where a map points; deletion (Petsiuk et al. 2018, "RISE"; Samek et al. 2017's
region perturbation) says whether the model's score depends on it. The input is cut into a grid of
patches (:data:`medctl.config.SaliencyConfig.deletion_grid` cells per axis, fewer where an axis is
shorter), the patches are ordered by their mean ``|map|``, and the most attributed ones are replaced,
in ``steps`` equal groups, by the image's per-channel mean. After each group the probability of the
explained class is recorded; the curve's area over the removed fraction [0, 1] is the deletion AUC.
Lower is more faithful: the evidence the map names goes first and the score falls fast.

A lone AUC means little (it depends on the model's confidence and the task), so it is read against
two baselines on the same sample: the same patches removed in a random order, and the order given by
the same method's map of the randomly re-initialised model, both scored with the trained model.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from medctl.saliency.attribution import ClassScores

BATCH = 16  # perturbed inputs per forward pass (a whole 16-step curve in two)


def patch_labels(spatial: tuple[int, ...], grid: int) -> np.ndarray:
    """``(*S)`` int array: the patch each voxel belongs to, ``min(grid, S_a)`` cells along axis ``a``."""
    cells = [min(grid, size) for size in spatial]
    index = np.meshgrid(
        *[np.arange(size) * count // size for size, count in zip(spatial, cells, strict=True)], indexing="ij"
    )  # per axis (*S): the cell along that axis
    return np.ravel_multi_index(index, cells)


def patch_order(attribution: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Patch indices by mean ``|attribution|``, highest first (ties in index order)."""
    magnitude = np.abs(np.nan_to_num(attribution, nan=0.0)).ravel()
    flat = labels.ravel()
    mean = np.bincount(flat, weights=magnitude) / np.maximum(np.bincount(flat), 1)  # (P,)
    return np.argsort(-mean, kind="stable")


def random_order(n_patches: int, sample_id: str) -> np.ndarray:
    """A permutation of the patches, seeded by the sample id (repeatable across runs and methods)."""
    return np.random.default_rng(zlib.crc32(sample_id.encode())).permutation(n_patches)


def deletion_curve(
    scores: ClassScores, x: torch.Tensor, labels: np.ndarray, order: np.ndarray, target: int, steps: int
) -> np.ndarray:
    """``(steps + 1,)`` probabilities of class ``target`` as the patches of ``order`` are replaced by the
    image's channel means in ``steps`` equal groups; ``x`` is ``(1, C, *S)``."""
    spatial_axes = tuple(range(2, x.ndim))
    fill = x.mean(dim=spatial_axes, keepdim=True).expand_as(x)  # (1, C, *S)
    n_patches = len(order)
    rank = np.empty(n_patches, dtype=np.int64)
    rank[order] = np.arange(n_patches)  # the position of each patch in the deletion order
    voxel_rank = torch.from_numpy(rank[labels]).to(x.device)  # (*S)
    cuts = [round(k * n_patches / steps) for k in range(steps + 1)]
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(cuts), BATCH):
            removed = torch.stack([voxel_rank < cut for cut in cuts[start : start + BATCH]])  # (b, *S)
            batch = torch.where(removed[:, None], fill, x)  # (b, C, *S)
            probabilities.append(scores.probabilities(scores(batch))[:, target].float().cpu())
    return torch.cat(probabilities).numpy()


def curve_area(curve: np.ndarray) -> float:
    """Trapezoidal area of a curve sampled at equal steps over [0, 1]."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(((curve[1:] + curve[:-1]) / 2).mean()) if len(curve) > 1 else float("nan")
