"""`medctl saliency`: Captum attribution maps of a trained classifier, scored against the masks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors
from medctl.cli.output import show_table


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
    table = Table(
        title=f"saliency of `{result.target_name}` on {result.n_samples} sample(s) ({result.samples})"
    )
    table.add_column("method", no_wrap=True)
    for column in ("pointing game", "chance", "mass in mask", "random. ρ", "s/map"):
        table.add_column(column, justify="right")
    for method, scores in result.result.scores.items():
        scored = f" ({scores['n_scored']} scored)" if scores["n_scored"] else ""
        table.add_row(
            method,
            _num(scores["pointing_hit_rate"]) + scored,
            _num(scores["pointing_chance"]),
            _num(scores["mass_in_mask"]),
            _num(scores["randomisation_spearman"]),
            _num(scores["seconds"], 2),
        )
    show_table(table)
    console.print(
        "  pointing game: share of maps whose peak lies in the mask; chance: the mask's share of the image "
        "(also the chance level of mass in mask). random. ρ: rank correlation with the maps of a partly "
        "re-initialised model (low is good).",
        highlight=False,
    )
    console.print(f"[green]✓[/] {result.out_dir}", soft_wrap=True, highlight=False)
    console.print(
        "  index.csv (one row per sample and method), scores.json, maps/<id>/<method>.{nrrd,png}, "
        "maps/<id>/<method>_original.nrrd on the source grid, class_means/",
        soft_wrap=True,
        highlight=False,
    )
    console.print("  open the *_original.nrrd maps in 3D Slicer over the original scan", highlight=False)


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"
