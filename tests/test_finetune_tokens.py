"""The attentive probe on cached float16 tokens trains the same head as running the frozen encoder every epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.finetune.tokens import TokenRows, cached_logits, read_tokens, token_paths
from medctl.training.state import read_train_state

runner = CliRunner()


def attentive_args(dataset, tmp_path, name: str, *extra: str) -> list[str]:
    return [
        "finetune",
        *dataset.config_overrides(),
        "data.preprocess.workers=1",
        "data.batch_size=4",
        'run.device="cpu"',
        'model.encoder="vit3d_test"',
        'model.head.kind="attentive"',
        "model.head.dropout=0.2",
        "train.epochs=3",
        "train.lr_head=0.01",
        "train.warmup_epochs=1",
        "train.patience=0",
        f"run.root={json.dumps(str(tmp_path))}",
        f"run.name={json.dumps(name)}",
        *extra,
    ]


def finetune(caplog, *args: str) -> tuple[dict, str]:
    """Run ``medctl finetune`` through the CLI; its results.json and the log lines."""
    caplog.clear()
    logger = logging.getLogger("medctl")  # the CLI stops it propagating: listen on it directly
    logger.addHandler(caplog.handler)
    try:
        result = runner.invoke(app, list(args), catch_exceptions=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert result.exit_code == 0, result.output
    options = dict(a.split("=", 1) for a in args if a.startswith("run."))
    run_dir = Path(json.loads(options["run.root"])) / json.loads(options["run.name"])
    return json.loads((run_dir / "results.json").read_text()), caplog.text


def test_cached_tokens_train_the_same_attentive_head_as_the_frozen_encoder_every_epoch(
    synthetic_3d, tmp_path, caplog
):
    cached, cached_log = finetune(caplog, *attentive_args(synthetic_3d, tmp_path, "cached"))
    direct, direct_log = finetune(
        caplog, *attentive_args(synthetic_3d, tmp_path, "direct", "train.feature_cache=false")
    )
    assert cached["feature_cache"] is True and direct["feature_cache"] is False
    # the size line comes before the tokens are written: 16x32x32 / (2x8x8) = 8*4*4 = 128 tokens of 64
    size_line = next(line for line in cached_log.splitlines() if "x 128 tokens x 64" in line)
    assert "float16" in size_line and "0.0164 MB per sample" in size_line
    assert cached_log.index("x 128 tokens x 64") < cached_log.index("computed, cached in")
    assert "tokens:" not in direct_log

    heads = read_train_state(tmp_path / "cached" / "checkpoints" / "last.ckpt")["state_dict"]
    full = read_train_state(tmp_path / "direct" / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(heads) == {k for k in full if k.startswith("heads.")}  # the probe's last.ckpt holds the heads
    for key, value in heads.items():  # float16 tokens: equal up to their rounding
        torch.testing.assert_close(value, full[key], atol=2e-3, rtol=1e-2)
    for a, b in zip(cached["history"], direct["history"], strict=True):  # the same dropout masks and batches
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-3)
    assert cached["best_epoch"] == direct["best_epoch"]

    # a rerun memory-maps the same files instead of running the encoder
    again, again_log = finetune(caplog, *attentive_args(synthetic_3d, tmp_path, "again"))
    assert "reused from" in again_log and "computed, cached in" not in again_log
    assert again["history"][-1]["train_loss"] == pytest.approx(cached["history"][-1]["train_loss"], abs=1e-6)


def test_tokens_over_the_cap_fall_back_to_the_encoder_every_epoch(synthetic_3d, tmp_path, caplog):
    # 128 tokens x 64 x 2 bytes = 16 kB per volume; a cap of 1 kB cannot hold them
    results, text = finetune(
        caplog,
        *attentive_args(
            synthetic_3d, tmp_path, "capped", "train.feature_cache_max_gb=1e-6", "train.epochs=1"
        ),
    )
    assert results["feature_cache"] is False
    assert "exceeds train.feature_cache_max_gb = 1e-06: the frozen encoder runs every epoch instead" in text
    assert "computed, cached in" not in text


def test_token_files_are_float16_memory_maps_checked_against_the_split(tmp_path):
    array, meta = token_paths(tmp_path, "k", "val")
    array.parent.mkdir(parents=True)
    data = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)  # (N, T, D)
    np.save(array, data)
    meta.write_text(json.dumps({"ids": ["a", "b"]}))
    tokens = read_tokens(array, meta, ["a", "b"], (3, 4))
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.float16
    assert read_tokens(array, meta, ["b", "a"], (3, 4)) is None  # other samples: computed again
    assert read_tokens(array, meta, ["a", "b"], (3, 5)) is None  # another encoder width

    rows = TokenRows(tokens, [torch.tensor([0, 1])])
    x, y = rows[1]
    assert x.dtype == torch.float32 and x.shape == (3, 4) and int(y) == 1
    logits = cached_logits(
        lambda t: {"t": t.sum(dim=(1, 2))[:, None]}, tokens, batch_size=1, device=torch.device("cpu")
    )
    torch.testing.assert_close(logits["t"][:, 0], torch.tensor(data.astype(np.float32).sum(axis=(1, 2))))
