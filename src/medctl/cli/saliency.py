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
            help="Explain this split (default saliency.split): maps written for its first saliency.max_samples, "
            "every lesion sample scored.",
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
            help="Samples of the split whose maps are written (default saliency.max_samples); every lesion "
            "sample is scored unless saliency.score_all_lesions = false.",
            show_default=False,
        ),
    ] = None,
    gradcam_layer: Annotated[
        str | None,
        typer.Option(
            "--gradcam-layer",
            help="Encoder module both CAMs read, e.g. layer3 or stem.1, or 'last' (the encoder's last spatial "
            "map); by default each CAM method picks its own on held-out lesions (sets saliency.gradcam_layer).",
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
    """The scores table (each method with its interval beside the model-free input baselines), the verdicts
    and the paired tests behind them, what they mean, and the files."""
    from medctl.saliency.outputs import deletion_cell, random_weight_hits, summary_lines
    from medctl.saliency.scoring import describe, hits_text

    saliency = result.result
    lesions = saliency.lesions_in_split
    table = Table(
        title=f"saliency of `{result.target_name}` on {result.n_samples} sample(s) ({result.samples})"
        + (f", {lesions} lesion samples scored" if lesions else "")
    )
    table.add_column("method", no_wrap=True)
    columns = ("pointing game [95% CI]", "chance", "mass in mask", "random. ρ", "random-weight hits", "deletion AUC", "s/map")
    for column in columns:
        table.add_column(column, justify="right")
    for method, scores in saliency.scores.items():
        table.add_row(
            method,
            hits_text(scores, lesions),
            format_number(scores["pointing_chance"]),
            format_number(scores["mass_in_mask"]),
            format_number(scores["randomisation_spearman"], 2),
            random_weight_hits(scores),
            deletion_cell(scores),
            format_number(scores["seconds"], 2),
        )
    for name, scores in saliency.baselines.items():  # the same scores for maps made without the model
        table.add_row(
            f"[dim]{name.replace('_', ': ', 1)}[/]", hits_text(scores, lesions), format_number(scores["pointing_chance"]),
            format_number(scores["mass_in_mask"]), "", "", "", "",
        )  # fmt: skip
    show_table(table)
    for method, scores in saliency.scores.items():
        console.print(f"  {describe(method, scores, lesions)}", soft_wrap=True, highlight=False)
    alpha = next(iter(saliency.scores.values()))["alpha"]
    for line in summary_lines(saliency.scores, alpha):
        console.print(f"  {line}", soft_wrap=True, highlight=False)
    console.print(
        "  pointing game: share of lesion samples whose map peaks in the mask (a map with no peak is a miss), "
        "95% Wilson interval; input: the image's own intensity and edge maps scored the same way, no model; "
        "chance: the mask's share of the image; every comparison is an exact McNemar test on the same samples. "
        "random. ρ: rank correlation with the maps of a re-initialised model; random-weight hits: that model's "
        "own pointing game on the same lesion samples. deletion AUC: class probability as the most attributed "
        "patches are removed (lower: more faithful), beside random order and the random-weight maps' order.",
        highlight=False,
    )
    for method, layer in saliency.cam_layers.items():
        warn = "[yellow]![/] " if layer.check and not layer.check["significant"] else ""
        console.print(f"  {warn}{method} layer {layer.name}: {layer.rule}", soft_wrap=True, highlight=False)
    console.print(f"[green]✓[/] {result.out_dir}", soft_wrap=True, highlight=False)
    console.print(
        "  report.md, index.csv (one row per sample and method), scores.json, maps/<id>/<method>.{nrrd,png}, "
        "maps/<id>/<method>_original.nrrd on the source grid, class_means/",
        soft_wrap=True,
        highlight=False,
    )
    console.print("  open the *_original.nrrd maps in 3D Slicer over the original scan", highlight=False)


