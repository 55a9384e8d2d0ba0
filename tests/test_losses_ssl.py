"""BYOL, InfoNCE and the decorrelation term against references written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medctl.training.ssl_losses import byol_loss, byol_symmetric_loss, decorrelation_loss, info_nce


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def reference_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    z = z_a.tolist() + z_b.tolist()
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [math.exp(cosine(z[i], z[k]) / temperature) for k in range(2 * n) if k != i]
        total += -math.log(math.exp(cosine(z[i], z[positive]) / temperature) / sum(others))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_info_nce_matches_a_loop_over_all_2n_anchors(seed, temperature):
    z_a, z_b = torch.randn(5, 8), torch.randn(5, 8)
    assert info_nce(z_a, z_b, temperature).item() == pytest.approx(
        reference_nt_xent(z_a, z_b, temperature), rel=1e-5
    )


def test_info_nce_is_low_for_matching_views_and_symmetric(seed):
    z = torch.randn(6, 16)
    assert info_nce(z, z + 0.01 * torch.randn(6, 16), 0.1) < info_nce(z, torch.randn(6, 16), 0.1)
    z_b = torch.randn(6, 16)
    assert torch.allclose(info_nce(z, z_b, 0.2), info_nce(z_b, z, 0.2))
    with pytest.raises(ValueError, match="batch_size"):
        info_nce(z[:1], z_b[:1], 0.2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z, z_b, 0.0)


def test_byol_loss_matches_two_minus_two_cosine_and_stops_the_target_gradient(seed):
    p = torch.randn(4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    loss = byol_loss(p, z)
    expected = sum(2 - 2 * cosine(a, b) for a, b in zip(p.tolist(), z.tolist(), strict=True)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert p.grad is not None and z.grad is None
    assert byol_loss(z.detach(), z.detach()).item() == pytest.approx(0.0, abs=1e-6)
    p1, p2, z1, z2 = (torch.randn(3, 5) for _ in range(4))
    assert torch.allclose(byol_symmetric_loss(p1, p2, z1, z2), byol_loss(p1, z2) + byol_loss(p2, z1))


def test_decorrelation_is_numpy_s_mean_squared_off_diagonal_correlation_and_scale_free(seed):
    y = torch.randn(16, 12) @ torch.randn(12, 40)  # (16, 40), correlated dimensions
    correlation = np.corrcoef(y.numpy(), rowvar=False)  # (40, 40)
    off = correlation[~np.eye(40, dtype=bool)]
    assert decorrelation_loss(y).item() == pytest.approx(float((off**2).mean()), rel=1e-3)
    assert decorrelation_loss(1e-3 * y + 5.0).item() == pytest.approx(decorrelation_loss(y).item(), rel=1e-3)


def test_decorrelation_rises_as_the_embeddings_lose_directions(seed):
    losses = [decorrelation_loss(torch.randn(64, rank) @ torch.randn(rank, 128)).item() for rank in (64, 8, 2, 1)]
    assert losses == sorted(losses)
    assert losses[-1] > 0.9  # one direction: every pair of dimensions correlates (the guard against 0 variance eases it)
    assert losses[0] < 0.05  # independent dimensions: about 1 / (N - 1)
