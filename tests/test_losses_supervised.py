"""Supervised losses against reference computations written out here, independently of medctl."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medctl.config import TrainConfig
from medctl.errors import ConfigError
from medctl.training.losses import (
    LOSSES,
    BinaryCrossEntropy,
    FocalLoss,
    LossSettings,
    MultiTargetLoss,
    SigmoidFocalLoss,
    bce_pos_weight,
    build_target_loss,
    class_weights_from_counts,
    describe_losses,
    dynamic_alpha,
    label_counts,
    sigmoid_focal_loss,
)


def reference_sigmoid_focal(logits, targets, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss, element by element in plain python (mean reduction)."""
    total, n = 0.0, 0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss *= alpha * t + (1 - alpha) * (1 - t)
        total += loss
        n += 1
    return total / n


def reference_softmax_focal(logits, targets, alpha, gamma):
    total = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        z = [math.exp(v) for v in row]
        p = z[target] / sum(z)
        weight = 1.0 if alpha is None else alpha[target]
        total += -weight * (1 - p) ** gamma * math.log(p)
    return total / len(targets)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1, 2.0), (0.8, 0.5), (0.25, 0.0)])
def test_sigmoid_focal_matches_the_torchvision_formula(seed, alpha, gamma):
    logits = 3 * torch.randn(6, 3)
    targets = (torch.rand(6, 3) > 0.5).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=None if alpha < 0 else alpha, gamma=gamma)
    assert ours.item() == pytest.approx(reference_sigmoid_focal(logits, targets, alpha, gamma), rel=1e-5)


def test_binary_focal_module_takes_one_logit_and_index_targets(seed):
    logits = torch.randn(5, 1)
    labels = torch.tensor([0, 1, 1, 0, 1])
    loss = SigmoidFocalLoss(gamma=2.0, alpha=0.25)(logits, labels)
    assert loss.item() == pytest.approx(
        reference_sigmoid_focal(logits[:, 0], labels.float(), 0.25, 2.0), rel=1e-5
    )


def test_softmax_focal_with_gamma_zero_and_no_alpha_is_cross_entropy(seed):
    logits = torch.randn(7, 4)
    targets = torch.randint(0, 4, (7,))
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, targets), F.cross_entropy(logits, targets), atol=1e-6)
    smoothed = FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, targets)
    assert torch.allclose(smoothed, F.cross_entropy(logits, targets, label_smoothing=0.1), atol=1e-6)


def test_softmax_focal_matches_the_formula_with_per_class_alpha(seed):
    logits = 2 * torch.randn(9, 3)
    targets = torch.randint(0, 3, (9,))
    alpha = [0.2, 0.5, 0.3]
    ours = FocalLoss(gamma=2.0, alpha=alpha)(logits, targets)
    assert ours.item() == pytest.approx(reference_softmax_focal(logits, targets, alpha, 2.0), rel=1e-5)
    uniform = FocalLoss(gamma=1.0, alpha=0.5)(logits, targets)
    assert uniform.item() == pytest.approx(
        0.5 * reference_softmax_focal(logits, targets, None, 1.0), rel=1e-5
    )
    with pytest.raises(ConfigError, match="focal_alpha"):
        FocalLoss(alpha=[0.5, 0.5])(logits, targets)


def test_class_weights_are_inverse_frequency_with_mean_one():
    weights = class_weights_from_counts([10, 30, 60])
    assert weights.mean().item() == pytest.approx(1.0)
    assert (weights[0] / weights[1]).item() == pytest.approx(3.0) and (
        weights[0] / weights[2]
    ).item() == pytest.approx(6.0)
    absent = class_weights_from_counts([0, 10, 30])
    assert absent[0] == 0 and absent[1:].mean().item() == pytest.approx(1.0)
    assert class_weights_from_counts([5, 5], "none").tolist() == [1.0, 1.0]
    assert class_weights_from_counts([5, 5], [1.0, 2.0]).tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="train.class_weights"):
        class_weights_from_counts([5, 5], [1.0, 2.0, 3.0])


def test_dynamic_alpha_and_pos_weight_follow_training_frequencies():
    assert dynamic_alpha([90, 10]).tolist() == pytest.approx([0.1, 0.9])  # alpha[1]: positive weight
    assert dynamic_alpha([70, 10, 20]).tolist() == pytest.approx([0.3, 0.9, 0.8])
    assert dynamic_alpha([[80, 20], [50, 50]]).tolist() == pytest.approx([0.8, 0.5])  # multilabel [neg, pos]
    assert bce_pos_weight([10, 25, 0], [90, 75, 100]).tolist() == pytest.approx([9.0, 3.0, 1.0])


def test_label_counts_layouts():
    assert label_counts(torch.tensor([0, 1, 1, 2]), "multiclass", 4).tolist() == [1, 2, 1, 0]
    assert label_counts([1, 1, 0], "binary", 1).tolist() == [1, 2]
    multi = label_counts(np.array([[1, 0], [1, 1], [0, 0]]), "multilabel", 2)
    assert multi.tolist() == [[1, 2], [2, 1]]


def settings(loss: str, **changes) -> LossSettings:
    """The [train] defaults (as TrainConfig holds them) with ``loss`` and ``changes``."""
    return replace(LossSettings.of(TrainConfig()), loss=loss, **changes)


def test_loss_settings_read_the_train_section():
    train = TrainConfig(loss="focal", class_weights=[1.0, 2.0], focal_gamma=1.5, focal_alpha=0.25, label_smoothing=0.1)
    assert LossSettings.of(train) == LossSettings("focal", [1.0, 2.0], 1.5, 0.25, 0.1)


def test_build_target_loss_binary(seed):
    logits = torch.randn(6, 1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    counts = [4, 2]
    ce = build_target_loss("binary", settings("cross_entropy"), counts)
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), pos_weight=torch.tensor(2.0))
    assert torch.allclose(ce(logits, labels), expected)
    assert torch.allclose(build_target_loss("binary", settings("bce"), counts)(logits, labels), expected)
    focal = build_target_loss("binary", settings("focal"), counts)
    ref = reference_sigmoid_focal(logits[:, 0], labels.float(), 4 / 6, 2.0)
    assert focal(logits, labels).item() == pytest.approx(ref, rel=1e-5)
    weighted = build_target_loss("binary", settings("bce", class_weights=[1.0, 3.0]), counts)
    assert torch.allclose(weighted.pos_weight, torch.tensor([3.0]))


def test_build_target_loss_multiclass(seed):
    logits = torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    counts = [50, 30, 20]
    ce = build_target_loss("multiclass", settings("cross_entropy", label_smoothing=0.1), counts)
    weights = class_weights_from_counts([50, 30, 20])
    assert torch.allclose(
        ce(logits, labels), F.cross_entropy(logits, labels, weight=weights, label_smoothing=0.1)
    )
    focal = build_target_loss("multiclass", settings("focal"), counts)
    ref = reference_softmax_focal(logits, labels, [0.5, 0.7, 0.8], 2.0)
    assert focal(logits, labels).item() == pytest.approx(ref, rel=1e-5)
    explicit = build_target_loss("multiclass", settings("cross_entropy", class_weights=[1, 2, 3]), None)
    assert explicit.weight.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="one per class"):
        build_target_loss("multiclass", settings("cross_entropy", class_weights=[1.0, 2.0]), counts)
    with pytest.raises(ConfigError, match='train.loss` = "bce".*study_group'):
        build_target_loss("multiclass", settings("bce"), counts, target="study_group")


def test_build_target_loss_multilabel(seed):
    logits = torch.randn(5, 3)
    labels = (torch.rand(5, 3) > 0.6).float()
    counts = [[8, 2], [5, 5], [9, 1]]
    bce = build_target_loss("multilabel", settings("bce", focal_gamma=1.0), counts)
    assert torch.allclose(
        bce(logits, labels),
        F.binary_cross_entropy_with_logits(logits, labels, pos_weight=torch.tensor([4.0, 1.0, 9.0])),
    )
    focal = build_target_loss("multilabel", settings("focal", focal_gamma=1.0), counts)
    alpha = torch.tensor([0.8, 0.5, 0.9])
    ref = np.mean(
        [reference_sigmoid_focal(logits[:, j], labels[:, j], alpha[j].item(), 1.0) for j in range(3)]
    )
    assert focal(logits, labels).item() == pytest.approx(ref, rel=1e-5)
    smoothed = BinaryCrossEntropy(label_smoothing=0.2)(logits, labels)
    assert torch.allclose(smoothed, F.binary_cross_entropy_with_logits(logits, labels * 0.8 + 0.1))


def test_impossible_settings_name_the_key():
    with pytest.raises(ConfigError, match="training class counts"):
        build_target_loss("multiclass", settings("cross_entropy"), None)
    with pytest.raises(ConfigError, match="train.loss"):
        build_target_loss("multiclass", settings("dice"), [1, 2])
    with pytest.raises(ConfigError, match="train.focal_gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ConfigError, match="train.focal_alpha"):
        SigmoidFocalLoss(alpha=1.5)
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_target_loss("binary", settings("focal", label_smoothing=0.1), [3, 1])
    with pytest.raises(ValueError, match=r"\[neg, pos\]"):
        build_target_loss("binary", settings("bce"), [3, 1, 1])
    assert set(LOSSES) == {"cross_entropy", "focal", "bce"}
    assert [row["name"] for row in describe_losses()] == list(LOSSES) and all(
        r["description"] for r in describe_losses()
    )


def test_multi_target_loss_is_the_weighted_sum(seed):
    losses = {"a": nn.CrossEntropyLoss(), "b": BinaryCrossEntropy()}
    criterion = MultiTargetLoss(losses, {"a": 2.0})
    logits = {"a": torch.randn(4, 3), "b": torch.randn(4, 1)}
    batch = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([1, 0, 1, 1]), "image": torch.zeros(4)}
    out = criterion(logits, batch)
    part_a = F.cross_entropy(logits["a"], batch["a"])
    part_b = F.binary_cross_entropy_with_logits(logits["b"][:, 0], batch["b"].float())
    assert torch.allclose(out["loss"], 2.0 * part_a + part_b)
    assert torch.allclose(out["loss_a"], part_a) and torch.allclose(out["loss_b"], part_b)
    with pytest.raises(ConfigError, match="unknown targets"):
        MultiTargetLoss(losses, {"c": 1.0})
    with pytest.raises(ConfigError, match="at least one > 0"):
        MultiTargetLoss(losses, {"a": 0.0, "b": 0.0})
