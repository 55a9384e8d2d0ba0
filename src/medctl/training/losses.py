"""Supervised losses, one per target, chosen by the target's kind and ``train.loss``.

| kind       | logits | target                | cross_entropy                 | focal                   | bce      |
| ---------- | ------ | --------------------- | ----------------------------- | ----------------------- | -------- |
| binary     | (B, 1) | LongTensor (B,) 0/1   | BCE with pos_weight           | sigmoid focal           | = c.e.   |
| multiclass | (B, K) | LongTensor (B,)       | softmax CE with class weights | softmax focal           | rejected |
| multilabel | (B, L) | FloatTensor (B, L)    | per-label BCE with pos_weight | per-label sigmoid focal | = c.e.   |

``counts`` are training-split class counts: ``[n_class0, n_class1, ...]`` for binary (``[neg, pos]``)
and multiclass, and one ``[neg, pos]`` row per label for multilabel (shape (L, 2));
:func:`label_counts` computes them from the training targets. Class weighting: ``class_weights``
(cross_entropy / bce) or ``focal_alpha`` (focal).

Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medctl.errors import ConfigError

if TYPE_CHECKING:
    from medctl.config import TrainConfig

KINDS = ("binary", "multiclass", "multilabel")

ClassWeights = str | Sequence[float]  # "auto" | "none" | one weight per class
FocalAlpha = str | float | Sequence[float] | None  # "dynamic" | "none" | None | a float | one per class


@dataclass(frozen=True)
class LossSettings:
    """The ``[train]`` keys that choose and weight a classification target's loss, read once and passed whole."""

    loss: str  # a LOSSES name
    class_weights: ClassWeights
    focal_gamma: float
    focal_alpha: FocalAlpha
    label_smoothing: float

    @classmethod
    def of(cls, train: TrainConfig) -> LossSettings:
        return cls(
            loss=train.loss,
            class_weights=train.class_weights,
            focal_gamma=train.focal_gamma,
            focal_alpha=train.focal_alpha,
            label_smoothing=train.label_smoothing,
        )


# ----------------------------------------------------------------------------------- class statistics
def label_counts(targets: torch.Tensor | np.ndarray | Sequence, kind: str, num_outputs: int) -> np.ndarray:
    """Training-split counts in the layout the builders expect (see the module docstring).

    ``targets``: class indices (N,) for binary/multiclass, 0/1 rows (N, L) for multilabel.
    """
    values = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    if kind == "multilabel":
        values = values.reshape(len(values), num_outputs).astype(np.int64)
        positives = values.sum(axis=0)
        return np.stack([len(values) - positives, positives], axis=1)  # (L, 2)
    classes = 2 if kind == "binary" else num_outputs
    return np.bincount(values.astype(np.int64).ravel(), minlength=classes)[:classes]


def class_weights_from_counts(
    counts: Sequence[float] | np.ndarray, mode: ClassWeights = "auto"
) -> torch.Tensor:
    """Per-class weights: ``"auto"`` is inverse frequency normalised to mean 1, ``"none"`` all ones.

    A list is used as given (checked for length and sign). Classes absent from the training split get
    weight 0 (they never occur as a training target) and the mean is taken over the present ones.
    """
    counts = _check_counts(counts, "class_weights")
    if isinstance(mode, str):
        if mode == "none":
            return torch.ones(len(counts))
        if mode != "auto":
            raise ConfigError(
                [f'`train.class_weights` = {mode!r}: use "auto", "none" or one weight per class']
            )
        present = counts > 0
        weights = np.zeros_like(counts, dtype=np.float64)
        weights[present] = 1.0 / counts[present]
        weights[present] /= weights[present].mean()
        return torch.tensor(weights, dtype=torch.float32)
    given = np.asarray(mode, dtype=np.float64)
    if given.shape != counts.shape or (given < 0).any():
        raise ConfigError(
            [f"`train.class_weights` = {list(mode)}: needs {len(counts)} non-negative weights, one per class"]
        )
    return torch.tensor(given, dtype=torch.float32)


def dynamic_alpha(counts: Sequence[float] | np.ndarray) -> torch.Tensor:
    """Focal alpha from training frequencies: ``alpha_c = 1 - n_c / N``, rarer classes weigh more.

    1-d counts give one alpha per class; for binary ``[neg, pos]`` counts, ``alpha[1] = neg / N`` is the
    sigmoid-focal alpha of the positive class. Multilabel (L, 2) rows of ``[neg, pos]`` give each label's
    positive alpha, ``neg_l / N``.
    """
    counts = _check_counts(counts, "focal_alpha")
    if counts.ndim == 2:  # multilabel: (L, 2) rows of [neg, pos]
        return torch.tensor(counts[:, 0] / counts.sum(axis=1).clip(min=1), dtype=torch.float32)
    return torch.tensor(1.0 - counts / counts.sum(), dtype=torch.float32)


def bce_pos_weight(positives: Any, negatives: Any) -> torch.Tensor:
    """``negatives / positives`` per label (BCEWithLogits ``pos_weight``); a label with no positive gets 1."""
    pos = torch.as_tensor(positives, dtype=torch.float32)
    neg = torch.as_tensor(negatives, dtype=torch.float32)
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("positive and negative counts must be >= 0")
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))


# ---------------------------------------------------------------------------------------- the losses
class BinaryCrossEntropy(nn.Module):
    """BCE with logits for binary (logits (B, 1), targets (B,)) and multilabel ((B, L), (B, L)) targets.

    ``label_smoothing`` moves targets towards 0.5: ``t * (1 - eps) + eps / 2``.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError([f"`train.label_smoothing` = {label_smoothing}: must be in [0, 1)"])
        self.label_smoothing = label_smoothing
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float()
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float().reshape(logits.shape)  # (B, 1) or (B, L)
        targets = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float | torch.Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss (the RetinaNet / torchvision form), elementwise over (B, L) logits.

    ``loss = -alpha_t * (1 - p_t) ** gamma * log(p_t)`` with ``p_t = p`` for positives and ``1 - p`` for
    negatives, ``alpha_t = alpha`` for positives and ``1 - alpha`` for negatives; ``alpha`` is None (no
    weighting), a float, or one value per label (broadcast over the last axis).
    """
    logits = logits.float()
    targets = targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class SigmoidFocalLoss(nn.Module):
    """:func:`sigmoid_focal_loss` for binary (logits (B, 1), targets (B,)) and multilabel (B, L) targets."""

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        _check_gamma(gamma)
        alpha_t = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_t is not None and ((alpha_t < 0) | (alpha_t > 1)).any():
            raise ConfigError([f"`train.focal_alpha` = {alpha}: a sigmoid focal alpha must lie in [0, 1]"])
        self.gamma = gamma
        self.register_buffer("alpha", alpha_t)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float().reshape(logits.shape)  # (B, 1) or (B, L)
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma)


class FocalLoss(nn.Module):
    """Softmax focal loss for multiclass targets: logits (B, K), class indices (B,).

    ``loss_i = -sum_c q_ic * alpha_c * (1 - p_ic) ** gamma * log p_ic`` averaged over the batch, where
    ``q`` is the one-hot target smoothed by ``label_smoothing`` as in ``nn.CrossEntropyLoss``.
    ``alpha``: None, a float (the same for every class) or one weight per class. ``gamma=0`` with
    ``alpha=None`` is exactly cross-entropy.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        _check_gamma(gamma)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError([f"`train.label_smoothing` = {label_smoothing}: must be in [0, 1)"])
        alpha_t = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_t is not None and (alpha_t < 0).any():
            raise ConfigError([f"`train.focal_alpha` = {alpha}: class weights must be >= 0"])
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("alpha", alpha_t)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        if self.alpha is not None and self.alpha.ndim == 1 and len(self.alpha) != num_classes:
            raise ConfigError(
                [f"`train.focal_alpha` has {len(self.alpha)} values but the target has {num_classes} classes"]
            )
        log_p = F.log_softmax(logits.float(), dim=1)  # (B, K)
        q = F.one_hot(targets.long(), num_classes).float()  # (B, K)
        q = q * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        weight = (1.0 - log_p.exp()) ** self.gamma  # (B, K)
        if self.alpha is not None:
            weight = weight * self.alpha
        return -(q * weight * log_p).sum(dim=1).mean()


class MultiTargetLoss(nn.Module):
    """The weighted sum of one loss per target: ``forward(logits, batch) -> {"loss", "loss_<target>"}``.

    ``logits`` maps target name -> logits (a ``Classifier``'s output), ``batch`` holds each target's
    labels under its name. Missing weights are 1.
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        weights = dict(weights or {})
        if not losses:
            raise ConfigError(
                ["`data.targets` is empty: add at least one [[data.targets]] to train a classifier"]
            )
        unknown = set(weights) - set(losses)
        if unknown:
            raise ConfigError(
                [f"loss weights for unknown targets {sorted(unknown)}; targets are {sorted(losses)}"]
            )
        full = {name: float(weights.get(name, 1.0)) for name in losses}
        if any(w < 0 for w in full.values()) or not any(w > 0 for w in full.values()):
            raise ConfigError(
                [f"`data.targets[].weight` = {full}: weights must be >= 0 and at least one > 0"]
            )
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = full

    def forward(
        self, logits: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        parts = {}
        for name, loss_fn in self.losses.items():
            if name not in batch or name not in logits:
                raise KeyError(
                    f"target `{name}` is missing from the {'batch' if name not in batch else 'model output'}"
                )
            parts[f"loss_{name}"] = loss_fn(logits[name], batch[name])
        total = sum(self.weights[name] * parts[f"loss_{name}"] for name in self.losses)
        return {"loss": total, **parts}


# ------------------------------------------------------------------------------------------ builders
def cross_entropy_loss(
    kind: str, settings: LossSettings, counts: Any, target: str = ""
) -> nn.Module:
    """Cross-entropy: softmax CE (multiclass), BCE with logits (binary, multilabel); class weights."""
    class_weights = settings.class_weights
    if kind == "multiclass":
        weight = None
        if class_weights == "auto" or (class_weights != "none" and counts is not None):
            table = _check_kind_counts(kind, _need_counts(counts, target), target)
            weight = class_weights_from_counts(table, class_weights)  # checks a list's length too
        elif class_weights != "none":
            weight = _explicit_weights(class_weights)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=settings.label_smoothing)
    return BinaryCrossEntropy(_pos_weight(kind, counts, class_weights, target), settings.label_smoothing)


def bce_loss(
    kind: str, settings: LossSettings, counts: Any, target: str = ""
) -> nn.Module:
    """Binary cross-entropy with logits and pos_weight (binary and multilabel targets)."""
    if kind == "multiclass":
        raise ConfigError(
            [f'`train.loss` = "bce" does not fit multiclass target `{target}`; use cross_entropy or focal']
        )
    return BinaryCrossEntropy(_pos_weight(kind, counts, settings.class_weights, target), settings.label_smoothing)


def focal_loss(
    kind: str, settings: LossSettings, counts: Any, target: str = ""
) -> nn.Module:
    """Focal loss: softmax (multiclass) or sigmoid (binary, multilabel), alpha fixed or dynamic."""
    alpha = _focal_alpha(kind, counts, settings.focal_alpha, target)
    if kind == "multiclass":
        return FocalLoss(settings.focal_gamma, alpha, settings.label_smoothing)
    if settings.label_smoothing:
        raise ConfigError(
            [
                f"`train.label_smoothing` = {settings.label_smoothing} is not defined for sigmoid focal loss; set it to 0"
            ]
        )
    return SigmoidFocalLoss(settings.focal_gamma, alpha)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "cross_entropy": cross_entropy_loss,
    "focal": focal_loss,
    "bce": bce_loss,
}


def describe_losses() -> list[dict[str, str]]:
    """Rows for ``medctl list losses``: each name with the first line of its builder's docstring."""
    return [
        {"name": name, "description": (fn.__doc__ or "").strip().splitlines()[0]}
        for name, fn in LOSSES.items()
    ]


def build_target_loss(kind: str, settings: LossSettings, counts: Any = None, target: str = "") -> nn.Module:
    """The loss module for one target of ``kind`` (binary | multiclass | multilabel) under ``settings.loss``.

    ``counts`` (training-split counts, see :func:`label_counts`) are needed by ``class_weights="auto"``
    and ``focal_alpha="dynamic"``. ``target`` names the target in error messages.
    """
    if kind not in KINDS:
        raise ConfigError([f"target `{target}` kind {kind!r}: use one of {', '.join(KINDS)}"])
    if settings.loss not in LOSSES:
        raise ConfigError([f"`train.loss` = {settings.loss!r}: use one of {', '.join(LOSSES)}"])
    return LOSSES[settings.loss](kind, settings, counts, target)


# ------------------------------------------------------------------------------------------- helpers
def _check_counts(counts: Any, key: str) -> np.ndarray:
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim not in (1, 2) or array.size == 0 or (array < 0).any() or array.sum() == 0:
        raise ValueError(
            f"train.{key}: class counts must be non-negative with at least one sample (got {counts})"
        )
    return array


def _check_kind_counts(kind: str, counts: Any, target: str) -> np.ndarray:
    array = _check_counts(counts, "class_weights")
    expected = {
        "binary": "[neg, pos]",
        "multiclass": "one count per class",
        "multilabel": "(L, 2) rows of [neg, pos]",
    }
    ok = {
        "binary": array.shape == (2,),
        "multiclass": array.ndim == 1,
        "multilabel": array.ndim == 2 and array.shape[1] == 2,
    }
    if not ok[kind]:
        raise ValueError(
            f"target `{target}`: {kind} counts must be {expected[kind]} (got shape {array.shape})"
        )
    return array


def _need_counts(counts: Any, target: str) -> Any:
    if counts is None:
        raise ConfigError(
            [
                f'target `{target}`: class_weights="auto" / focal_alpha="dynamic" need the training class counts'
            ]
        )
    return counts


def _pos_weight(kind: str, counts: Any, class_weights: ClassWeights, target: str) -> torch.Tensor | None:
    """BCE pos_weight: "auto" -> neg/pos per label; a list -> w1/w0 (binary) or one per label (multilabel)."""
    if class_weights == "none":
        return None
    if class_weights == "auto":
        table = _check_kind_counts(kind, _need_counts(counts, target), target)
        table = table.reshape(-1, 2)  # binary [neg, pos] -> (1, 2); multilabel (L, 2)
        weight = bce_pos_weight(table[:, 1], table[:, 0])
        return weight if kind == "multilabel" else weight.reshape(1)
    given = _explicit_weights(class_weights)
    if kind == "binary":
        if len(given) != 2 or given[0] <= 0:
            raise ConfigError(
                [
                    f"`train.class_weights` = {list(class_weights)}: a binary target `{target}` takes [w_neg, w_pos], w_neg > 0"
                ]
            )
        return (given[1] / given[0]).reshape(1)
    return given  # multilabel: one pos_weight per label (its length is checked against the logits by torch)


def _explicit_weights(class_weights: ClassWeights) -> torch.Tensor:
    if isinstance(class_weights, str):
        raise ConfigError([f'`train.class_weights` = {class_weights!r}: use "auto", "none" or a list'])
    given = torch.tensor(list(class_weights), dtype=torch.float32)
    if (given < 0).any():
        raise ConfigError([f"`train.class_weights` = {list(class_weights)}: weights must be >= 0"])
    return given


def _focal_alpha(kind: str, counts: Any, focal_alpha: FocalAlpha, target: str) -> float | torch.Tensor | None:
    if focal_alpha is None or focal_alpha == "none":
        return None
    if focal_alpha == "dynamic":
        alpha = dynamic_alpha(_check_kind_counts(kind, _need_counts(counts, target), target))
        return alpha[1] if kind == "binary" else alpha
    if isinstance(focal_alpha, str):
        raise ConfigError(
            [f'`train.focal_alpha` = {focal_alpha!r}: use "dynamic", "none", a number or a list']
        )
    if isinstance(focal_alpha, int | float):
        return float(focal_alpha)
    alpha = torch.tensor(list(focal_alpha), dtype=torch.float32)
    if kind == "binary" and alpha.numel() != 1:
        raise ConfigError(
            [
                f"`train.focal_alpha` = {list(focal_alpha)}: a binary target `{target}` takes one alpha (the positive weight)"
            ]
        )
    return alpha


def _check_gamma(gamma: float) -> None:
    if gamma < 0:
        raise ConfigError([f"`train.focal_gamma` = {gamma}: must be >= 0 (0 is plain cross-entropy)"])
