"""model.encoder = "auto": tiny V-JEPA 2-layout checkpoints of different schemes, grids, widths, entries and
channels each rebuild the encoder they came from, giving the features of the explicitly configured model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medctl.config import ModelConfig
from medctl.errors import CheckpointError, ConfigError
from medctl.models.architecture import pretrained_encoder, read_architecture, vit_heads
from medctl.models.checkpoints import encoder_payload, load_encoder_weights, save_checkpoint
from medctl.models.registry import build_encoder

SIZE = (16, 32, 32)  # the data: a (8, 4, 4) token grid for 2x8x8 tubelets


def vjepa2_file(path: Path, encoder, *, entry: str = "target_encoder") -> Path:
    """V-JEPA 2's training layout: online and target encoders (or only `entry`) under `module.backbone.`."""
    state = {f"module.backbone.{k}": v.clone() for k, v in encoder.state_dict().items()}
    entries = {"encoder": state, "target_encoder": state} if entry == "target_encoder" else {entry: state}
    torch.save({**entries, "predictor": {"module.backbone.predictor_embed.weight": torch.zeros(4, 4)}, "epoch": 3}, path)
    return path


def source(seed: int, size=SIZE, **args):
    torch.manual_seed(seed)
    return build_encoder("vit3d_test", input_size=size, **args).eval()


# name, how the file was made, what it is under an explicit config, in_channels of the data
CASES = {
    "rope": (dict(pos_embed="rope"), "target_encoder", ("vit3d_test", {"pos_embed": "rope"})),
    "sincos_other_grid": (dict(size=(8, 16, 16)), "target_encoder", ("vit3d_test", {})),  # grid (4, 2, 2)
    "wide_context": (dict(embed_dim=96, num_heads=3), "context_encoder", ("vit3d_test", {"embed_dim": 96, "num_heads": 3})),
    "rgb": (dict(in_channels=3), "target_encoder", ("vit3d_test", {})),
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vjepa2")
    return {
        name: vjepa2_file(folder / f"{name}.pt", source(i, **made), entry=entry)
        for i, (name, (made, entry, _)) in enumerate(CASES.items())
    }


@pytest.mark.parametrize("case", list(CASES))
def test_auto_builds_what_the_explicit_config_builds_with_the_same_features(checkpoints, case):
    made, entry, (name, args) = CASES[case]
    path = checkpoints[case]
    auto = pretrained_encoder(ModelConfig(checkpoint=str(path)), in_channels=1, input_size=SIZE, spatial_dims=3)
    assert auto.report.complete and auto.report.source_key == entry and auto.report.prefix == "module.backbone."

    explicit = build_encoder(name, input_size=SIZE, **args).eval()
    load_encoder_weights(explicit, path)
    assert auto.encoder.state_dict().keys() == explicit.state_dict().keys()
    x = torch.randn(2, 1, *SIZE)
    with torch.no_grad():
        assert torch.equal(auto.encoder.eval().forward_features(x), explicit.forward_features(x))
    assert auto.encoder.num_heads == explicit.num_heads and auto.encoder.pos_embed_kind == explicit.pos_embed_kind

    arch = auto.choice.architecture
    assert arch.key == entry and arch.prefix == "module.backbone."
    if case == "rgb":  # 3 -> 1 channel: summed, and said so
        assert arch.in_channels == 3 and auto.encoder.in_channels == 1
        assert any("3-channel stem is summed into 1" in n for n in auto.choice.notes)
        assert any("3 input channels summed into 1" in n for n in auto.report.notes)
    if case == "sincos_other_grid":  # the table's own grid, resized to the data's
        assert "positions: sin-cos pos_embed for the grid [4, 2, 2] (16 positions; uniform_power = false: halves and quarters)" in arch.facts
        assert any("from grid [4, 2, 2] to [8, 4, 4]" in n for n in auto.report.notes)
    if case == "wide_context":
        assert arch.name == "vit3d" and arch.args["embed_dim"] == 96 and arch.args["depth"] == 2
        assert any("3 heads (not stored in a checkpoint: 32-channel heads assumed" in f for f in arch.facts)
    if case == "rope":
        assert arch.name == "vit3d_test" and "positions: RoPE (no pos_embed in the file)" in arch.facts


def test_a_named_encoder_that_does_not_fit_names_the_one_that_does(checkpoints):
    model = ModelConfig(encoder="vit3d_test", checkpoint=str(checkpoints["wide_context"]))
    with pytest.raises(CheckpointError) as info:
        pretrained_encoder(model, in_channels=1, input_size=SIZE, spatial_dims=3)
    message = str(info.value)
    assert "\n" not in message and 'set model.encoder = "vit3d"' in message
    assert "embed_dim = 96" in message and "num_heads = 3" in message and 'pos_embed = "sincos"' in message

    rope_named_sincos = ModelConfig(encoder="vit3d_test", checkpoint=str(checkpoints["rope"]))
    with pytest.raises(CheckpointError, match='no pos_embed: it was trained with RoPE.*pos_embed = "rope"'):
        pretrained_encoder(rope_named_sincos, in_channels=1, input_size=SIZE, spatial_dims=3)


def test_inputs_the_checkpoint_cannot_take_are_refused_not_resized(checkpoints, tmp_path):
    gray = ModelConfig(checkpoint=str(checkpoints["rope"]))
    with pytest.raises(CheckpointError, match="takes 1-channel input but the data has 3 channel"):
        pretrained_encoder(gray, in_channels=3, input_size=SIZE, spatial_dims=3)
    with pytest.raises(CheckpointError, match=r"2x8x8 tubelets do not tile the data's size \[16, 32, 36\]"):
        pretrained_encoder(gray, in_channels=1, input_size=(16, 32, 36), spatial_dims=3)
    with pytest.raises(ConfigError, match='"auto" reads the architecture from model.checkpoint, which is empty'):
        pretrained_encoder(ModelConfig(), in_channels=1, input_size=SIZE, spatial_dims=3)
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="cannot tell the architecture from its keys"):
        read_architecture(tmp_path / "unknown.pt")


def test_medctl_checkpoints_rebuild_as_recorded_and_other_families_by_shape(tmp_path):
    encoder = source(1, pos_embed="rope", embed_dim=48, num_heads=4)  # 4 heads: no rule would guess it
    save_checkpoint(tmp_path / "encoder.ckpt", encoder_payload(encoder, name="vit3d_test", args=encoder.build_args))
    arch = read_architecture(tmp_path / "encoder.ckpt")
    assert arch.name == "vit3d_test" and arch.args == {"pos_embed": "rope", "embed_dim": 48, "num_heads": 4}
    assert arch.source == "recorded in the medctl checkpoint"
    built = pretrained_encoder(ModelConfig(checkpoint=str(tmp_path / "encoder.ckpt")), in_channels=1, input_size=SIZE, spatial_dims=3)
    assert built.encoder.num_heads == 4 and built.report.complete

    for name, size in (("mt3_tiny", (16, 32, 32)), ("resnet_test_3d", (16, 16, 16)), ("unet2d_tiny", (32, 16))):
        torch.save({"state_dict": {f"model.{k}": v for k, v in build_encoder(name, input_size=size).state_dict().items()}},
                   tmp_path / f"{name}.pt")  # fmt: skip
        arch = read_architecture(tmp_path / f"{name}.pt")
        assert arch.name == name and arch.prefix == "model." and arch.in_channels == 1


def test_head_counts_follow_vjepa2_sizes():
    assert vit_heads(1024, [])[0] == 16 and vit_heads(1280, [])[0] == 16 and vit_heads(384, [])[0] == 6
    heads, why = vit_heads(1408, [16, 22])
    assert heads == 22 and "released ViT-g" in why and "num_heads = 16" in why
    assert vit_heads(64, [2])[0] == 2 and vit_heads(512, [])[0] == 8 and vit_heads(40, [])[0] == 1


def test_an_all_zero_pos_embed_beside_rope_is_a_placeholder(tmp_path):
    rope = source(1, pos_embed="rope")
    state = {**rope.state_dict(), "pos_embed": torch.zeros(1, 64, 64)}
    torch.save({"target_encoder": state}, tmp_path / "release.pt")
    built = pretrained_encoder(ModelConfig(checkpoint=str(tmp_path / "release.pt")), in_channels=1, input_size=SIZE, spatial_dims=3)
    assert built.encoder.pos_embed_kind == "rope" and built.report.complete
    assert any("all zeros" in n for n in built.report.notes)
    x = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        assert torch.equal(built.encoder.eval().forward_features(x), rope.forward_features(x))
