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
  block). Two pieces of evidence: the copy's own pointing game on the same lesion samples, compared with
  the trained model's by the exact McNemar test, and the Spearman rank correlation of ``|map|`` before and
  after. The paired test is the stronger: a method is flagged as input-driven only when rho is at or above
  :data:`RANDOMISATION_THRESHOLD` *and* it does not beat random weights, so the two never contradict.
- Verdicts (:func:`judge`): every hit rate carries its Wilson interval and every "beats" an exact paired
  test at ``saliency.alpha`` (:mod:`medctl.analysis.proportions`); otherwise "not distinguishable". A
  method not above chance, or significantly below an input baseline, failed to locate the lesion; empty
  and constant maps are counted.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats
from torch import nn

from medctl.analysis.proportions import (
    PairedTest,
    SignTest,
    above_chance,
    comparison_words,
    format_p,
    paired_hits_test,
    rate_interval,
    sign_test,
)
from medctl.errors import RunFailure
from medctl.io import MISSING, format_number

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


def summarise(rows: Iterable[dict]) -> dict[str, dict[str, Any]]:
    """Per method: sample count, lesion samples scored and hits with the rate's Wilson interval, chance level,
    mean mass in mask and mask share, empty and constant maps, mean randomisation Spearman (over the samples
    that had the check), mean seconds per map, and the paired comparisons on the same samples
    (``comparisons``: exact McNemar tests against each input baseline and against the random-weight model's
    maps; ``deletion``: mean areas and sign tests against random order and random weights). NaN where
    nothing was scored."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = {}
    for method, items in by_method.items():
        scored = [r for r in items if r.get("pointing_hit") is not None]
        hits = [bool(r["pointing_hit"]) for r in scored]
        rate = rate_interval(sum(hits), len(hits))
        rhos = [r.get("randomisation_spearman") for r in items if r.get("randomisation_spearman") is not None]
        checked = [r for r in scored if r.get("random_weights_hit") is not None]
        comparisons = {
            name: paired_hits_test(
                [r["pointing_hit"] for r in scored], [r[f"{name}_hit"] for r in scored]
            ).to_dict()
            for name in BASELINES
            if scored and all(r.get(f"{name}_hit") is not None for r in scored)
        }
        if checked:
            comparisons["random_weights"] = paired_hits_test(
                [r["pointing_hit"] for r in checked], [r["random_weights_hit"] for r in checked]
            ).to_dict()
        summary[method] = {
            "n": len(items),
            "n_scored": len(hits),
            "pointing_hits": rate.hits,
            "pointing_hit_rate": rate.rate,
            "pointing_low": rate.low,
            "pointing_high": rate.high,
            "pointing_chance": _mean(r.get("pointing_chance") for r in scored),
            "mass_in_mask": _mean(r.get("mass_in_mask") for r in items),
            "mask_share": _mean(r.get("mask_share") for r in scored),
            "empty_maps": sum(r.get("map_flat") == "empty" for r in items),
            "constant_maps": sum(r.get("map_flat") == "constant" for r in items),
            "randomisation_spearman": _mean(rhos),
            "n_randomisation": len(rhos),
            # the pointing game of the randomised model's maps, beside the trained model's on the same samples
            "random_weights_scored": len(checked),
            "random_weights_hits": sum(bool(r["random_weights_hit"]) for r in checked),
            "checked_hits": sum(bool(r["pointing_hit"]) for r in checked),
            "comparisons": comparisons,
            "deletion": deletion_summary(items),
            "seconds": _mean(r.get("seconds") for r in items),
        }
    return summary


def deletion_summary(items: Sequence[dict]) -> dict[str, Any]:
    """Mean deletion areas of a method's maps, of random order and of the random-weight maps, with the
    exact sign test of the method against each on the samples that have both (empty: no deletion scored)."""
    auc = [r.get("deletion_auc") for r in items]
    if all(v is None for v in auc):
        return {}
    summary: dict[str, Any] = {"auc": _mean(auc), "n": sum(v is not None for v in auc)}
    for name in ("random_order", "random_weights"):
        pairs = [
            (r["deletion_auc"], r[f"deletion_{name}_auc"])
            for r in items
            if r.get("deletion_auc") is not None and r.get(f"deletion_{name}_auc") is not None
        ]
        if pairs:
            summary[f"{name}_auc"] = _mean(b for _, b in pairs)
            summary[name] = sign_test([a for a, _ in pairs], [b for _, b in pairs]).to_dict()
    return summary


def judge(
    scores: dict[str, dict[str, Any]],
    baselines: dict[str, dict[str, Any]],
    *,
    alpha: float,
    threshold: float = RANDOMISATION_THRESHOLD,
) -> dict[str, dict]:
    """Each method's scores with the verdicts added (a new dict); every claim rests on a paired test at
    ``alpha`` on the same samples.

    - ``beats_input_baseline``: True when the exact McNemar test beats *every* input baseline
      (:data:`BASELINES`); ``input_baseline`` names the stronger one (most hits, ties to intensity).
    - ``failed``: True when the hits are not significantly above chance (one-sided binomial test on the mean
      chance level) or significantly below an input baseline: the maps failed to locate the lesion.
    - ``beats_random_weights``: the McNemar test against the random-weight model's maps on the same samples.
    - ``input_driven``: randomisation rho at or above ``threshold`` *and* no significant win over random
      weights; where the paired test shows the maps depend on the weights, rho is only reported (the stronger
      test decides, so the two never contradict each other).
    - ``deletion_faithful``: lower deletion areas than random order (sign test), when deletion ran.

    ``verdict`` says all of it in words; None where something could not be tested (no lesion scored).
    """
    rated = {n: b for n, b in baselines.items() if b.get("n_scored")}
    best = max(rated, key=lambda n: rated[n]["pointing_hits"], default=None)
    judged = {}
    for method, entry in scores.items():
        comparisons = entry.get("comparisons") or {}
        words: list[str] = []
        beats = failed = None
        if entry.get("n_scored"):
            chance_p = above_chance(entry["pointing_hits"], entry["n_scored"], entry["pointing_chance"])
            outcomes = {
                name: comparison_words(PairedTest(**comparisons[name]), baseline_name(name), alpha)
                for name in BASELINES
                if name in comparisons
            }
            beats = bool(outcomes) and all(outcome == "beats" for outcome, _ in outcomes.values())
            below = [phrase for outcome, phrase in outcomes.values() if outcome == "below"]
            failed = chance_p >= alpha or bool(below)
            if failed:
                reason = below[0] if below else (
                    f"not above chance: {entry['pointing_hits']}/{entry['n_scored']} vs "
                    f"{entry['pointing_chance']:.3f}, {format_p(chance_p)}"
                )
                words.append(f"the maps failed to locate the lesion ({reason})")
            elif outcomes:
                # the comparison with the stronger baseline it did not win, else its weakest win
                unbeaten = [name for name, (outcome, _) in outcomes.items() if outcome != "beats"]
                unbeaten.sort(key=lambda name: -comparisons[name]["other_hits"])
                words.append(outcomes[unbeaten[0]][1] if unbeaten else _weakest(outcomes, comparisons))
            entry = {**entry, "chance_p": chance_p}
        random_outcome = None
        if "random_weights" in comparisons:
            test = PairedTest(**comparisons["random_weights"])
            random_outcome, phrase = comparison_words(test, "random weights", alpha)
            words.append(phrase)
        rho = entry["randomisation_spearman"]
        input_driven = None if math.isnan(rho) else bool(rho >= threshold and random_outcome != "beats")
        if input_driven:
            words.append(f"depends on the input more than the model (randomisation ρ {rho:.2f} ≥ {threshold})")
        elif input_driven is False and random_outcome is None:
            words.append(f"depends on the weights (randomisation ρ {rho:.2f})")
        flat = bool(entry.get("empty_maps") or entry.get("constant_maps"))
        if flat:
            words.append(flat_counts(entry))
        deletion = entry.get("deletion") or {}
        faithful = None
        if "random_order" in deletion:
            test = SignTest(**deletion["random_order"])
            faithful = test.p < alpha and test.lower > test.higher
            words.append(deletion_words(deletion, alpha))
        judged[method] = {
            **entry,
            "input_baseline": best,
            "input_baseline_rate": rated[best]["pointing_hit_rate"] if best else math.nan,
            "beats_input_baseline": beats,
            "failed": failed,
            "input_driven": input_driven,
            "beats_random_weights": None if random_outcome is None else random_outcome == "beats",
            "flat_maps": flat,
            "deletion_faithful": faithful,
            "alpha": alpha,
            "randomisation_threshold": threshold,
            "verdict": "; ".join(words),
        }
    return judged


def flat_counts(entry: dict[str, Any]) -> str:
    """``12 of 20 maps empty, 1 of 20 maps constant``: the maps that point nowhere."""
    counts = [(entry.get(f"{kind}_maps") or 0, kind) for kind in ("empty", "constant")]
    return ", ".join(f"{count} of {entry['n']} maps {kind}" for count, kind in counts if count)


def baseline_name(name: str) -> str:
    """``input_edges`` -> ``the input baseline (edges)``."""
    return f"the input baseline ({name.removeprefix('input_')})"


def _weakest(outcomes: dict[str, tuple[str, str]], comparisons: dict[str, dict]) -> str:
    """The phrase of the won comparison with the largest p (the one a reader should check)."""
    name = max(outcomes, key=lambda n: comparisons[n]["p"])
    return outcomes[name][1]


def deletion_words(deletion: dict[str, Any], alpha: float) -> str:
    """``deletion AUC 0.21: below random order 0.45 (11/12, p = 0.006), random weights 0.40 (...)``."""
    parts = []
    for name in ("random_order", "random_weights"):
        if name not in deletion:
            continue
        test = SignTest(**deletion[name])
        label = name.replace("_", " ")
        counts = f"{deletion[name + '_auc']:.2f}, lower on {test.lower}/{test.n}, {format_p(test.p)}"
        if test.p < alpha and test.lower > test.higher:
            parts.append(f"faster than {label} ({counts})")
        elif test.p < alpha:
            parts.append(f"slower than {label} ({counts})")
        else:
            parts.append(f"not distinguishable from {label} ({counts})")
    return f"deletion AUC {deletion['auc']:.2f}: " + ", ".join(parts)


def hits_text(entry: dict[str, Any], lesions_in_split: int | None = None) -> str:
    """``0.75 [0.47, 0.91] (9/12)``, with ``; scored 6 of 20 lesion samples`` when a cap left some out."""
    if not entry.get("n_scored"):
        return f"{MISSING} (scored 0 of {lesions_in_split} lesion samples)" if lesions_in_split else MISSING
    rate, low, high = (format_number(entry[key], 2) for key in ("pointing_hit_rate", "pointing_low", "pointing_high"))
    text = f"{rate} [{low}, {high}] ({entry['pointing_hits']}/{entry['n_scored']}"
    if lesions_in_split and entry["n_scored"] < lesions_in_split:
        text += f"; scored {entry['n_scored']} of {lesions_in_split} lesion samples"
    return text + ")"


def describe(method: str, entry: dict, lesions_in_split: int | None = None) -> str:
    """One line: ``integrated_gradients: pointing game 0.75 [0.47, 0.91] (9/12), chance 0.007 — beats the
    input baseline (edges) (9/12 vs 2/12, p = 0.016); ...``."""
    parts = [f"pointing game {hits_text(entry, lesions_in_split)}"] if entry.get("n_scored") else []
    parts.append(f"chance {format_number(entry.get('pointing_chance', math.nan))}")
    verdict = entry.get("verdict")
    return f"{method}: {', '.join(parts)}{' — ' + verdict if verdict else ''}"


def _mean(values: Iterable[float | None]) -> float:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else math.nan


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"map and mask shapes differ: {np.shape(a)} vs {np.shape(b)}")
