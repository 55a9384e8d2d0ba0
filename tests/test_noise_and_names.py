"""What the CLI says and how it names things: one note per model, not per sample; sweep entries named
after their pretraining runs; the sweep's "top" counted among pretrained checkpoints; a sweep entry that
holds a run this sweep did not finish is never silently replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.config import load_config
from medctl.data.dataset import read_summary, target_specs
from medctl.data.preprocess import preprocess
from medctl.models.checkpoints import classifier_payload, encoder_payload, save_checkpoint
from medctl.models.classifier import build_classifier
from medctl.models.registry import build_encoder

runner = CliRunner()
ENCODER, SIZE = "vit3d_test", [16, 32, 32]  # GELU only: no nn.ReLU anywhere
EASY = ['data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"']


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_guided_backprop_notes_a_model_without_relu_once(synthetic_3d, tmp_path):
    config = load_config(None, [*synthetic_3d.config_overrides(), *EASY], env={})
    cache = preprocess(config.data, workers=1).cache_dir
    summary, specs = read_summary(cache), target_specs(cache)
    encoder = build_encoder(ENCODER, in_channels=1, input_size=SIZE)
    payload = classifier_payload(
        build_classifier(encoder, specs),
        model_info={"name": ENCODER, "args": encoder.build_args, "head": config.model.head.model_dump()},
        targets=[s.to_dict() for s in specs],
        preprocessing={"settings": summary["settings"], "spatial_dims": 3, "in_channels": 1, "spatial_size": SIZE},
        config_text=config.to_toml(),
    )
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", payload)
    result = invoke(
        "saliency", "--ckpt", str(ckpt), "--split", "test", "--method", "gbp", "--max-samples", "3",
        "saliency.randomisation_check=false",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("has no nn.ReLU modules") == 1, result.output


@pytest.fixture
def pretrain_runs(tmp_path) -> list[Path]:
    """Two encoders where `medctl pretrain` leaves them: runs/<name>/checkpoints/encoder.ckpt."""
    paths = []
    for name, seed in (("byol_a", 1), ("byol_b", 2)):
        torch.manual_seed(seed)
        encoder = build_encoder(ENCODER, input_size=SIZE)
        path = tmp_path / "pretrain" / name / "checkpoints" / "encoder.ckpt"
        paths.append(save_checkpoint(path, encoder_payload(encoder, name=ENCODER, args=encoder.build_args)))
    return paths


def test_sweep_names_entries_after_runs_counts_its_top_among_pretrained_and_never_overwrites(
    synthetic_3d, pretrain_runs, tmp_path
):
    args = [
        "sweep", "-c", "config/sweep.toml", "--listed-only", *synthetic_3d.config_overrides(), *EASY,
        f'model.encoder="{ENCODER}"', "data.batch_size=4", "train.epochs=2", "train.patience=0", "train.warmup_epochs=0",
        "train.log_every=0", "sweep.bootstrap=20", "sweep.finetune_top=1", "sweep.random_baseline=true",
        f"sweep.checkpoints={json.dumps([str(p) for p in pretrain_runs])}",
        f"run.root={json.dumps(str(tmp_path / 'runs'))}", 'run.name="sw"',
    ]  # fmt: skip
    first = invoke(*args, "--mode", "both")
    assert first.exit_code == 0, first.output
    sweep = tmp_path / "runs" / "sw"
    assert {"byol_a", "byol_b", "random_init"} <= {p.name for p in sweep.iterdir() if p.is_dir()}
    assert not (sweep / "encoder").exists() and not (sweep / "encoder_2").exists()
    said = " ".join(first.output.split())
    assert "of the 2 pretrained checkpoint(s)" in said and "random_init baseline is not fine-tuned" in said
    assert "(top 1 by" not in said
    assert len([p for p in sweep.iterdir() if p.name.endswith("_ft")]) == 1

    # byol_a's checkpoint is written again (a longer pretraining, say): its finished entry is not replaced
    results = sweep / "byol_a" / "results.json"
    stamp = results.stat().st_mtime_ns
    pretrain_runs[0].write_bytes(pretrain_runs[0].read_bytes())
    again = invoke(*args, "--mode", "linear_probe")
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert "byol_a failed" in said and "--overwrite" in said and "already holds a run" in said
    assert results.stat().st_mtime_ns == stamp

    replaced = invoke(*args, "--mode", "linear_probe", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "failed" not in " ".join(replaced.output.split()).replace("0 failed", "")
    assert results.stat().st_mtime_ns != stamp
