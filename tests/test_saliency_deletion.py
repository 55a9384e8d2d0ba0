"""Deletion curves on a model whose evidence is known: removing what it uses first drops its score first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medctl.saliency import ClassScores
from medctl.saliency.deletion import curve_area, deletion_curve, patch_labels, patch_order, random_order


class RegionSum(nn.Module):
    """A binary classifier whose logit is the summed intensity inside ``region`` minus a bias."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(region.astype(np.float32)))
        self.bias = float(region.sum()) / 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        spatial = tuple(range(1, x.ndim))
        return {"lesion": ((x[:, 0] * self.weight).sum(dim=spatial[:-1]) - self.bias)[:, None]}  # (B, 1)


@pytest.mark.parametrize("shape", [(8, 16, 16), (16, 16)])
def test_the_map_that_names_the_evidence_deletes_it_first(shape):
    region = np.zeros(shape, bool)
    region[(slice(2, 6),) * len(shape)] = True  # the evidence: one corner block
    image = np.zeros((1, *shape), np.float32)
    image[0][region] = 1.0  # (1, *S): bright where the model looks, mean ~0 elsewhere
    x = torch.from_numpy(image)[None]  # (1, 1, *S)
    scores = ClassScores(RegionSum(region), "lesion", "binary")
    labels = patch_labels(shape, 4)
    assert labels.shape == shape and labels.max() + 1 == 4 ** len(shape)
    assert all(np.unique(labels, return_counts=True)[1] == np.prod(shape) // 4 ** len(shape))  # equal patches

    steps = 8
    faithful = deletion_curve(scores, x, labels, patch_order(region.astype(float), labels), 1, steps)
    shuffled = deletion_curve(scores, x, labels, random_order(int(labels.max()) + 1, "s1"), 1, steps)
    backwards = deletion_curve(scores, x, labels, patch_order(region.astype(float), labels)[::-1], 1, steps)
    assert faithful.shape == (steps + 1,)
    with torch.no_grad():
        start = torch.sigmoid(scores.classifier(x)["lesion"])[0, 0].item()
        flat = torch.sigmoid(scores.classifier(x.mean().expand_as(x))["lesion"])[0, 0].item()
    assert faithful[0] == pytest.approx(start) and shuffled[0] == pytest.approx(start)
    assert faithful[-1] == pytest.approx(flat) and shuffled[-1] == pytest.approx(flat)  # everything replaced
    assert faithful[1] < shuffled[1]  # the first group removed is the evidence
    assert curve_area(faithful) < curve_area(shuffled) <= curve_area(backwards) + 1e-6
    assert np.array_equal(random_order(10, "s1"), random_order(10, "s1"))  # repeatable per sample
    assert not np.array_equal(random_order(64, "s1"), random_order(64, "s2"))


def test_curve_area_is_the_trapezoid_over_the_removed_fraction():
    assert curve_area(np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert curve_area(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
