"""Which layer Grad-CAM and HiResCAM read by default: the map that points best on held-out lesions, else
the deepest spatial map fine enough for the target.

**Held-out check** (:func:`check_cam_layers`, the default whenever lesion masks exist): the
:data:`CHECK_CANDIDATES` deepest distinct map sizes of the encoder are each scored on a check set of
masked samples that are not the ones being reported (by default up to ``saliency.cam_check_samples``
lesion samples of the val split, or of train when val is the one reported). Each CAM method chooses its
own layer: it explains each check sample's labelled class on each candidate layer, and the layer with its
best pointing-game hit rate wins (ties: the higher mass in mask, then the deeper layer) -- Grad-CAM
averages the gradient over the map and HiResCAM does not, so one layer rarely suits both. The winner's
hits are tested against chance (one-sided exact binomial test); when they are not above it at
``saliency.alpha`` the choice is kept but a warning is logged and written into the report. The candidates,
their check scores, the check set, the test and the seconds it took are recorded per method in
``scores.json``. Its cost is ``candidates x check samples x CAM methods`` CAM passes (one forward and one
backward each): 4 x 8 x 2 = 64 at the defaults, the price of explaining about 2 more samples with IG at 32
steps.

**Resolution rule** (without masks, with ``saliency.cam_check_samples = 0``, or for an ``--input`` scan
explained alone), below.

A CAM is no finer than the map it reads: a lesion five voxels across cannot be pointed at on a map whose
cells are eight voxels wide (the upsampled peak lands on a cell centre or a border plateau). The deepest
map is the most class-specific (Selvaraju et al. 2017), so the default is the deepest map that still
resolves the target:

- with lesion masks, the target's size is the median extent of their connected lesions per axis, each
  lesion's bounding box capped by its thickness so that a thin rod counts as thin however it lies
  (:func:`lesion_extent`); a map qualifies when each of its cells spans at most
  1 / :data:`CELLS_ACROSS_TARGET` of that extent along every axis (two cells across a lesion);
- without masks, a map qualifies when it has at least :data:`MIN_CELLS` cells along every axis (or
  the input's own size, when smaller);
- no map qualifies: the finest one.

The candidates are the encoder's modules whose output, in the classifier's own forward pass on the
first sample, is a map ``(1, C>1, *s)`` with the input's number of spatial axes, ordered by when they
finish (a container finishes after its last child, so a whole stage wins over its last activation).
By encoder family (strides for the default builders):

- ``resnet*`` (MONAI, ``conv1_t_stride = 1`` by default): ``act`` (1), ``layer1`` (1/2, after the max-pool),
  ``layer2`` (1/4), ``layer3`` (1/8), ``layer4`` (1/16); without max-pool each is 2x finer (``layer4`` at 1/8);
- ``convnext_tiny_cbam``: ``stages.0``-``stages.3`` and ``cbam.*`` (1/4 to 1/32);
- ``unet2d``: ``down.0``-``down.3`` (1, 1/2, 1/4, 1/8);
- ``mt3``: ``stem.0``-``stem.3`` (1, 1/2, 1/4, 1/8): its last map is too coarse for small lesions at
  small inputs, so the choice usually falls on ``stem.1`` or ``stem.0``;
- token encoders (``vit3d_*``; ``gradcam_layout == "tokens"``): every block keeps the patch grid, so the
  deepest -- the encoder's own ``gradcam_layer`` (the final norm) -- is taken; no finer map exists, and
  there is nothing for the held-out check to choose between.

What the held-out check picked, measured (benchmarks/RESULTS.md, bench_pointing.py with distractors): the
check scores ``layer1``-``layer4`` (resnet) or ``stem.0``, ``stem.1``, ``stem`` (mt3) and keeps the one that
points best: ``layer3`` (0.88 on the check, where the size rule took ``layer2``) in one resnet run at
32x64x64, ``layer1`` in a weaker-trained one; ``stem.0`` or ``stem.1`` for mt3_tiny at 16x32x32; ``layer2``/``layer3``
for a 2D resnet at 32x32. With a handful of check lesions the choice is noisy; it is recorded with its
scores so that a reader can see how clear it was.

``saliency.gradcam_layer`` set to a module name overrides the choice; ``"last"`` reads the encoder's own
last spatial layer (the choice before this rule existed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from medctl.analysis.proportions import above_chance, format_p
from medctl.config import SaliencyConfig
from medctl.saliency.attribution import ClassScores, compute_map
from medctl.saliency.scoring import mass_in_mask, pointing_chance, pointing_game

CELLS_ACROSS_TARGET = 2  # with masks: at least two map cells across the median lesion, along every axis
MIN_CELLS = 8  # without masks: at least this many cells along every axis
# the held-out check scores this many of the deepest distinct map sizes: the deeper maps are the
# class-specific ones, and a stem at full resolution rarely is (and each candidate costs one CAM per sample)
CHECK_CANDIDATES = 4


@dataclass(frozen=True)
class SpatialLayer:
    """An encoder module whose output is a spatial map, and how coarse that map is."""

    name: str
    shape: tuple[int, ...]  # the map's spatial shape
    stride: tuple[float, ...]  # input voxels per map cell, per axis


@dataclass(frozen=True)
class CamLayerChoice:
    """The layer a CAM reads, why, and what else there was (recorded in ``scores.json``)."""

    name: str
    shape: tuple[int, ...] = ()
    stride: tuple[float, ...] = ()
    rule: str = ""
    target_extent: tuple[float, ...] | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # the held-out check, when it chose: source, ids, methods, seconds (the candidates hold their scores)
    check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spatial_layers(classifier: nn.Module, x: torch.Tensor) -> list[SpatialLayer]:
    """The encoder's modules that output a map ``(1, C>1, *s)`` on input ``x`` ``(1, C, *S)``, in the
    order they finish in one forward pass of ``classifier`` (without gradients)."""
    encoder = classifier.encoder
    spatial = tuple(x.shape[2:])
    finished: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def keep(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == x.ndim and output.shape[1] > 1:
                finished.pop(name, None)  # a module called twice (a shared activation) counts when last done
                finished[name] = tuple(int(s) for s in output.shape[2:])

        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in encoder.named_modules() if name]
    try:
        with torch.no_grad():
            classifier(x)
    finally:
        for handle in handles:
            handle.remove()
    return [
        SpatialLayer(name, shape, tuple(round(s / m, 3) for s, m in zip(spatial, shape, strict=True)))
        for name, shape in finished.items()
    ]


def lesion_extent(masks: Iterable[np.ndarray]) -> tuple[float, ...] | None:
    """Median size per axis (voxels) of the connected lesions in ``masks`` ``(*S)``; None when there is no
    lesion. A lesion's size along an axis is its bounding-box extent, capped by its thickness (twice the largest
    distance from a lesion voxel to the background): a thin rod lying diagonally fills a large box, but a map
    must resolve its width to point inside it."""
    extents: list[tuple[float, ...]] = []
    for mask in masks:
        labelled, count = ndimage.label(np.asarray(mask) > 0)
        for index, box in enumerate(ndimage.find_objects(labelled), start=1):
            lesion = labelled[box] == index
            depth = ndimage.distance_transform_edt(np.pad(lesion, 1))  # voxels to the nearest background
            thickness = 2 * float(depth.max())
            extents.append(tuple(min(float(s.stop - s.start), thickness) for s in box))
    if not extents:
        return None
    return tuple(float(v) for v in np.median(np.asarray(extents, dtype=float), axis=0))


def choose_cam_layer(
    classifier: nn.Module, x: torch.Tensor, target_extent: Sequence[float] | None = None
) -> CamLayerChoice:
    """The default CAM layer for inputs like ``x`` ``(1, C, *S)`` (see the module docstring)."""
    encoder = classifier.encoder
    own = next((name for name, m in encoder.named_modules() if m is encoder.gradcam_layer), "")
    layout = getattr(encoder, "gradcam_layout", getattr(encoder, "feature_layout", "map"))
    if layout == "tokens":
        return CamLayerChoice(
            own, rule="token encoder: every block keeps the patch grid; the deepest is read"
        )
    layers = spatial_layers(classifier, x)
    if not layers:
        return CamLayerChoice(own, rule="no spatial map found in the forward pass; the encoder's own layer")
    deepest_per_shape = {layer.shape: layer for layer in layers}  # the last module to finish at each size
    candidates = [
        {"name": layer.name, "shape": list(layer.shape), "stride": list(layer.stride)}
        for layer in sorted(deepest_per_shape.values(), key=layers.index)  # in the order they finish
    ]
    extent = tuple(float(e) for e in target_extent) if target_extent else None
    if extent is not None and len(extent) == x.ndim - 2:
        limits = tuple(max(1.0, e / CELLS_ACROSS_TARGET) for e in extent)
        fine = [
            layer for layer in layers if all(s <= lim for s, lim in zip(layer.stride, limits, strict=True))
        ]
        rule = (
            f"the deepest map with cells at most 1/{CELLS_ACROSS_TARGET} of the lesions' median extent "
            f"({'x'.join(f'{e:g}' for e in extent)} voxels)"
        )
    else:
        extent = None
        need = tuple(min(MIN_CELLS, int(s)) for s in x.shape[2:])
        fine = [layer for layer in layers if all(m >= n for m, n in zip(layer.shape, need, strict=True))]
        rule = f"no lesion masks: the deepest map with at least {MIN_CELLS} cells per axis"
    if fine:
        chosen = fine[-1]
    else:
        finest = min(math.prod(layer.stride) for layer in layers)
        chosen = [layer for layer in layers if math.prod(layer.stride) == finest][-1]
        rule += "; none is that fine, so the deepest of the finest"
    return CamLayerChoice(chosen.name, chosen.shape, chosen.stride, rule, extent, candidates)


@dataclass(frozen=True)
class CheckSample:
    """A held-out lesion sample for :func:`check_cam_layers`."""

    id: str
    x: torch.Tensor  # (1, C, *S) on the model's device
    mask: np.ndarray  # (*S) bool, not empty
    target: int  # the class to explain: the labelled one


def check_cam_layers(
    scores: ClassScores,
    resolution_choice: CamLayerChoice,
    check: Sequence[CheckSample],
    *,
    source: str,
    method: str,
    settings: SaliencyConfig,
    tolerance: int = 0,
    alpha: float,
) -> CamLayerChoice:
    """The candidate layer whose ``method`` maps point best at the lesions of ``check`` (see the module
    docstring); ``resolution_choice`` (from :func:`choose_cam_layer`) gives the candidates, in the order they
    finish, and is returned unchanged when there is nothing to check. The winner's hits are tested against
    chance (one-sided exact binomial test on the check lesions' mean share); ``check["significant"]`` is
    False, and the rule says so, when they are not above chance at ``alpha``."""
    candidates = resolution_choice.candidates[-CHECK_CANDIDATES:]
    if not check or not candidates:
        return resolution_choice
    started = time.perf_counter()
    chance = float(np.mean([pointing_chance(sample.mask, tolerance=tolerance) for sample in check]))
    scored = []
    for candidate in candidates:
        layer_settings = settings.model_copy(update={"gradcam_layer": candidate["name"]})
        hits, masses = [], []
        for sample in check:
            amap = compute_map(method, scores, sample.x, sample.target, layer_settings)  # (*S)
            hits.append(bool(pointing_game(amap, sample.mask, tolerance=tolerance)))
            masses.append(mass_in_mask(amap, sample.mask))
        scored.append(
            {
                **candidate,
                "check_hits": int(sum(hits)),
                "check_pointing_hit_rate": float(np.mean(hits)),
                "check_mass_in_mask": float(np.mean(masses)),
            }
        )
    depth = {c["name"]: i for i, c in enumerate(scored)}
    best = max(
        scored, key=lambda c: (c["check_pointing_hit_rate"], c["check_mass_in_mask"], depth[c["name"]])
    )
    p = above_chance(best["check_hits"], len(check), chance)
    seconds = time.perf_counter() - started
    rule = (
        f"the best pointing game (then mass in mask) of {method} among the {len(scored)} deepest map sizes "
        f"on {len(check)} held-out lesion samples ({source}): {best['check_hits']}/{len(check)} on "
        f"{best['name']}, chance {chance:.3f}, {format_p(p)}"
        + ("" if p < alpha else " — not significantly above chance: no candidate layer located the lesions")
        + f"; the resolution rule alone would read {resolution_choice.name}"
    )
    unscored = resolution_choice.candidates[: len(resolution_choice.candidates) - len(scored)]
    return CamLayerChoice(
        best["name"],
        tuple(best["shape"]),
        tuple(best["stride"]),
        rule,
        resolution_choice.target_extent,
        [*unscored, *scored],
        {
            "source": source,
            "ids": [sample.id for sample in check],
            "method": method,
            "tolerance": tolerance,
            "chance": chance,
            "p": p,
            "significant": p < alpha,
            "seconds": round(seconds, 3),
            "resolution_rule_choice": resolution_choice.name,
        },
    )
