"""[tracking] backend = "wandb" offline (WANDB_MODE=offline, no network): the run's transaction log in
<run>/wandb/offline-run-*/run-<id>.wandb holds the resolved config, the history at medctl's steps and the
final metrics; the user is told how to sync; the API key is written and printed nowhere."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.training.logging import read_metrics

runner = CliRunner()
SECRET = "wandb-key-5e1f0b-never-written"
TINY = [
    'data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"', 'model.encoder="vit3d_test"',
    "data.batch_size=4", "train.warmup_epochs=0", "train.log_every=1", "train.patience=0",
]  # fmt: skip


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a .wandb file, parsed with W&B's own protobuf ``Record``. The file is W&B's
    LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with
    a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def complete_log(path: Path, timeout_s: float = 120) -> list[Any]:
    """The records once W&B's service (its own process) has written the exit record: ``run.finish()``
    returns before the last of the log may be on disk."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(wandb_records(path))
        except DecodeError:  # a chunk still being written
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{path}: W&B never finished its log"
        time.sleep(0.5)


def items(updates) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def test_an_offline_wandb_run_holds_the_config_the_history_and_the_summary(synthetic_3d, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "runs" / "wb"
    result = runner.invoke(
        app,
        ["finetune", "-c", "config/finetune/linear_probe.toml", *synthetic_3d.config_overrides(), *TINY,
         "train.epochs=3", 'tracking.backend="wandb"', 'tracking.project="medctl-test"', 'tracking.tags={cohort="a"}',
         f"run.root={json.dumps(str(run_dir.parent))}", 'run.name="wb"'],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    link = json.loads((run_dir / "tracking.json").read_text())
    assert link["backend"] == "wandb" and link["kind"] == "finetune"
    (log_file,) = run_dir.glob(f"wandb/offline-run-*-{link['run_id']}/run-{link['run_id']}.wandb")
    assert f"wandb sync {log_file.parent}" in " ".join(result.output.split())

    config, history, summary, run_tags = {}, [], {}, []
    for record in complete_log(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config |= items(record.run.config.update)
            run_tags = list(record.run.tags)
        elif kind == "config":
            config |= items(record.config.update)
        elif kind == "history":
            history.append(items(record.history.item))
        elif kind == "summary":
            summary |= items(record.summary.update)
    results = json.loads((run_dir / "results.json").read_text())
    assert config["train.epochs"] == 3 and config["model.encoder"] == "vit3d_test"
    assert config["medctl.split_manifest_hash"] == results["split_manifest_hash"]
    assert run_tags == ["cohort:a"]
    # every row of metrics.jsonl at medctl's step: the epochs' and each optimizer step's
    logged = {(row["step"], round(row["train/loss"], 6)) for row in history if "train/loss" in row}
    assert logged == {(row["step"], round(row["loss"], 6)) for row in read_metrics(run_dir, "train")}
    assert len([row for row in history if "train_step/loss" in row]) == len(read_metrics(run_dir, "train_step"))
    assert summary["final/balanced_accuracy"] == pytest.approx(results["metrics"]["balanced_accuracy"])
    assert summary["final/best_epoch"] == results["best_epoch"]

    for path in run_dir.rglob("*"):  # the key W&B read from the environment went nowhere
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.output
