"""A small 2D U-Net whose bottleneck is the embedding and whose decoder reconstructs the input.

Paper: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (MICCAI 2015). Used by the ``mim_contrastive`` pretraining (masked image modelling plus
InfoNCE on left/right halves): the decoder, with skip connections, fills in masked patches, and the
global average of the bottleneck is the embedding the contrastive loss and the classifier use.

``depth`` resolution levels with ``base * 2**i`` channels (depth 4, base 16: 16, 32, 64 and a
128-channel bottleneck at 1/8 of the input), so H and W must be multiples of ``2**(depth-1)``
(192 x 96 half images work). ``encode(x)`` returns the skip maps and the bottleneck,
``decode(features)`` turns them back into an image (B, C_in, H, W), ``reconstruct(x)`` does both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder, check_input_size, group_norm


# ----------------------------------------------------------------------------------------- blocks
class DoubleConv(nn.Module):
    """(Conv3x3 -> GroupNorm -> ReLU) twice; keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """Upsample x2 with a transposed conv, concatenate the skip, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, out, 2h, 2w)
        return self.conv(torch.cat([x, skip], dim=1))


# ------------------------------------------------------------------------------------------ model
class UNet2D(Encoder):
    """U-Net encoder (embedding = GAP of the bottleneck) with a reconstruction decoder."""

    feature_layout = "map"
    spatial_dims = 2

    def __init__(self, *, in_channels: int = 1, input_size: Sequence[int] = (192, 96), base: int = 16, depth: int = 4):
        super().__init__()
        if depth < 2:
            raise ConfigError([f"unet2d depth must be at least 2 (one downsampling), got {depth}"], "model.encoder_args")
        channels = [base * 2**i for i in range(depth)]  # e.g. 16, 32, 64, 128
        self.in_channels, self.embed_dim, self.depth = in_channels, channels[-1], depth
        self.multiple = 2 ** (depth - 1)
        self.input_size = check_input_size("unet2d", input_size, 2, (self.multiple, self.multiple))

        self.down = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.down.append(DoubleConv(previous, c))
            previous = c
        self.up = nn.ModuleList(Up(channels[i + 1], channels[i], channels[i]) for i in reversed(range(depth - 1)))
        self.out = nn.Conv2d(channels[0], in_channels, 1)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.down[-1]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> [skip_0 (B, base, H, W), ..., bottleneck (B, 8*base, H/8, W/8)]."""
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ConfigError(
                [f"unet2d needs H and W that are multiples of {self.multiple}, got {h}x{w}; change data.preprocess.spatial_size"],
                "data.preprocess.spatial_size",
            )
        features = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The list from ``encode`` -> a reconstruction (B, C_in, H, W)."""
        x = features[-1]
        for up, skip in zip(self.up, reversed(features[:-1]), strict=True):
            x = up(x, skip)
        return self.out(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck map (B, 8*base, H/8, W/8)."""
        return self.encode(x)[-1]


# ----------------------------------------------------------------------------------------- builders
def unet2d(**kwargs) -> UNet2D:
    return UNet2D(**kwargs)


def unet2d_tiny(**kwargs) -> UNet2D:
    return UNet2D(**{"base": 4, **kwargs})
