"""What a pretraining method registers: its typed ``[pretrain.<name>]`` table, its minimum batch, its module.

A method is one module (``pretrain/byol.py``, ...) that defines a :class:`~medctl.config.Section` of its own
settings (defaults and checks beside the code that reads them), an ``nn.Module`` built from the encoder and
that section, passed whole (``Module(encoder, settings)``), and one
:class:`MethodSpec`; :data:`medctl.pretrain.METHODS` lists the specs, one line per method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator
from torch import nn

from medctl.config import Section


@dataclass(frozen=True)
class MethodSpec:
    module: type[nn.Module]  # its first docstring line is what `medctl list methods` shows
    settings: type[Section]  # the [pretrain.<name>] table: every default of the method lives here
    min_batch: int = 1  # samples per batch the method needs (checked with the config, before any work)
    min_batch_reason: str = ""  # why, for that error: "BatchNorm in the projector"

    def build(self, encoder: nn.Module, settings: Section) -> nn.Module:
        """The module around ``encoder``, configured by its typed table."""
        return self.module(encoder, settings)


def _share_range(value: list[float]) -> list[float]:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        raise ValueError("needs [low, high] with 0 < low <= high <= 1")
    return value


def _positive_range(value: list[float]) -> list[float]:
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError("needs [low, high] with 0 < low <= high, e.g. [0.75, 1.5]")
    return value


ShareRange = Annotated[list[float], AfterValidator(_share_range)]  # [low, high], shares of a size in (0, 1]
PositiveRange = Annotated[list[float], AfterValidator(_positive_range)]  # [low, high], both > 0
