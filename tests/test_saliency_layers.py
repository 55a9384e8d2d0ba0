"""The default CAM layer: the deepest spatial map of the encoder fine enough for the lesions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medctl.data.tables import TargetSpec
from medctl.models.classifier import build_classifier
from medctl.models.registry import build_encoder
from medctl.saliency.layers import choose_cam_layer, lesion_extent, spatial_layers
from saliency_support import ball

SPEC = TargetSpec.from_dict({"name": "label", "kind": "binary", "classes": ["healthy", "edema"]})


def classifier(name: str, size, **args):
    torch.manual_seed(0)
    return build_classifier(build_encoder(name, in_channels=1, input_size=list(size), **args), [SPEC]).eval()


def test_mt3_maps_are_found_in_forward_order_with_their_strides(seed):
    model, x = classifier("mt3_tiny", (16, 32, 32)), torch.randn(1, 1, 16, 32, 32)
    layers = {layer.name: layer for layer in spatial_layers(model, x)}
    names = list(layers)
    assert [n for n in names if n.count(".") == 1 and n.startswith("stem.")] == ["stem.0", "stem.1", "stem.2"]
    assert (
        names.index("stem.1.norm2") < names.index("stem.1") < names.index("stem.2")
    )  # a stage after its parts
    assert [layers[f"stem.{i}"].stride for i in range(3)] == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert layers["stem.2"].shape == (4, 8, 8)  # the encoder's own CAM layer: too coarse for small lesions
    assert not any(
        n.startswith(("plane_embed", "transformer")) for n in names
    )  # 2D planes and tokens are not maps


def test_the_choice_follows_the_lesion_size(seed):
    model, x = classifier("mt3_tiny", (16, 32, 32)), torch.randn(1, 1, 16, 32, 32)
    small = choose_cam_layer(model, x, (4.0, 8.0, 8.0))  # two cells across: stride <= (2, 4, 4)
    assert small.name == "stem.1" and small.stride == (2, 2, 2) and small.shape == (8, 16, 16)
    assert small.target_extent == (4.0, 8.0, 8.0) and "median extent" in small.rule
    tiny = choose_cam_layer(model, x, (1.0, 2.0, 2.0))
    assert tiny.stride == (1, 1, 1) and tiny.name.startswith("stem.0")
    large = choose_cam_layer(model, x, (16.0, 32.0, 32.0))
    assert large.stride == (4, 4, 4)  # the deepest map (the whole stem, or its last stage)
    unknown = choose_cam_layer(model, x, None)  # no masks: at least 8 cells per axis
    assert unknown.name == "stem.1" and "no lesion masks" in unknown.rule
    assert [c["name"] for c in small.candidates] == ["stem.0", "stem.1", "stem"]  # the deepest module per size


def test_resnet_and_token_encoders(seed):
    size = (16, 32, 32)
    resnet = classifier("resnet_test_3d", size, no_max_pool=True, conv1_t_stride=1)
    choice = choose_cam_layer(resnet, torch.randn(1, 1, *size), (6.0, 12.0, 12.0))
    assert choice.name == "layer2" and choice.stride == (2, 2, 2)
    vit = classifier("vit3d_test", size)
    token = choose_cam_layer(vit, torch.randn(1, 1, *size), (6.0, 12.0, 12.0))
    assert token.name == "norm" and "token" in token.rule  # no map finer than the patch grid exists


def test_lesion_extent_is_the_median_box_of_connected_lesions_capped_by_their_thickness():
    shape = (16, 32, 32)
    one = ball(shape, (5, 8, 8), 2.0) | ball(shape, (10, 24, 24), 3.0)  # boxes 5x5x5 and 7x7x7
    two = ball(shape, (8, 16, 16), 4.0)  # 9x9x9
    # a ball's thickness: twice the distance from its centre to the nearest outside voxel, (3, 1, 0) for r = 3
    assert lesion_extent([one, two]) == pytest.approx((2 * 10**0.5,) * 3)
    assert lesion_extent([np.zeros(shape, bool)]) is None
    rod = np.zeros(shape, bool)
    for i in range(20):
        rod[8, 4 + i, 4 + i : 6 + i] = True  # a staircase rod lying diagonally: a 1x20x21 box
    assert lesion_extent([rod]) == (1.0, 2.0, 2.0)  # as thin as it is, not as big as its box
