"""`medctl saliency`: Captum attribution maps of a trained classifier, scored against the masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors
from medctl.cli.output import show_table
from medctl.io import format_number

if TYPE_CHECKING:
    from medctl.saliency.stage import SaliencyStageResult


@handle_errors
def saliency_command(
    ckpt: Annotated[
        Path, typer.Option("--ckpt", help="Classifier checkpoint from `medctl finetune` (best.ckpt).")
    ],
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Explain this split's first saliency.max_samples (default saliency.split).",
            show_default=False,
        ),
    ] = None,
    ids: Annotated[
        str | None,
        typer.Option(
            "--ids",
            help="Explain these cached samples, comma-separated: --ids sub-001,sub-007.",
            show_default=False,
        ),
    ] = None,
    input_path: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="Explain one raw scan (NRRD, NIfTI, DICOM folder, NPY, PNG), preprocessed like the training data.",
            show_default=False,
        ),
    ] = None,
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask", help="Ground-truth mask of the --input scan, to score the maps.", show_default=False
        ),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Attribution method, repeatable (default saliency.methods); see `medctl list`.",
            show_default=False,
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Class to explain: pred, true or a class name (default saliency.target).",
            show_default=False,
        ),
    ] = None,
    target_name: Annotated[
        str | None,
        typer.Option(
            "--target-name",
            help="Which target of a multi-target classifier (default: its first).",
            show_default=False,
        ),
    ] = None,
    max_samples: Annotated[
        int | None,
        typer.Option(
            "--max-samples",
            min=1,
            help="Samples of the split to explain (default saliency.max_samples).",
            show_default=False,
        ),
    ] = None,
    gradcam_layer: Annotated[
        str | None,
        typer.Option(
            "--gradcam-layer",
            help="Encoder module Grad-CAM reads, e.g. layer3 or stem.1: finer than the default last spatial "
            "layer for small lesions (sets saliency.gradcam_layer).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output folder (default: <run dir>/saliency_<split|ids|input stem>/).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Attribution maps (NRRD + PNG) for a trained classifier, scored against ground-truth masks.

    Samples: a split of the cache (--split), cached ids (--ids) or one raw scan (--input). The maps are
    written on the preprocessed grid and resampled onto each source scan's grid, for 3D Slicer.

    Example: medctl saliency --ckpt runs/oct_ft/checkpoints/best.ckpt --split test --method ig --method gradcam

    Example: medctl saliency --ckpt runs/ft/checkpoints/best.ckpt --ids sub-003 --method gradcam --gradcam-layer layer3
    """
    from medctl.saliency.stage import run_saliency_stage  # torch and Captum load only when this command runs

    layer_override = [f"saliency.gradcam_layer={json.dumps(gradcam_layer)}"] if gradcam_layer else []
    result = run_saliency_stage(
        ckpt,
        split=split,
        ids=ids.split(",") if ids is not None else None,
        input_path=input_path,
        mask_path=mask,
        methods=methods,
        target=target,
        target_name=target_name,
        max_samples=max_samples,
        out_dir=out,
        config_file=config,
        overrides=[*(overrides or []), *layer_override],
    )
    show_saliency(result)


def show_saliency(result: SaliencyStageResult) -> None:
    """The scores table (each method beside the model-free input baselines), what they mean, and the files."""
    from medctl.saliency.outputs import random_weight_hits
    from medctl.saliency.scoring import describe
    table = Table(
        title=f"saliency of `{result.target_name}` on {result.n_samples} sample(s) ({result.samples})"
    )
    table.add_column("method", no_wrap=True)
    for column in ("pointing game", "chance", "mass in mask", "random. ρ", "random-weight hits", "s/map"):
        table.add_column(column, justify="right", no_wrap=column == "pointing game")
    saliency = result.result
    for method, scores in saliency.scores.items():
        table.add_row(
            method,
            _hits(scores),
            _num(scores["pointing_chance"]),
            _num(scores["mass_in_mask"]),
            _num(scores["randomisation_spearman"], 2),
            random_weight_hits(scores),
            _num(scores["seconds"], 2),
        )
    for name, scores in saliency.baselines.items():  # the same scores for maps made without the model
        table.add_row(
            f"[dim]{name.replace('_', ': ', 1)}[/]", _hits(scores), _num(scores["pointing_chance"]),
            _num(scores["mass_in_mask"]), "", "", "",
        )  # fmt: skip
    show_table(table)
    for method, scores in saliency.scores.items():
        console.print(f"  {describe(method, scores)}", soft_wrap=True, highlight=False)
    beating = [m for m, s in saliency.scores.items() if s["beats_input_baseline"]]
    if saliency.baselines:
        console.print(
            f"  beat the input baseline: {', '.join(beating)}"
            if beating
            else "  no method beats the input baseline: the image alone points at the lesions as well",
            highlight=False,
        )
    flagged = [m for m, s in saliency.scores.items() if s["input_driven"]]
    if flagged:
        threshold = next(iter(saliency.scores.values()))["randomisation_threshold"]
        console.print(
            f"  [yellow]![/] {', '.join(flagged)}: randomisation ρ ≥ {threshold}, the maps depend on the input "
            "more than on the model's weights (Adebayo et al. 2018)",
            highlight=False,
        )
    console.print(
        "  pointing game: share of lesion samples whose map peaks in the mask (a map with no peak is a miss); "
        "input: the image's own intensity and edge maps scored the same way, no model (input baseline: the "
        "better of the two); chance: the mask's share of the image. random. ρ: rank correlation with the maps "
        "of a re-initialised model (high: the map shows the input, not the model); random-weight hits: that "
        "model's own pointing game on the same checked samples, beside the trained model's.",
        highlight=False,
    )
    if saliency.cam_layer is not None:
        console.print(f"  CAM layer {saliency.cam_layer.name}: {saliency.cam_layer.rule}", highlight=False)
    console.print(f"[green]✓[/] {result.out_dir}", soft_wrap=True, highlight=False)
    console.print(
        "  report.md, index.csv (one row per sample and method), scores.json, maps/<id>/<method>.{nrrd,png}, "
        "maps/<id>/<method>_original.nrrd on the source grid, class_means/",
        soft_wrap=True,
        highlight=False,
    )
    console.print("  open the *_original.nrrd maps in 3D Slicer over the original scan", highlight=False)


def _hits(scores: dict) -> str:
    if not scores["n_scored"]:
        return _num(scores["pointing_hit_rate"])
    return f"{_num(scores['pointing_hit_rate'])} ({scores['pointing_hits']}/{scores['n_scored']})"


def _num(value: float | None, digits: int = 3) -> str:
    return format_number(value, digits, missing="—")
