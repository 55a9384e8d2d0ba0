"""ConvNeXt with CBAM attention after its last two stages, for 2D (multi-label) images.

Papers: Liu et al., "A ConvNet for the 2020s" (CVPR 2022); Woo et al., "CBAM: Convolutional Block
Attention Module" (ECCV 2018).

ConvNeXt-Tiny: a 4x4 patchify stem, four stages (depths 3, 3, 9, 3; widths 96, 192, 384, 768) of
blocks ``depthwise 7x7 -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale`` with a residual,
and a LayerNorm + stride-2 conv between stages. CBAM re-weights channels (a shared MLP on the average-
and max-pooled descriptors) and then positions (a 7x7 conv on the channel-wise mean and max) after
stages 3 and 4, where features are semantic enough for attention to pick out findings. Block and
stage parameter names follow timm's ConvNeXt (``stem.0``, ``stages.N.downsample.1``,
``stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``), so its ImageNet weights load (with a
partial-load report for CBAM and a 3->1 channel stem). Inputs are multiples of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder, check_input_size


# ----------------------------------------------------------------------------------------- blocks
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """x + drop_path(gamma * mlp(norm(dwconv7x7(x)))), computed channels-last."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.gamma * self.mlp(self.norm(y))
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, C, H, W)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: Sequence[float]):
        super().__init__()
        if in_dim == dim:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, dp) for dp in drop_paths[:depth]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ChannelAttention(nn.Module):
    """sigmoid(MLP(avgpool) + MLP(maxpool)) per channel."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))  # (B, C, 1, 1)
        peak = self.mlp(x.amax(dim=(2, 3), keepdim=True))  # (B, C, 1, 1)
        return x * torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """sigmoid(conv7x7([mean_c, max_c])) per position."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.conv(descriptor))


class CBAM(nn.Module):
    """Channel attention, then spatial attention (Woo et al., 2018)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


# ------------------------------------------------------------------------------------------ model
class ConvNeXtCBAM(Encoder):
    """ConvNeXt stages with CBAM after the stages listed in ``cbam_stages`` (0-based)."""

    feature_layout = "map"
    spatial_dims = 2

    def __init__(
        self,
        *,
        in_channels: int = 1,
        input_size: Sequence[int] = (224, 224),
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        cbam_stages: Sequence[int] = (2, 3),
        cbam_reduction: int = 16,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ConfigError([f"depths and dims need four stages each, got {list(depths)} and {list(dims)}"], "model.encoder_args")
        if any(s not in range(4) for s in cbam_stages):
            raise ConfigError([f"cbam_stages {list(cbam_stages)} must be stage indices 0..3"], "model.encoder_args")
        self.in_channels, self.embed_dim = in_channels, dims[-1]
        self.input_size = check_input_size("convnext_cbam", input_size, 2, (32, 32))

        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, start, previous = [], 0, dims[0]
        for depth, dim in zip(depths, dims, strict=True):
            stages.append(ConvNeXtStage(previous, dim, depth, rates[start : start + depth]))
            start, previous = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.cbam = nn.ModuleDict({str(s): CBAM(dims[s], cbam_reduction) for s in sorted(cbam_stages)})
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def gradcam_layer(self) -> nn.Module:
        last = str(len(self.stages) - 1)
        return self.cbam[last] if last in self.cbam else self.stages[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the last stage's map (B, dims[-1], H/32, W/32)."""
        x = self.stem(x)  # (B, dims[0], H/4, W/4)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if str(i) in self.cbam:
                x = self.cbam[str(i)](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_features(x).mean(dim=(2, 3)))  # (B, dims[-1])


# ----------------------------------------------------------------------------------------- builders
def convnext_tiny_cbam(**kwargs) -> ConvNeXtCBAM:
    return ConvNeXtCBAM(**{"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768), **kwargs})


def convnext_test_cbam(**kwargs) -> ConvNeXtCBAM:
    return ConvNeXtCBAM(**{"depths": (1, 1, 2, 1), "dims": (16, 32, 48, 64), "cbam_reduction": 4, **kwargs})
