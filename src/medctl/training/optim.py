"""AdamW with decoupled weight decay, a pure cosine-with-warmup ``get_lr``, and the EMA momentum schedule.

Param groups carry their own ``lr`` (e.g. ``lr_head`` vs ``lr_encoder``); the scheduler multiplies every
group's initial lr by the same factor ``get_lr(step, base_lr=1.0, ...)``, so one schedule serves all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from medctl.progress import log


def param_groups_with_decay(
    module: nn.Module, lr: float, weight_decay: float, *, name: str = "", include_frozen: bool = True
) -> list[dict]:
    """Two AdamW groups: weights with ``weight_decay``, and norms/biases/1-d params without.

    Parameters named in ``module.no_weight_decay()`` (the timm convention, e.g. ``pos_embed``) join the
    no-decay group. Frozen parameters are included by default so that unfreezing later (``requires_grad``
    back to True) needs no new optimizer; AdamW skips parameters whose ``.grad`` is None. ``name``
    prefixes the group names (``"encoder"`` -> ``encoder.decay`` / ``encoder.no_decay``), which
    :func:`medctl.training.fit.fit` logs as ``lr_<group name>``.
    """
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param_name, param in module.named_parameters():
        if not include_frozen and not param.requires_grad:
            continue
        if param.ndim <= 1 or param_name.endswith(".bias") or param_name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    prefix = f"{name}." if name else ""
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{prefix}decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{prefix}no_decay"},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    param_groups: Iterable[dict], weight_decay: float, *, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (a group without ``weight_decay`` gets this one); fused on CUDA."""
    groups = [dict(group) for group in param_groups]
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("the optimizer got no parameters: nothing in the model is trainable")
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, weight_decay=weight_decay, betas=betas, fused=fused or None)


def get_lr(
    step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``.

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (reaches ``base_lr`` on
    the last warmup step). Then ``min + (base - min) * (1 + cos(pi * progress)) / 2`` with ``progress``
    going 0 -> 1 from ``warmup_steps`` to ``total_steps``; ``min = base_lr * min_lr_ratio`` from then on.
    """
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"get_lr needs total_steps >= 1, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1 "
            f"(got {total_steps}, {warmup_steps}, {min_lr_ratio})"
        )
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """``LambdaLR`` factor ``get_lr(step, base_lr=1)``; a plain object so its state saves with weights_only."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return get_lr(
            step,
            base_lr=1.0,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            min_lr_ratio=self.min_lr_ratio,
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Per-step cosine schedule with linear warmup; call ``.step()`` after every optimizer step.

    ``total_steps`` is ``epochs * steps_per_epoch``. A warmup as long as the whole run would never reach
    the base lr, so it is cut to half the run (with a note saying which setting to lower).
    """
    if total_steps < 1:
        raise ValueError(
            f"the schedule needs at least one step (total_steps={total_steps}); is the loader empty?"
        )
    if warmup_steps >= total_steps:
        shorter = total_steps // 2
        log(
            f"warmup of {warmup_steps} steps is not shorter than the {total_steps} training steps; "
            f"using {shorter} (lower warmup_epochs to choose yourself)"
        )
        warmup_steps = shorter
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def momentum_schedule(step: int, total: int, start: float, end: float) -> float:
    """Cosine ramp from ``start`` (step 0) to ``end`` (step ``total`` and after): BYOL's target momentum.

    ``end - (end - start) * (1 + cos(pi * step / total)) / 2``.
    """
    if total < 1:
        raise ValueError(f"momentum_schedule needs total >= 1 steps (got {total})")
    progress = min(max(step, 0), total) / total
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_initial_share(total: int, start: float, end: float) -> float:
    """The share of its initial weights an EMA target still holds after ``total`` steps of
    :func:`momentum_schedule`, were the online network to stand still: the product of the momenta. Near 1,
    the target is still its initialisation, whatever the online network learned."""
    return math.prod(momentum_schedule(step, total, start, end) for step in range(total))


def adamw_with_cosine(
    groups: list[dict[str, Any]],
    *,
    weight_decay: float,
    steps_per_epoch: int,
    warmup_epochs: int,
    epochs: int,
    min_lr_ratio: float,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """The recipe of every stage: AdamW over ``groups`` and its per-step cosine schedule with linear warmup."""
    optimizer = build_optimizer(groups, weight_decay)
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=warmup_epochs * steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
        min_lr_ratio=min_lr_ratio,
    )
    return optimizer, scheduler

