"""The sweep's configs and entry planning: config/sweep*.toml validate and their keys reach each entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medctl.config import load_config
from medctl.errors import ConfigError, DataError
from medctl.sweep.entries import (
    FINETUNE,
    PROBE,
    SweepEntry,
    entry_config,
    entry_names,
    find_checkpoints,
    plan_entries,
)
from medctl.sweep.records import EntryRecord
from medctl.sweep.run import top_pretrained
from medctl.sweep.state import SweepState, finished, write_done


def test_oct_sweep_config_validates_and_its_keys_are_honoured():
    config = load_config("config/sweep_oct.toml", env={})
    assert config.sweep.mode == "both" and config.sweep.finetune_top == 1 and config.sweep.random_baseline
    checkpoints = find_checkpoints(config, all_checkpoints=True)  # listed files are kept even when absent
    assert [Path(c).name for c in checkpoints] == [
        "best_checkpoint_multi_domain.pt", "best_checkpoint_single_domain_01.pt", "best_checkpoint_single_domain_02.pt",
    ]  # fmt: skip
    probes = plan_entries(config, checkpoints, PROBE)
    assert [e.name for e in probes] == [
        "best_checkpoint_multi_domain", "best_checkpoint_single_domain_01", "best_checkpoint_single_domain_02", "random_init",
    ]  # fmt: skip
    probe = entry_config(config, probes[0])
    assert probe.model.checkpoint == checkpoints[0] and probe.model.unfreeze_at_epoch == -1
    assert probe.model.encoder == "auto" and probe.model.checkpoint_key == ""  # read from each file
    assert entry_config(config, probes[-1]).model.architecture_from == checkpoints[0]  # none reads: the first
    assert probe.model.head.kind == "attentive" and probe.data.preprocess.spatial_size == [64, 384, 384]
    assert entry_config(config, probes[-1]).model.checkpoint == ""
    tuned = entry_config(config, SweepEntry("best_checkpoint_multi_domain_ft", checkpoints[0], FINETUNE))
    assert tuned.model.unfreeze_at_epoch == config.sweep.finetune_unfreeze_at_epoch == 4  # 1-based
    assert tuned.model.freeze_encoder and tuned.model.head.kind == "linear" and tuned.train.lr_encoder == 3e-5
    assert tuned.data == probe.data  # every entry reads the same cache


def test_sweep_toml_validates_and_reads_the_checkpoint_folder(tmp_path):
    folder = tmp_path / "ckpts"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.pt", "a.pth", "notes.txt", "sub/a.pt"):
        (folder / name).write_bytes(b"x")
    config = load_config("config/sweep.toml", [f"sweep.checkpoint_dir={json.dumps(str(folder))}"], env={})
    assert config.sweep.mode == "linear_probe" and config.model.encoder == "auto"
    assert [Path(p).name for p in find_checkpoints(config)] == ["a.pth", "b.pt"]
    listed = load_config(
        None,
        [
            f"sweep.checkpoints=[{json.dumps(str(folder / 'sub/a.pt'))}]",
            f"sweep.checkpoint_dir={json.dumps(str(folder))}",
        ],
        env={},
    )
    both = find_checkpoints(listed)
    assert [Path(p).name for p in both] == ["a.pt", "a.pth", "b.pt"] and entry_names(both) == [
        "a",
        "a_2",
        "b",
    ]
    assert [Path(p).name for p in find_checkpoints(listed, all_checkpoints=False)] == ["a.pt"]
    with pytest.raises(DataError, match="sweep.checkpoint_dir"):
        find_checkpoints(load_config(None, ['sweep.checkpoint_dir="/no/such/folder"'], env={}))


def test_entry_names_are_file_safe_and_unique():
    assert entry_names(["x/best.pt", "y/best.pt", "z/random_init.pt", "w/my model (v2).pt"]) == [
        "best", "best_2", "random_init_2", "my_model_v2",
    ]  # fmt: skip


def test_fine_tune_overrides_that_change_the_data_or_do_not_validate_are_refused():
    config = load_config(
        None,
        ['sweep.finetune_overrides=["data.batch_size=8", "train.lr_encodr=1e-4", "train.epochs=0"]'],
        env={},
    )
    with pytest.raises(ConfigError) as err:
        entry_config(config, SweepEntry("a_ft", "a.pt", FINETUNE))
    message = str(err.value)
    assert "sweep.finetune_overrides" in message and "data.batch_size" in message
    assert "train.lr_encoder" in message and "train.epochs" in message
    late = load_config(None, ["train.epochs=3", "sweep.finetune_unfreeze_at_epoch=4"], env={})
    with pytest.raises(ConfigError, match="finetune_unfreeze_at_epoch"):
        entry_config(late, SweepEntry("a_ft", "a.pt", FINETUNE))


def test_done_marker_is_tied_to_the_checkpoint_file_and_the_split_manifest(tmp_path):
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"weights")
    entry, run_dir = SweepEntry("a", str(ckpt), PROBE), tmp_path / "a"
    for name in ("results.json", "checkpoints/best.ckpt", "eval_val/metrics.json", "eval_test/metrics.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    assert not finished(run_dir, entry, "h1")
    write_done(run_dir, entry, "h1")
    assert finished(run_dir, entry, "h1")
    assert not finished(run_dir, entry, "h2")  # other splits
    assert not finished(run_dir, SweepEntry("a", str(ckpt), FINETUNE), "h1")
    ckpt.write_bytes(b"other weights")
    assert not finished(run_dir, entry, "h1")  # the checkpoint changed

    state = SweepState.load(tmp_path, "h1", "linear_probe")
    state.mark(entry, "failed", reason="bad file")
    reread = SweepState.load(tmp_path, "h1", "linear_probe")
    assert reread.status("a") == "failed" and reread.entries["a"]["reason"] == "bad file"
    assert reread.status("other") == "pending"


def test_top_pretrained_skips_failures_and_the_random_baseline(tmp_path, monkeypatch):
    import medctl.sweep.run as sweep_run

    scores = {"a": 0.6, "b": 0.9, "random_init": 1.0}
    monkeypatch.setattr(
        sweep_run,
        "entry_row",
        lambda entry, record, manifest_hash: {"status": "ok", "val_balanced_accuracy": scores[entry.name]},
    )
    outcomes = [
        sweep_run.EntryOutcome(
            SweepEntry(n, "" if n == "random_init" else f"{n}.pt", PROBE), tmp_path / n, "done",
            record=EntryRecord(tmp_path / n, {}, {}, {}, None),
        )  # fmt: skip
        for n in scores
    ] + [sweep_run.EntryOutcome(SweepEntry("c", "c.pt", PROBE), tmp_path / "c", "failed", "broken")]
    assert [e.name for e in top_pretrained(outcomes, "h", 1)] == ["b"]
    assert [e.name for e in top_pretrained(outcomes, "h", 5)] == ["b", "a"]
