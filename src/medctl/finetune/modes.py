"""How ``medctl finetune`` uses the encoder: one builder per training mode, each returning a :class:`Mode`.

- :func:`embeddings_mode`: a linear probe on cached embeddings (:mod:`medctl.finetune.features`), the
  encoder frozen and never run during training;
- :func:`tokens_mode`: an attentive probe on every token, cached as a float16 memory map
  (:mod:`medctl.finetune.tokens`);
- :func:`encoder_mode`: the encoder runs every step (an augmented probe, or a fine-tune).

A :class:`Mode` is what :func:`medctl.training.fit.fit` needs from the choice: the module it trains (and
saves in ``last.ckpt``), the loader and train step, and the validation logits of the classifier. The
recipe in :mod:`medctl.finetune.run` does everything else the same way for all three.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medctl.config import ModelConfig, TrainConfig
from medctl.data.dataset import CacheDataset
from medctl.finetune.features import Features, encoder_fingerprint, feature_key, split_features
from medctl.finetune.tokens import TokenRows, cached_logits, plan_token_cache, split_tokens
from medctl.models.classifier import Classifier
from medctl.models.encoders.base import Encoder
from medctl.training.distributed import make_loader
from medctl.training.fit import TrainStep
from medctl.training.precision import autocast_context
from medctl.training.predict import predict_logits

Logits = dict[str, torch.Tensor]  # {target: (N_val, K)}


@dataclass
class Mode:
    """One way of training the heads, as ``fit`` sees it."""

    module: nn.Module  # what fit trains and saves in last.ckpt: the heads alone, or the whole classifier
    train_loader: Any
    train_step: TrainStep
    val_logits: Callable[[], Logits]  # the classifier's logits on the validation split
    feature_cache: str = ""  # "embeddings" or "tokens" when the heads read a cache; "" when the encoder runs


@dataclass
class ModeInputs:
    """What every builder reads: the classifier, both splits, the loss and the loader settings."""

    classifier: Classifier
    names: list[str]  # the targets, in the order of the heads and the loss
    train_set: CacheDataset
    val_set: CacheDataset
    loss_fn: nn.Module
    batch_size: int
    num_workers: int
    seed: int
    drop_last: bool
    device: torch.device
    precision: str


class ProbeHeads(nn.Module):
    """The heads alone, reading cached embeddings: ``(B, D) -> {target: logits (B, K)}``.

    What ``fit`` trains (and saves in ``last.ckpt``) for a probe on cached features; the head modules
    are the classifier's own, so ``best.ckpt`` holds the trained heads with the frozen encoder.
    """

    def __init__(self, heads: nn.ModuleDict):
        super().__init__()
        self.heads = heads

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(z) for name, head in self.heads.items()}


# ------------------------------------------------------------------------------------------ builders
def build_mode(
    inputs: ModeInputs,
    *,
    feature_cache: bool,
    encoder: Encoder,
    model: ModelConfig,
    train: TrainConfig,
    in_channels: int,
    spatial_size: Sequence[int],
    data_fingerprint: str,
    standardize: bool = False,
) -> Mode:
    """The mode this run trains in: cached embeddings for a probe that may cache (``feature_cache``, see
    :func:`medctl.finetune.checks.wants_feature_cache`), cached tokens for an attentive one when they fit
    ``train.feature_cache_max_gb``, otherwise the encoder every step.

    With ``standardize`` (a frozen encoder's linear or MLP probe) the heads read the embeddings
    standardised on the training split, from the same feature cache in every mode (so a probe that runs
    the encoder each step standardises exactly as a cached one)."""
    shared = cache_args(
        encoder, model, seed=inputs.seed, data_fingerprint=data_fingerprint, batch_size=inputs.batch_size,
        num_workers=inputs.num_workers, device=inputs.device, precision=inputs.precision,
    )  # fmt: skip
    train_features = None  # the training split's embeddings, once, when standardising
    if standardize:
        unaugmented = copy.copy(inputs.train_set)
        unaugmented.transform = None
        train_features = split_features(inputs.classifier.encoder, unaugmented, **shared)
        inputs.classifier.standardize_inputs(train_features.embeddings)
    if not feature_cache:
        return encoder_mode(inputs)
    shape = None  # (T, D) per sample when an attentive probe caches its tokens
    if model.head.kind == "attentive":
        shape = plan_token_cache(
            inputs.classifier, (inputs.train_set, inputs.val_set), in_channels=in_channels,
            spatial_size=spatial_size, max_gb=train.feature_cache_max_gb, device=inputs.device,
            precision=inputs.precision,
        )  # fmt: skip
        if shape is None:
            return encoder_mode(inputs)
    return tokens_mode(inputs, shared, shape) if shape else embeddings_mode(inputs, shared, train_features)


def embeddings_mode(inputs: ModeInputs, cache_args: Mapping[str, Any], train_cached: Features | None = None) -> Mode:
    """Each split's embeddings computed once (or read back from the cache; ``train_cached`` when the caller
    already has the training split's); the heads train on ``(N, D)``."""
    encoder = inputs.classifier.encoder
    train_cached = train_cached or split_features(encoder, inputs.train_set, **cache_args)
    val_cached = split_features(encoder, inputs.val_set, **cache_args)  # an inner split names its parts by position
    train_data = TensorDataset(train_cached.embeddings, *train_labels(inputs))  # (N, D), labels...
    val_inputs = val_cached.embeddings.to(inputs.device)  # (N_val, D)
    return Mode(
        module=ProbeHeads(inputs.classifier.heads),
        train_loader=make_loader(train_data, inputs.batch_size, True, 0, inputs.seed, inputs.drop_last),
        train_step=CachedStep(inputs.loss_fn, inputs.names),
        val_logits=CachedLogits(inputs.classifier, val_inputs, len(val_inputs), inputs.device, inputs.precision),
        feature_cache="embeddings",
    )


def tokens_mode(inputs: ModeInputs, cache_args: Mapping[str, Any], shape: tuple[int, int]) -> Mode:
    """Each split's tokens ``(T, D)`` per sample cached as float16; the attentive heads train on them."""
    train_tokens, val_tokens = (
        split_tokens(inputs.classifier, s, shape=shape, **cache_args) for s in (inputs.train_set, inputs.val_set)
    )
    train_data = TokenRows(train_tokens.tokens, train_labels(inputs))  # (T, D) float32, labels...
    val_inputs = val_tokens.tokens  # (N_val, T, D) float16 memory map, read a batch at a time
    return Mode(
        module=ProbeHeads(inputs.classifier.heads),
        train_loader=make_loader(train_data, inputs.batch_size, True, 0, inputs.seed, inputs.drop_last),
        train_step=CachedStep(inputs.loss_fn, inputs.names),
        val_logits=CachedLogits(inputs.classifier, val_inputs, inputs.batch_size, inputs.device, inputs.precision),
        feature_cache="tokens",
    )


def encoder_mode(inputs: ModeInputs) -> Mode:
    """The encoder runs every step on the (augmented) cached images: a frozen probe or a fine-tune."""
    return Mode(
        module=inputs.classifier,
        train_loader=make_loader(
            inputs.train_set, inputs.batch_size, True, inputs.num_workers, inputs.seed, inputs.drop_last
        ),
        train_step=partial(image_step, inputs.loss_fn),
        val_logits=partial(
            predict_logits,
            inputs.classifier,
            inputs.val_set,
            batch_size=inputs.batch_size,
            num_workers=inputs.num_workers,
            device=inputs.device,
            precision=inputs.precision,
        ),
    )


def cache_args(
    encoder: Encoder,
    model: ModelConfig,
    *,
    seed: int,
    data_fingerprint: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
) -> dict[str, Any]:
    """The keyword arguments :func:`split_features` and :func:`split_tokens` share: the cache key (encoder
    and data fingerprints) and how to run the encoder once."""
    info = encoder_fingerprint(
        name=encoder.name,
        args=encoder.build_args,
        checkpoint=model.checkpoint,
        checkpoint_key=model.checkpoint_key,
        allow_partial=model.allow_partial_load,
        seed=seed,
    )
    return dict(
        key=feature_key(info, data_fingerprint), encoder_info=info, data_fingerprint=data_fingerprint, batch_size=batch_size,
        num_workers=num_workers, device=device, precision=precision,
    )  # fmt: skip


def train_labels(inputs: ModeInputs) -> list[torch.Tensor]:
    """One ``(N,)`` label tensor per target, in the order of the training split's targets."""
    return [torch.as_tensor(inputs.train_set.labels(name)) for name in inputs.names]


# ------------------------------------------------------------------------------- the train steps
def image_step(loss_fn: nn.Module, model: nn.Module, batch: Mapping[str, Any], step: int) -> dict[str, torch.Tensor]:
    return loss_fn(model(batch["image"]), batch)  # image (B, C, *spatial)


@dataclass
class CachedStep:
    """The heads on a batch of cached inputs: ``(z, *labels)`` with one label tensor per target."""

    loss_fn: nn.Module
    names: Sequence[str]

    def __call__(self, model: nn.Module, batch: Sequence[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        z, *labels = batch  # (B, D) or tokens (B, T, D), then one label tensor per target
        return self.loss_fn(model(z), dict(zip(self.names, labels, strict=True)))


@dataclass
class CachedLogits:
    """The heads on the cached validation inputs, ``rows`` at a time, in eval mode; the global RNG is left
    as it was (so a cached probe trains exactly as one that runs the encoder)."""

    classifier: Classifier
    inputs: torch.Tensor | np.ndarray  # (N_val, D) on device, or (N_val, T, D) float16 memory map
    rows: int
    device: torch.device
    precision: str

    def __call__(self) -> Logits:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast_context(self.device, self.precision):
            self.classifier.heads.eval()
            logits = cached_logits(
                self.classifier.forward_from_head_inputs, self.inputs, batch_size=self.rows, device=self.device
            )
            self.classifier.heads.train()
        return logits
