"""Scores for attribution maps against ground-truth masks, and the model-randomisation sanity check.

- Pointing game (Zhang et al. 2016): does the peak of ``|map|`` fall inside the mask (optionally grown by
  a tolerance of a few voxels)? Reported with the grown mask's share of the volume, the hit rate of a
  uniformly random peak (chance level).
- Mass in mask: the share of the map's positive attribution that lies inside the mask; chance is again
  the mask's share.
- Model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): maps from a copy of the
  classifier whose heads and last encoder block are re-initialised should differ from the trained
  model's; the Spearman rank correlation of ``|map|`` before and after is reported (low is good).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

from medctl.errors import RunFailure


def pointing_game(attribution: np.ndarray, mask: np.ndarray, *, tolerance: int = 0) -> bool | None:
    """True when the voxel of largest ``|attribution|`` lies in ``mask`` grown by ``tolerance`` voxels.

    None when the mask is empty or the map has no non-zero value (no peak to point with).
    """
    _check_shapes(attribution, mask)
    inside = grown_mask(mask, tolerance)
    magnitude = np.abs(np.nan_to_num(attribution, nan=0.0))
    if not inside.any() or not magnitude.any():
        return None
    return bool(inside[peak_voxel(magnitude)])


def peak_voxel(magnitude: np.ndarray) -> tuple[int, ...]:
    """The index of the largest value; where several voxels tie for it (the flat border of a coarse map
    upsampled with clamped edges), the tied voxel nearest their centroid, not the first in memory order."""
    tied = np.argwhere(magnitude >= magnitude.max())  # (n, ndim)
    if len(tied) == 1:
        return tuple(int(i) for i in tied[0])
    nearest = np.argmin(((tied - tied.mean(axis=0)) ** 2).sum(axis=1))
    return tuple(int(i) for i in tied[nearest])


def pointing_chance(mask: np.ndarray, *, tolerance: int = 0) -> float:
    """Hit rate of a peak placed uniformly at random: the grown mask's share of the volume."""
    return mask_share(grown_mask(mask, tolerance))


def grown_mask(mask: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """The mask as booleans, dilated by ``tolerance`` voxels (full connectivity: a cube per step)."""
    inside = np.asarray(mask) > 0
    if tolerance > 0 and inside.any():
        structure = ndimage.generate_binary_structure(inside.ndim, inside.ndim)
        inside = ndimage.binary_dilation(inside, structure=structure, iterations=int(tolerance))
    return inside


def mass_in_mask(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive attribution inside the mask, in [0, 1]; NaN when nothing is positive."""
    _check_shapes(attribution, mask)
    positive = np.clip(np.nan_to_num(attribution, nan=0.0), 0, None).astype(np.float64)
    total = positive.sum()
    if total <= 0:
        return math.nan
    return float(positive[np.asarray(mask) > 0].sum() / total)


def mask_share(mask: np.ndarray) -> float:
    """Fraction of the volume inside the mask: chance level for both scores above."""
    mask = np.asarray(mask)
    return float((mask > 0).sum() / mask.size) if mask.size else math.nan


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of ``|a|`` and ``|b|`` over all voxels; NaN when either map is constant."""
    _check_shapes(a, b)
    x, y = np.abs(np.ravel(a)), np.abs(np.ravel(b))
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def randomised_copy(
    classifier: nn.Module, *, example: torch.Tensor | None = None, seed: int = 0
) -> tuple[nn.Module, list[str]]:
    """A deep copy with re-initialised heads and last encoder block, and the names of what was reset.

    Re-initialised, each through its modules' own ``reset_parameters`` (``_reset_parameters`` for
    ``nn.MultiheadAttention``): every head, the encoder's ``gradcam_layer``, and :func:`last_block` --
    with an ``example`` input ``(1, C, *S)``, the last block that actually runs in the forward pass (a
    UNet's decoder does not, for classification). The global random state is left as it was.
    """
    model = copy.deepcopy(classifier)
    encoder = model.encoder
    parts: dict[str, nn.Module] = {"heads": model.heads, "encoder.gradcam_layer": encoder.gradcam_layer}
    last = last_block(model, example)
    if last is not None:
        parts[last[0]] = last[1]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    reset: list[str] = []
    seen: set[int] = set()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, part in parts.items():
            for sub_name, module in part.named_modules():
                method = getattr(module, "reset_parameters", None) or getattr(
                    module, "_reset_parameters", None
                )
                if id(module) in seen or not callable(method):
                    continue
                seen.add(id(module))
                method()
                reset.append(f"{name}.{sub_name}".rstrip("."))
    if not reset:
        raise RunFailure(
            "randomisation check: no module under the heads or encoder.gradcam_layer has reset_parameters; "
            "set saliency.randomisation_check = false"
        )
    return model, reset


def last_block(classifier: nn.Module, example: torch.Tensor | None = None) -> tuple[str, nn.Module] | None:
    """``(name, block)``: the encoder block nearest the output, or None (CNNs: their gradcam_layer is).

    Blocks are the entries of the encoder's ``nn.ModuleList``s of two or more modules of one type that
    hold parameters (a ViT's ``blocks``, a ``TransformerEncoder``'s ``layers``). With ``example`` the
    last one to finish in a forward pass wins; without, the last registered.
    """
    candidates = {}
    for name, module in classifier.encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(b) for b in module}) == 1:
            if any(True for _ in module[-1].parameters()):
                for i, block in enumerate(module):
                    candidates[f"encoder.{name}.{i}"] = block
    if not candidates:
        return None
    if example is None:
        name = next(reversed(candidates))
        return name, candidates[name]
    finished: list[str] = []
    hooks = [
        block.register_forward_hook(lambda *_args, name=name: finished.append(name))
        for name, block in candidates.items()
    ]
    try:
        with torch.no_grad():
            classifier(example)
    finally:
        for hook in hooks:
            hook.remove()
    return (finished[-1], candidates[finished[-1]]) if finished else None


def summarise(rows: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per method: sample count, pointing-game hit rate and its chance level, mean mass in mask and mean
    mask share (its chance level), mean randomisation Spearman and mean seconds per map; NaN where
    nothing was scored."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = {}
    for method, items in by_method.items():
        hits = [float(r["pointing_hit"]) for r in items if r.get("pointing_hit") is not None]
        summary[method] = {
            "n": len(items),
            "n_scored": len(hits),
            "pointing_hit_rate": _mean(hits),
            "pointing_chance": _mean(
                r.get("pointing_chance") for r in items if r.get("pointing_hit") is not None
            ),
            "mass_in_mask": _mean(r.get("mass_in_mask") for r in items),
            "mask_share": _mean(r.get("mask_share") for r in items if r.get("pointing_hit") is not None),
            "randomisation_spearman": _mean(r.get("randomisation_spearman") for r in items),
            "seconds": _mean(r.get("seconds") for r in items),
        }
    return summary


def _mean(values: Iterable[float | None]) -> float:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else math.nan


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"map and mask shapes differ: {np.shape(a)} vs {np.shape(b)}")
