"""medctl's ViT against facebookresearch/vjepa2's own forward pass: golden fixtures made by upstream's code
(tests/data/vjepa2/README.md says how and at which commits), loaded through `model.encoder = "auto"` from
V-JEPA's training layout. Also what a lab sees for files the weights cannot fully describe: a sin-cos table
that may sit unused beside RoPE, V-JEPA 2.1's layout, entries that differ, and shapes too big to build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app
from medctl.config import ModelConfig
from medctl.errors import CheckpointError
from medctl.models.architecture import describe_encoder, pretrained_encoder, vit_heads
from medctl.models.checkpoints import LoadReport, plan_encoder_load
from medctl.models.encoders.vit3d import sincos_3d
from medctl.models.registry import build_encoder

FIXTURES = Path(__file__).parent / "data" / "vjepa2"
TOLERANCE = 1e-5  # fp32; upstream's and medctl's RoPE and attention order their operations differently
runner = CliRunner()


def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def training_file(path: Path, state: dict[str, torch.Tensor], online: dict[str, torch.Tensor] | None = None) -> Path:
    """What app/vjepa/train.py saves: encoder, predictor, target_encoder (+ optimizer state, epoch)."""
    predictor = {"module.backbone.predictor_embed.weight": torch.zeros(4, 4)}
    torch.save({"encoder": online or state, "predictor": predictor, "target_encoder": state, "opt": {}, "epoch": 3}, path)
    return path


def auto_tokens(path: Path, x: torch.Tensor, **encoder_args) -> tuple[torch.Tensor, object]:
    model = ModelConfig(checkpoint=str(path), encoder_args=encoder_args)
    built = pretrained_encoder(model, in_channels=x.shape[1], input_size=x.shape[2:], spatial_dims=3)
    with torch.no_grad():
        return built.encoder.eval().forward_features(x), built


@pytest.mark.parametrize(
    "name", ["vjepa2_rope", "vjepa2_sincos", "vjepa2_sincos_uniform_power", "vjepa2_rope_3ch", "vjepa2_1"]
)
def test_auto_gives_upstreams_tokens(tmp_path, name):
    golden = fixture(name)
    path = training_file(tmp_path / f"{name}.pt", golden["state_dict"])
    for x, want in zip(golden["inputs"], golden["tokens"], strict=True):
        got, built = auto_tokens(path, x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOLERANCE, f"{name} at {list(x.shape)}"
        assert built.report.complete and built.report.unexpected == []
    facts = " ".join(built.choice.architecture.facts)
    if name.startswith("vjepa2_sincos"):  # medctl's own table for upstream's grid is upstream's, exactly
        uniform = name.endswith("uniform_power")
        table = golden["state_dict"]["module.backbone.pos_embed"]
        assert torch.equal(sincos_3d((2, 2, 2), 16, uniform_power=uniform), table)
        assert built.encoder.uniform_power == uniform and f"uniform_power = {str(uniform).lower()}" in facts
    if name == "vjepa2_rope_3ch":
        assert built.choice.architecture.in_channels == 3 and built.encoder.in_channels == 1
    if name == "vjepa2_1":
        assert "layout: V-JEPA 2.1" in facts and built.encoder.rope_frequencies == "interleaved"
        assert any("norms_block.3 read as the final norm" in note for note in built.report.notes)


def test_check_checkpoint_names_vjepa_2_1_and_a_2_0_model_refuses_it(tmp_path):
    path = training_file(tmp_path / "v21.pt", fixture("vjepa2_1")["state_dict"])
    args = ["data.preprocess.spatial_size=[4,32,32]", "run.device=cpu"]
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(path), *args])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "layout: V-JEPA 2.1 (norms_block.0-3" in out and "RoPE (V-JEPA 2.1)" in out
    assert "loaded 149 of 149 keys (100% of the encoder)" in out

    tiled = ["model.encoder=vit3d", 'model.encoder_args={embed_dim=12, depth=12, num_heads=1, mlp_ratio=1.0, patch_size=16, pos_embed="rope"}']
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(path), *args, *tiled])
    out = one_error_line(result)
    assert "V-JEPA 2.1's layout" in out and 'rope_frequencies = "interleaved"' in out


def test_rope_file_with_a_sincos_table_warns_and_pos_embed_rope_gives_upstreams_tokens(tmp_path):
    """A RoPE model that saved a sin-cos table (as V-JEPA 2's releases do): `auto` can only guess sin-cos, says
    so in one warning line and marks the guess; pos_embed = "rope" drops the table and gives upstream's tokens."""
    golden = fixture("vjepa2_rope")
    state = dict(golden["state_dict"])
    state["module.backbone.pos_embed"] = sincos_3d((2, 2, 2), 16)  # (1, 8, 16): the 4x16x16 grid's table
    path = training_file(tmp_path / "rope_with_table.pt", state)
    x, want = golden["inputs"][0], golden["tokens"][0]

    args = ["data.preprocess.spatial_size=[4,16,16]", "run.device=cpu"]
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(path), *args])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.strip().startswith("warning:")]
    assert len(warnings) == 1, result.output
    out = " ".join(result.output.split())
    assert "read as sin-cos positions" in out and 'set model.encoder_args = {pos_embed = "rope"}' in out
    guessed, built = auto_tokens(path, x)
    assert "sin-cos (guessed from its table)" in describe_encoder(built.encoder)  # the leaderboard's column
    assert (guessed - want).norm() / want.norm() > 0.1  # the guess is wrong for this file

    rope_args = [*args, 'model.encoder_args={pos_embed="rope"}']
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(path), *rope_args])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "warning:" not in out and "sin-cos table for the grid [2, 2, 2] dropped" in out
    got, built = auto_tokens(path, x, pos_embed="rope")
    assert (got - want).abs().max().item() <= TOLERANCE and "guessed" not in describe_encoder(built.encoder)


def test_differing_entries_are_both_named(tmp_path):
    golden = fixture("vjepa2_rope")
    online = {k: v + 0.01 for k, v in golden["state_dict"].items()}
    path = training_file(tmp_path / "two.pt", golden["state_dict"], online)
    encoder = build_encoder("vit3d", input_size=(4, 16, 16), embed_dim=16, depth=2, num_heads=1, mlp_ratio=2.0,
                            patch_size=8, pos_embed="rope")  # fmt: skip
    report, _ = plan_encoder_load(encoder, path)
    assert any("`target_encoder` and `encoder` hold different weights; `target_encoder` used" in n for n in report.notes)
    report, _ = plan_encoder_load(encoder, path, key="encoder")
    assert any('`encoder` used' in n and 'checkpoint_key = "target_encoder"' in n for n in report.notes)
    same = training_file(tmp_path / "same.pt", golden["state_dict"])
    assert not any("different weights" in n for n in plan_encoder_load(encoder, same)[0].notes)


def test_a_load_report_never_rounds_to_100_percent_with_a_key_missing_or_unexpected():
    keys = [f"k{i}" for i in range(20000)]
    missing = LoadReport("x.pt", "bare state dict", loaded=keys[:-2], missing=keys[-2:], loaded_share=0.99996)
    assert missing.share() == "19998 of 20000 keys (99.9% of the encoder), 2 missing"
    extra = LoadReport("x.pt", "bare state dict", loaded=keys, unexpected=["head.weight"], loaded_share=1.0)
    assert extra.share() == "20000 of 20000 keys, 1 unexpected"
    whole = LoadReport("x.pt", "bare state dict", loaded=keys, loaded_share=1.0)
    assert whole.share() == "20000 of 20000 keys (100% of the encoder)"


def test_head_counts_name_both_upstream_variants_of_a_width():
    heads, why = vit_heads(1664, [])
    assert heads == 26 and "num_heads = 16" in why and "vit_gigantic" in why
    heads, why = vit_heads(1408, [])
    assert heads == 22 and "num_heads = 16" in why


def test_a_file_declaring_a_model_too_big_to_build_is_refused_before_allocating(tmp_path):
    """A 3 kB file of expanded tensors declares a 65,536-wide ViT (51.5 billion parameters)."""
    wide, one = 65536, torch.zeros(1)
    shapes = {
        "patch_embed.proj.weight": (wide, 1, 2, 8, 8), "patch_embed.proj.bias": (wide,),
        "blocks.0.norm1.weight": (wide,), "blocks.0.norm1.bias": (wide,),
        "blocks.0.attn.qkv.weight": (3 * wide, wide), "blocks.0.attn.qkv.bias": (3 * wide,),
        "blocks.0.attn.proj.weight": (wide, wide), "blocks.0.attn.proj.bias": (wide,),
        "blocks.0.norm2.weight": (wide,), "blocks.0.norm2.bias": (wide,),
        "blocks.0.mlp.fc1.weight": (4 * wide, wide), "blocks.0.mlp.fc1.bias": (4 * wide,),
        "blocks.0.mlp.fc2.weight": (wide, 4 * wide), "blocks.0.mlp.fc2.bias": (wide,),
        "norm.weight": (wide,), "norm.bias": (wide,),
    }  # fmt: skip
    state = {f"module.backbone.{k}": one.expand(*shape) for k, shape in shapes.items()}
    path = training_file(tmp_path / "liar.pt", state)
    assert path.stat().st_size < 10_000
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(path), "data.preprocess.spatial_size=[8,16,16]", "run.device=cpu"])
    out = one_error_line(result)
    assert "liar.pt: builds vit3d (65536 wide" in out and "51,549,044,736 parameters, 206.2 GB of weights" in out
    assert "GB of memory free" in out
    with pytest.raises(CheckpointError, match="GB of memory free"):
        pretrained_encoder(ModelConfig(checkpoint=str(path)), in_channels=1, input_size=(8, 16, 16), spatial_dims=3)


def test_finetune_and_sweep_log_the_guess_in_one_warning_line(tmp_path, caplog):
    """finetune (and each sweep entry, which runs it) builds its encoder through build_pretrained_encoder."""
    from medctl.finetune.model import build_pretrained_encoder

    state = dict(fixture("vjepa2_rope")["state_dict"])
    state["module.backbone.pos_embed"] = sincos_3d((2, 2, 2), 16)
    path = training_file(tmp_path / "rope_with_table.pt", state)
    with caplog.at_level("INFO", logger="medctl"):
        encoder = build_pretrained_encoder(ModelConfig(checkpoint=str(path)), {"in_channels": 1, "spatial_dims": 3}, [4, 16, 16])
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().strip().startswith("warning:")]
    assert len(warnings) == 1 and "rope_with_table.pt: read as sin-cos positions" in warnings[0]
    assert "guessed" in describe_encoder(encoder)
