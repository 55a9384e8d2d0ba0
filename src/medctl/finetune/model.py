"""The fine-tune's model and optimisation: the pretrained encoder, when it trains, DDP wrapping, AdamW."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medctl.config import ModelConfig, TrainConfig
from medctl.finetune.augment import ImageAugment
from medctl.models.architecture import describe_encoder, pretrained_encoder
from medctl.models.encoders.base import Encoder
from medctl.progress import log
from medctl.training.distributed import (
    is_distributed,
    wrap_ddp,
)
from medctl.training.multitask import UncertaintyWeightedLoss
from medctl.training.optim import adamw_with_cosine, param_groups_with_decay


def build_pretrained_encoder(
    model: ModelConfig, summary: Mapping[str, Any], spatial_size: Sequence[int]
) -> Encoder:
    """``model.encoder`` (``auto``: the checkpoint's own architecture) for the cache's size and channels, with
    ``model.checkpoint`` loaded (report logged); see :mod:`medctl.models.architecture`."""
    in_channels = int(summary["in_channels"])
    if model.encoder != "auto" and in_channels != model.in_channels:
        log(
            f"the cache has {in_channels} channel(s): building {model.encoder} for that (model.in_channels = {model.in_channels})"
        )
    built = pretrained_encoder(
        model, in_channels=in_channels, input_size=spatial_size, spatial_dims=int(summary["spatial_dims"])
    )
    encoder = built.encoder
    if built.report is None:
        log(f"{encoder.name}: random initialisation (model.checkpoint is empty)")
        return encoder
    log(f"{describe_encoder(encoder)} <- {model.checkpoint}")
    arch = built.choice.architecture
    for line in (arch.lines() if arch is not None and model.encoder == "auto" else []) + built.choice.notes:
        log(f"  {line}")
    for line in built.report.lines():
        log(f"  {line}")
    return encoder


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def start_epoch(
    encoder: nn.Module, first_trainable: int | None, lr_encoder: float, augment: ImageAugment | None, epoch: int
) -> None:
    """``fit``'s ``start_epoch_hook``: the encoder trains from ``first_trainable`` (0-based) on and is otherwise
    frozen in eval mode (no dropout, BatchNorm statistics untouched); the augmentation draws follow the epoch."""
    trains = first_trainable is not None and epoch >= first_trainable
    set_trainable(encoder, trains)
    if not trains:
        encoder.eval()
    if first_trainable is not None and epoch == first_trainable and epoch > 0:  # 0-based index
        log(f"epoch {epoch + 1}: the encoder is unfrozen (lr_encoder {lr_encoder:g})")
    if isinstance(augment, ImageAugment):
        augment.set_epoch(epoch)


def wrap_for_fit(module: nn.Module, encoder: nn.Module, first_trainable: int | None) -> nn.Module:
    """``module`` wrapped for DDP under torchrun, with the encoder trainable iff it trains from the start.

    DDP registers only trainable parameters: an encoder that unfreezes later is wrapped trainable, and its
    frozen epochs leave it unused."""
    set_trainable(encoder, first_trainable == 0 or bool(is_distributed() and first_trainable))
    model = wrap_ddp(module, find_unused_parameters=bool(first_trainable))
    set_trainable(encoder, first_trainable == 0)
    return model


def build_optimization(
    classifier: nn.Module, loss_fn: nn.Module, train: TrainConfig, first_trainable: int | None, steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the heads (``lr_head``), learned task weights and, when it ever trains, the encoder
    (``lr_encoder``); a cosine schedule with warmup over ``train.epochs * steps`` optimizer steps."""
    groups = param_groups_with_decay(classifier.heads, train.lr_head, train.weight_decay, name="head")
    if isinstance(loss_fn, UncertaintyWeightedLoss):  # the learned task weights train with the heads
        groups.append({"params": [loss_fn.log_vars], "lr": train.lr_head, "weight_decay": 0.0, "name": "task_weights"})
    if first_trainable is not None:
        groups += param_groups_with_decay(
            classifier.encoder, train.lr_encoder, train.weight_decay, name="encoder"
        )
    return adamw_with_cosine(
        groups, weight_decay=train.weight_decay, steps_per_epoch=steps, warmup_epochs=train.warmup_epochs,
        epochs=train.epochs, min_lr_ratio=train.min_lr_ratio,
    )  # fmt: skip


def describe_run(
    kind: str, encoder: Encoder, n_train: int, n_val: int, feature_cache: str, first_trainable: int | None
) -> str:
    """The one log line that says what this run trains, on what."""
    return (
        f"finetune: {kind} of {describe_encoder(encoder)} ({sum(p.numel() for p in encoder.parameters()):,} parameters) "
        f"on {n_train} train / {n_val} val samples"
        + (f", heads on cached {feature_cache}" if feature_cache else "")
        + (f", encoder trains from epoch {first_trainable + 1}" if first_trainable else "")
    )
