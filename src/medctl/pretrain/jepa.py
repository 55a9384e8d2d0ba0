"""JEPA on a 3D ViT: predict the target encoder's features of masked 3D blocks from the visible context.

Papers: Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture" (I-JEPA, CVPR 2023); Bardes et al., "Revisiting Feature Prediction for Learning Visual
Representations from Video" (V-JEPA, 2024); Assran et al., "V-JEPA 2" (2025).

One step on a volume batch x (B, C, D, H, W), with the token grid (T, H', W') of the ViT:

1. multi-block masks (``masks.multiblock_masks_batch``): ``mask_blocks`` contiguous target boxes per
   sample and the context = every token outside them (same counts across the batch);
2. target: the EMA target encoder on the whole volume, no gradient, features layer-normed over the
   channel dim (``F.layer_norm``) -> h (B, N, C);
3. context: the online encoder on the visible tokens only (``forward_features(x, masks=context)``),
   positions applied before tokens are dropped -> (B, Nc, C);
4. predictor: a narrow transformer (``predictor_dim`` wide, ``predictor_depth`` deep) over the context
   tokens projected down plus one learned mask token per target position, both with 3D sin-cos
   positions of the token grid; it is run once per target block, and its outputs at the mask tokens
   are projected back to C;
5. ``loss`` = mean L1 between predictions and h at the target positions, averaged over blocks.

The caller moves the target encoder after each optimizer step with ``update_target(momentum)``.

Exports (:func:`medctl.pretrain.run.export_encoders`): ``encoder.ckpt`` holds the EMA **target**
encoder, the one V-JEPA evaluates and the one the loader picks from a JEPA file by default
(``target_encoder`` first), so the exported default and the loaded default agree; the online (context)
encoder goes to ``context_encoder.ckpt``. :meth:`JEPA.vjepa2_layout` writes both in V-JEPA 2's training
layout (``encoder``, ``target_encoder``, ``predictor``, ``epoch``; keys under ``module.backbone.``), plus
``medctl_model`` (name and args) so that ``model.encoder = "auto"`` rebuilds it exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medctl.config import Section
from medctl.errors import ConfigError
from medctl.models.checkpoints import plain
from medctl.models.encoders.base import Encoder
from medctl.models.encoders.vit3d import Block, keep_tokens, sincos_3d
from medctl.pretrain.byol import frozen_copy
from medctl.pretrain.masks import multiblock_masks_batch
from medctl.pretrain.spec import MethodSpec, PositiveRange, ShareRange
from medctl.training.ema import ema_update


class JepaSettings(Section):
    """``[pretrain.jepa]``."""

    predictor_dim: int = Field(default=96, ge=1)
    predictor_depth: int = Field(default=2, ge=1)
    predictor_heads: int = Field(default=3, ge=1)  # attention heads of the predictor; divide predictor_dim
    mask_blocks: int = Field(default=4, ge=1)
    mask_block_scale: ShareRange = [0.1, 0.2]  # share of the token grid each target block covers
    mask_aspect_ratio: PositiveRange = [0.75, 1.5]  # h / w of a target block, log-uniform in this range
    mask_depth_scale: ShareRange = [1.0, 1.0]  # share of the depth (T) a block spans; V-JEPA: all of it
    # also write checkpoints/vjepa2.pt in V-JEPA 2's training layout (`encoder`, `target_encoder`, keys under
    # `module.backbone.`), to sweep or load beside a lab's V-JEPA 2 files without a conversion
    export_vjepa2: bool = False


class Predictor(nn.Module):
    """Context tokens (B, Nc, C) at known positions -> predicted features (B, Nt, C) at target positions."""

    def __init__(self, embed_dim: int, predictor_dim: int, depth: int, num_heads: int, grid: Sequence[int]):
        super().__init__()
        self.embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer(
            "pos_embed", sincos_3d(tuple(grid), predictor_dim)[0], persistent=False
        )  # (N, P)
        self.blocks = nn.ModuleList(
            Block(predictor_dim, num_heads, 4.0, True, 0.0, 0.0, 0.0) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        self.proj = nn.Linear(predictor_dim, embed_dim)

    def forward(
        self, context: torch.Tensor, context_ids: torch.Tensor, target_ids: torch.Tensor
    ) -> torch.Tensor:
        """context (B, Nc, C), context_ids (B, Nc), target_ids (B, Nt) -> (B, Nt, C)."""
        tokens = self.embed(context) + self.pos_embed[context_ids].to(context.dtype)  # (B, Nc, P)
        queries = self.mask_token + self.pos_embed[target_ids].to(context.dtype)  # (B, Nt, P)
        x = torch.cat([tokens, queries], dim=1)  # (B, Nc + Nt, P)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, tokens.shape[1] :]))  # (B, Nt, C)


class JEPA(nn.Module):
    """Online (context) ViT, EMA target ViT, and a narrow predictor; L1 on layer-normed target features."""

    def __init__(self, encoder: Encoder, settings: JepaSettings):
        super().__init__()
        self.grid = _check_settings(encoder, settings.predictor_dim, settings.predictor_heads)
        self.mask_settings = dict(
            n_blocks=settings.mask_blocks,
            block_scale=tuple(settings.mask_block_scale),
            aspect_ratio=tuple(settings.mask_aspect_ratio),
            depth_scale=tuple(settings.mask_depth_scale),
        )
        _check_masks(self.grid, self.mask_settings)
        self.encoder = encoder
        self.target_encoder = frozen_copy(encoder)
        self.predictor = Predictor(
            encoder.embed_dim, settings.predictor_dim, settings.predictor_depth, settings.predictor_heads, self.grid
        )
        self.export_vjepa2 = settings.export_vjepa2  # the stage also writes vjepa2_layout() as checkpoints/vjepa2.pt

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, D, H, W) -> {"loss", "context_tokens", "target_std"}."""
        context_ids, target_ids = self.masks(x.shape[0])  # (B, Nc), n_blocks x (B, Nt_i), on the CPU
        context_ids = context_ids.to(x.device)
        with torch.no_grad():
            h = self.target_encoder.forward_features(x)  # (B, N, C)
            h = F.layer_norm(h.float(), h.shape[-1:])  # (B, N, C) normalised per token
        context = self.encoder.forward_features(x, masks=context_ids)  # (B, Nc, C)
        losses = []
        for ids in target_ids:
            ids = ids.to(x.device)  # (B, Nt)
            prediction = self.predictor(context, context_ids, ids)  # (B, Nt, C)
            losses.append((prediction.float() - keep_tokens(h, ids)).abs().mean())
        loss = torch.stack(losses).mean()
        return {
            "loss": loss,
            "context_tokens": torch.tensor(float(context_ids.shape[1])),
            "target_std": h.std(dim=0).mean(),  # spread of the targets across the batch; ~0 means collapse
        }

    def masks(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Context (B, Nc) and target (B, Nt_i) token indices drawn from the global RNG (or ``generator``)."""
        return multiblock_masks_batch(batch, self.grid, generator=generator, **self.mask_settings)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        ema_update(self.target_encoder, self.encoder, momentum)

    def exported_encoders(self) -> dict[str, nn.Module]:
        """What ``pretrain`` writes: ``<name>.ckpt`` -> encoder (see the module docstring)."""
        return {"encoder": self.target_encoder, "context_encoder": self.encoder}

    def vjepa2_layout(self, epoch: int) -> dict[str, Any]:
        """Both encoders and the predictor as V-JEPA 2's ``app/vjepa/train.py`` saves them (DDP around a
        multi-sequence wrapper: ``module.backbone.`` keys); medctl's predictor is its own, not V-JEPA 2's."""

        def wrapped(module: nn.Module) -> dict[str, torch.Tensor]:
            return {f"module.backbone.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}

        args = plain(self.encoder.build_args)
        return {
            "encoder": wrapped(self.encoder),
            "target_encoder": wrapped(self.target_encoder),
            "predictor": wrapped(self.predictor),
            "epoch": epoch,
            "medctl_model": {"name": self.encoder.name, "args": args},
        }

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online encoder's pooled embedding (B, C) over all tokens."""
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> None:
        """JEPA predicts features, not pixels: there is nothing to show as a reconstruction."""
        return None


def _check_settings(encoder: Encoder, predictor_dim: int, predictor_heads: int) -> tuple[int, int, int]:
    """The encoder's token grid (T, H', W'); every impossible setting is reported at once."""
    name = getattr(encoder, "name", type(encoder).__name__)
    takes_masks = "masks" in inspect.signature(encoder.forward_features).parameters
    if encoder.feature_layout != "tokens" or encoder.spatial_dims != 3 or not takes_masks:
        raise ConfigError(
            [
                f"`model.encoder` = {name}: jepa needs a 3D ViT that can drop tokens (vit3d_*, e.g. vit3d_small)"
            ],
            "pretrain",
        )
    problems = []
    if predictor_dim % predictor_heads:
        problems.append(
            f"`pretrain.jepa.predictor_dim` = {predictor_dim} is not divisible by pretrain.jepa.predictor_heads = "
            f"{predictor_heads}; change one"
        )
    if predictor_dim % 8:
        problems.append(
            f"`pretrain.jepa.predictor_dim` = {predictor_dim}: 3D sin-cos positions need a multiple of 8, e.g. 96 or 192"
        )
    if problems:
        raise ConfigError(problems, "pretrain")
    return tuple(encoder.token_grid(encoder.input_size))


def _check_masks(grid: tuple[int, int, int], settings: dict) -> None:
    """Draw masks once with a fixed generator: settings that leave no context fail here, not mid-run."""
    try:
        with torch.device("cpu"):  # a few small index tensors, also when the model is built on "meta"
            multiblock_masks_batch(4, grid, generator=torch.Generator().manual_seed(0), **settings)
    except ValueError as exc:
        raise ConfigError([f"jepa masks on the token grid {list(grid)}: {exc}"], "pretrain") from None


SPEC = MethodSpec(JEPA, JepaSettings, min_batch=1)
