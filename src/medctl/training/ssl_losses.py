"""Self-supervised losses.

- BYOL: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (normalised MSE = 2 - 2 cos).
- InfoNCE / NT-Xent: Chen et al., "A Simple Framework for Contrastive Learning", ICML 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean_i (2 - 2 cos(p_i, z_i))`` for online predictions p (B, D) and target projections z (B, D).

    ``z`` is detached (BYOL's stop-gradient): only the online branch learns. Computed in fp32.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(
            f"byol_loss needs two (B, D) tensors of the same shape (got {tuple(p.shape)}, {tuple(z.shape)})"
        )
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return (2.0 - 2.0 * (p * z).sum(dim=1)).mean()


def byol_symmetric_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """The symmetrised BYOL loss: view 1's prediction against view 2's target, and the other way round."""
    return byol_loss(p1, z2) + byol_loss(p2, z1)


def decorrelation_loss(y: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation of a batch of embeddings (N, D): Barlow Twins' redundancy reduction
    (Zbontar et al., ICML 2021) within one batch, scale-free, so it works whatever the embeddings' scale.

    About ``1 / r`` when the embeddings vary along r equally strong directions (1 when one direction carries all
    the variation), and at least about ``1 / (N - 1)``: it rises as a dimensional collapse sets in.
    """
    y = y.float()
    centred = y - y.mean(dim=0)  # (N, D)
    variance = centred.pow(2).mean(dim=0)  # (D,)
    standard = centred / torch.sqrt(variance + 1e-4 * variance.mean() + 1e-12)  # (N, D), unit variance
    correlation = standard.T @ standard / y.shape[0]  # (D, D)
    off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
    dims = y.shape[1]
    return off_diagonal.pow(2).sum() / max(1, dims * (dims - 1))


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent over 2N embeddings: (z_a[i], z_b[i]) are positives, the other 2N - 2 negatives.

    ``z_a``, ``z_b``: (N, D) embeddings of two views; cosine similarities divided by ``temperature``,
    cross-entropy averaged over all 2N anchors. Computed in fp32.
    """
    if temperature <= 0:
        raise ValueError(f"info_nce temperature must be > 0 (got {temperature}); see pretrain.mim_contrastive.temperature")
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"info_nce needs two (N, D) tensors of the same shape (got {tuple(z_a.shape)}, {tuple(z_b.shape)})"
        )
    n = z_a.shape[0]
    if n < 2:
        raise ValueError("info_nce needs at least 2 pairs per batch to have negatives; raise data.batch_size")
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    return F.cross_entropy(logits, positives)
