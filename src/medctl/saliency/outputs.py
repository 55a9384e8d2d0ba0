"""Files a saliency run leaves: NRRD maps (preprocessed and original grid), PNG panels, ``index.csv``.

NRRDs are written with pynrrd in C order (``index_order="C"``, the file's fastest axis is the array's
last), the layout :mod:`medctl.data.readers` reads and writes, with ``space directions`` and ``space
origin`` from :class:`~medctl.saliency.geometry.Geometry`; 3D files declare
``space: left-posterior-superior`` and open in 3D Slicer on top of the source scan. Figures are drawn with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nrrd
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from medctl.analysis.proportions import fewest_pairs_to_decide
from medctl.io import MISSING, atomic_write, format_number, markdown_table, write_text_atomic
from medctl.saliency.geometry import Geometry, resample_to_grid, resample_to_shape
from medctl.saliency.scoring import flat_counts, hits_text, peak_voxel

INDEX_COLUMNS = [
    "id",
    "label",
    "prediction",
    "probability",
    "target_class",
    "target_probability",
    "misclassified",
    "method",
    "layer",
    "map_flat",
    "map_nrrd",
    "map_original_nrrd",
    "panel_png",
    "pointing_hit",
    "pointing_chance",
    "mass_in_mask",
    "mask_share",
    "input_intensity_hit",
    "input_edges_hit",
    "randomisation_spearman",
    "random_weights_hit",
    "deletion_auc",
    "deletion_random_order_auc",
    "deletion_random_weights_auc",
    "seconds",
]


def random_weight_hits(entry: Mapping[str, Any]) -> str:
    """``1/4 (trained 3/4)``: the randomised model's pointing-game hits beside the trained model's on the same
    checked lesion samples; ``—`` when none was checked."""
    n = entry.get("random_weights_scored") or 0
    return f"{entry['random_weights_hits']}/{n} (trained {entry['checked_hits']}/{n})" if n else MISSING


def deletion_cell(entry: Mapping[str, Any]) -> str:
    """``0.21 (order 0.45, weights 0.40)``: the mean deletion area beside its baselines; ``—`` without."""
    deletion = entry.get("deletion") or {}
    if not deletion:
        return MISSING
    others = [
        f"{name} {format_number(deletion[f'random_{name}_auc'], 2)}"
        for name in ("order", "weights")
        if f"random_{name}_auc" in deletion
    ]
    return format_number(deletion["auc"], 2) + (f" ({', '.join(others)})" if others else "")


def summary_lines(scores: Mapping[str, Mapping[str, Any]], alpha: float) -> list[str]:
    """The verdicts gathered, the same words in the CLI, ``report.md`` and the demo report: which methods beat
    the input baseline, which failed, which are not distinguishable, which depend on the input, which gave
    empty or constant maps."""
    def having(key: str, value: Any = True) -> list[str]:
        return [method for method, entry in scores.items() if entry.get(key) is value]

    lines = []
    beating, failed = having("beats_input_baseline"), having("failed")
    level = f"paired exact test, p < {alpha:g}"
    if beating:
        lines.append(f"Beat the input baseline ({level}): {', '.join(beating)}.")
    undecided = [m for m in having("beats_input_baseline", False) if m not in failed]
    if undecided:
        lines.append(
            f"Not distinguishable from the input baseline (paired exact test at α = {alpha:g}): {', '.join(undecided)}: "
            "on these samples the "
            "pointing game cannot tell their maps from the image's own intensity or edges."
        )
    if failed:
        lines.append(
            f"The maps failed to locate the lesion: {', '.join(failed)} (not above chance, or significantly below "
            "the input baseline)."
        )
    flagged = having("input_driven")
    if flagged:
        lines.append(
            f"Depend on the input more than the model: {', '.join(flagged)} (randomisation ρ at or above the "
            "threshold and no significant win over random weights; Adebayo et al. 2018)."
        )
    flat = [f"{method} ({flat_counts(entry)})" for method, entry in scores.items() if entry.get("flat_maps")]
    if flat:
        lines.append(f"Maps that point nowhere (all zero or constant): {', '.join(flat)}.")
    scored = max((entry.get("n_scored") or 0 for entry in scores.values()), default=0)
    needed = fewest_pairs_to_decide(alpha)
    if 0 < scored < needed:
        lines.append(
            f"Too few to decide: {scored} lesion samples scored, and a paired exact test reaches p < {alpha:g} only "
            f"when at least {needed} samples are hit by one map and missed by the other; so \"not distinguishable\" "
            "here says nothing either way: score more lesion samples (a split that holds more of them)."
        )
    return lines


def report_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` of a saliency run from its ``scores.json`` payload: every method with its interval next to
    the chance level and the model-free input baselines, the paired tests behind each verdict, the
    randomisation check, the deletion curve, and each CAM method's layer."""
    scores, baselines = report["scores"], report.get("baselines") or {}
    settings = report["settings"]
    lesions = report.get("lesions_in_split")
    header = [
        "map", "pointing game [95% CI] (hits)", "chance", "mass in mask", "randomisation ρ", "random-weight hits",
        "deletion AUC (random order, weights)", "verdict",
    ]  # fmt: skip
    rows = [
        [
            method, hits_text(entry, lesions), format_number(entry["pointing_chance"]),
            format_number(entry["mass_in_mask"]), format_number(entry["randomisation_spearman"], 2),
            random_weight_hits(entry), deletion_cell(entry), entry.get("verdict") or MISSING,
        ]  # fmt: skip
        for method, entry in scores.items()
    ]
    rows += [
        [
            f"{name.replace('_', ' ')} (no model)", hits_text(entry, lesions), format_number(entry["pointing_chance"]),
            format_number(entry["mass_in_mask"]), "", "", "", "baseline",
        ]  # fmt: skip
        for name, entry in baselines.items()
    ]
    lines = [f"# Saliency of `{report['target_name']}` (explaining: {report['target']})", ""]
    lines += markdown_table(header, rows, "lrrrrrrl")
    lines += ["", *summary_lines(scores, settings["alpha"])]
    lines += [
        "",
        "Pointing game: the share of lesion samples whose map peaks inside the lesion (a map with no peak "
        "counts as a miss), with its 95% Wilson interval. Chance: the lesion's share of the image. Input "
        "baselines: the image's own intensity and its edge map (gradient magnitude), scored the same way "
        "without any model. Every comparison is an exact McNemar test on the same samples (the samples one "
        f"map hits and the other misses); \"beats\" needs p < {settings['alpha']:g}. Random-weight hits: the "
        "pointing game of a copy whose weights were re-initialised "
        f"({settings['randomisation_scope']}), on every scored lesion sample (the trained model's hits in "
        "brackets); randomisation ρ: the Spearman correlation of |map| with that copy's maps, shown as evidence "
        "(the paired test decides). Deletion AUC: the area under the class probability as the most attributed "
        "patches are replaced by the image mean (lower: the model needed what the map points at), beside "
        "random order and the random-weight maps' order, compared by the exact sign test per sample.",
    ]
    for method, cam in (report.get("cam_layers") or {}).items():
        shape = f" ({'x'.join(map(str, cam['shape']))})" if cam.get("shape") else ""
        lines += ["", f"{method} layer: `{cam['name']}`{shape}: {cam['rule']}."]
        check = cam.get("check")
        if check:
            lines += [
                "",
                f"Held-out check of {method}'s layer ({len(check['ids'])} lesion samples of the {check['source']}, "
                f"not among those reported; {check['seconds']:.1f} s):",
                "",
            ]
            rows = [
                [
                    f"`{candidate['name']}`" + (" (chosen)" if candidate["name"] == cam["name"] else ""),
                    "x".join(map(str, candidate["shape"])), f"{candidate['check_hits']}/{len(check['ids'])}",
                    format_number(candidate["check_pointing_hit_rate"]), format_number(candidate["check_mass_in_mask"]),
                ]  # fmt: skip
                for candidate in cam["candidates"]
                if "check_pointing_hit_rate" in candidate
            ]
            header = ["layer", "map", "check hits", "check pointing game", "check mass in mask"]
            lines += markdown_table(header, rows, "llrrr")
            if not check["significant"]:
                lines += [
                    "",
                    f"Warning: the best candidate is not significantly above chance ({format_number(check['p'])}); no layer "
                    f"made {method} locate the held-out lesions, so its maps here are not evidence of where the "
                    "model looks.",
                ]
    return "\n".join(lines) + "\n"


def safe_name(text: str) -> str:
    """A file-name-safe version of a sample id or class name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "sample"


def write_nrrd(path: Path, volume: np.ndarray, geometry: Geometry | None) -> Path:
    """``volume`` ``(*S)`` as gzip NRRD (float32), placed in world space by ``geometry`` when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"encoding": "gzip"}
    if geometry is not None:
        if tuple(geometry.shape) != tuple(volume.shape):
            raise ValueError(f"geometry shape {geometry.shape} does not match the volume {volume.shape}")
        header.update(geometry.nrrd_header())
    with atomic_write(path, "wb") as fh:
        nrrd.write(fh, np.ascontiguousarray(volume, dtype=np.float32), header, index_order="C")
    return path


def write_index(path: Path, rows: Sequence[dict]) -> pd.DataFrame:
    """``index.csv``: one row per sample and method (columns :data:`INDEX_COLUMNS`)."""
    frame = pd.DataFrame(list(rows), columns=INDEX_COLUMNS)
    write_text_atomic(path, frame.to_csv(index=False))
    return frame


# -------------------------------------------------------------------------------------------- panels
def save_panel(
    path: Path,
    image: np.ndarray,
    attribution: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    title: str = "",
    axis_labels: tuple[str, str] | None = None,
    origin: Sequence[float] | None = None,
) -> Path:
    """A PNG of the map over the image, with the mask's contour when given.

    ``image`` and ``attribution`` are ``(*S)``. 3D: the three orthogonal slices through the peak of
    ``|map|`` and a maximum intensity projection along axis 0. 2D: the image and the overlay.
    ``axis_labels`` (2D, e.g. ``("frequency (Hz)", "time (s)")`` for a spectrogram): rows and columns are
    drawn on physical axes, ``origin + index * spacing``, rows upwards, with labelled ticks.
    """
    if image.shape != attribution.shape or (mask is not None and mask.shape != attribution.shape):
        raise ValueError(
            f"panel shapes differ: image {image.shape}, map {attribution.shape}, mask {np.shape(mask)}"
        )
    spacing = tuple(spacing) if spacing is not None else (1.0,) * attribution.ndim
    signed = bool((attribution < 0).any())
    vmax = float(np.abs(attribution).max()) or 1.0
    views = (
        _views_3d(image, attribution, mask, spacing)
        if attribution.ndim == 3
        else _views_2d(image, attribution, mask, spacing)
    )

    labelled = axis_labels is not None and attribution.ndim == 2
    placement: dict = {}
    if labelled:  # physical axes: cell edges at origin + (index -/+ 1/2) * spacing, rows upwards
        o = tuple(origin) if origin is not None else (0.0, 0.0)
        rows, cols = attribution.shape
        edges = [o[a] + (np.array([-0.5, n - 0.5]) * spacing[a]) for a, n in ((1, cols), (0, rows))]
        placement = {"extent": (*edges[0], *edges[1]), "origin": "lower"}
    width = 3.2 * len(views) + 0.8 + 0.6 * labelled
    figure = Figure(figsize=(width, 3.6 + 0.4 * labelled))  # fixed layout: constrained layout costs a second
    FigureCanvasAgg(figure)
    left, bottom, space = (0.9 / width, 0.14, 0.3) if labelled else (0.01, 0.02, 0.04)
    figure.subplots_adjust(left=left, right=1 - 0.7 / width, bottom=bottom, top=0.86, wspace=space)
    axes = figure.subplots(1, len(views), squeeze=False)[0]
    for ax, (name, img, amap, contour, aspect) in zip(axes, views, strict=True):
        aspect = "auto" if labelled else aspect
        ax.imshow(
            _normalise_image(img),
            cmap="gray",
            vmin=0,
            vmax=1,
            aspect=aspect,
            interpolation="nearest",
            **placement,
        )
        if amap is not None:
            ax.imshow(_overlay(amap, vmax, signed), aspect=aspect, interpolation="nearest", **placement)
        if contour is not None and contour.any() and not contour.all():
            ax.contour(contour.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(name, fontsize=8)
        if labelled:
            ax.set_xlabel(axis_labels[1], fontsize=8)
            ax.set_ylabel(axis_labels[0], fontsize=8)
            ax.tick_params(labelsize=7)
        else:
            ax.set_axis_off()
    cmap = "RdBu_r" if signed else "inferno"
    scale = ScalarMappable(Normalize(-vmax if signed else 0.0, vmax), cmap=cmap)
    colorbar_axes = figure.add_axes((1 - 0.55 / width, 0.12, 0.12 / width, 0.66))
    figure.colorbar(scale, cax=colorbar_axes)
    colorbar_axes.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    with atomic_write(path, "wb") as fh:
        figure.savefig(fh, format="png", dpi=100)
    return path


View = tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None, float]  # title, image, map, mask, aspect


def _views_3d(
    image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float]
) -> list[View]:
    peak = peak_voxel(np.abs(np.nan_to_num(amap, nan=0.0)))  # the pointing game's peak
    views = []
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = peak[axis]
        rows, cols = [a for a in range(3) if a != axis]
        view = tuple(index)
        views.append(
            (
                f"axis {axis} = {peak[axis]}",
                image[view],
                amap[view],
                None if mask is None else mask[view] > 0,
                spacing[rows] / spacing[cols],
            )
        )
    views.append(
        (
            "max projection (axis 0)",
            image.max(axis=0),
            np.abs(amap).max(axis=0),
            None if mask is None else (mask > 0).any(axis=0),
            spacing[1] / spacing[2],
        )
    )
    return views


def _views_2d(
    image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float]
) -> list[View]:
    contour = None if mask is None else mask > 0
    aspect = spacing[0] / spacing[1]
    return [("image", image, None, contour, aspect), ("attribution", image, amap, contour, aspect)]


def _normalise_image(image: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] between the 1st and 99th percentile."""
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    return np.clip((image - low) / (high - low), 0, 1)


def _overlay(amap: np.ndarray, vmax: float, signed: bool) -> np.ndarray:
    """RGBA ``(*S, 4)``: colour by value, opacity by magnitude, so zero attribution stays transparent."""
    if signed:
        rgba = colormaps["RdBu_r"](np.clip(0.5 + 0.5 * amap / vmax, 0, 1))
    else:
        rgba = colormaps["inferno"](np.clip(amap / vmax, 0, 1))
    rgba[..., 3] = 0.85 * np.clip(np.abs(amap) / vmax, 0, 1) ** 0.5
    return rgba


# ------------------------------------------------------------------------------------- map files
SPECTROGRAM_AXES = ("frequency (Hz)", "time (s)")  # EEG windows: rows are frequencies, columns times


def write_map(
    out_dir: Path,
    folder: Path,
    method: str,
    amap: np.ndarray,
    display: np.ndarray,
    mask: np.ndarray | None,
    grid: Geometry | None,
    source: Geometry | None,
    row: Mapping[str, Any],
    spectrogram: bool = False,
) -> dict[str, str]:
    """The map as NRRD (preprocessed grid, and the source grid when known) and as a PNG panel."""
    files = {"map_nrrd": write_nrrd(folder / f"{method}.nrrd", amap, grid)}
    if source is not None and grid is not None:
        original = resample_to_grid(amap, grid, source)  # (*orig_shape)
        files["map_original_nrrd"] = write_nrrd(folder / f"{method}_original.nrrd", original, source)
    title = (
        f"{row['id']} | {method} | explains {row['target_class']} (p={row['target_probability']:.2f}) | "
        f"pred {row['prediction']}" + (f" | label {row['label']}" if row["label"] else "")
    )
    spacing = grid.spacing if grid is not None else None
    files["panel_png"] = save_panel(
        folder / f"{method}.png",
        display,
        amap,
        mask=mask,
        spacing=spacing,
        title=title,
        axis_labels=SPECTROGRAM_AXES if spectrogram and grid is not None else None,
        origin=grid.origin if spectrogram and grid is not None else None,
    )
    return {key: path.relative_to(out_dir).as_posix() for key, path in files.items()}


class ClassMeans:
    """Running sums of max-normalised maps (and images) per method and explained class."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], dict[str, Any]] = {}

    def add(
        self, method: str, class_index: int, amap: np.ndarray, image: np.ndarray, grid: Geometry | None
    ) -> None:
        scale = float(np.nanmax(np.abs(amap))) if amap.size else 0.0
        normalised = np.nan_to_num(amap / scale if scale > 0 else amap).astype(np.float64)
        entry = self.sums.get((method, class_index))
        if entry is None:
            self.sums[(method, class_index)] = {
                "map": normalised,
                "image": image.astype(np.float64),
                "n": 1,
                "grid": grid,
            }
            return
        shape = entry["map"].shape
        entry["map"] += resample_to_shape(normalised, shape)
        entry["image"] += resample_to_shape(image, shape)
        entry["n"] += 1
        if entry["grid"] != grid:
            entry["grid"] = None  # samples on different grids: the mean has no single world placement

    def write(self, folder: Path, classes: Sequence[str]) -> list[dict[str, Any]]:
        written = []
        for (method, class_index), entry in sorted(self.sums.items()):
            name = f"{method}_{safe_name(classes[class_index])}"
            mean_map = (entry["map"] / entry["n"]).astype(np.float32)
            mean_image = (entry["image"] / entry["n"]).astype(np.float32)
            grid = entry["grid"]
            nrrd_path = write_nrrd(folder / f"{name}.nrrd", mean_map, grid)
            png_path = save_panel(
                folder / f"{name}.png",
                mean_image,
                mean_map,
                spacing=grid.spacing if grid is not None else None,
                title=f"{method} | mean over {entry['n']} maps explaining {classes[class_index]}",
            )
            written.append(
                {
                    "method": method,
                    "class": classes[class_index],
                    "n": entry["n"],
                    "nrrd": nrrd_path.relative_to(folder.parent).as_posix(),
                    "png": png_path.relative_to(folder.parent).as_posix(),
                }
            )
        return written
