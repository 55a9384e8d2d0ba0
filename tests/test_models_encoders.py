"""Every encoder family: shapes, finite outputs, gradients, Grad-CAM layers, the registry and its errors."""

from __future__ import annotations

import pytest
import torch

from medctl.errors import ConfigError
from medctl.models.registry import ENCODERS, build_encoder, describe_encoders, get_spec, parameter_count

# (name, input size, in_channels): every tiny variant, in 2D or 3D as the family allows
TINY = [
    ("mt3_tiny", (16, 32, 32), 1),
    ("vit3d_test", (8, 16, 16), 1),
    ("vit3d_test", (8, 16, 24), 2),
    ("unet2d_tiny", (32, 16), 1),
    ("convnext_test_cbam", (64, 32), 3),
    ("resnet_test_2d", (32, 32), 1),
    ("resnet_test_3d", (8, 16, 16), 1),
]


def _features_shape(encoder, size):
    if encoder.feature_layout == "tokens":
        return 3
    return 2 + len(size)


@pytest.mark.parametrize(("name", "size", "channels"), TINY)
def test_tiny_encoder_shapes_finite_and_gradients(seed, name, size, channels):
    encoder = build_encoder(name, in_channels=channels, input_size=size)
    x = torch.randn(2, channels, *size)  # (B, C, *spatial)

    features = encoder.forward_features(x)
    embedding = encoder(x)

    assert encoder.spatial_dims == len(size) and encoder.in_channels == channels
    assert embedding.shape == (2, encoder.embed_dim)
    assert features.ndim == _features_shape(encoder, size)
    channel_axis = -1 if encoder.feature_layout == "tokens" else 1
    assert features.shape[0] == 2 and features.shape[channel_axis] == encoder.embed_dim
    assert torch.isfinite(features).all() and torch.isfinite(embedding).all()
    assert embedding.std() > 0  # not a constant

    loss = embedding.pow(2).mean()
    if hasattr(encoder, "reconstruct"):  # the decoder only trains through reconstruction
        loss = loss + encoder.reconstruct(x).pow(2).mean()
    loss.backward()
    no_grad = [n for n, p in encoder.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


@pytest.mark.parametrize(("name", "size", "channels"), TINY)
def test_gradcam_layer_output_matches_its_layout(name, size, channels):
    encoder = build_encoder(name, in_channels=channels, input_size=size).eval()
    captured = []
    handle = encoder.gradcam_layer.register_forward_hook(lambda m, i, o: captured.append(o))
    encoder(torch.randn(1, channels, *size))
    handle.remove()
    out = captured[-1]
    if encoder.gradcam_layout == "map":
        assert out.ndim == 2 + len(size)
    else:
        assert out.ndim == 3
        assert out.shape[1] == torch.tensor(encoder.token_grid(size)).prod().item()


def test_mt3_tiny_runs_at_the_required_size_and_projects_three_planes(seed):
    encoder = build_encoder("mt3_tiny", input_size=(16, 32, 32)).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        stem = encoder.stem_features(x)  # (2, 32, 4, 8, 8)
        tokens = encoder.forward_features(x)
    d, h, w = stem.shape[2:]
    assert stem.shape[:2] == (2, 32) and (d, h, w) == (4, 8, 8)
    assert tokens.shape == (2, h * w + d * w + d * h, 64)  # axial + coronal + sagittal planes
    with pytest.raises(TypeError, match="no token grid"):
        encoder.token_grid((16, 32, 32))


def test_mt3_planes_are_mean_and_max_over_each_axis():
    from medctl.models.encoders.mt3 import project_planes

    volume = torch.randn(2, 3, 4, 5, 6)  # (B, C, d, h, w)
    axial, coronal, sagittal = project_planes(volume)
    assert axial.shape == (2, 6, 5, 6) and coronal.shape == (2, 6, 4, 6) and sagittal.shape == (2, 6, 4, 5)
    torch.testing.assert_close(axial[:, :3], volume.mean(2))
    torch.testing.assert_close(coronal[:, 3:], volume.max(3).values)
    torch.testing.assert_close(sagittal[:, 3:], volume.max(4).values)


def test_unet2d_takes_half_images_and_reconstructs(seed):
    encoder = build_encoder("unet2d", input_size=(192, 96))
    x = torch.randn(2, 1, 192, 96)
    skips = encoder.encode(x)
    assert [s.shape[1] for s in skips] == [16, 32, 64, 128]  # depth 4, base 16, bottleneck 128
    assert skips[-1].shape[2:] == (24, 12)
    assert encoder.decode(skips).shape == (2, 1, 192, 96)
    assert encoder.reconstruct(x).shape == (2, 1, 192, 96)
    torch.testing.assert_close(encoder(x), skips[-1].mean(dim=(2, 3)))  # embedding = GAP of the bottleneck
    with pytest.raises(ConfigError, match="multiples of 8"):
        encoder.encode(torch.randn(1, 1, 100, 96))


def test_convnext_tiny_cbam_has_tiny_depths_and_cbam_after_stages_3_and_4():
    with torch.device("meta"):  # structure only; the test variant runs above
        encoder = build_encoder("convnext_tiny_cbam", input_size=(64, 64))
        assert encoder(torch.empty(1, 1, 64, 64)).shape == (1, 768)
    assert [len(stage.blocks) for stage in encoder.stages] == [3, 3, 9, 3]
    assert [stage.blocks[0].conv_dw.in_channels for stage in encoder.stages] == [96, 192, 384, 768]
    assert sorted(encoder.cbam) == ["2", "3"] and encoder.embed_dim == 768


def test_cbam_reweights_channels_and_positions():
    from medctl.models.encoders.convnext_cbam import CBAM

    cbam = CBAM(8, reduction=2)
    x = torch.randn(2, 8, 5, 5)
    y = cbam(x)
    channel = torch.sigmoid(cbam.channel.mlp(x.mean((2, 3), keepdim=True)) + cbam.channel.mlp(x.amax((2, 3), keepdim=True)))
    xc = x * channel
    spatial = torch.sigmoid(cbam.spatial.conv(torch.cat([xc.mean(1, keepdim=True), xc.amax(1, keepdim=True)], 1)))
    torch.testing.assert_close(y, xc * spatial)


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
@pytest.mark.parametrize("dims", [2, 3])
def test_monai_resnets_wrap_with_monai_key_names(depth, dims):
    name = f"resnet{depth}_{dims}d"
    with torch.device("meta"):
        encoder = build_encoder(name, input_size=(32,) * dims)
    assert encoder.embed_dim == (2048 if depth == 50 else 512)
    assert encoder.spatial_dims == dims
    keys = set(encoder.state_dict())
    assert {"conv1.weight", "bn1.weight", "layer4.0.conv1.weight"} <= keys
    assert not any(k.startswith("fc.") for k in keys)


def test_resnet_forward_features_matches_monai_pooled_output(seed):
    from monai.networks.nets import resnet10

    encoder = build_encoder("resnet_test_3d", input_size=(8, 16, 16)).eval()
    reference = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, widen_factor=0.125).eval()
    reference.load_state_dict(encoder.state_dict())
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(x))


def test_registry_names_the_required_encoders():
    required = {"mt3", "mt3_tiny", "vit3d_test", "unet2d", "unet2d_tiny", "convnext_tiny_cbam", "convnext_test_cbam"}
    required |= {f"vit3d_{s}" for s in ("tiny", "small", "base", "large", "huge", "giant")}
    required |= {f"resnet{d}_{k}" for d in (10, 18, 34, 50) for k in ("2d", "3d")}
    assert required <= set(ENCODERS)


def test_describe_encoders_gives_kind_size_width_and_parameters():
    rows = {row["name"]: row for row in describe_encoders()}
    assert rows["vit3d_base"]["input"].startswith("3D volume") and rows["unet2d"]["input"].startswith("2D image")
    assert rows["vit3d_base"]["embed_dim"] == 768 and "2x16x16" in rows["vit3d_base"]["size"]
    # ViT-B: patch embed (1 channel, 2x16x16) + 12 blocks of 12*C^2 + 13*C weights + final norm
    c = 768
    block = (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c) + 4 * c
    expected = (c * 2 * 16 * 16 + c) + 12 * block + 2 * c
    assert rows["vit3d_base"]["params"] == expected == parameter_count("vit3d_base")
    assert rows["vit3d_giant"]["params"] == rows["vit3d_giant_h16"]["params"]


def test_build_encoder_reports_bad_names_args_and_sizes():
    with pytest.raises(ConfigError, match="did you mean `vit3d_base`"):
        build_encoder("vit3d_bas", input_size=(16, 32, 32))
    with pytest.raises(ConfigError, match="model.encoder_args"):
        build_encoder("vit3d_test", input_size=(8, 16, 16), no_such_arg=1)
    with pytest.raises(ConfigError, match="3D encoder"):
        build_encoder("vit3d_test", input_size=(16, 16))
    with pytest.raises(ConfigError, match="multiples of"):
        build_encoder("vit3d_test", input_size=(8, 16, 20))
    with pytest.raises(ConfigError, match="pos_embed"):
        build_encoder("vit3d_test", input_size=(8, 16, 16), pos_embed="learned")
    assert get_spec("unet2d").spatial_dims == 2


def test_build_encoder_records_how_to_rebuild_it():
    encoder = build_encoder("vit3d_test", in_channels=2, input_size=(8, 16, 16), pos_embed="rope")
    assert encoder.name == "vit3d_test"
    assert encoder.build_args == {"in_channels": 2, "input_size": [8, 16, 16], "pos_embed": "rope"}
