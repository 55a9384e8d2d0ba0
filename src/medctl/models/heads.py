"""Classification heads: linear, MLP, and an attentive pooler for token encoders.

The attentive probe follows V-JEPA's evaluation protocol (Bardes et al., 2024): a learned query
cross-attends over all tokens (a pre-norm cross-attention block with an MLP), and a linear layer reads
the attended query. Linear and MLP heads take pooled embeddings (B, D); the attentive head takes
tokens (B, N, D) (or a feature map flattened to tokens by the classifier).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medctl.errors import ConfigError

HEAD_KINDS = ("linear", "mlp", "attentive")


class LinearHead(nn.Module):
    """Dropout then Linear: (B, D) -> (B, K)."""

    def __init__(self, embed_dim: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(z))


class MLPHead(nn.Module):
    """Linear -> GELU -> Dropout -> Linear: (B, D) -> (B, K)."""

    def __init__(self, embed_dim: int, num_outputs: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(z))))


class AttentiveHead(nn.Module):
    """A learned query attends over the tokens, then Linear: (B, N, D) -> (B, K).

    ``q = query + xattn(query, norm1(tokens)); q = q + mlp(norm2(q)); logits = linear(dropout(q))``.
    """

    def __init__(self, embed_dim: int, num_outputs: int, *, num_heads: int = 0, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        num_heads = num_heads or default_num_heads(embed_dim)
        if embed_dim % num_heads:
            raise ConfigError([f"attentive head: embed_dim {embed_dim} is not divisible by num_heads {num_heads}"], "model.head")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.q = nn.Linear(embed_dim, embed_dim)
        self.kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-6)
        hidden = int(embed_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_outputs)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> the attended query (B, D).

        The cross-attention of one learned query, computed without the keys and values of every token: with
        ``LN(x) = g * x_hat + b`` and the key of attention head j ``W_k[j] LN(x) + b_k[j]``, its score is
        ``(g * W_k[j]^T q_j) . x_hat`` plus a constant the softmax drops, and since the weights sum to one its
        value is ``W_v[j] LN(sum_i a_i x_hat_i) + b_v[j]``. The same function at O(N D h) rather than O(N D^2),
        and ``x_hat`` (the tokens normalised without affine) does not depend on the head's weights, so a probe
        grid (:mod:`medctl.training.stacked`) computes it once for all its heads.
        """
        B, N, D = tokens.shape
        heads, head_dim = self.num_heads, D // self.num_heads
        normed = F.layer_norm(tokens, (D,), eps=self.norm1.eps)  # (B, N, D) x_hat, no parameters
        gain, shift = self.norm1.weight, self.norm1.bias  # (D,)
        q = self.q(self.query[0, 0]).view(heads, head_dim)  # (h, d): the same query for every sample
        w_k, w_v = self.kv.weight.view(2, heads, head_dim, D)  # (h, d, D) each
        b_v = self.kv.bias.view(2, heads, head_dim)[1]  # (h, d)
        reader = torch.einsum("hd,hdD->hD", q, w_k) * gain * head_dim**-0.5  # (h, D) scores = x_hat @ reader^T
        weights = torch.softmax(normed @ reader.T, dim=1)  # (B, N, h), over the tokens
        mixed = torch.einsum("bnh,bnD->bhD", weights, normed) * gain + shift  # (B, h, D) = LN(sum_i a_i x_hat_i)
        attended = (torch.einsum("hdD,bhD->bhd", w_v, mixed) + b_v).reshape(B, 1, D)  # (B, 1, D)
        query = self.query.expand(B, -1, -1)  # (B, 1, D)
        pooled = query + attended
        pooled = pooled + self.mlp(self.norm2(pooled))
        return pooled[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"the attentive head takes tokens (B, N, D), got shape {tuple(tokens.shape)}")
        return self.fc(self.drop(self.pool(tokens)))


def default_num_heads(embed_dim: int) -> int:
    """The largest of 16, 12, 8, 6, 4, 3, 2, 1 that divides ``embed_dim`` (64-wide heads or so)."""
    return next(h for h in (16, 12, 8, 6, 4, 3, 2, 1) if embed_dim % h == 0 and embed_dim // h >= 8 or h == 1)


def num_outputs(kind: str, classes: list[str]) -> int:
    """Logits per target: 1 for binary and regression, one per class (multiclass) or label (multilabel)."""
    return 1 if kind in ("binary", "regression") else len(classes)


class Standardized(nn.Module):
    """A regression head whose output is in the target's units: ``head(z) * std + mean``.

    The head learns a standardised value; ``mean`` and ``std`` (of the training split, set by fine-tuning
    with :meth:`set_scale`) are buffers, so they travel in the checkpoint's state dict and ``evaluate`` /
    ``saliency`` read predictions in years (or whatever the column holds) with nothing else to load.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def set_scale(self, mean: float, std: float) -> None:
        self.mean.fill_(float(mean))
        self.std.fill_(float(std) if std > 0 else 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z) * self.std + self.mean  # (B, 1)


class InputStandardized(nn.Module):
    """A linear or MLP head that reads embeddings standardised per dimension: ``head((z - mean) / std)``.

    A frozen encoder's pooled features can sit far from zero with a small spread (a tiny UNet's vary by
    ~10% of their mean), where a linear head at a probe's learning rate hardly moves; standardising them
    on the training split, as MAE's linear probe does with a BatchNorm without affine, fixes that.
    ``mean`` and ``std`` (D,) are buffers, so ``last.ckpt`` resumes with them. :meth:`folded` returns the
    plain head computing the same function on raw embeddings, the standardisation folded into its first
    linear layer (``W' = W / std``, ``b' = b - W' @ mean``): checkpoints hold that, so every reader sees an
    ordinary head.
    """

    def __init__(self, head: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        first_linear(head)  # fails early for a head that cannot fold
        self.head = head
        self.register_buffer("mean", mean.detach().float().clone())  # (D,)
        self.register_buffer("std", std.detach().float().clone())  # (D,)

    @classmethod
    def of(cls, head: nn.Module, embeddings: torch.Tensor) -> InputStandardized:
        """Standardised on ``embeddings`` (N, D); a near-constant dimension keeps a floor of 1e-3 of the typical
        spread rather than being blown up by its own tiny one."""
        embeddings = embeddings.float().to(first_linear(head).weight.device)
        mean, var = embeddings.mean(0), embeddings.var(0, unbiased=False)
        floor = 1e-6 * var.mean().clamp_min(1e-12)
        return cls(head, mean, (var + floor).sqrt())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head((z - self.mean) / self.std)

    def folded(self) -> nn.Module:
        head = copy.deepcopy(self.head)
        linear = first_linear(head)
        with torch.no_grad():
            weight = linear.weight.float() / self.std  # (K, D)
            linear.bias.sub_((weight @ self.mean).to(linear.bias.dtype))
            linear.weight.copy_(weight)
        return head


def first_linear(head: nn.Module) -> nn.Linear:
    """The layer that reads the embedding: a linear head's ``fc``, an MLP's ``fc1``, through a regression scale."""
    if isinstance(head, Standardized):
        return first_linear(head.head)
    if isinstance(head, LinearHead):
        return head.fc
    if isinstance(head, MLPHead):
        return head.fc1
    raise TypeError(f"cannot standardise the input of a {type(head).__name__}; only linear and MLP heads read embeddings")


def build_head(
    kind: str, embed_dim: int, num_outputs: int, *, hidden: int = 0, dropout: float = 0.0, num_heads: int = 0
) -> nn.Module:
    """A head mapping embeddings (linear, mlp) or tokens (attentive) to ``num_outputs`` logits.

    ``mlp`` with ``hidden == 0`` is a linear head (the config's "0 means linear").
    """
    if num_outputs < 1:
        raise ConfigError([f"a head needs at least one output, got {num_outputs}; check the target's classes"], "data.targets")
    if kind == "linear" or (kind == "mlp" and hidden == 0):
        return LinearHead(embed_dim, num_outputs, dropout)
    if kind == "mlp":
        return MLPHead(embed_dim, num_outputs, hidden, dropout)
    if kind == "attentive":
        return AttentiveHead(embed_dim, num_outputs, num_heads=num_heads, dropout=dropout)
    raise ConfigError([f"unknown head kind `{kind}`; use one of {', '.join(HEAD_KINDS)}"], "model.head.kind")
