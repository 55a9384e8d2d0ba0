"""`medctl check checkpoint` and `medctl list models` through the real CLI."""

from __future__ import annotations

import os

import torch
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.models.registry import build_encoder

runner = CliRunner()
ARGS = ["model.encoder=vit3d_test", "data.preprocess.spatial_size=[8,16,16]", "run.device=cpu"]


def vjepa_file(path, encoder):
    state = {f"module.backbone.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"encoder": state, "target_encoder": state, "predictor": {}, "opt": {}, "epoch": 1}, path)
    return path


def test_check_checkpoint_reports_load_and_forward(tmp_path, seed):
    path = vjepa_file(tmp_path / "vjepa.pt", build_encoder("vit3d_test", input_size=(8, 16, 16)))
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(path), *ARGS])
    out = " ".join(result.output.split())  # unwrap rich's line breaks
    assert result.exit_code == 0, result.output
    assert "V-JEPA/I-JEPA training checkpoint" in out and "entry `target_encoder`" in out
    assert "prefix `module.backbone.` stripped" in out
    assert "(100% of the encoder)" in out
    assert "input (B=1, C=1, D=8, H=16, W=16)" in out and "features [1, 16, 64]" in out and "embedding [1, 64]" in out
    assert "108,352 parameters" in out


def test_check_checkpoint_adapts_rgb_stem_and_refuses_partial_load(tmp_path, seed):
    rgb = build_encoder("vit3d_test", in_channels=3, input_size=(8, 16, 16))
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(tmp_path / "rgb.pt"), *ARGS])
    assert result.exit_code == 0, result.output
    assert "3 input channels summed into 1" in " ".join(result.output.split())

    partial = {k: v for k, v in rgb.state_dict().items() if not k.startswith("blocks.0.")}
    torch.save(partial, tmp_path / "partial.pt")
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(tmp_path / "partial.pt"), *ARGS])
    out = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "missing: 12" in out and "refused a partial load" in out and "model.allow_partial_load = true" in out
    assert "embedding" not in out  # no forward pass after a refused load

    allowed = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(tmp_path / "partial.pt"), *ARGS, "model.allow_partial_load=true"])
    assert allowed.exit_code == 0 and "embedding [1, 64]" in " ".join(allowed.output.split())


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo code ran",))


def test_check_checkpoint_refuses_unsafe_and_corrupt_files(tmp_path):
    torch.save({"x": RunsCode()}, tmp_path / "evil.pt")
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(tmp_path / "evil.pt"), *ARGS])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "refused" in out and "could run code" in out and "code ran" not in out

    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(tmp_path / "cut.pt"), *ARGS])
    assert result.exit_code == 2 and "corrupt or incomplete" in " ".join(result.output.split())


def test_list_models_shows_kind_size_width_and_parameters():
    result = runner.invoke(app, ["list", "models"], env={"COLUMNS": "80"})  # not a terminal: plain rows, uncut
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[2:] if line.strip()}
    assert {"vit3d_base", "vit3d_giant", "vit3d_giant_h16", "mt3", "unet2d", "convnext_tiny_cbam", "resnet50_3d"} <= set(lines)
    assert "3D volume" in lines["vit3d_base"] and "85.45M" in lines["vit3d_base"] and "768" in lines["vit3d_base"]
    assert "2D image" in lines["unet2d"] and "multiples of 8" in lines["unet2d"]


def test_list_methods_losses_and_attributions():
    from typer.testing import CliRunner

    from medctl.cli.app import app
    from medctl.pretrain import METHODS

    runner = CliRunner()
    expected = {
        "methods": list(METHODS),
        "losses": ["cross_entropy", "focal", "bce"],
        "attributions": ["integrated_gradients", "gradcam", "occlusion", "guided_backprop"],
    }
    for what, names in expected.items():
        result = runner.invoke(app, ["list", what], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for name in names:
            assert name in result.output


def test_check_checkpoint_with_auto_prints_what_it_read(tmp_path, seed):
    wide = build_encoder("vit3d_test", in_channels=3, input_size=(16, 32, 32), embed_dim=96, num_heads=3, pos_embed="rope")
    state = {f"module.backbone.{k}": v for k, v in wide.state_dict().items()}
    torch.save({"context_encoder": state, "predictor": {}, "epoch": 1}, tmp_path / "oct.pt")
    args = ["data.preprocess.spatial_size=[8,16,16]", "run.device=cpu"]  # model.encoder defaults to "auto"
    result = runner.invoke(app, ["check", "checkpoint", "--ckpt", str(tmp_path / "oct.pt"), *args])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "into vit3d (96 wide, 2 deep, 3 heads, RoPE, 2x8x8, 1 ch)" in out
    assert "architecture: vit3d `vit3d` (read from the state dict, entry `context_encoder`, prefix `module.backbone.` stripped)" in out
    assert "96 wide, 2 deep, MLP 384 (4 x width), 2x8x8 tubelets" in out and "3 heads (not stored" in out
    assert "positions: RoPE (no pos_embed in the file)" in out and "takes 3 channel(s)" in out
    assert "3-channel stem is summed into 1 channel" in out and "(100% of the encoder)" in out
    assert "embedding [1, 96]" in out
