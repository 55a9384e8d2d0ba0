"""Does each SSL method beat its own random initialisation on held-out test, over pretraining seeds?

Everything runs through the real CLI (``python -m medctl``), on the synthetic volumes of
``medctl.data.synthetic`` (``--family``: lesion, 2 classes, by default; count, shape, texture: issue 29):

1. ``medctl pretrain`` for seeds 0, 1, 2 (``run.seed``: the initial weights, the views, the batches) of
   BYOL on ``mt3_tiny`` with the auxiliary heads off and on (reconstruction, rotation, jigsaw), JEPA on
   ``vit3d_test`` at the short-run EMA momentum pretrain advises (probed twice: ``encoder.ckpt``, the EMA
   target V-JEPA evaluates, and ``context_encoder.ckpt``, the online encoder) and mim_contrastive on ``unet2d_tiny``, the last on 2D
   synthetic images (``dims=2``: every "edema" image holds a lesion, every image two brighter distractor
   balls). Not on axial slices of the volumes: each slice takes its volume's label, and 72% of the "edema"
   slices (3 axial slices per 16x32x32 volume) hold no lesion voxel, so no encoder can pass ~0.64 balanced
   accuracy there and every probe sits near chance;
2. one ``medctl sweep`` per encoder with ``sweep.seeds = [0, 1, 2]``: seed s probes pretraining run s
   (``{seed}`` in the checkpoint path) and the random baseline initialised with seed s, which is exactly
   the weights pretraining run s started from; every probe picks its epoch on val and the leaderboard
   ranks on test (``sweep.rank_on = "test"``);
3. the figures: per entry the test balanced accuracy mean and std over seeds, its per-seed values, the
   per-seed gain over random initialisation (mean, std) and the paired t-test across seeds; plus, from
   the pretraining runs, the heads' final losses against chance and the collapse check's std ratio.

    uv run python benchmarks/bench_ssl_seeds.py              # ~25 min on 2 cores; appends to RESULTS.md
    uv run python benchmarks/bench_ssl_seeds.py --no-append  # print only
    uv run python benchmarks/bench_ssl_seeds.py --family count --n 120 --size 16 64 64 --epochs 30 --only byol
    uv run python benchmarks/bench_ssl_seeds.py --family shape --only byol --extra-test 480

``--extra-test N`` adds N volumes, drawn by the generator at another seed, to the volumes' test split only:
pretraining and the probes see the same train and val volumes as without it, and each seed's test figure
rests on ~12 + N volumes instead of ~12, where one volume moves balanced accuracy by 0.08.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from medctl.analysis.proportions import paired_hits_test
from medctl.data.synthetic import FAMILIES, make_synthetic_dataset

RESULTS = Path(__file__).with_name("RESULTS.md")
SEEDS = [0, 1, 2]
SIZE = (16, 32, 32)
SIZE_2D = (32, 32)
EXTRA_TEST_SEED = 1  # the generator's seed of the --extra-test volumes (the benchmark's data is seed 0)
DISTRACTORS_2D = 2  # bright balls in every image: without them a random unet2d_tiny already reaches ~0.9 k-NN
COMMON = ["data.preprocess.workers=1", 'run.device="cpu"', "data.num_workers=0"]
MT3 = ['model.encoder="mt3_tiny"']
METHODS = {  # name -> (encoder group, overrides); every group but "images" pretrains on the volumes
    "byol": ("mt3", [*MT3, 'pretrain.method="byol"', "pretrain.byol.reconstruction_weight=0", "pretrain.byol.rotation_weight=0",
                     "pretrain.byol.jigsaw_weight=0"]),
    "byol_heads": ("mt3", [*MT3, 'pretrain.method="byol"', "pretrain.byol.reconstruction_weight=1.0",
                           "pretrain.byol.rotation_weight=0.5", "pretrain.byol.jigsaw_weight=0.5"]),
    # ema_momentum 0.9: what pretrain's warning advises for a run this short (at 0.99 the exported target keeps
    # ~88% of its initial weights and ties random init)
    "jepa": ("vit", ['model.encoder="vit3d_test"', 'pretrain.method="jepa"', "pretrain.ema_momentum=0.9",
                     "pretrain.jepa.predictor_dim=32",
                     "pretrain.jepa.predictor_heads=2", "pretrain.jepa.predictor_depth=1", "pretrain.jepa.mask_blocks=2"]),
    "mim_contrastive": ("images", ['model.encoder="unet2d_tiny"', 'pretrain.method="mim_contrastive"',
                                   "pretrain.mim_contrastive.patch_size=8"]),
}  # fmt: skip
GROUPS = {
    "mt3": MT3,
    "vit": ['model.encoder="vit3d_test"'],
    "images": ['model.encoder="unet2d_tiny"'],
}
EXTRA_EXPORTS = {"jepa": {"jepa_context": "context_encoder.ckpt"}}  # method -> {entry: another export to probe}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="synthetic volumes")
    parser.add_argument(
        "--family", default="lesion", choices=list(FAMILIES), help="what carries the class (medctl.data.synthetic)"
    )
    parser.add_argument("--size", type=int, nargs=3, default=list(SIZE), help="volume size D H W")
    parser.add_argument("--n-2d", type=int, default=160, help="synthetic 2D images (mim_contrastive)")
    parser.add_argument("--epochs", type=int, default=6, help="pretraining epochs")
    parser.add_argument(
        "--only", action="append", choices=list(METHODS), help="run only these methods (repeatable); default all"
    )
    parser.add_argument(
        "--raw-probe", action="store_true", help="probe raw embeddings (model.head.standardize = false), for comparison"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra key=value overrides for every pretraining run (a setting against its default)"
    )
    parser.add_argument(
        "--extra-test", type=int, default=0, help="add this many unseen volumes to the volumes' test split only"
    )
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args()


def append_test_volumes(volumes, n: int, family: str, size: list[int]) -> int:
    """Add ``n`` volumes drawn at ``EXTRA_TEST_SEED`` to the test split of ``volumes`` (a SyntheticDataset of
    NRRD volumes), under their own ids and subjects; train and val stay as they were. Returns the test split's
    size."""
    extra = make_synthetic_dataset(
        volumes.root.parent / "extra_test", n=n, dims=3, size=size, seed=EXTRA_TEST_SEED, family=family,
        n_excluded=0, cache_dir=None,
    )  # fmt: skip
    added = pd.read_csv(extra.table, sep="\t", dtype=str)
    for old in added["participant_id"]:
        shutil.move(extra.image_root / f"{old}.nrrd", volumes.image_root / f"x{old}.nrrd")
        shutil.move(extra.mask_root / f"{old}.nrrd", volumes.mask_root / f"x{old}.nrrd")
    added = added.assign(
        participant_id="x" + added["participant_id"], subject_id="x" + added["subject_id"], recommended_split="test"
    )
    table = pd.concat([pd.read_csv(volumes.table, sep="\t", dtype=str), added], ignore_index=True)
    table.to_csv(volumes.table, sep="\t", index=False)
    return int((table["recommended_split"] == "test").sum())


def medctl(*args: str) -> None:
    """One CLI call in a fresh process; its last lines are shown when it fails."""
    env = {**os.environ, "MEDCTL_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "medctl", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"medctl {' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_ssl_seeds_"))
    try:
        methods = {m: v for m, v in METHODS.items() if not args.only or m in args.only}
        volumes = make_synthetic_dataset(root / "data", n=args.n, dims=3, size=args.size, seed=0, family=args.family)
        n_test = append_test_volumes(volumes, args.extra_test, args.family, args.size) if args.extra_test else None
        runs = [*COMMON, f'run.root="{root / "runs"}"']
        datasets = {}
        if any(group == "images" for group, _ in methods.values()):  # the 2D set only for the 2D method
            images = make_synthetic_dataset(
                root / "data_2d", n=args.n_2d, dims=2, size=SIZE_2D, seed=0, distractors=DISTRACTORS_2D,
                family=args.family,
            )  # fmt: skip
            datasets["images"] = [*images.config_overrides(), *runs]
        ckpts = root / "ckpts"
        ckpts.mkdir()

        # 1. pretraining: every method, every seed
        pretrain_results: dict[str, list[dict]] = {}
        for method, (group, overrides) in methods.items():
            for seed in SEEDS:
                name = f"{method}_{seed}"
                t0 = time.perf_counter()
                data = datasets.get(group, [*volumes.config_overrides(), *runs])
                medctl(
                    "pretrain", *data, *overrides, f'run.name="{name}"',
                    f"run.seed={seed}", f"pretrain.epochs={args.epochs}", "pretrain.warmup_epochs=1",
                    "data.batch_size=8", f"pretrain.monitor_every={args.epochs}", f"pretrain.knn_every={args.epochs}",
                    "pretrain.byol.projector_dim=32", "pretrain.byol.projector_hidden=64",
                    "pretrain.mim_contrastive.projector_dim=32", "pretrain.mim_contrastive.projector_hidden=64",
                    *args.set,
                )  # fmt: skip
                results = json.loads((root / "runs" / name / "results.json").read_text())
                pretrain_results.setdefault(method, []).append(results)
                shutil.copy(root / "runs" / name / "checkpoints" / "encoder.ckpt", ckpts / f"{name}.ckpt")
                for entry, export in EXTRA_EXPORTS.get(method, {}).items():
                    shutil.copy(root / "runs" / name / "checkpoints" / export, ckpts / f"{entry}_{seed}.ckpt")
                print(
                    f"pretrain {name}: {time.perf_counter() - t0:.0f} s, loss {results['final_loss']:.3f}",
                    flush=True,
                )

        # 2. one sweep per encoder, over the seeds, ranked on test
        boards, per_seed = [], []
        for group, encoder in GROUPS.items():
            entries = [e for m, (g, _) in methods.items() if g == group for e in [m, *EXTRA_EXPORTS.get(m, {})]]
            if not entries:
                continue
            templates = [str(ckpts / f"{e}_{{seed}}.ckpt") for e in entries]
            data = datasets.get(group, [*volumes.config_overrides(), *runs])
            medctl(
                "sweep", "--listed-only", *data, *encoder,
                f'run.name="sweep_{group}"', f"sweep.checkpoints={json.dumps(templates)}", f"sweep.seeds={SEEDS}",
                'sweep.rank_on="test"', "sweep.bootstrap=200", "train.epochs=30", "train.lr_head=0.01",
                "train.patience=0", "train.warmup_epochs=0", "train.log_every=0", "data.batch_size=8",
                f"model.head.standardize={str(not args.raw_probe).lower()}",
            )  # fmt: skip
            sweep_dir = root / "runs" / f"sweep_{group}"
            name = encoder[0].split('"')[1]
            boards.append(pd.read_csv(sweep_dir / "leaderboard.csv").assign(encoder=name))
            per_seed.append(pd.read_csv(sweep_dir / "leaderboard_seeds.csv").assign(encoder=name))
        board, seeds = pd.concat(boards), pd.concat(per_seed)
        wall = time.perf_counter() - start
        lines = report(board, seeds, pretrain_results, args, wall, len(volumes.classes), n_test)
        print("\n".join(lines))
        if not args.no_append:
            with RESULTS.open("a") as fh:
                fh.write("\n" + "\n".join(lines) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def paired_vs_random(seeds: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Per (encoder, entry): each seed's test hits against its random baseline's on the same volumes, as
    "won–lost, p" of the exact McNemar test (``eval_test/test_preds.parquet`` of the sweep's runs). ``seeds``:
    the per-seed rows with their entry's ``base`` name."""

    def hits(run_dir: str) -> pd.Series:
        preds = pd.read_parquet(Path(run_dir) / "eval_test" / "test_preds.parquet")
        return (preds["y_true"] == preds["y_pred"]).set_axis(preds["id"].astype(str))

    done = seeds[seeds["status"] == "ok"]
    out = {}
    for (encoder, entry), runs in done[done["base"] != "random_init"].groupby(["encoder", "base"]):
        cells = []
        for _, run in runs.sort_values("seed").iterrows():
            random = done[(done["encoder"] == encoder) & (done["base"] == "random_init") & (done["seed"] == run["seed"])]
            if random.empty:
                continue
            mine, theirs = hits(run["run_dir"]), hits(random.iloc[0]["run_dir"])
            test = paired_hits_test(mine.to_numpy(), theirs.reindex(mine.index).to_numpy())
            p = "p < 0.001" if test.p < 0.001 else f"p = {test.p:.3f}"
            cells.append(f"{test.only_method}–{test.only_other}, {p}")
        out[(encoder, entry)] = "; ".join(cells) or "—"
    return out


def report(
    board: pd.DataFrame, seeds: pd.DataFrame, pretrain: dict, args, wall: float, n_classes: int, n_test: int | None
) -> list[str]:
    info = machine()
    extra = f"; the volumes' test split holds {n_test} (`--extra-test {args.extra_test}`)" if n_test else ""
    lines = [
        f"## bench_ssl_seeds.py — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- setting: synthetic {args.family} volumes ({args.n}, {n_classes} classes, {'x'.join(map(str, args.size))}; mim_contrastive on "
        f"{args.n_2d} synthetic 2D {args.family} images of {SIZE_2D[0]}x{SIZE_2D[1]}"
        f"{f' with {DISTRACTORS_2D} bright distractors each' if args.family in ('lesion', 'rod') else ''}), methods {', '.join(args.only or METHODS)}, pretraining {args.epochs} epochs at batch 8 for seeds {SEEDS}; "
        f"linear probe 30 epochs on {'raw embeddings' if args.raw_probe else 'embeddings standardised on train'} "
        "(`model.head.standardize`), epoch picked on "
        "val, ranked on test (`sweep.rank_on`), `sweep.seeds` pairs "
        "pretraining seed s with probe seed s and the random baseline's seed s; all through the CLI"
        + (f"; every pretraining run with {', '.join(f'`{o}`' for o in args.set)}" if args.set else "")
        + extra,
        f"- machine: {info['cpu']}, {info['cores']} cores (shared), gpu {info['gpu']}; {info['python / torch']}; "
        f"load average {info['load average (1 min) at the end']}; wall time {wall / 60:.1f} min",
        "",
        "| encoder | entry | test bal. acc. mean ± std | per seed | Δ vs random (mean ± std) | p vs random (paired t) | val bal. acc. mean "
        "| per seed vs random on the same test volumes (hits won–lost, exact McNemar) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    seeds = seeds.assign(base=seeds["entry"].astype(str).str.split("/").str[0])
    paired = paired_vs_random(seeds)
    for _, row in board.iterrows():
        values = seeds[
            (seeds["encoder"] == row["encoder"]) & (seeds["base"] == row["entry"]) & (seeds["status"] == "ok")
        ].sort_values("seed")  # each sweep's own random_init: every encoder group has one
        per = ", ".join(fmt(v, 2) for v in values["test_balanced_accuracy"])
        delta = (
            f"{fmt(row.get('delta_vs_random'))} ± {fmt(row.get('delta_vs_random_std'))}"
            if not pd.isna(row.get("delta_vs_random"))
            else "—"
        )
        lines.append(
            f"| {row['encoder']} | {row['entry']} | {fmt(row['test_balanced_accuracy'])} ± "
            f"{fmt(row['test_balanced_accuracy_std'])} | {per} | {delta} | {fmt(row.get('p_vs_random'))} | "
            f"{fmt(row['val_balanced_accuracy'])} | {paired.get((row['encoder'], row['entry']), '—')} |"
        )
    lines += ["", "Pretraining, last epoch (mean over seeds):", ""]
    for method, runs in pretrain.items():
        last = [r["history"][-1] for r in runs]
        parts = [f"loss {fmt(sum(r['final_loss'] for r in runs) / len(runs))}"]
        for head, chance in (("rotation", math.log(4)), ("jigsaw", math.log(24))):
            key = f"train_loss_{head}"
            if all(key in row for row in last):
                parts.append(
                    f"{head} loss {fmt(sum(r[key] for r in last) / len(last))} (chance {chance:.2f})"
                )
        shares = [r["ema_target"]["initial_share"] for r in runs if "ema_target" in r]
        if shares:
            parts.append(f"exported EMA target keeps {fmt(sum(shares) / len(shares), 2)} of its initial weights")
        ratios = [r.get("val_embed_std_ratio") for r in last if r.get("val_embed_std_ratio") is not None]
        if ratios:
            parts.append(f"embed std ratio vs untrained {fmt(sum(ratios) / len(ratios), 2)}")
        knn = [
            (r["initial_monitoring"].get("knn_accuracy"), r["final_monitoring"].get("knn_accuracy"))
            for r in runs
        ]
        knn = [(a, b) for a, b in knn if a is not None and b is not None]
        if knn:
            parts.append(
                f"k-NN untrained {fmt(sum(a for a, _ in knn) / len(knn), 2)} -> {fmt(sum(b for _, b in knn) / len(knn), 2)}"
            )
        lines.append(f"- {method}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    main()
