"""Do the saliency maps point at the lesions? Pointing game and mass in mask, per method and CAM layer.

    uv run python benchmarks/bench_pointing.py                 # both scenarios below, about 4 minutes on 2 cores
    uv run python benchmarks/bench_pointing.py --scenario mt3 --no-write
    uv run python benchmarks/bench_pointing.py --distractors 2   # lesions no longer the brightest structure

Each scenario makes the synthetic lesion dataset, fine-tunes a classifier with `medctl finetune` and explains
its test split with `medctl saliency` (target: the labelled class, pointing tolerance 0), once per CAM layer:
the default (chosen on a held-out check of val lesions, its candidates' check scores listed) and others given
with `--gradcam-layer`. Chance is the
mask's share of the volume, the hit rate of a peak placed at random; the input rows score the image's own
intensity and edge maps the same way, without a model (`--distractors N` adds N balls brighter than any
lesion to every volume, so the intensity map misses). The commands run as a user runs them,
in subprocesses; the figures come from each run's `scores.json`, are printed and appended, dated and with the
machine, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from machine_info import machine

from medctl.data.synthetic import make_synthetic_dataset
from medctl.saliency.scoring import hits_text

RESULTS = Path(__file__).with_name("RESULTS.md")
# the pointing game's protocol (Zhang et al. 2016): explain the labelled class, whatever the prediction
SALIENCY_SETTINGS = [
    "saliency.ig_steps=16",
    "saliency.max_samples=20",
    "saliency.randomisation_check=false",
    'saliency.target="true"',
]


@dataclass(frozen=True)
class Scenario:
    name: str
    encoder: str
    size: tuple[int, int, int]
    finer_layers: tuple[str, ...]
    encoder_args: str = ""
    lr_encoder: float = 3e-3
    methods: tuple[str, ...] = ("integrated_gradients", "gradients", "gradcam", "hirescam")
    layer_methods: tuple[str, ...] = ("gradcam", "hirescam")  # rerun on each finer layer


SCENARIOS = {
    "resnet": Scenario(
        "resnet",
        "resnet_test_3d",
        (32, 64, 64),
        finer_layers=("layer2",),
        encoder_args="{no_max_pool=true, conv1_t_stride=1}",  # layer4 at 1/8 of the input: 4x8x8
    ),
    "mt3": Scenario("mt3", "mt3_tiny", (16, 32, 32), finer_layers=("stem.1", "stem.0"), lr_encoder=1e-3),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--n", type=int, default=48, help="synthetic volumes per scenario")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--distractors", type=int, default=0, help="bright non-lesion balls per volume")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    return parser.parse_args()


def medctl(*args: str) -> None:
    """Run one `medctl` command; its output is shown only when it fails."""
    done = subprocess.run([sys.executable, "-m", "medctl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"medctl {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def finetune(scenario: Scenario, root: Path, n: int, epochs: int, distractors: int) -> tuple[Path, dict]:
    """Make the data, fine-tune the whole classifier; returns best.ckpt and results.json."""
    dataset = make_synthetic_dataset(
        root / "data", n=n, dims=3, size=scenario.size, seed=0, distractors=distractors
    )
    args = [
        *dataset.config_overrides(),
        "data.preprocess.workers=1",
        "data.batch_size=4",
        'run.device="cpu"',
        f'model.encoder="{scenario.encoder}"',
        "model.freeze_encoder=false",
        f"train.epochs={epochs}",
        "train.lr_head=3e-3",
        f"train.lr_encoder={scenario.lr_encoder}",
        "train.warmup_epochs=1",
        "train.patience=0",
        f"run.root={json.dumps(str(root / 'runs'))}",
        f'run.name="{scenario.name}"',
        "run.seed=0",
    ]
    if scenario.encoder_args:
        args.append(f"model.encoder_args={scenario.encoder_args}")
    medctl("finetune", *args)
    run_dir = root / "runs" / scenario.name
    return run_dir / "checkpoints" / "best.ckpt", json.loads((run_dir / "results.json").read_text())


def explain(ckpt: Path, out: Path, methods: tuple[str, ...], layer: str) -> dict:
    """`medctl saliency` on the test split; its scores.json."""
    method_args = [arg for method in methods for arg in ("--method", method)]
    layer_args = ["--gradcam-layer", layer] if layer else []
    medctl("saliency", "--ckpt", str(ckpt), "--split", "test", "--out", str(out), *method_args, *layer_args,
           *SALIENCY_SETTINGS)  # fmt: skip
    return json.loads((out / "scores.json").read_text())


def run_scenario(
    scenario: Scenario, root: Path, n: int, epochs: int, distractors: int
) -> tuple[dict, list[dict]]:
    started = time.perf_counter()
    ckpt, results = finetune(scenario, root, n, epochs, distractors)
    rows = []
    runs = [("", scenario.methods)] + [(layer, scenario.layer_methods) for layer in scenario.finer_layers]
    for layer, methods in runs:
        report = explain(ckpt, root / f"saliency_{layer or 'default'}", methods, layer)
        layers = report.get("cam_layers") or {}
        if not layer:
            cam_layers = layers
        for method, scores in report["scores"].items():
            chosen = (layers.get(method) or {}).get("name", "")
            shown = (layer or f"default ({chosen})") if method in layers else "-"
            rows.append({"method": method, "layer": shown, **scores})
        if not layer:
            for name, scores in report["baselines"].items():
                rows.append({"method": name.replace("_", ": ", 1) + " (no model)", "layer": "-", **scores})
    info = {
        "val balanced accuracy": results["metrics"]["balanced_accuracy"],
        "seconds": time.perf_counter() - started,
        "cam_layers": cam_layers,
    }
    return info, rows


def table(
    scenario: Scenario, info: dict, rows: list[dict], n: int, epochs: int, distractors: int
) -> list[str]:
    lines = [
        f"### {scenario.encoder}{' ' + scenario.encoder_args if scenario.encoder_args else ''}, "
        f"{'x'.join(map(str, scenario.size))}",
        "",
        f"- {n} synthetic volumes ({distractors} distractors each), fine-tuned {epochs} epochs (`medctl finetune`): "
        "val balanced accuracy "
        f"{info['val balanced accuracy']:.3f}; scenario wall time {info['seconds']:.0f} s",
        "",
        *[line for method, cam in info["cam_layers"].items() for line in cam_check_lines(method, cam)],
        "| method | CAM layer | scored maps | pointing game [95% CI] | chance | mass in mask | s/map | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        seconds = "" if math.isnan(row.get("seconds") or math.nan) else f"{row['seconds']:.2f}"
        lines.append(
            f"| {row['method']} | {row['layer']} | {row['n_scored']} | {hits_text(row)} | {row['pointing_chance']:.4f} | "
            f"{row['mass_in_mask']:.3f} | {seconds} | {row.get('verdict') or 'baseline'} |"
        )
    return lines


def cam_check_lines(method: str, cam_layer: dict) -> list[str]:
    """How a CAM method's default layer was chosen: its held-out check's candidates and scores, or the rule."""
    check = cam_layer.get("check")
    if not check:
        return [f"- {method}'s default layer `{cam_layer.get('name', '')}`: {cam_layer.get('rule', '')}", ""]
    scored = ", ".join(
        f"{c['name']} {c['check_pointing_hit_rate']:.2f} / {c['check_mass_in_mask']:.3f}"
        for c in cam_layer["candidates"]
        if "check_pointing_hit_rate" in c
    )
    return [
        f"- {method}'s default layer `{cam_layer['name']}`, chosen on {len(check['ids'])} held-out lesion samples of "
        f"the {check['source']} (pointing game / mass in mask per candidate: {scored}; best against chance "
        f"p = {check['p']:.3f}; {check['seconds']:.1f} s; the resolution rule alone: {check['resolution_rule_choice']})",
        "",
    ]


def main() -> None:
    args = parse_args()
    lines = [
        f"## bench_pointing.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    sections = []
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(args.workdir) if args.workdir else Path(scratch)
        for name in args.scenario:
            scenario = SCENARIOS[name]
            info, rows = run_scenario(scenario, base / name, args.n, args.epochs, args.distractors)
            sections += ["", *table(scenario, info, rows, args.n, args.epochs, args.distractors)]
            print("\n".join(sections[-(len(rows) + 9) :]), flush=True)
    lines += [f"| {key} | {value} |" for key, value in machine().items()]
    text = "\n".join([*lines, *sections]) + "\n"
    if not args.no_write:
        with RESULTS.open("a") as results:
            results.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
