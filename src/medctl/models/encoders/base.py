"""The interface every medctl encoder implements, so that heads, training and saliency treat all alike.

An encoder maps an image ``(B, C, H, W)`` or a volume ``(B, C, D, H, W)`` to

- ``forward_features(x)``: a feature map ``(B, C', *spatial')`` (``feature_layout == "map"``, CNNs)
  or tokens ``(B, N, C')`` (``feature_layout == "tokens"``, transformers);
- ``forward(x)``: one pooled embedding ``(B, embed_dim)`` (average over the map or the tokens).

``gradcam_layer`` is the module whose output Grad-CAM reads: the last spatial feature map
(``gradcam_layout == "map"``) or the final tokens (``"tokens"``, reshaped with ``token_grid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from medctl.errors import ConfigError


class Encoder(nn.Module):
    """Base class: subclasses set the attributes in ``__init__`` and implement ``forward_features``."""

    embed_dim: int
    spatial_dims: int  # 2 or 3
    in_channels: int
    feature_layout: Literal["map", "tokens"]
    input_size: tuple[int, ...]  # the size the encoder was built for, (D, H, W) or (H, W)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.feature_layout == "tokens":
            return features.mean(dim=1)  # (B, C)
        return features.flatten(2).mean(dim=2)  # (B, C)

    @property
    def gradcam_layer(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must name its gradcam_layer")

    @property
    def gradcam_layout(self) -> Literal["map", "tokens"]:
        """How to read ``gradcam_layer``'s output; the same as ``feature_layout`` unless overridden."""
        return self.feature_layout

    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """The grid the tokens form for an input of ``spatial_size`` (token encoders with one grid)."""
        raise TypeError(f"{type(self).__name__} has no token grid; read its gradcam_layer as a feature map")


def check_input_size(
    name: str, input_size: Sequence[int], spatial_dims: int, multiple: Sequence[int]
) -> tuple[int, ...]:
    """Reject an input size of the wrong rank or not divisible by what the encoder downsamples by."""
    size = tuple(int(s) for s in input_size)
    axes = "(D, H, W)" if spatial_dims == 3 else "(H, W)"
    if len(size) != spatial_dims:
        raise ConfigError(
            [
                f"{name} is a {spatial_dims}D encoder and needs a {axes} input size, got {list(size)}; "
                f"set data.preprocess.spatial_size to {spatial_dims} numbers or pick a {len(size)}D encoder"
            ],
            "model.encoder",
        )
    if any(s < m or s % m for s, m in zip(size, multiple, strict=True)):
        raise ConfigError(
            [
                f"{name} needs an input size {axes} made of multiples of {list(multiple)}, got {list(size)}; "
                "change data.preprocess.spatial_size"
            ],
            "model.encoder",
        )
    return size


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)
