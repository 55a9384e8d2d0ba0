"""``medctl demo``: every stage on the built-in synthetic lesion dataset, on a laptop CPU, in minutes.

The recipe, read top to bottom (each step calls the same library function as its own command and
writes an ordinary run directory, so any step can be rerun by hand with the config it saved):

1. synthetic 3D lesion dataset: NRRD volumes, ``participants.tsv`` with splits, ground-truth masks;
2. ``preprocess`` into the cache;
3. ``pretrain`` three BYOL encoders standing in for a lab's three checkpoints: one on all training
   volumes, two on different halves of them;
4. ``sweep``: the linear probe over the three plus a random-initialisation baseline, one leaderboard;
5. ``finetune`` of the leader (head first, then the encoder);
6. ``evaluate`` on the test split;
7. ``saliency`` on test samples, scored against the masks (pointing game);
8. ``saliency`` again, on a small 2D classifier whose evidence (a thin rod) is not the brightest thing in the
   image, so that a map can beat the image's own intensity (:mod:`medctl.demo_saliency`);
9. ``report.md`` and a self-contained ``report.html``.

A second run reuses the cache and every finished run (and says so); ``fresh=True`` starts over.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from medctl.analysis.markdown import write_report
from medctl.config import Config, apply_overrides, load_config, upgrade_saved_tree
from medctl.data.preprocess import preprocess
from medctl.data.synthetic import SyntheticDataset, described_synthetic_dataset
from medctl.demo_saliency import run_distractor_saliency
from medctl.errors import UserError
from medctl.evaluate import run_evaluate
from medctl.finetune.run import run_finetune
from medctl.io import format_number
from medctl.pretrain.run import run_pretrain
from medctl.progress import log
from medctl.saliency.outputs import deletion_cell, random_weight_hits, summary_lines
from medctl.saliency.scoring import hits_text
from medctl.saliency.stage import run_saliency_stage
from medctl.sweep.run import run_sweep


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; ``small`` is the default a new user runs (< 5 minutes on 2 CPU cores)."""

    n: int  # participants
    volume: tuple[int, int, int]  # synthetic (D, H, W)
    spatial_size: tuple[int, int, int]  # preprocessed (D, H, W)
    pretrain_epochs: int
    finetune_epochs: int
    unfreeze_at_epoch: int  # 1-based: the first epoch in which the encoder trains
    saliency_samples: int
    bootstrap: int
    batch_size: int


SIZES = {
    "tiny": DemoSize(24, (16, 32, 32), (16, 32, 32), 1, 4, 3, 3, 50, 4),  # the test suite's end-to-end run
    "small": DemoSize(60, (24, 48, 48), (16, 32, 32), 8, 20, 9, 12, 1000, 8),
    "medium": DemoSize(120, (32, 64, 64), (24, 48, 48), 15, 30, 11, 8, 1000, 8),
}

# three encoders standing in for the OCT case's three checkpoints
# (run name, pretrain.subset, run.seed): the two halves differ by their seed
PRETRAIN_RUNS = (("byol_all", "", 0), ("byol_half_a", "fraction:0.5", 1), ("byol_half_b", "fraction:0.5", 2))

STAGES = ("dataset", "preprocess", "pretrain", "sweep", "finetune", "evaluate", "saliency", "saliency_2d", "report")


@dataclass
class DemoResult:
    out: Path
    report_md: Path
    report_html: Path
    leaderboard: list[dict[str, Any]]
    test_metrics: dict[str, Any]
    saliency_scores: dict[str, dict[str, float]]
    distractor_scores: dict[str, dict[str, float]]  # the 2D check whose evidence (a rod) is not the brightest thing
    reused: list[str] = field(default_factory=list)  # steps skipped because they had finished before
    stage_seconds: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


StageCallback = Callable[[int, int, str], None]


def default_config_text() -> str:
    """The embedded default config (``config/demo.toml`` is a link to this one file)."""
    return resources.files("medctl").joinpath("demo.toml").read_text()


def demo_config(
    out: Path, dataset: SyntheticDataset, size: DemoSize, config_file: Path | None, overrides: Iterable[str]
) -> Config:
    """Defaults < the demo config < the dataset's locations < the user's ``key=value``."""
    if config_file is None:
        config_file = out / "demo.toml"
        config_file.write_text(default_config_text())
    layered = [
        *dataset.config_overrides(),
        f"data.cache_dir={json.dumps(str(out / 'cache'))}",
        f"data.preprocess.spatial_size={json.dumps(list(size.spatial_size))}",
        f"run.root={json.dumps(str(out))}",
        f"data.batch_size={size.batch_size}",
        f"pretrain.epochs={size.pretrain_epochs}",
        f"train.epochs={size.finetune_epochs}",
        f"train.bootstrap={size.bootstrap}",
        f"sweep.bootstrap={size.bootstrap}",
        f"saliency.max_samples={size.saliency_samples}",
        *overrides,
    ]
    return load_config(config_file, layered)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    size: str = "small",
    fresh: bool = False,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    on_stage: StageCallback | None = None,
) -> DemoResult:
    """Run every stage into ``out``; see the module docstring."""
    if size not in SIZES:
        raise UserError(f"--size {size!r} is not a demo size; use one of: {', '.join(SIZES)}")
    settings, out = SIZES[size], Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    seconds: dict[str, float] = {}
    stage = _stage_counter(on_stage, seconds)

    with stage("dataset"):
        dataset, was_there = described_synthetic_dataset(
            out / "data", n=settings.n, dims=3, size=settings.volume, seed=0, cache_dir=out / "cache"
        )
        if was_there:
            reused.append("dataset")
        config = demo_config(out, dataset, settings, Path(config_file) if config_file else None, overrides)

    with stage("preprocess"):
        prepared = preprocess(config.data)
        if prepared.n_new == 0:
            reused.append("preprocess")

    with stage("pretrain"):
        checkpoints = pretrain_checkpoints(config, out, reused)

    with stage("sweep"):
        sweep_config = apply_overrides(
            config,
            [
                'run.name="sweep"',
                f"sweep.checkpoints={json.dumps([str(c) for c in checkpoints])}",
                "sweep.random_baseline=true",
                'sweep.mode="linear_probe"',
            ],
        )
        sweep = run_sweep(sweep_config, command="medctl demo", all_checkpoints=True)
        board = sweep.leaderboard
        leader = _leader(board)

    with stage("finetune"):
        ft_dir = out / "finetune"
        ft_config = apply_overrides(
            config,
            [
                'run.name="finetune"',
                f"model.checkpoint={json.dumps(str(leader['checkpoint']))}",
                "model.freeze_encoder=true",
                f"model.unfreeze_at_epoch={settings.unfreeze_at_epoch}",
                "train.grid={}",  # the sweep's probe grid; a fine-tune trains one head
            ],
        )
        best = ft_dir / "checkpoints" / "best.ckpt"
        if (ft_dir / "results.json").exists() and best.exists():
            reused.append("finetune")
        else:
            # an unfinished fine-tune from an earlier demo is started again
            best = run_finetune(ft_config, command="medctl demo", run_dir=ft_dir, overwrite=True).best_checkpoint

    with stage("evaluate"):
        evaluation = run_evaluate(best, split="test", out_dir=ft_dir / "eval_test", overwrite=True)

    with stage("saliency"):
        saliency = run_saliency_stage(best, split="test", out_dir=ft_dir / "saliency_test")

    with stage("saliency_2d"):
        distractors = run_distractor_saliency(out / "distractors_2d", size, config.run.device, reused)

    with stage("report"):
        commands = rerun_commands(out, leader)
        markdown = demo_report(
            out, dataset, prepared.manifest, board, evaluation.metrics, saliency, commands, distractors
        )
        report_md, report_html = write_report(markdown, out, name="report")

    log("demo: reused " + ", ".join(reused) if reused else "demo: every step ran fresh")
    return DemoResult(
        out=out,
        report_md=report_md,
        report_html=report_html,
        leaderboard=board.to_dict("records"),
        test_metrics=evaluation.summary,
        saliency_scores=saliency.result.scores,
        distractor_scores=distractors.result.scores,
        reused=reused,
        stage_seconds=seconds,
        commands=commands,
    )


def pretrain_checkpoints(config: Config, out: Path, reused: list[str]) -> list[Path]:
    """The ``PRETRAIN_RUNS`` under ``out/pretrain`` (a finished one reused and noted in ``reused``, an
    interrupted one resumed), published as named files in ``out/checkpoints``."""
    checkpoints = []
    for name, subset, seed in PRETRAIN_RUNS:
        run_config = apply_overrides(
            config,
            [
                f'run.name="{name}"',
                f'pretrain.subset="{subset}"',
                f"run.seed={seed}",
                f"run.root={json.dumps(str(out / 'pretrain'))}",
            ],
        )
        encoder_ckpt = out / "pretrain" / name / "checkpoints" / "encoder.ckpt"
        if (out / "pretrain" / name / "results.json").exists() and encoder_ckpt.exists():
            reused.append(f"pretrain {name}")
            checkpoints.append(encoder_ckpt)
            continue
        resume = (out / "pretrain" / name / "checkpoints" / "last.ckpt").exists()
        checkpoints.append(
            run_pretrain(run_config, command="medctl demo", resume=resume).encoder_checkpoint
        )
    # a folder of named checkpoints, as a lab has them: the sweep names its entries after the files
    return [
        publish_checkpoint(path, out / "checkpoints" / f"{name}.ckpt")
        for path, (name, *_) in zip(checkpoints, PRETRAIN_RUNS, strict=False)
    ]


def publish_checkpoint(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` unless an identical copy is there (a rerun keeps its mtime)."""
    if not (
        target.exists()
        and target.stat().st_size == source.stat().st_size
        and target.stat().st_mtime >= source.stat().st_mtime
    ):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return target


def _leader(board: Any) -> dict[str, Any]:
    """The best pretrained entry: the random baseline may lead on a bad day, but it is no encoder."""
    rows = [r for r in board.to_dict("records") if r.get("status") == "ok" and r.get("checkpoint")]
    if not rows:
        raise UserError("demo: no pretrained entry finished in the sweep; see its leaderboard.md for why")
    return rows[0]


class _stage_counter:
    """Context-manager factory: ``with stage("pretrain"):`` reports [3/8] and times the step."""

    def __init__(self, on_stage: StageCallback | None, seconds: dict[str, float]):
        self.on_stage, self.seconds, self.index = on_stage, seconds, 0

    def __call__(self, name: str) -> _stage_counter:
        self.index += 1
        self.name = name
        return self

    def __enter__(self) -> None:
        if self.on_stage:
            self.on_stage(self.index, len(STAGES), self.name)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.name] = round(time.perf_counter() - self.start, 1)


def rerun_commands(out: Path, leader: dict[str, Any]) -> list[str]:
    ckpt = out / "finetune" / "checkpoints" / "best.ckpt"
    return [
        f"medctl preprocess -c {out}/pretrain/byol_all/config.toml",
        f"medctl pretrain -c {out}/pretrain/byol_all/config.toml run.name=byol_again",
        f"medctl sweep -c {out}/sweep/config.toml --all-checkpoints",
        f"medctl finetune -c {out}/finetune/config.toml run.name=finetune_again model.checkpoint={leader['checkpoint']}",
        f"medctl evaluate --ckpt {ckpt} --split test",
        f"medctl saliency --ckpt {ckpt} --split test",
        f"medctl saliency --ckpt {out}/distractors_2d/finetune/checkpoints/best.ckpt --split test"
        " --method integrated_gradients --method hirescam",
    ]


def demo_report(
    out: Path,
    dataset: SyntheticDataset,
    manifest: Any,
    board: Any,
    test_metrics: dict[str, Any],
    saliency: Any,
    commands: list[str],
    distractors: Any,
) -> str:
    """The report a person wants to read: data, pretraining, leaderboard, test metrics, saliency, next steps."""
    from medctl.analysis.leaderboard import leaderboard_markdown

    counts = manifest[manifest["status"] == "ok"].groupby("split").size().to_dict()
    lines = [
        "# medctl demo",
        "",
        "Every stage of medctl on a synthetic 3D lesion dataset: healthy volumes have no lesion, "
        "edema volumes carry bright ellipsoids under noise, a bias field and per-volume intensity scaling.",
        "",
        "## Dataset",
        "",
        f"{len(dataset.ids)} participants, classes {', '.join(dataset.classes)}; volumes {list(dataset.size)} "
        f"with spacing {list(dataset.spacing)} mm; cached samples per split: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        f"## Pretraining ({pretrain_title(out)})",
        "",
    ]
    for name, subset, _ in PRETRAIN_RUNS:
        figure = _first_figure(out / "pretrain" / name / "figures", ("loss", "curve"))
        lines += [f"### {name} ({subset or 'all training volumes'})", ""]
        if figure:
            lines += [f"![{name} loss]({figure.relative_to(out)})", ""]
    lines += ["## Leaderboard (linear probe, identical splits)", "", leaderboard_markdown(board), ""]
    summary = test_metrics.get("summary", {})
    lines += ["## Fine-tuned leader on the test split", ""]
    for key in ("balanced_accuracy", "macro_f1", "auroc", "accuracy"):
        if summary.get(key) is not None:
            ci = summary.get(f"{key}_ci") or [None, None]
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else ""
            lines.append(f"- {key.replace('_', ' ')}: {summary[key]:.3f}{interval}")
    confusion = _first_figure(out / "finetune" / "eval_test" / "figures", ("confusion",))
    if confusion:
        lines += ["", f"![confusion matrix]({confusion.relative_to(out)})"]
    lines += ["", "## Saliency on test samples", "", *saliency_lines(saliency.result)]
    alpha = next(iter(saliency.result.scores.values()))["alpha"]
    lines += [
        "",
        "Pointing game: the share of lesion samples whose map peaks inside the lesion, with its 95% Wilson "
        "interval; chance is the hit rate of a random peak; the input baselines score the image's own intensity "
        "and edge maps, no model. Every comparison is an exact McNemar test on the same samples, and \"beats\" "
        f"needs p < {alpha:g}. Random-weight hits: the pointing game of a re-initialised copy of the model on the "
        "same lesion samples, beside the trained model's; randomisation ρ: the rank correlation with that copy's "
        "maps (Adebayo et al. 2018), evidence the paired test outranks. Deletion AUC: the class probability as "
        "the most attributed patches are removed (lower: the model needed what the map shows), beside random "
        "order and the random-weight maps' order. Grad-CAM weighs each channel by its gradient averaged over the "
        "map; HiResCAM keeps the gradient at each voxel, which matters for encoders that max-pool (MT3's plane "
        "projections).",
    ]
    lines += cam_layer_lines(saliency.result)
    lines += ["", *panel_lines(out, saliency.out_dir)]
    lines += [
        "",
        "## Saliency where the evidence is not the brightest thing (2D)",
        "",
        "On the volumes above the lesions are the brightest structure, so the image alone finds them and no map "
        "can beat it. Here a 2D ResNet is trained from scratch on synthetic images whose class is a thin rod, "
        "present or absent, while three round distractors brighter than the rod sit in every image of both "
        "classes (min-max scaled): the intensity map points at a distractor, and a map that finds the rod has "
        f"it from the model ({distractor_summary(distractors)}).",
        "",
        *saliency_lines(distractors.result),
        *cam_layer_lines(distractors.result),
        "",
    ]
    lines += panel_lines(out, distractors.out_dir)
    lines += ["", "## Rerun each step, or point it at your own data", "", "```", *commands, "```", ""]
    lines += [
        "Next: copy a config from `config/` (e.g. `config/finetune/oct_vjepa2.toml`), point `data.table` and "
        "`data.source.root` at your table and bucket, then `medctl check bucket -c my.toml`, "
        "`medctl sweep -c my.toml --all-checkpoints` and `medctl saliency --ckpt runs/.../best.ckpt`.",
        "",
    ]
    return "\n".join(lines)


def saliency_lines(result: Any) -> list[str]:
    """The saliency table of a run (every method, then the input baselines) and its verdict lines."""
    lesions = result.lesions_in_split
    lines = [
        "| map | pointing game [95% CI] (hits) | chance (mask share) | mass in mask | randomisation ρ | random-weight hits | deletion AUC (random order, weights) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, scores in result.scores.items():
        lines.append(
            f"| {method} | {hits_text(scores, lesions)} | {format_number(scores.get('mask_share'), 2)} | "
            f"{format_number(scores.get('mass_in_mask'), 2)} | {format_number(scores.get('randomisation_spearman'), 2)} | "
            f"{random_weight_hits(scores)} | {deletion_cell(scores)} | {scores.get('verdict') or '—'} |"
        )
    for name, scores in result.baselines.items():
        lines.append(
            f"| {name.replace('_', ' ')} (no model) | {hits_text(scores, lesions)} | "
            f"{format_number(scores.get('mask_share'), 2)} | {format_number(scores.get('mass_in_mask'), 2)} | | | | baseline |"
        )
    alpha = next(iter(result.scores.values()))["alpha"]
    return [*lines, "", *summary_lines(result.scores, alpha)]


def cam_layer_lines(result: Any) -> list[str]:
    """Which layer each CAM method read, and by which rule (its own held-out check, or a pinned layer)."""
    return [line for method, cam in result.cam_layers.items() for line in ("", f"{method} reads `{cam.name}`: {cam.rule}.")]


def distractor_summary(distractors: Any) -> str:
    """'32 rod images in its test split, every one scored' for the 2D check's intro."""
    return f"{distractors.result.lesions_in_split or 0} rod images in its test split, every one scored"


def panel_lines(out: Path, saliency_dir: Path) -> list[str]:
    """Markdown images of :func:`lesion_panels`, relative to the report in ``out``."""
    return [f"![{path.parent.name} {path.stem}]({path.relative_to(out)})" for path in lesion_panels(saliency_dir)]


def lesion_panels(saliency_dir: Path, limit: int = 2) -> list[Path]:
    """Panels of the first test samples that carry a lesion (scored against a mask), every method."""
    index = pd.read_csv(saliency_dir / "index.csv")
    scored = index[index["pointing_hit"].notna() & index["panel_png"].notna()]  # scored and written
    ids = list(dict.fromkeys(scored["id"]))[:limit]
    return [saliency_dir / p for p in scored[scored["id"].isin(ids)]["panel_png"]]


def pretrain_title(out: Path) -> str:
    """'BYOL on mt3_tiny, heads: rotation 0.5' from the first pretraining run's saved config."""
    saved = upgrade_saved_tree(tomllib.loads((out / "pretrain" / PRETRAIN_RUNS[0][0] / "config.toml").read_text()))
    method = saved["pretrain"]["method"]
    settings = saved["pretrain"].get(method, {})  # the pretrain stage writes its method's whole table
    heads = [
        f"{h} {settings[f'{h}_weight']}"
        for h in ("reconstruction", "rotation", "jigsaw")
        if settings.get(f"{h}_weight", 0) > 0
    ]
    return f"{method.upper()} on {saved['model']['encoder']}, auxiliary heads: {', '.join(heads) or 'off'}"


def _first_figure(folder: Path, words: tuple[str, ...]) -> Path | None:
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.png")):
        if any(w in path.stem for w in words):
            return path
    return None


