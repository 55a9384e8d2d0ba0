"""``run_saliency``: every requested map for every sample, written to disk, scored and indexed.

The stage reads like a recipe: check the settings -> wrap the classifier into one target's class scores
(and a randomised copy for the sanity check) -> choose each CAM method's layer -> for each sample:
predict, pick the class to explain, compute each method's map, write NRRDs and a panel (the first
``max_samples``), score against the mask next to the model-free input baselines and the random-weight
copy's map, run the deletion curve -> per-class mean maps -> ``index.csv``, ``scores.json`` and
``report.md`` (each rate with its interval; "beats" only where a paired exact test says so; failed and
empty maps named). It needs nothing but a classifier and samples, so the CLI stage is "load checkpoint +
cache, call this".

Layout of ``out_dir``::

    index.csv                       one row per sample and method (outputs.INDEX_COLUMNS)
    scores.json                     per-method summary with intervals, paired tests, deletion areas and
                                    verdicts, the settings, each CAM method's layer and why, what the
                                    randomisation reset
    report.md                       the scores table and what it means
    maps/<id>/image.nrrd            the preprocessed input (channel mean) on the preprocessed grid
    maps/<id>/<method>.nrrd         the map on the preprocessed grid
    maps/<id>/<method>_original.nrrd  the map resampled onto the source scan's grid (geometry known)
    maps/<id>/<method>.png          panel: slices through the peak + projection, mask contour
    class_means/<method>_<class>.{nrrd,png}  mean of max-normalised maps per explained class
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medctl.config import SaliencyConfig
from medctl.errors import DataError
from medctl.io import to_jsonable, write_json, write_text_atomic
from medctl.progress import log, progress_bar
from medctl.saliency.attribution import (
    ClassScores,
    TargetKind,
    compute_map,
    gradcam_target,
    resolve_methods,
)
from medctl.saliency.deletion import curve_area, deletion_curve, patch_labels, patch_order, random_order
from medctl.saliency.geometry import (
    cache_geometry,
    source_geometry,
)
from medctl.saliency.layers import CamLayerChoice, CheckSample, check_cam_layers, choose_cam_layer
from medctl.saliency.outputs import ClassMeans, report_markdown, safe_name, write_index, write_map, write_nrrd
from medctl.saliency.samples import (
    check_target,
    class_to_explain,
    has_lesion,
    infer_kind,
    label_text,
    misclassified,
    row_is_spectrogram,
    sample_image,
    sample_label,
    sample_mask,
)
from medctl.saliency.scoring import (
    baseline_rows,
    judge,
    mask_share,
    mass_in_mask,
    pointing_chance,
    pointing_game,
    randomised_copy,
    rank_correlation,
    summarise,
)
from medctl.training.precision import resolve_device

DEFAULTS = SaliencyConfig()  # run_saliency's settings default to the config model's
CAM_METHODS = {"gradcam", "hirescam"}


@dataclass
class SaliencyResult:
    """What a run produced: the index rows, per-method scores and where the files are."""

    out_dir: Path
    index: pd.DataFrame  # one row per sample and method
    scores: dict[str, dict[str, Any]]  # method -> summary with baseline and verdict (scoring.judge)
    class_means: list[dict[str, Any]] = field(default_factory=list)  # method, class, n, nrrd, png
    randomised_modules: list[str] = field(default_factory=list)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # input_intensity, input_edges
    cam_layers: dict[str, CamLayerChoice] = field(default_factory=dict)  # per CAM method: the layer it read
    lesions_in_split: int | None = None  # the split's lesion samples, when a split was explained

    @property
    def index_path(self) -> Path:
        return self.out_dir / "index.csv"

    @property
    def scores_path(self) -> Path:
        return self.out_dir / "scores.json"


def run_saliency(
    classifier: nn.Module,
    samples: Iterable[Mapping[str, Any]],
    *,
    classes: Sequence[str],
    target_name: str,
    out_dir: str | Path,
    settings: SaliencyConfig = DEFAULTS,
    device: str | torch.device = "cpu",
    kind: TargetKind | None = None,
    cam_target_extent: Sequence[float] | None = None,
    cam_check: Iterable[Mapping[str, Any]] = (),
    cam_check_source: str = "",
    lesions_in_split: int | None = None,
) -> SaliencyResult:
    """Explain ``classifier``'s ``target_name`` head on each sample with each of ``settings.methods``.

    ``samples`` yields dicts with ``image`` ``(C, *S)``, ``id``, and optionally ``label`` (class index,
    or a multi-hot vector for multilabel; ``<target_name>`` is read when ``label`` is absent, so
    :class:`CacheDataset` items work as they are), ``mask`` ``(1, *S)``, ``geometry`` (the manifest
    row's ``spacing``, ``origin``, ``direction``, ``orig_shape`` and ``cache_affine``; see
    :mod:`medctl.saliency.geometry`) and ``write`` (False: score the maps without writing their files).
    ``kind`` None infers binary from a one-logit head and multiclass otherwise; pass ``multilabel``
    explicitly. The CAM layer of each CAM method (``settings.gradcam_layer`` empty) is chosen by its own
    held-out check (:func:`medctl.saliency.layers.check_cam_layers`) when ``cam_check`` yields lesion
    samples (held out from ``samples``; ``cam_check_source`` says where they come from), else by the
    resolution rule from ``cam_target_extent`` (the lesions' median extent per axis in voxels; None: no
    masks known). The randomisation check (when on) maps the first ``settings.randomisation_samples``
    samples and every lesion sample with a re-initialised copy, so that its pointing game is compared on
    the same samples. ``lesions_in_split`` (the lesion samples the split holds) lets the report say how
    many of them were scored.
    """
    out_dir = Path(out_dir)
    names = resolve_methods(settings.methods)
    classes = list(classes)
    check_target(settings.target, classes, target_name)
    if CAM_METHODS & set(names):
        gradcam_target(classifier.encoder, settings.gradcam_layer)  # an unknown layer fails before any work
    device = resolve_device(device)
    classifier = classifier.to(device).eval()
    spatial_dims = getattr(classifier.encoder, "spatial_dims", None)

    explainers: Explainers | None = None  # built on the first sample, which sizes the model's inputs
    rows: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    means = ClassMeans()
    n_seen = 0
    total = len(samples) if hasattr(samples, "__len__") else None  # type: ignore[arg-type]
    with progress_bar("saliency", total) as bar:
        for sample in samples:
            if "image" not in sample or "id" not in sample:
                raise DataError(f"saliency samples need `image` and `id`; got keys {sorted(sample)}")
            image = sample_image(sample, spatial_dims)  # (C, *S)
            x = image[None].to(device)  # (1, C, *S)
            if explainers is None:
                explainers = build_explainers(
                    classifier, x, target_name, classes, kind, names, settings,
                    cam_target_extent=cam_target_extent, cam_check=cam_check, cam_check_source=cam_check_source,
                )  # fmt: skip
            # the first samples for rho, and every lesion sample, where the random model's maps are scored
            check = explainers.randomised is not None and (n_seen < settings.randomisation_samples or has_lesion(sample))
            n_seen += 1
            sample_rows, sample_baselines = explain_sample(
                sample, image, x, explainers, names, classes, target_name, out_dir, settings,
                check=check, means=means,
            )  # fmt: skip
            rows += sample_rows
            baselines += sample_baselines
            bar.advance(1)

    if explainers is None:
        raise DataError(f"saliency: no samples to explain for target `{target_name}`; check saliency.split")
    class_means = means.write(out_dir / "class_means", classes)
    index = write_index(out_dir / "index.csv", rows)
    baseline_scores = summarise(baselines)
    summary = judge(
        summarise(rows), baseline_scores, alpha=settings.alpha, threshold=settings.randomisation_threshold
    )
    for method, layer in explainers.cam_layers.items():
        summary[method]["layer"] = layer.name
    write_scores(
        out_dir, explainers, target_name=target_name, classes=classes, settings=settings, methods=names,
        scores=summary, baselines=baseline_scores, class_means=class_means, lesions_in_split=lesions_in_split,
    )  # fmt: skip
    n_written = index.loc[index["map_nrrd"].notna(), "id"].nunique()
    log(f"saliency: {index['id'].nunique()} samples x {len(names)} methods ({n_written} written) -> {out_dir}")
    return SaliencyResult(
        out_dir, index, summary, class_means, explainers.reset, baseline_scores, explainers.cam_layers,
        lesions_in_split,
    )  # fmt: skip


def write_scores(
    out_dir: Path,
    explainers: Explainers,
    *,
    target_name: str,
    classes: Sequence[str],
    settings: SaliencyConfig,
    methods: Sequence[str],
    scores: dict[str, dict[str, Any]],
    baselines: dict[str, dict[str, float]],
    class_means: list[dict[str, Any]],
    lesions_in_split: int | None,
) -> None:
    """``scores.json`` (the per-method summary with baselines, paired tests and verdicts, the settings, each
    CAM method's layer and what the randomisation reset) and ``report.md``."""
    report = {
        "target_name": target_name,
        "kind": explainers.scores.kind,
        "classes": classes,
        "target": settings.target,
        "methods": methods,
        "settings": settings.model_dump(mode="json"),
        "lesions_in_split": lesions_in_split,
        "scores": scores,
        "baselines": baselines,
        "cam_layers": {method: layer.to_dict() for method, layer in explainers.cam_layers.items()},
        "randomised_modules": explainers.reset,
        "class_means": class_means,
    }
    report = to_jsonable(report)
    write_json(out_dir / "scores.json", report)
    write_text_atomic(out_dir / "report.md", report_markdown(report))


@dataclass
class Explainers:
    """The class scores every method explains, their randomised copy for the sanity check (None when off),
    and the settings each method reads (a CAM method: with its own layer)."""

    scores: ClassScores
    randomised: ClassScores | None
    reset: list[str]  # the modules the randomised copy re-initialised
    cam_layers: dict[str, CamLayerChoice]  # CAM method -> the layer it reads
    settings: SaliencyConfig

    def settings_for(self, method: str) -> SaliencyConfig:
        layer = self.cam_layers.get(method)
        return self.settings if layer is None else self.settings.model_copy(update={"gradcam_layer": layer.name})


def build_explainers(
    classifier: nn.Module,
    x: torch.Tensor,
    target_name: str,
    classes: Sequence[str],
    kind: TargetKind | None,
    names: Sequence[str],
    settings: SaliencyConfig,
    *,
    cam_target_extent: Sequence[float] | None,
    cam_check: Iterable[Mapping[str, Any]] = (),
    cam_check_source: str = "",
) -> Explainers:
    """:class:`Explainers` from the first sample ``x`` ``(1, C, *S)``: it fixes the target's kind, the
    randomised copy's example input and each CAM method's layer (its own held-out check)."""
    scores = ClassScores(classifier, target_name, infer_kind(classifier, target_name, x, classes, kind))
    randomised, reset = None, []
    if settings.randomisation_check:
        random_model, reset = randomised_copy(classifier, example=x, scope=settings.randomisation_scope)
        randomised = ClassScores(random_model, target_name, scores.kind)
    cam_methods = [name for name in names if name in CAM_METHODS]
    cam_layers: dict[str, CamLayerChoice] = {}
    if cam_methods:
        resolution = cam_layer_for(classifier, x, settings.gradcam_layer, cam_target_extent)
        check = (
            check_samples(cam_check, scores, x.device, target_name, classes)
            if not settings.gradcam_layer and resolution.candidates
            else []
        )
        for method in cam_methods:
            cam_layers[method] = check_cam_layers(
                scores, resolution, check, source=cam_check_source, method=method, settings=settings,
                tolerance=settings.pointing_tolerance, alpha=settings.alpha,
            )  # fmt: skip
            if settings.gradcam_layer:
                continue
            layer = cam_layers[method]
            took = f" ({layer.check['seconds']:.1f} s)" if layer.check else ""
            log(f"saliency: {method} reads {layer.name or 'the encoder output'}: {layer.rule}{took}")
            if layer.check and not layer.check["significant"]:
                log(f"saliency: warning: no candidate layer made {method} locate the held-out lesions above chance")
    return Explainers(scores, randomised, reset, cam_layers, settings)


def explain_sample(
    sample: Mapping[str, Any],
    image: torch.Tensor,
    x: torch.Tensor,
    explainers: Explainers,
    names: Sequence[str],
    classes: Sequence[str],
    target_name: str,
    out_dir: Path,
    settings: SaliencyConfig,
    *,
    check: bool,
    means: ClassMeans,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One sample: predict, pick the class to explain, each method's map scored (and written, unless the
    sample says ``write: False``), its deletion curve, and the randomised model's map when ``check``; its
    index rows and its input-baseline rows."""
    scores, tolerance = explainers.scores, settings.pointing_tolerance
    sample_id = str(sample["id"])
    write = bool(sample.get("write", True))
    with torch.no_grad():
        probabilities = scores.probabilities(scores(x))[0].float().cpu()  # (K,)
    predicted = int(probabilities.argmax())
    label = sample_label(sample, target_name, scores.kind)
    target_index = class_to_explain(settings.target, predicted, label, classes, sample_id)
    spatial = tuple(image.shape[1:])
    mask = sample_mask(sample, spatial, sample_id)  # (*S) or None
    record = sample.get("geometry")
    # an EEG spectrogram window has axes in Hz and s but no source grid (its recording is channels x samples)
    spectrogram = row_is_spectrogram(record)
    source = None if spectrogram else source_geometry(record, len(spatial))  # the scan's grid or None
    grid = cache_geometry(record, spatial, source)  # the cached array's grid
    display = image.float().mean(dim=0).numpy()  # (*S)
    # deletion measures evidence that is there to remove: every sample when no mask is known, else the lesion ones
    wanted = settings.deletion and (mask is None or bool(mask.any()))
    deletion = Deletion(scores, x, target_index, sample_id, settings) if wanted else None

    folder = out_dir / "maps" / safe_name(sample_id)
    if write:
        write_nrrd(folder / "image.nrrd", display, grid)
    sample_baselines = baseline_rows(display, mask, tolerance=tolerance) if mask is not None else []
    rows = []
    for method in names:
        method_settings = explainers.settings_for(method)
        started = time.perf_counter()
        amap = compute_map(method, scores, x, target_index, method_settings)  # (*S)
        seconds = time.perf_counter() - started
        if not np.all(np.isfinite(amap)):
            log(f"saliency: {method} gave non-finite values for {sample_id}; they are kept in the files")
        row = {
            "id": sample_id,
            "label": label_text(label, classes),
            "prediction": classes[predicted],
            "probability": float(probabilities[predicted]),
            "target_class": classes[target_index],
            "target_probability": float(probabilities[target_index]),
            "misclassified": misclassified(label, predicted, scores.kind),
            "method": method,
            "layer": method_settings.gradcam_layer if method in CAM_METHODS else "",
            "map_flat": flatness(amap),
            "seconds": seconds,
        }
        if write:
            row.update(write_map(out_dir, folder, method, amap, display, mask, grid, source, row, spectrogram))
            means.add(method, target_index, amap, display, grid)
        if mask is not None:
            row["pointing_hit"] = pointing_game(amap, mask, tolerance=tolerance)
            row["pointing_chance"] = pointing_chance(mask, tolerance=tolerance)
            row["mass_in_mask"] = mass_in_mask(amap, mask)
            row["mask_share"] = mask_share(mask)
            row.update({f"{b['method']}_hit": b["pointing_hit"] for b in sample_baselines})
        random_map = None
        if check:
            random_map = compute_map(method, explainers.randomised, x, target_index, method_settings)
            row["randomisation_spearman"] = rank_correlation(amap, random_map)
            if mask is not None:
                row["random_weights_hit"] = pointing_game(random_map, mask, tolerance=tolerance)
        if deletion is not None:
            row.update(deletion.areas(amap, random_map))
        rows.append(row)
    return rows, sample_baselines


class Deletion:
    """One sample's deletion curves (:mod:`medctl.saliency.deletion`), scored with the trained model:
    each map's, the random order's (once per sample) and the random-weight map's."""

    def __init__(self, scores: ClassScores, x: torch.Tensor, target: int, sample_id: str, settings: SaliencyConfig):
        self.scores, self.x, self.target, self.steps = scores, x, target, settings.deletion_steps
        self.labels = patch_labels(tuple(x.shape[2:]), settings.deletion_grid)  # (*S)
        order = random_order(int(self.labels.max()) + 1, sample_id)
        self.random_order_auc = self.area(order)

    def area(self, order: np.ndarray) -> float:
        return curve_area(deletion_curve(self.scores, self.x, self.labels, order, self.target, self.steps))

    def areas(self, amap: np.ndarray, random_map: np.ndarray | None) -> dict[str, float]:
        found = {
            "deletion_auc": self.area(patch_order(amap, self.labels)),
            "deletion_random_order_auc": self.random_order_auc,
        }
        if random_map is not None:
            found["deletion_random_weights_auc"] = self.area(patch_order(random_map, self.labels))
        return found


def flatness(amap: np.ndarray) -> str:
    """``empty`` (all zero), ``constant`` (one value everywhere) or ``""``: a map that points nowhere."""
    values = np.nan_to_num(amap, nan=0.0)
    if not values.any():
        return "empty"
    return "constant" if np.ptp(values) == 0 else ""


def cam_layer_for(
    classifier: nn.Module, x: torch.Tensor, gradcam_layer: str, target_extent: Sequence[float] | None
) -> CamLayerChoice:
    """The layer the CAMs read: the configured one, or the one :func:`choose_cam_layer` picks for ``""``."""
    if not gradcam_layer:
        return choose_cam_layer(classifier, x, target_extent)
    rule = (
        "the encoder's own last spatial layer" if gradcam_layer == "last" else "set by saliency.gradcam_layer"
    )
    return CamLayerChoice(gradcam_layer, rule=rule)


def check_samples(
    samples: Iterable[Mapping[str, Any]],
    scores: ClassScores,
    device: torch.device,
    target_name: str,
    classes: Sequence[str],
) -> list[CheckSample]:
    """The held-out samples with a non-empty lesion mask, each to be explained for its labelled class (the
    predicted one when it has no label)."""
    check = []
    for sample in samples:
        image = torch.as_tensor(sample["image"]).float()  # (C, *S)
        mask = sample_mask(sample, tuple(image.shape[1:]), str(sample["id"]))
        if mask is None or not mask.any():
            continue
        x = image[None].to(device)  # (1, C, *S)
        label = sample_label(sample, target_name, scores.kind)
        if isinstance(label, list):
            label = label[0] if label else None
        if label is None or not 0 <= label < len(classes):
            with torch.no_grad():
                label = int(scores(x)[0].argmax())
        check.append(CheckSample(str(sample["id"]), x, mask, int(label)))
    return check


