"""`medctl sweep` end to end through the CLI on the synthetic volumes: leaderboard, resume, failures, jobs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import medctl.sweep.jobs as sweep_jobs
from medctl.cli.app import app
from medctl.models.checkpoints import encoder_payload, save_checkpoint
from medctl.models.registry import build_encoder

runner = CliRunner()
ENCODER = "vit3d_test"
SIZE = [16, 32, 32]
# minmax intensity makes the synthetic task learnable from pooled features of any encoder (see test_finetune_cli)
EASY = ['data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"']
ENTRIES = ["byol_a", "byol_b", "corrupt", "random_init"]
FINISHED = (
    "results.json",
    "checkpoints/best.ckpt",
    "eval_val/metrics.json",
    "eval_test/metrics.json",
    "done.json",
)


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """Two 'pretrained' encoders (different seeds, one perturbed) and a truncated file."""
    folder = tmp_path_factory.mktemp("ckpts")
    for name, seed in (("byol_a", 1), ("byol_b", 2)):
        torch.manual_seed(seed)
        encoder = build_encoder(ENCODER, input_size=SIZE)
        with torch.no_grad():
            for param in encoder.parameters():
                param.add_(0.05 * seed * torch.randn_like(param))
        save_checkpoint(
            folder / f"{name}.pt", encoder_payload(encoder, name=ENCODER, args=encoder.build_args)
        )
    whole = (folder / "byol_a.pt").read_bytes()
    (folder / "corrupt.pt").write_bytes(whole[: len(whole) // 3])
    return folder


def sweep_args(synthetic_3d, checkpoint_dir: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "sweep", "-c", "config/sweep.toml", "--all-checkpoints", *extra, *synthetic_3d.config_overrides(), *EASY,
        f'model.encoder="{ENCODER}"', "data.batch_size=4", "train.epochs=15", "train.lr_head=0.05", "train.patience=0",
        "train.warmup_epochs=0", "train.log_every=0", "sweep.bootstrap=50",
        f"sweep.checkpoint_dir={json.dumps(str(checkpoint_dir))}",
        f"run.root={json.dumps(str(root))}", f'run.name="{name}"',
    ]  # fmt: skip


def stamps(run_dir: Path) -> dict[str, int]:
    return {name: (run_dir / name).stat().st_mtime_ns for name in FINISHED}


def test_sweep_leaderboard_resume_after_interrupt_and_corrupt_checkpoint(
    synthetic_3d, checkpoint_dir, tmp_path, monkeypatch
):
    args = sweep_args(synthetic_3d, checkpoint_dir, tmp_path / "runs", "sw")
    sweep_dir = tmp_path / "runs" / "sw"

    # 1. killed midway: the second entry is interrupted; the first one is finished and kept
    original = sweep_jobs.run_finetune
    calls = []

    def interrupt_second(config, **kwargs):
        calls.append(config.model.checkpoint)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(config, **kwargs)

    monkeypatch.setattr(sweep_jobs, "run_finetune", interrupt_second)
    result = invoke(*args)
    assert result.exit_code == 130, result.output
    state = json.loads((sweep_dir / "sweep_state.json").read_text())["entries"]
    assert state["byol_a"]["status"] == "done" and state["byol_b"]["status"] == "interrupted"
    assert not (sweep_dir / "leaderboard.csv").exists()
    first = stamps(sweep_dir / "byol_a")

    # 2. the rerun finishes only the missing entries; the corrupt checkpoint fails alone, with the reason
    monkeypatch.setattr(sweep_jobs, "run_finetune", original)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "byol_a already finished, skipped" in result.output
    assert stamps(sweep_dir / "byol_a") == first
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert sorted(board["entry"]) == sorted(ENTRIES)
    failed = board[board["status"] != "ok"]
    assert failed["entry"].tolist() == ["corrupt"] and failed["status"].tolist() == ["failed"]
    assert "corrupt.pt" in failed["reason"].iloc[0] and pd.isna(failed["rank"].iloc[0])
    state = json.loads((sweep_dir / "sweep_state.json").read_text())["entries"]
    assert {k: v["status"] for k, v in state.items()} == {
        "byol_a": "done", "byol_b": "done", "corrupt": "failed", "random_init": "done",
    }  # fmt: skip
    assert "corrupt.pt" in state["corrupt"]["reason"]

    # ranked on test (val picked each probe's epoch), and says so; every number is the entry's own
    ok = board[board["status"] == "ok"].reset_index(drop=True)
    assert ok["rank"].tolist() == [1, 2, 3]
    assert ok["test_balanced_accuracy"].is_monotonic_decreasing
    assert set(board["selected_on"]) == {"val"} and set(board["ranked_on"]) == {"test"}
    hashes = set()
    for _, row in ok.iterrows():
        run_dir = sweep_dir / row["entry"]
        results = json.loads((run_dir / "results.json").read_text())
        hashes.add(results["split_manifest_hash"])
        assert row["epochs"] == results["epochs_run"] and row["wall_time_s"] == pytest.approx(
            json.loads((run_dir / "timing.json").read_text())["wall_time_s"]
        )
        assert row["checkpoint"] == (
            str(checkpoint_dir / f"{row['entry']}.pt") if row["entry"] != "random_init" else ""
        ) or (row["entry"] == "random_init" and pd.isna(row["checkpoint"]))
        for split in ("val", "test"):
            summary = json.loads((run_dir / f"eval_{split}" / "metrics.json").read_text())["summary"]
            for metric in ("balanced_accuracy", "macro_f1", "auroc"):
                assert row[f"{split}_{metric}"] == pytest.approx(summary[metric])
                assert [row[f"{split}_{metric}_low"], row[f"{split}_{metric}_high"]] == pytest.approx(
                    summary[f"{metric}_ci"]
                )
        assert row["val_balanced_accuracy"] == pytest.approx(results["metrics"]["balanced_accuracy"])
    assert hashes == {ok["split_manifest_hash"].iloc[0]}
    assert json.loads((sweep_dir / "sweep_state.json").read_text())["split_manifest_hash"] in hashes
    assert math.isnan(ok["p_vs_leader"].iloc[0])
    assert all(0 <= p <= 1 for p in ok["p_vs_leader"].iloc[1:])
    md = (sweep_dir / "leaderboard.md").read_text()
    assert "| 1 | " + ok["entry"].iloc[0] in md and "leader" in md and "failed: " in md
    assert "leader" in result.output and ok["entry"].iloc[0] in result.output
    assert "corrupt failed: " in " ".join(result.output.split())
    # sweep.toml's default grid: each entry at its own selected head, shown on the board
    assert "head lr / wd" in md
    for _, row in ok.iterrows():
        selected = json.loads((sweep_dir / row["entry"] / "results.json").read_text())["selected"]
        assert (row["lr_head"], row["weight_decay"]) == (selected["lr_head"], selected["weight_decay"])
        line = next(line for line in md.splitlines() if f"| {row['entry']} |" in line)
        assert f"| {selected['lr_head']:g} / {selected['weight_decay']:g} |" in line

    # 3. a third run has nothing to do: every finished entry is untouched, the corrupt one is retried
    before = {name: stamps(sweep_dir / name) for name in ok["entry"]}
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert {name: stamps(sweep_dir / name) for name in ok["entry"]} == before
    assert "3 already finished, 1 failed" in result.output


def test_no_checkpoint_found_is_one_line_naming_the_keys(synthetic_3d, tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    result = invoke(*sweep_args(synthetic_3d, empty, tmp_path / "runs", "x"))
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "sweep.checkpoints" in message and "sweep.checkpoint_dir" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_jobs_two_and_mode_both_fine_tune_the_probe_leader(synthetic_3d, checkpoint_dir, tmp_path):
    args = sweep_args(
        synthetic_3d, checkpoint_dir, tmp_path / "runs", "par", "--jobs", "2", "--mode", "both",
        "sweep.random_baseline=false", 'sweep.finetune_overrides=["train.epochs=2"]',
    )  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "par"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    probes = board[(board["mode"] == "linear_probe") & (board["status"] == "ok")]
    leader_probe = probes.sort_values("val_balanced_accuracy", ascending=False, kind="mergesort")[
        "entry"
    ].iloc[0]
    tuned = board[board["mode"] == "finetune"]
    assert tuned["entry"].tolist() == [f"{leader_probe}_ft"] and tuned["status"].tolist() == ["ok"]
    results = json.loads((sweep_dir / f"{leader_probe}_ft" / "results.json").read_text())
    assert results["mode"] == "finetune" and results["epochs_run"] == 2
    assert board.loc[board["entry"] == "corrupt", "status"].tolist() == ["failed"]


def test_seeds_give_mean_spread_and_paired_tests_ranked_on_test(synthetic_3d, checkpoint_dir, tmp_path):
    """``sweep.seeds``: each entry once per seed ({seed} picks the checkpoint of that seed), one row each
    with mean and std over seeds; p-values are paired t-tests across seeds on the ranking split."""
    templates = tmp_path / "seeded"
    templates.mkdir()
    for seed, source in ((0, "byol_a"), (1, "byol_b")):
        (templates / f"ssl_{seed}.pt").write_bytes((checkpoint_dir / f"{source}.pt").read_bytes())
    template = str(templates / "ssl_{seed}.pt")
    args = sweep_args(
        synthetic_3d, checkpoint_dir, tmp_path / "runs", "seeded", "--listed-only",
        f"sweep.checkpoints={json.dumps([template])}", "sweep.seeds=[0, 1]", "train.epochs=4",
    )  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "seeded"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    seeds = pd.read_csv(sweep_dir / "leaderboard_seeds.csv")
    assert sorted(board["entry"]) == ["random_init", "ssl"]
    assert sorted(seeds["entry"]) == ["random_init/seed0", "random_init/seed1", "ssl/seed0", "ssl/seed1"]

    # each seed is its own run: the probe's run.seed and, for ssl, the checkpoint of that seed
    for seed in (0, 1):
        resolved = (sweep_dir / "ssl" / f"seed{seed}" / "config.toml").read_text()
        assert f"seed = {seed}" in resolved and f"ssl_{seed}.pt" in resolved
    assert json.loads((sweep_dir / "random_init" / "seed1" / "done.json").read_text())["seed"] == 1

    # one row per entry: mean and std over its seeds, ranked on test
    by_entry = {
        entry: group.sort_values("seed")
        for entry, group in seeds.groupby(seeds["entry"].str.split("/").str[0])
    }
    for _, row in board.iterrows():
        values = by_entry[row["entry"]]["test_balanced_accuracy"].to_numpy()
        assert row["n_seeds"] == 2
        assert row["test_balanced_accuracy"] == pytest.approx(values.mean())
        assert row["test_balanced_accuracy_std"] == pytest.approx(values.std(ddof=1))
    assert board["test_balanced_accuracy"].is_monotonic_decreasing
    assert set(board["ranked_on"]) == {"test"}

    # the paired comparison with the random baseline, seed by seed
    ssl = board[board["entry"] == "ssl"].iloc[0]
    diffs = (
        by_entry["ssl"]["test_balanced_accuracy"].to_numpy()
        - by_entry["random_init"]["test_balanced_accuracy"].to_numpy()
    )
    assert ssl["delta_vs_random"] == pytest.approx(diffs.mean())
    assert ssl["delta_vs_random_std"] == pytest.approx(diffs.std(ddof=1))
    md = (sweep_dir / "leaderboard.md").read_text()
    assert "mean ± std over seeds [0, 1]" in md and "ranked on test" in md and " ± " in md
    assert "ranked on test" in " ".join(result.output.split())


def test_inner_split_selects_the_epochs_and_val_ranks(synthetic_3d, checkpoint_dir, tmp_path):
    """``sweep.select_on = "inner_val"``: the train split is carved once (grouped, seeded, frozen in the sweep
    folder); every entry and seed fits on inner_train and picks its epoch on inner_val, so the leaderboard
    ranks on the outer val, which selected nothing, and test stays untouched."""
    args = sweep_args(
        synthetic_3d, checkpoint_dir, tmp_path / "runs", "inner", "--listed-only",
        f"sweep.checkpoints={json.dumps([str(checkpoint_dir / 'byol_a.pt')])}", "sweep.seeds=[0, 1]",
        "train.epochs=4", 'sweep.select_on="inner_val"', 'sweep.rank_on="val"', "sweep.inner_val_share=0.25",
    )  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    sweep_dir = tmp_path / "runs" / "inner"

    # the inner split: only training samples, both parts non-empty, no subject on both sides
    inner = pd.read_csv(sweep_dir / "inner_split.csv", dtype=str)
    cache = Path(json.loads((sweep_dir / "byol_a" / "seed0" / "results.json").read_text())["cache_dir"])
    manifest = pd.read_parquet(cache / "manifest.parquet").query("status == 'ok'")
    split_of = manifest.set_index("id")["split"]
    assert set(inner["id"]) == set(manifest.loc[manifest["split"] == "train", "id"])
    assert not set(inner["id"]) & set(manifest.loc[manifest["split"].isin(["val", "test"]), "id"])
    assert set(inner["inner_split"]) == {"inner_train", "inner_val"}
    assert inner.groupby("group")["inner_split"].nunique().max() == 1  # grouped like the outer split
    record = json.loads((sweep_dir / "inner_split.json").read_text())
    assert record["val_share"] == 0.25 and record["n_inner_val"] == (inner["inner_split"] == "inner_val").sum()
    inner_val = set(inner.loc[inner["inner_split"] == "inner_val", "id"])

    # every entry and seed selected on the same inner val: its validation predictions are those samples
    entries = ["byol_a/seed0", "byol_a/seed1", "random_init/seed0", "random_init/seed1"]
    for entry in entries:
        run_dir = sweep_dir / entry
        results = json.loads((run_dir / "results.json").read_text())
        assert results["selected_on"] == "inner_val"
        assert results["inner_split"] == str(sweep_dir / "inner_split.csv")
        assert set(pd.read_parquet(run_dir / "val_preds.parquet")["id"].astype(str)) == inner_val
        assert set(split_of[sorted(inner_val)]) == {"train"}
        assert json.loads((run_dir / "done.json").read_text())["inner_split"] == record["digest"]
        val = json.loads((run_dir / "eval_val" / "metrics.json").read_text())  # the outer val, evaluated after
        assert val["n_samples"] == (manifest["split"] == "val").sum()

    # ranked on the outer val, and the table says which split did what
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert set(board["selected_on"]) == {"inner_val"} and set(board["ranked_on"]) == {"val"}
    assert board["val_balanced_accuracy"].is_monotonic_decreasing and board["rank"].tolist() == [1, 2]
    seeds = pd.read_csv(sweep_dir / "leaderboard_seeds.csv")
    for _, row in seeds.iterrows():
        summary = json.loads((sweep_dir / row["entry"] / "eval_val" / "metrics.json").read_text())["summary"]
        assert row["val_balanced_accuracy"] == pytest.approx(summary["balanced_accuracy"])
    md = " ".join((sweep_dir / "leaderboard.md").read_text().split())
    assert "picked its epoch (train.monitor) on the rest, an inner val" in md and "test stays untouched" in md
    assert "ranked on val" in " ".join(result.output.split())

    # a rerun keeps the frozen split and skips every finished entry
    before = (sweep_dir / "inner_split.csv").read_bytes()
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert (sweep_dir / "inner_split.csv").read_bytes() == before
    assert all(f"{entry} already finished, skipped" in again.output for entry in entries)


def test_an_inner_split_file_from_other_data_is_one_line(synthetic_3d, tmp_path):
    stray = tmp_path / "inner_split.csv"
    stray.write_text("id,group,inner_split\nnot-a-sample,g,inner_val\nsub-000,g2,inner_train\n")
    result = invoke(
        "finetune", *synthetic_3d.config_overrides(), *EASY, f'model.encoder="{ENCODER}"', "train.epochs=1",
        f"train.inner_split={json.dumps(str(stray))}", f"run.root={json.dumps(str(tmp_path / 'runs'))}",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "not-a-sample" in message and "rerun the sweep" in message and "Traceback" not in result.output


def test_paired_seed_test_matches_scipy():
    from scipy import stats

    from medctl.analysis.leaderboard import paired_seed_test

    a = {0: 0.71, 1: 0.64, 2: 0.80, 3: 0.55}
    b = {0: 0.52, 1: 0.58, 2: 0.61, 3: 0.50, 9: 0.9}  # seed 9 has no pair
    out = paired_seed_test(a, b)
    reference = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert out["n"] == 4 and out["p"] == pytest.approx(reference.pvalue)
    assert out["mean"] == pytest.approx(sum(a[s] - b[s] for s in range(4)) / 4)
    assert math.isnan(paired_seed_test({0: 0.5}, {0: 0.4})["p"])
    assert paired_seed_test({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})["p"] == 1.0
    # three seeds each one test sample better: no spread, so the sign test's 2 * 0.5**3, not p = 0
    same_gain = paired_seed_test({0: 11 / 12, 1: 7 / 12, 2: 0.3 + 1 / 12}, {0: 10 / 12, 1: 6 / 12, 2: 0.3})  # 1e-17 apart
    assert same_gain["p"] == pytest.approx(0.25) and same_gain["mean"] == pytest.approx(1 / 12)
