"""Scores for attribution maps against ground-truth masks, and the model-randomisation sanity check.

- Pointing game (Zhang et al. 2016): does the peak of ``|map|`` fall inside the mask (optionally grown by
  a tolerance of a few voxels)? Every sample with a lesion counts: a map with no peak (all zero, e.g. a
  CAM whose ReLU removed everything) is a miss, not left out. Reported with the grown mask's share of the
  volume, the hit rate of a uniformly random peak (chance level).
- Mass in mask: the share of the map's positive attribution that lies inside the mask (0 when nothing
  is positive); chance is again the mask's share.
- Input baselines: the same scores for two maps made without any model, the image's own intensity
  (its peak is the brightest voxel) and its edges (gradient magnitude of the smoothed image). On data
  whose lesions are the brightest structure the intensity map alone wins the pointing game; a method
  that does not beat the stronger of the two has not shown that it explains the model.
- Model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): maps from a copy of the
  classifier with re-initialised weights (``full``: every weight; ``top``: the heads and the last encoder
  block) should differ from the trained model's; the Spearman rank correlation of ``|map|`` before and
  after is reported (low is good). At or above :data:`RANDOMISATION_THRESHOLD` a method is flagged: its
  maps depend on the input more than on what the model learned.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

from medctl.errors import RunFailure
from medctl.io import format_number

# Spearman rho of |map| between the trained and the fully re-initialised model at or above which a method
# is flagged. Adebayo et al. (2018, Fig. 4) find methods that pass the check falling to about 0.1-0.3 once
# the weights are random, and input-driven ones (guided backprop, gradient x input, IG from a zero
# baseline) staying above 0.5: with half the voxel ranking surviving the loss of every learned weight,
# the map is explained by the image at least as much as by the model.
RANDOMISATION_THRESHOLD = 0.5
EDGE_SIGMA = 1.0  # voxels: the Gaussian the edge baseline smooths with before taking the gradient
BASELINES = ("input_intensity", "input_edges")  # the model-free maps every method is compared with


def pointing_game(attribution: np.ndarray, mask: np.ndarray, *, tolerance: int = 0) -> bool | None:
    """True when the voxel of largest ``|attribution|`` lies in ``mask`` grown by ``tolerance`` voxels.

    None when the mask is empty (nothing to point at); False when the map has no non-zero value (it
    points nowhere: a miss, so that every lesion sample stays in the hit rate's denominator).
    """
    _check_shapes(attribution, mask)
    inside = grown_mask(mask, tolerance)
    magnitude = np.abs(np.nan_to_num(attribution, nan=0.0))
    if not inside.any():
        return None
    if not magnitude.any():
        return False
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
    """Share of the positive attribution inside the mask, in [0, 1]; 0 when nothing is positive (no
    attribution lands in the mask), NaN only when the mask is empty."""
    _check_shapes(attribution, mask)
    positive = np.clip(np.nan_to_num(attribution, nan=0.0), 0, None).astype(np.float64)
    total = positive.sum()
    if not (np.asarray(mask) > 0).any():
        return math.nan
    if total <= 0:
        return 0.0
    return float(positive[np.asarray(mask) > 0].sum() / total)


def mask_share(mask: np.ndarray) -> float:
    """Fraction of the volume inside the mask: chance level for both scores above."""
    mask = np.asarray(mask)
    return float((mask > 0).sum() / mask.size) if mask.size else math.nan


def intensity_map(image: np.ndarray) -> np.ndarray:
    """The image itself as a map, shifted to be non-negative: its peak is the brightest voxel."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    return image - image.min() if image.size else image


def edge_map(image: np.ndarray, sigma: float = EDGE_SIGMA) -> np.ndarray:
    """Gradient magnitude of the image smoothed by a Gaussian of ``sigma`` voxels (scipy)."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    return ndimage.gaussian_gradient_magnitude(image, sigma=sigma).astype(np.float32)


def baseline_rows(image: np.ndarray, mask: np.ndarray, *, tolerance: int = 0) -> list[dict]:
    """Pointing game and mass in mask of the two model-free maps of ``image`` ``(*S)`` (see
    :data:`BASELINES`), as rows :func:`summarise` takes."""
    rows = []
    for name, amap in (("input_intensity", intensity_map(image)), ("input_edges", edge_map(image))):
        rows.append(
            {
                "method": name,
                "pointing_hit": pointing_game(amap, mask, tolerance=tolerance),
                "pointing_chance": pointing_chance(mask, tolerance=tolerance),
                "mass_in_mask": mass_in_mask(amap, mask),
                "mask_share": mask_share(mask),
            }
        )
    return rows


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of ``|a|`` and ``|b|`` over all voxels; NaN when either map is constant."""
    _check_shapes(a, b)
    x, y = np.abs(np.ravel(a)), np.abs(np.ravel(b))
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def randomised_copy(
    classifier: nn.Module, *, example: torch.Tensor | None = None, seed: int = 0, scope: str = "full"
) -> tuple[nn.Module, list[str]]:
    """A deep copy with re-initialised weights, and the names of what was reset.

    ``scope="full"`` re-initialises every module of the classifier (the end point of Adebayo et al.'s
    cascading randomisation), and draws any parameter no module resets (position or plane embeddings,
    class tokens) from N(0, 0.02^2). ``scope="top"`` re-initialises every head, the encoder's
    ``gradcam_layer``, and :func:`last_block` -- with an ``example`` input ``(1, C, *S)``, the last block
    that actually runs in the forward pass (a UNet's decoder does not, for classification). Modules are
    reset through their own ``reset_parameters`` (``_reset_parameters`` for ``nn.MultiheadAttention``).
    The draws are seeded by ``seed`` plus :func:`weights_seed`, so they are repeatable and never the
    draws that built the model; the global random state is left as it was.
    """
    if scope not in ("full", "top"):
        raise ValueError(f"randomisation scope {scope!r}: use full or top")
    model = copy.deepcopy(classifier)
    if scope == "full":
        parts: dict[str, nn.Module] = {"": model}
    else:
        parts = {"heads": model.heads, "encoder.gradcam_layer": model.encoder.gradcam_layer}
        last = last_block(model, example)
        if last is not None:
            parts[last[0]] = last[1]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    reset: list[str] = []
    seen: set[int] = set()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + weights_seed(classifier))
        for name, part in parts.items():
            for sub_name, module in part.named_modules():
                method = getattr(module, "reset_parameters", None) or getattr(
                    module, "_reset_parameters", None
                )
                if id(module) in seen or not callable(method):
                    continue
                seen.add(id(module))
                method()
                reset.append(".".join(p for p in (name, sub_name) if p))
        if scope == "full":
            covered = {id(p) for m in model.modules() if id(m) in seen for p in m.parameters(recurse=False)}
            for param_name, param in model.named_parameters():
                if id(param) not in covered:
                    with torch.no_grad():
                        nn.init.normal_(param, std=0.02)
                    reset.append(param_name)
    if not reset:
        raise RunFailure(
            "randomisation check: no module under the heads or encoder.gradcam_layer has reset_parameters; "
            "set saliency.randomisation_check = false"
        )
    return model, reset


def weights_seed(model: nn.Module) -> int:
    """A seed drawn from the model's own weights: the re-initialisation must not replay the draws that
    made the model (a classifier built right after ``manual_seed(run.seed)`` and re-initialised with that
    same seed would get its own weights back)."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes()[:4096])
    return int.from_bytes(digest.digest()[:4], "little")


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
    """Per method: sample count, lesion samples scored and hits, pointing-game hit rate and its chance
    level, mean mass in mask and mean mask share (its chance level), mean randomisation Spearman (over
    the samples that had the check) and mean seconds per map; NaN where nothing was scored."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = {}
    for method, items in by_method.items():
        hits = [float(r["pointing_hit"]) for r in items if r.get("pointing_hit") is not None]
        rhos = [r.get("randomisation_spearman") for r in items if r.get("randomisation_spearman") is not None]
        checked = [r for r in items if r.get("random_weights_hit") is not None and r.get("pointing_hit") is not None]
        summary[method] = {
            "n": len(items),
            "n_scored": len(hits),
            "pointing_hits": int(sum(hits)),
            "pointing_hit_rate": _mean(hits),
            "pointing_chance": _mean(
                r.get("pointing_chance") for r in items if r.get("pointing_hit") is not None
            ),
            "mass_in_mask": _mean(r.get("mass_in_mask") for r in items),
            "mask_share": _mean(r.get("mask_share") for r in items if r.get("pointing_hit") is not None),
            "randomisation_spearman": _mean(rhos),
            "n_randomisation": len(rhos),
            # the pointing game of the randomised model's maps, beside the trained model's on the same samples
            "random_weights_scored": len(checked),
            "random_weights_hits": int(sum(float(r["random_weights_hit"]) for r in checked)),
            "checked_hits": int(sum(float(r["pointing_hit"]) for r in checked)),
            "seconds": _mean(r.get("seconds") for r in items),
        }
    return summary


def judge(
    scores: dict[str, dict[str, float]],
    baselines: dict[str, dict[str, float]],
    *,
    threshold: float = RANDOMISATION_THRESHOLD,
) -> dict[str, dict]:
    """Each method's scores with the input baseline and the sanity-check verdict added (a new dict).

    ``input_baseline`` is the stronger model-free map (:data:`BASELINES`, highest pointing-game hit
    rate, ties to the intensity map) and ``input_baseline_rate`` its rate; ``beats_input_baseline`` is
    True when the method's hit rate is strictly higher (None when no lesion sample was scored);
    ``input_driven`` is True when the randomisation rho is at or above ``threshold`` (None when not
    checked). ``verdict`` says both in words.
    """
    rated = {n: b for n, b in baselines.items() if not math.isnan(b.get("pointing_hit_rate", math.nan))}
    best = max(rated, key=lambda n: rated[n]["pointing_hit_rate"], default=None)
    best_rate = rated[best]["pointing_hit_rate"] if best else math.nan
    judged = {}
    for method, entry in scores.items():
        rate, rho = entry["pointing_hit_rate"], entry["randomisation_spearman"]
        beats = None if math.isnan(rate) or best is None else bool(rate > best_rate)
        input_driven = None if math.isnan(rho) else bool(rho >= threshold)
        n_checked = entry.get("random_weights_scored") or 0
        trained, random = entry.get("checked_hits", 0), entry.get("random_weights_hits", 0)
        beats_random = bool(trained > random) if n_checked else None
        words = []
        if beats is not None:
            words.append("beats the input baseline" if beats else "no better than the input baseline")
        if input_driven:
            words.append("depends on the input more than the model")
        elif input_driven is False:
            words.append("depends on the weights")
        if beats_random is not None:
            versus = f"{trained}/{n_checked} vs {random}/{n_checked}"
            words.append(f"beats random weights ({versus})" if beats_random else f"no better than random weights ({versus})")
        judged[method] = {
            **entry,
            "input_baseline": best,
            "input_baseline_rate": best_rate,
            "beats_input_baseline": beats,
            "input_driven": input_driven,
            "beats_random_weights": beats_random,
            "randomisation_threshold": threshold,
            "verdict": "; ".join(words),
        }
    return judged


def describe(method: str, entry: dict) -> str:
    """One line: ``integrated_gradients: pointing game 1.000 (6/6; input baseline 1.000, chance 0.007,
    randomisation rho 0.66 -- depends on the input more than the model)``."""
    rate, chance = entry.get("pointing_hit_rate", math.nan), entry.get("pointing_chance", math.nan)
    parts = []
    if entry.get("n_scored"):
        parts.append(f"{entry.get('pointing_hits', 0)}/{entry['n_scored']}")
    if entry.get("input_baseline"):
        parts.append(f"input baseline {format_number(entry.get('input_baseline_rate'))}")
    parts.append(f"chance {format_number(chance)}")
    rho = entry.get("randomisation_spearman", math.nan)
    if rho is not None and not math.isnan(rho):
        parts.append(f"randomisation ρ {rho:.2f}")
    verdict = entry.get("verdict")
    return f"{method}: pointing game {format_number(rate)} ({', '.join(parts)}{' — ' + verdict if verdict else ''})"




def _mean(values: Iterable[float | None]) -> float:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else math.nan


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"map and mask shapes differ: {np.shape(a)} vs {np.shape(b)}")
