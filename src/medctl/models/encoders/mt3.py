"""MT3: a 3D CNN stem, a multi-plane projector and a transformer over the three planes' tokens.

Idea after multi-plane / tri-plane representations of volumes (Chan et al., "Efficient Geometry-aware
3D Generative Adversarial Networks", CVPR 2022) and hybrid CNN-transformer encoders for medical volumes
(Chen et al., "TransUNet", 2021; Hatamizadeh et al., "UNETR", WACV 2022).

1. Stem: Conv3d blocks, each stage halving (D, H, W): (B, C_in, D, H, W) -> (B, C, d, h, w).
2. Multi-plane projector: the feature volume is collapsed along each axis by mean and max, giving an
   axial (h, w), a coronal (d, w) and a sagittal (d, h) plane with 2C channels each.
3. Token embedding: a 1x1 conv per plane to ``embed_dim``, plus a 2D sin-cos position and a learned
   plane embedding, so the transformer knows where and in which plane each token lies.
4. Transformer encoder (pre-norm, PyTorch SDPA) over the ``h*w + d*w + d*h`` tokens; the embedding is
   the mean of the normalised tokens.

Tokens from three planes do not form one grid, so Grad-CAM reads the stem's last 3D feature map
(``gradcam_layout == "map"``); ``stem_features(x)`` exposes it for reconstruction heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder, check_input_size, group_norm
from medctl.models.encoders.vit3d import sincos_1d


# ----------------------------------------------------------------------------------------- blocks
class ConvBlock3D(nn.Module):
    """Conv3d(3x3x3, stride) -> GroupNorm -> GELU, then Conv3d(3x3x3) -> GroupNorm -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


def project_planes(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, d, h, w) -> axial (B, 2C, h, w), coronal (B, 2C, d, w), sagittal (B, 2C, d, h).

    Each plane stacks the mean and the max over the collapsed axis.
    """
    planes = []
    for axis in (2, 3, 4):  # collapse depth, then height, then width
        planes.append(torch.cat([volume.mean(dim=axis), volume.amax(dim=axis)], dim=1))
    return planes[0], planes[1], planes[2]


def sincos_2d(rows: int, cols: int, dim: int, device: torch.device) -> torch.Tensor:
    """2D sin-cos positions of a rows x cols plane, half the channels per axis: (rows*cols, dim)."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.cat([sincos_1d(dim // 2, r), sincos_1d(dim // 2, c)], dim=1).float()


# ------------------------------------------------------------------------------------------ model
class MT3(Encoder):
    """CNN3D stem -> multi-plane projector -> plane tokens -> transformer -> pooled embedding."""

    feature_layout = "tokens"
    spatial_dims = 3

    def __init__(
        self,
        *,
        in_channels: int = 1,
        input_size: Sequence[int] = (32, 64, 64),
        stem_channels: Sequence[int] = (16, 32, 64, 128),
        embed_dim: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if embed_dim % num_heads or embed_dim % 4:
            raise ConfigError(
                [f"embed_dim {embed_dim} must be divisible by num_heads {num_heads} and by 4"], "model.encoder_args"
            )
        if not stem_channels:
            raise ConfigError(["stem_channels needs at least one stage, e.g. [16, 32, 64]"], "model.encoder_args")
        self.in_channels, self.embed_dim = in_channels, embed_dim
        # the first stage keeps the size, the others halve it (rounding up), so any size works
        self.input_size = check_input_size("mt3", input_size, 3, (1, 1, 1))

        stages, previous = [], in_channels
        for i, channels in enumerate(stem_channels):
            stages.append(ConvBlock3D(previous, channels, stride=1 if i == 0 else 2))
            previous = channels
        self.stem = nn.Sequential(*stages)
        self.plane_embed = nn.ModuleList(nn.Conv2d(2 * previous, embed_dim, 1) for _ in range(3))
        self.plane_type = nn.Parameter(torch.zeros(3, embed_dim))  # axial, coronal, sagittal
        nn.init.trunc_normal_(self.plane_type, std=0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.stem[-1]

    @property
    def gradcam_layout(self) -> str:
        return "map"

    def stem_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C, d, h, w)."""
        return self.stem(x)

    def tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """Stem features (B, C, d, h, w) -> plane tokens (B, h*w + d*w + d*h, embed_dim)."""
        out = []
        for i, plane in enumerate(project_planes(volume)):
            embedded = self.plane_embed[i](plane)  # (B, E, rows, cols)
            rows, cols = embedded.shape[2:]
            position = sincos_2d(rows, cols, self.embed_dim, plane.device).to(embedded.dtype)  # (rows*cols, E)
            out.append(embedded.flatten(2).transpose(1, 2) + position + self.plane_type[i])  # (B, rows*cols, E)
        return torch.cat(out, dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(self.stem_features(x))  # (B, N, E)
        return self.norm(self.transformer(tokens))  # (B, N, E)


# ----------------------------------------------------------------------------------------- builders
def mt3(**kwargs) -> MT3:
    return MT3(**kwargs)


def mt3_tiny(**kwargs) -> MT3:
    """Three stem stages (8, 16, 32), 64 wide, 2 layers: runs at (2, 1, 16, 32, 32) in milliseconds."""
    return MT3(**{"stem_channels": (8, 16, 32), "embed_dim": 64, "depth": 2, "num_heads": 4, **kwargs})
