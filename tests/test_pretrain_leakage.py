"""The pretraining-leakage audit: pretrain on a pool holding some downstream val/test participants, then
finetune, check data and sweep count them (through the CLI); foreign checkpoints are unknown unless
sweep.pretrain_ids lists their pool."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.provenance import Overlap, count_overlap, hash_id, pool_provenance, read_pretrain_ids
from medctl.errors import DataError
from medctl.models.checkpoints import read_provenance
from medctl.models.registry import build_encoder

runner = CliRunner()
TINY = ['model.encoder="vit3d_test"', "data.preprocess.workers=1", 'run.device="cpu"', "data.batch_size=4"]
JEPA = [
    'pretrain.method="jepa"', "pretrain.jepa.predictor_dim=32", "pretrain.jepa.predictor_heads=2", "pretrain.jepa.predictor_depth=1",
    "pretrain.jepa.mask_blocks=2", "pretrain.epochs=1", "pretrain.warmup_epochs=0", "pretrain.monitor_samples=8",
]  # fmt: skip


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def quoted(value: object) -> str:
    return json.dumps(str(value))


@pytest.fixture(scope="module")
def planted(synthetic_3d, tmp_path_factory):
    """An encoder pretrained (jepa, one epoch) on every downstream train participant plus 2 val and 1 test."""
    root = tmp_path_factory.mktemp("leakage")
    table = pd.read_csv(synthetic_3d.table, sep="\t", dtype=str)
    usable = table[table["retinal_oct"].str.upper() == "TRUE"]
    val = usable.loc[usable["recommended_split"] == "val", "participant_id"].tolist()
    test = usable.loc[usable["recommended_split"] == "test", "participant_id"].tolist()
    leaked = {"val": val[:2], "test": test[:1]}
    pool_table = table.copy()
    pool_table.loc[pool_table["participant_id"].isin(leaked["val"] + leaked["test"]), "recommended_split"] = "train"
    pool_table.to_csv(root / "pretrain.tsv", sep="\t", index=False)
    result = invoke(
        "pretrain", *synthetic_3d.config_overrides(), *TINY, *JEPA,
        f"data.table={quoted(root / 'pretrain.tsv')}", f"data.cache_dir={quoted(root / 'cache')}",
        f"run.root={quoted(root / 'runs')}", 'run.name="pool"',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    torch.manual_seed(3)
    foreign = root / "foreign.pt"  # a bare state dict: no provenance
    torch.save(build_encoder("vit3d_test", input_size=synthetic_3d.size).state_dict(), foreign)
    return {
        "root": root,
        "encoder": root / "runs" / "pool" / "checkpoints" / "encoder.ckpt",
        "foreign": foreign,
        "leaked": leaked,
        "n": {"val": len(val), "test": len(test)},
        "pool_ids": pool_table.loc[
            (pool_table["recommended_split"] == "train") & (pool_table["retinal_oct"].str.upper() == "TRUE"),
            "participant_id",
        ].tolist(),
    }


def test_pretrain_stores_hashed_pool_ids_and_finetune_counts_the_planted_overlap(synthetic_3d, planted, tmp_path):
    block = read_provenance(planted["encoder"])
    assert block is not None and block["id_hash"] == "sha256[:16]"
    assert sorted(block["ids"]) == sorted(hash_id(i) for i in planted["pool_ids"])
    assert not set(planted["pool_ids"]) & set(block["ids"])  # raw ids are never stored
    summary = next((planted["root"] / "cache").glob("*/summary.json"))
    assert block["cache_fingerprint"] == json.loads(summary.read_text())["fingerprint"]

    result = invoke(
        "finetune", *synthetic_3d.config_overrides(), *TINY, "train.epochs=1",
        f"model.checkpoint={quoted(planted['encoder'])}", f"run.root={quoted(tmp_path)}", 'run.name="ft"',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    overlap = json.loads((tmp_path / "ft" / "results.json").read_text())["pretraining_overlap"]
    assert (overlap["status"], overlap["val"], overlap["test"]) == ("known", 2, 1)
    assert (overlap["n_val"], overlap["n_test"]) == (planted["n"]["val"], planted["n"]["test"])
    assert overlap["pool_size"] == len(planted["pool_ids"])
    warning = f"2 of {planted['n']['val']} val, 1 of {planted['n']['test']} test participants were in its pretraining pool"
    assert warning in " ".join(result.output.split())  # the CLI's warning line


def test_check_data_counts_the_overlap_and_reads_pretrain_ids_for_foreign_checkpoints(synthetic_3d, planted, tmp_path):
    base = ["check", "data", *synthetic_3d.config_overrides(), "--reads", "0"]
    result = invoke(*base, f"model.checkpoint={quoted(planted['encoder'])}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2  # a pretraining leak is a ✗
    assert f"2 of {planted['n']['val']} val, 1 of {planted['n']['test']} test participants were in its pretraining pool" in text

    result = invoke(*base, f"model.checkpoint={quoted(planted['foreign'])}")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "pretraining pool unknown" in text and "sweep.pretrain_ids" in text

    ids = tmp_path / "pool.txt"
    ids.write_text("# the lab's pretraining pool\n" + "\n".join([*planted["leaked"]["test"], "someone-else"]) + "\n\n")
    result = invoke(*base, f"sweep.checkpoints=[{quoted(planted['foreign'])}]", f"sweep.pretrain_ids={quoted(ids)}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"0 of {planted['n']['val']} val, 1 of {planted['n']['test']} test participants were in" in text
    assert "sweep.pretrain_ids (pool.txt)" in text


def test_sweep_leaderboard_has_a_pretrain_overlap_column(synthetic_3d, planted, tmp_path):
    result = invoke(
        "sweep", "--listed-only", *synthetic_3d.config_overrides(), *TINY, "train.epochs=1", "sweep.bootstrap=0",
        f"sweep.checkpoints=[{quoted(planted['encoder'])}, {quoted(planted['foreign'])}]",
        f"run.root={quoted(tmp_path)}", 'run.name="sw"',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "sw" / "leaderboard.csv").set_index("entry")
    assert board.loc["pool", "pretrain_overlap"] == "2 val / 1 test"  # the entry takes its pretraining run's name
    assert board.loc["foreign", "pretrain_overlap"] == "unknown"
    assert board.loc["random_init", "pretrain_overlap"] == "none"
    markdown = (tmp_path / "sw" / "leaderboard.md").read_text()
    assert "pretrain overlap" in markdown and "| 2 val / 1 test |" in markdown


def test_id_hashes_are_unsalted_sha256_prefixes_and_overlaps_count_per_split(tmp_path):
    assert hash_id("sub-001") == hashlib.sha256(b"sub-001").hexdigest()[:16]
    block = pool_provenance(["a", "b", "b", "c"], cache_fingerprint="f", id_column="participant_id")
    assert block["n_ids"] == 3 and block["ids"] == sorted(hash_id(i) for i in "abc")
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n# comment\n\n  c \n")
    pool = read_pretrain_ids(ids)
    overlap = count_overlap(pool, {"train": ["a", "x"], "val": ["c", "y", "z"], "test": ["q"]})
    assert (overlap.counts, overlap.totals) == ({"train": 1, "val": 1, "test": 0}, {"train": 2, "val": 3, "test": 1})
    assert overlap.leaked == 1 and overlap.cell() == "1 val / 0 test"
    assert Overlap.from_dict(overlap.to_dict()).cell() == overlap.cell()
    assert count_overlap(None, {"val": ["a"]}).cell() == "unknown"
    ids.write_text("# nothing\n")
    with pytest.raises(DataError, match="lists no ids"):
        read_pretrain_ids(ids)
    with pytest.raises(DataError, match="no such file"):
        read_pretrain_ids(tmp_path / "missing.txt")
