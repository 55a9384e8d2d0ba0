"""MONAI's 2D/3D ResNets behind the encoder interface.

Papers: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016); Chen, Ma and Zheng,
"Med3D: Transfer Learning for 3D Medical Image Analysis" (2019) for the 3D variants MONAI implements.

``monai.networks.nets.resnet{10,18,34,50}`` are built with ``feed_forward=False`` (no classifier) and
their layers become this module's own children, so the state dict has MONAI's (and MedicalNet's) key
names: ``conv1``, ``bn1``, ``layer1..4``. ``forward_features`` stops before the average pool and returns
``layer4``'s map; the embedding is 512 wide (basic blocks) or 2048 (resnet50's bottlenecks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks import nets
from torch import nn

from medctl.models.encoders.base import Encoder, check_input_size

BUILDERS = {10: nets.resnet10, 18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}


# ------------------------------------------------------------------------------------------ model
class MonaiResNet(Encoder):
    feature_layout = "map"

    def __init__(
        self,
        *,
        depth: int,
        spatial_dims: int,
        in_channels: int = 1,
        input_size: Sequence[int] = (),
        **monai_args: Any,
    ):
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.input_size = check_input_size(f"resnet{depth}_{spatial_dims}d", input_size, spatial_dims, (1,) * spatial_dims)
        net = BUILDERS[depth](spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False, **monai_args)
        self.no_max_pool = net.no_max_pool
        for name in ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))
        self.embed_dim = net.in_planes  # channels leaving layer4

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.layer4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) -> layer4's map (B, embed_dim, *spatial / 16 or 32)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ----------------------------------------------------------------------------------------- builders
def resnet10_2d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=10, spatial_dims=2, **kwargs)


def resnet18_2d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=18, spatial_dims=2, **kwargs)


def resnet34_2d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=34, spatial_dims=2, **kwargs)


def resnet50_2d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=50, spatial_dims=2, **kwargs)


def resnet10_3d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=10, spatial_dims=3, **kwargs)


def resnet18_3d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=18, spatial_dims=3, **kwargs)


def resnet34_3d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=34, spatial_dims=3, **kwargs)


def resnet50_3d(**kwargs) -> MonaiResNet:
    return MonaiResNet(depth=50, spatial_dims=3, **kwargs)


def resnet_test_2d(**kwargs) -> MonaiResNet:
    """resnet10 at 1/8 width (8..64 channels): for tests."""
    return MonaiResNet(depth=10, spatial_dims=2, **{"widen_factor": 0.125, **kwargs})


def resnet_test_3d(**kwargs) -> MonaiResNet:
    """resnet10 at 1/8 width (8..64 channels): for tests."""
    return MonaiResNet(depth=10, spatial_dims=3, **{"widen_factor": 0.125, **kwargs})
