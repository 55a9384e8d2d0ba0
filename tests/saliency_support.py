"""Tiny models and toy data shared by the saliency tests (a support module, as cli_support.py is: no tests here).

The models follow the medctl Encoder/Classifier contract (``embed_dim``, ``spatial_dims``,
``feature_layout``, ``forward_features``, ``gradcam_layer``, ``token_grid``; ``Classifier.forward ->
{target: logits}``, ``.encoder``, ``.heads``), so the saliency code that works on them works unchanged
on the registry's encoders.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Conv stem -> two conv blocks; ``gradcam_layer`` is the last block's output ``(B, 2w, *S/2)``."""

    feature_layout = "map"

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, width: int = 8, pool: str = "mean"):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        max_pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        self.spatial_dims, self.in_channels, self.embed_dim, self.pool = (
            spatial_dims,
            in_channels,
            2 * width,
            pool,
        )
        self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), max_pool(2))
        self.blocks = nn.Sequential(
            nn.Sequential(conv(width, width, 3, padding=1), nn.ReLU(inplace=True)),
            nn.Sequential(conv(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True)),
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.blocks[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))  # (B, 2w, *S/2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x).flatten(2)  # (B, 2w, N)
        return features.amax(-1) if self.pool == "max" else features.mean(-1)  # (B, embed_dim)


class Block(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP), ViT style."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyTokens(nn.Module):
    """Patch embedding -> class token + positions -> blocks -> norm; ``forward_features`` gives tokens."""

    feature_layout = "tokens"

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        input_size=(8, 16, 16),
        patch: int = 4,
        dim: int = 16,
    ):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.spatial_dims, self.in_channels, self.embed_dim, self.patch = (
            spatial_dims,
            in_channels,
            dim,
            patch,
        )
        self.patch_embed = conv(in_channels, dim, patch, stride=patch)
        n_tokens = int(np.prod(self.token_grid(input_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_tokens + 1, dim))
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.norm = nn.LayerNorm(dim)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.blocks[-1]

    def token_grid(self, spatial_size) -> tuple[int, ...]:
        return tuple(int(s) // self.patch for s in spatial_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = (
            torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        )  # (B, 1+N, C)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 1:].mean(1)  # (B, C)


class TinyClassifier(nn.Module):
    """Encoder + one linear head per target: ``forward(x) -> {target: logits (B, K)}``."""

    def __init__(self, encoder: nn.Module, outputs: dict[str, int]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({name: nn.Linear(encoder.embed_dim, k) for name, k in outputs.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)  # (B, D)
        return {name: head(z) for name, head in self.heads.items()}


def make_model(kind: str, spatial_dims: int, outputs: dict[str, int], size) -> TinyClassifier:
    torch.manual_seed(0)
    encoder = TinyCNN(spatial_dims) if kind == "cnn" else TinyTokens(spatial_dims, input_size=size)
    return TinyClassifier(encoder, outputs).eval()


# ------------------------------------------------------------------------------------- blob toy task
def ball(shape, centre, radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


def blob_batch(n: int, rng: np.random.Generator, shape=(8, 16, 16), radius: float = 1.6):
    """Noise volumes; label 1 carries a bright ball (its mask), label 0 none. Returns images (n, 1, *S),
    labels (n,), masks (n, *S)."""
    images = rng.normal(0.0, 1.0, size=(n, 1, *shape)).astype(np.float32)  # (n, 1, *S)
    labels = rng.integers(0, 2, size=n)
    masks = np.zeros((n, *shape), dtype=bool)  # (n, *S)
    for i in range(n):
        if labels[i]:
            centre = [rng.integers(2, s - 2) for s in shape]
            masks[i] = ball(shape, centre, radius)
            images[i, 0][masks[i]] += 3.0
    return images, labels, masks


def train_blob_classifier(steps: int = 40, seed: int = 0, lr: float = 0.03) -> TinyClassifier:
    """A TinyCNN (max-pooled) that learns 'is there a bright ball' in about a second on CPU.

    Plain SGD with momentum written out: ``torch.optim`` would import torch._dynamo, seconds on its own.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TinyClassifier(TinyCNN(3, pool="max"), {"blob": 1}).train()
    velocity = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(steps):
        images, labels, _ = blob_batch(16, rng)
        logits = model(torch.from_numpy(images))["blob"][:, 0]  # (B,)
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).float())
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, v, g in zip(model.parameters(), velocity, grads, strict=True):
                v.mul_(0.9).add_(g)
                p.sub_(lr * v)
    return model.eval()
