"""Exponential moving average of weights (BYOL's and JEPA's target networks)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every parameter, in place.

    Buffers (e.g. BatchNorm running statistics) are copied from ``online``. ``target`` and ``online`` must
    have the same architecture; ``momentum=1`` leaves the target unchanged, ``0`` copies the online net.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1] (got {momentum}); see pretrain.ema_momentum")
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(
            f"EMA target has {len(target_params)} parameters but the online network {len(online_params)}; "
            "build the target as a copy of the online network"
        )
    if target_params:
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers(), strict=True):
        target_buffer.copy_(online_buffer)
