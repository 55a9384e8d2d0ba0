"""The OCT plan end to end with the README's commands: volumes and participants.tsv in a bucket (moto's real
S3 server), two V-JEPA 2-layout checkpoints of different widths and position schemes, no per-checkpoint
settings: check bucket -> check checkpoint -> preprocess -> sweep --mode both -> evaluate -> saliency."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset
from medctl.storage import filesystem
from test_models_architecture import source, vjepa2_file

runner = CliRunner()
BUCKET = "eye-dataset-plan"


def medctl(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.fixture
def oct_plan(s3_server, tmp_path):
    """The lab's inputs: a bucket with <id>/volume.nrrd and participants.tsv (a seed no other test uses),
    a folder of V-JEPA 2 training checkpoints, and my.toml copied from the OCT config and pointed at them."""
    ds = make_synthetic_dataset(tmp_path / "lab", n=16, seed=14, cache_dir=None)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    fs = filesystem("s3://x")
    fs.put_file(str(ds.table), f"{BUCKET}/participants.tsv")
    for path in ds.image_root.iterdir():
        fs.put_file(str(path), f"{BUCKET}/oct/{path.name.removesuffix('.nrrd')}/volume.nrrd")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    vjepa2_file(ckpts / "best_checkpoint_multi_domain.pt", source(1, pos_embed="rope"))
    vjepa2_file(ckpts / "best_checkpoint_single_domain_01.pt", source(2, embed_dim=96, num_heads=3), entry="context_encoder")

    text = Path("config/finetune/oct_vjepa2.toml").read_text()  # cp config/finetune/oct_vjepa2.toml my.toml
    edits = {
        'table = "s3://eye-dataset/participants.tsv"': f'table = "s3://{BUCKET}/participants.tsv"',
        'root = "s3://eye-dataset/oct/"': f'root = "s3://{BUCKET}/oct/"',
        'pattern = "{participant_id}/*.dcm"': 'pattern = "{participant_id}/*.nrrd"',
        'name = "oct_lp"': f'name = "oct_lp"\nroot = {json.dumps(str(tmp_path / "runs"))}\ndevice = "cpu"',
        "spatial_size = [64, 384, 384]": "spatial_size = [16, 32, 32]\nworkers = 1",
        "num_workers = 4": f"num_workers = 0\ncache_dir = {json.dumps(str(tmp_path / 'cache'))}\n"
        f"download_dir = {json.dumps(str(tmp_path / 'downloads'))}",
        'checkpoint = "ckpts/best_checkpoint_multi_domain.pt"': f'checkpoint = "{ckpts}/best_checkpoint_multi_domain.pt"',
        "epochs = 50": "epochs = 3",
        'checkpoint_dir = "ckpts"': f'checkpoint_dir = "{ckpts}"\nbootstrap = 20\nfinetune_overrides = ["train.epochs=2"]',
        "warmup_epochs = 2": "warmup_epochs = 0",
    }
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    start = text.index("[[data.targets]]")  # the synthetic study's own label column and classes
    end = text.index("[data.preprocess]")
    target = f'[[data.targets]]\nname = "label"\nkind = "binary"\nclasses = {json.dumps(ds.classes)}\n\n'
    text = text[:start] + target + text[end:]
    text += '\n[saliency]\nig_steps = 4\nmax_samples = 2\nrandomisation_check = false\n'
    (tmp_path / "my.toml").write_text(text)
    return tmp_path


@pytest.mark.slow
def test_the_oct_plan_runs_with_the_readme_commands(oct_plan):
    my = str(oct_plan / "my.toml")
    out = medctl("check", "bucket", "-c", my)
    assert "keys: 5/5 ids matched (e.g. sub-001 -> sub-001/volume.nrrd)" in out

    ckpt = oct_plan / "ckpts" / "best_checkpoint_multi_domain.pt"
    out = medctl("check", "checkpoint", "-c", my, "--ckpt", str(ckpt))
    assert "into vit3d_test (64 wide, 2 deep, 2 heads, RoPE, 2x8x8, 1 ch)" in out
    assert "entry `target_encoder`, prefix `module.backbone.` stripped" in out and "(100% of the encoder)" in out

    out = medctl("preprocess", "-c", my)
    cache = next((oct_plan / "cache").iterdir())
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert manifest["status"].eq("ok").all() and manifest["source_key"].str.endswith("/volume.nrrd").all()

    medctl("sweep", "-c", my, "--all-checkpoints", "--mode", "both")
    sweep_dir = oct_plan / "runs" / "oct_lp"
    board = pd.read_csv(sweep_dir / "leaderboard.csv").set_index("entry")
    assert board["status"].eq("ok").all(), board[["status", "reason"]]
    assert set(board.index) == {
        "best_checkpoint_multi_domain", "best_checkpoint_single_domain_01", "random_init",
        f"{board[board['mode'] == 'linear_probe'].drop('random_init')['val_balanced_accuracy'].idxmax()}_ft",
    }  # fmt: skip
    assert "RoPE" in board.loc["best_checkpoint_multi_domain", "architecture"]
    assert board.loc["best_checkpoint_single_domain_01", "architecture"].startswith("vit3d (96 wide")
    tuned = next(name for name in board.index if name.endswith("_ft"))
    best = sweep_dir / tuned / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["model"]["name"] in ("vit3d", "vit3d_test")

    out = medctl("evaluate", "--ckpt", str(best))
    metrics = json.loads((sweep_dir / tuned / "eval_test" / "metrics.json").read_text())
    assert 0 <= metrics["summary"]["balanced_accuracy"] <= 1 and metrics["n_samples"] > 0

    out = medctl("saliency", "--ckpt", str(best), "--split", "test")
    maps = list((sweep_dir / tuned / "saliency_test").rglob("*.nrrd"))
    assert maps and "3D Slicer" in out
