"""An encoder with one head per target: ``forward(x) -> {target name: logits (B, K)}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder
from medctl.models.heads import InputStandardized, Standardized, build_head, num_outputs


class Classifier(nn.Module):
    """Encoder + ``heads`` (a ModuleDict keyed by target name) of one ``head_kind``.

    Linear and MLP heads read the pooled embedding ``encoder(x)`` (B, D); attentive heads read tokens
    ``encoder.forward_features(x)`` (B, N, D) (a CNN's map (B, D, *spatial) is flattened to tokens).
    """

    def __init__(self, encoder: Encoder, heads: Mapping[str, nn.Module], head_kind: str):
        super().__init__()
        if not heads:
            raise ConfigError(["a classifier needs at least one target; add a [[data.targets]] table"], "data.targets")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.head_kind = head_kind

    def head_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the heads read: pooled embeddings (B, D), or tokens (B, N, D) for attentive heads."""
        if self.head_kind != "attentive":
            return self.encoder(x)  # (B, D)
        features = self.encoder.forward_features(x)
        if self.encoder.feature_layout == "map":
            features = features.flatten(2).transpose(1, 2)  # (B, C, *spatial) -> (B, N, C)
        return features

    def forward_from_head_inputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(inputs) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_from_head_inputs(self.head_inputs(x))

    def forward_from_embeddings(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits from cached pooled embeddings (B, D): the linear probe's fast path."""
        if self.head_kind == "attentive":
            raise ConfigError(
                ["attentive heads read tokens, not cached embeddings; set train.feature_cache = false or model.head.kind = \"linear\""],
                "model.head.kind",
            )
        return self.forward_from_head_inputs(z)

    def standardize_inputs(self, embeddings: torch.Tensor) -> None:
        """Every head reads embeddings standardised on ``embeddings`` (N, D), the training split's
        (:class:`~medctl.models.heads.InputStandardized`); a frozen encoder's linear or MLP probe only."""
        for name, head in self.heads.items():
            self.heads[name] = InputStandardized.of(head, embeddings)

    def folded(self) -> Classifier:
        """This classifier as checkpoints hold it, sharing the encoder: standardised inputs folded into the heads."""
        heads = {name: h.folded() if isinstance(h, InputStandardized) else h for name, h in self.heads.items()}
        return Classifier(self.encoder, heads, self.head_kind)


def build_classifier(
    encoder: Encoder,
    targets: Sequence[Mapping[str, Any] | Any],
    *,
    kind: str = "linear",
    hidden: int = 0,
    dropout: float = 0.0,
    num_heads: int = 0,
) -> Classifier:
    """One head per target; a target is a dict or an object with ``name``, ``kind`` and ``classes``
    (``medctl.data.dataset.TargetSpec``). Head settings are ``model.head``'s."""
    heads = {}
    for target in targets:
        name, target_kind, classes = _target_fields(target)
        outputs = num_outputs(target_kind, classes)
        heads[name] = build_head(kind, encoder.embed_dim, outputs, hidden=hidden, dropout=dropout, num_heads=num_heads)
        if target_kind == "regression":  # predictions in the target's units (scale set by fine-tuning)
            heads[name] = Standardized(heads[name])
    return Classifier(encoder, heads, kind)


def _target_fields(target: Mapping[str, Any] | Any) -> tuple[str, str, list[str]]:
    if isinstance(target, Mapping):
        return target["name"], target["kind"], list(target["classes"])
    return target.name, target.kind, list(target.classes)
