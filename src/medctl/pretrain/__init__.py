"""Self-supervised pretraining: one module per method (byol, mim_contrastive, jepa) plus the views
(:mod:`~medctl.pretrain.views`) and masks (:mod:`~medctl.pretrain.masks`) they learn from.

:data:`METHODS` maps ``pretrain.method`` to the method's ``nn.Module`` class. Every method is built as
``METHODS[name](encoder, **settings)`` from plain values (:func:`method_settings` picks the
``[pretrain]`` values its constructor names) and offers the same small surface to the stage
(:mod:`~medctl.pretrain.run`):

- ``forward(x) -> {"loss": scalar with a graph, <other scalars logged as train_<name>>}``;
- ``update_target(momentum)``: move the EMA target network(s) after an optimizer step (no-op without);
- ``embed(x) -> (B, D)``: the online encoder's pooled embedding, for monitoring;
- ``reconstruct(x) -> {"original", "mask", "reconstruction"} | None``: for reconstruction panels;
- ``.encoder``: the online encoder, exported as ``checkpoints/encoder.ckpt``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from medctl.config import PretrainConfig
from medctl.pretrain.byol import BYOL
from medctl.pretrain.jepa import JEPA
from medctl.pretrain.mim_contrastive import MIMContrastive

METHODS: dict[str, type[nn.Module]] = {
    "byol": BYOL,  # any encoder, 2D or 3D; mt3 for volumes
    "mim_contrastive": MIMContrastive,  # unet2d on 2D slices
    "jepa": JEPA,  # vit3d_* on volumes
}


def method_settings(method: str, pretrain: PretrainConfig) -> dict[str, Any]:
    """The ``[pretrain]`` values the constructor of ``METHODS[method]`` names, as plain keyword arguments."""
    parameters = inspect.signature(METHODS[method].__init__).parameters
    return {
        name: getattr(pretrain, name)
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_method(method: str, encoder: nn.Module, pretrain: PretrainConfig) -> nn.Module:
    """``METHODS[method](encoder, **method_settings(method, pretrain))``."""
    return METHODS[method](encoder, **method_settings(method, pretrain))


__all__ = ["METHODS", "build_method", "method_settings"]
