"""Masked-image modelling + InfoNCE on the left and right halves of 2D slices, with a U-Net.

Papers: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR,
ICML 2020) for the 2N InfoNCE; He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022)
and Xie et al., "SimMIM" (CVPR 2022) for masked patch reconstruction with an L1 loss on masked
patches only; Ronneberger et al., "U-Net" (MICCAI 2015) for the network.

A slice (B, C, H, W) (192 x 192 in the reference setup; any H divisible by ``patch_size`` and W by
``2 * patch_size``) is sharpened as a whole (unsharp mask, ``halves_unsharp_amount``; or already at
preprocessing with ``data.preprocess.unsharp``), split into a left and a right half (B, C, H, W/2),
and each half gets its own photometric augmentation only (intensity jitter, noise, light blur), so
the halves stay anatomically aligned. Then:

- contrastive (``halves_positives = "views"``, the default): the 2B halves, unmasked, each get two
  independent views (crop-resize by ``halves_crop_scale``, no flips, their own intensity jitter and noise),
  both go through the U-Net encoder; the global average of the bottleneck -> 2-layer projection MLP with
  BatchNorm -> 128-d, L2-normalised; symmetric 2N InfoNCE (temperature 0.2) over the 4B views with the
  other view of the same half as the positive and every other half's views (the other half of the same
  slice included) as negatives.
- ``halves_positives = "mirror"``: the left half's positive is the right half of the same slice (one
  crop each), for anatomy whose two sides carry the same information. Where the class lives on one side
  only (a lesion), the two halves share little besides the slice's global intensity and shape, and
  InfoNCE cannot match them: on 2D synthetic lesion images with bright distractors (32 x 32,
  unet2d_tiny, 150 steps of 16, 3 seeds) its loss stayed at 3.28 (chance ln(31) = 3.43) and a logistic
  probe on held-out images moved 0.55 -> 0.62 (+0.01, +0.02, +0.19), where ``"views"`` reached 1.48 and
  0.55 -> 0.77 (+0.23, +0.19, +0.25) (benchmarks/RESULTS.md, "mim_contrastive: what the InfoNCE
  positives are"). Without its crop, each half of a mirror pair is found by a shortcut: the two pixel
  columns either side of the midline are neighbours, and a half's position and size are fixed.
- masked image modelling: each half loses ``round(mask_ratio * gh * gw)`` distinct 16 x 16 patches
  under the anti-mirror rule (where the left half is masked, the mirror-image patch of the right half
  is visible, ``masks.mirror_masks``). The two masked halves are put back side by side and the U-Net
  sees this *full* slice: every masked region has its anatomical counterpart in view on the other
  side, and the decoder fills the masked patches in. L1 on masked pixels only.

Why this reading of "the network sees the full unmasked image": a network that received the unmasked
pixels it must reconstruct would learn the identity, and a network that received one half alone could
not use the anti-mirror rule at all. The coherent reading is that the network sees the full image
(both halves at once, each with its own mask, so nothing is hidden on both sides), while the
contrastive branch and the embedding used downstream see unmasked halves.

``loss = contrastive_weight * loss_contrastive + mim_weight * loss_mim`` (equal weights by default).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medctl.config import Section
from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder
from medctl.pretrain.byol import projection_mlp
from medctl.pretrain.masks import (
    apply_pixel_mask,
    masked_patch_count,
    mirror_masks_batch,
    patch_mask_to_pixels,
)
from medctl.pretrain.spec import MethodSpec, ShareRange
from medctl.pretrain.views import ViewSettings, byol_view, halves_views, unsharp
from medctl.training.ssl_losses import info_nce

PANEL_SEED = 0  # the reconstruction panels mask the same patches every epoch
POSITIVES = ("views", "mirror")  # pretrain.mim_contrastive.halves_positives: two views of one half | the other half


class MIMContrastiveSettings(Section):
    """``[pretrain.mim_contrastive]``."""

    projector_dim: int = Field(default=128, ge=1)
    projector_hidden: int = Field(default=512, ge=1)
    patch_size: int = Field(default=16, ge=1)
    mask_ratio: float = Field(default=0.35, gt=0, lt=1)
    temperature: float = Field(default=0.2, gt=0)
    contrastive_weight: float = Field(default=1.0, ge=0)
    mim_weight: float = Field(default=1.0, ge=0)
    # halves: unsharp mask on the whole slice, then photometric-only jitter per half
    halves_unsharp_amount: float = Field(default=0.0, ge=0)  # 0 disables
    halves_unsharp_sigma: float = Field(default=1.0, gt=0)
    halves_intensity_jitter: float = Field(default=0.1, ge=0)
    halves_noise_std: float = Field(default=0.02, ge=0)
    halves_blur_prob: float = Field(default=0.1, ge=0, le=1)
    halves_blur_sigma: float = Field(default=0.5, ge=0)
    # each half's own crop-resize before InfoNCE (MIM keeps the halves aligned): breaks the midline shortcut
    halves_crop_scale: ShareRange = [0.6, 1.0]
    # InfoNCE positives: "views" = two views of the same half (learns on one-sided findings such as lesions);
    # "mirror" = the left half's positive is the right half of its slice (only for two sides that match)
    halves_positives: Literal["views", "mirror"] = "views"


class MIMContrastive(nn.Module):
    """U-Net encoder/decoder, a projection MLP, and the two losses on left/right halves."""

    def __init__(self, encoder: Encoder, settings: MIMContrastiveSettings):
        super().__init__()
        self.grid = _check_settings(encoder, settings)
        self.encoder = encoder
        self.projector = projection_mlp(encoder.embed_dim, settings.projector_hidden, settings.projector_dim)
        self.patch_size, self.mask_ratio = settings.patch_size, settings.mask_ratio
        self.temperature = settings.temperature
        self.contrastive_weight, self.mim_weight = settings.contrastive_weight, settings.mim_weight
        self.unsharp = (settings.halves_unsharp_sigma, settings.halves_unsharp_amount)
        self.view_settings = dict(
            unsharp_sigma=settings.halves_unsharp_sigma,
            unsharp_amount=settings.halves_unsharp_amount,
            intensity_jitter=settings.halves_intensity_jitter,
            noise_std=settings.halves_noise_std,
            blur_prob=settings.halves_blur_prob,
            blur_sigma=settings.halves_blur_sigma,
        )
        low, high = settings.halves_crop_scale
        self.crop_scale = (low, high)
        self.positives = settings.halves_positives

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, H, W) -> {"loss", "loss_contrastive", "loss_mim"}."""
        batch = x.shape[0]
        left, right = halves_views(x, **self.view_settings)  # (B, C, H, W/2) each, photometric only
        out: dict[str, torch.Tensor] = {}
        loss = x.new_zeros(())
        if self.contrastive_weight > 0:
            out["loss_contrastive"] = self.contrastive_loss(left, right)
            loss = loss + self.contrastive_weight * out["loss_contrastive"]
        if self.mim_weight > 0:
            mask = self.pixel_mask(batch, x.device)  # (B, H, W) True = masked
            full = torch.cat([left, right], dim=-1)  # (B, C, H, W): the augmented slice, unmasked
            reconstruction = self.encoder.decode(
                self.encoder.encode(apply_pixel_mask(full, mask))
            )  # (B, C, H, W)
            out["loss_mim"] = masked_l1(reconstruction, full, mask)
            loss = loss + self.mim_weight * out["loss_mim"]
        return {"loss": loss, **out}

    def contrastive_loss(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """InfoNCE on the halves (B, C, H, W/2) each; the positives are set by ``halves_positives``."""
        jitter = self.view_settings["intensity_jitter"] if self.positives == "views" else 0.0
        noise = self.view_settings["noise_std"] if self.positives == "views" else 0.0
        crop = ViewSettings(
            crop_scale=self.crop_scale,
            flip_prob=0.0,
            intensity_jitter=jitter,
            noise_std=noise,
            blur_prob=0.0,
            blur_sigma=0.0,
        )  # geometry, plus (views) a second photometric draw: each half's first one is already applied
        if self.positives == "views":
            halves = torch.cat([left, right])  # (2B, C, H, W/2)
            first, second = byol_view(halves, crop), byol_view(halves, crop)  # (2B, C, H, W/2) each
        else:
            first, second = byol_view(left, crop), byol_view(right, crop)  # (B, C, H, W/2) each
        bottleneck = self.encoder.forward_features(torch.cat([first, second]))  # (2N, E, h, w/2)
        z = F.normalize(self.projector(bottleneck.mean(dim=(2, 3))), dim=1)  # (2N, P), unit length
        return info_nce(*z.split(first.shape[0]), self.temperature)

    def pixel_mask(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Anti-mirrored patch masks of both halves, side by side in pixels: bool (B, H, W)."""
        left, right = mirror_masks_batch(batch, *self.grid, self.mask_ratio, generator)  # (B, gh, gw) each
        pixels = [patch_mask_to_pixels(m, self.patch_size) for m in (left, right)]  # (B, H, W/2) each
        return torch.cat(pixels, dim=-1).to(device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled embedding (B, E) of the whole slice, as finetuning will see it."""
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The MIM task on un-augmented slices with a fixed mask: original, mask (B, 1, H, W), reconstruction."""
        sigma, amount = self.unsharp
        full = unsharp(x, sigma, amount) if amount > 0 else x  # (B, C, H, W)
        generator = torch.Generator().manual_seed(PANEL_SEED)
        mask = self.pixel_mask(x.shape[0], x.device, generator)  # (B, H, W)
        reconstruction = self.encoder.decode(self.encoder.encode(apply_pixel_mask(full, mask)))
        return {"original": full, "mask": mask[:, None].float(), "reconstruction": reconstruction}

    def update_target(self, momentum: float) -> None:
        """No target network: nothing to move."""


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |prediction - target| over masked pixels (all channels); mask bool (B, H, W). In fp32."""
    weight = mask[:, None].expand_as(target).float()  # (B, C, H, W)
    error = (prediction.float() - target.float()).abs()
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


def _check_settings(encoder: Encoder, settings: MIMContrastiveSettings) -> tuple[int, int]:
    """The (gh, gw) patch grid of one half; every impossible setting is reported at once."""
    patch_size, mask_ratio, temperature = settings.patch_size, settings.mask_ratio, settings.temperature
    contrastive_weight, mim_weight = settings.contrastive_weight, settings.mim_weight
    positives = settings.halves_positives
    name = getattr(encoder, "name", type(encoder).__name__)
    if encoder.spatial_dims != 2 or not hasattr(encoder, "decode") or not hasattr(encoder, "encode"):
        raise ConfigError(
            [
                f"`model.encoder` = {name}: mim_contrastive needs a 2D encoder with a decoder (unet2d, unet2d_tiny) "
                "and 2D slices (data.preprocess.slices or 2D images)"
            ],
            "pretrain",
        )
    height, width = (int(s) for s in encoder.input_size)
    problems = []
    if height % patch_size or width % (2 * patch_size):
        problems.append(
            f"`pretrain.mim_contrastive.patch_size` = {patch_size}: slices of {height} x {width} need H divisible by the patch and W "
            f"by twice the patch (two halves of whole patches), e.g. 192 x 192 with 16; change "
            "data.preprocess.spatial_size or pretrain.mim_contrastive.patch_size"
        )
    multiple = int(getattr(encoder, "multiple", 1))
    if height % multiple or (width // 2) % multiple:
        problems.append(
            f"{name} needs H and W/2 divisible by {multiple}, but the halves are {height} x {width // 2}; "
            "change data.preprocess.spatial_size"
        )
    grid = (height // patch_size, (width // 2) // patch_size)
    if not problems:
        try:
            masked_patch_count(*grid, mask_ratio)
        except ValueError as exc:
            problems.append(f"`pretrain.mim_contrastive.mask_ratio` = {mask_ratio}: {exc}")
    if contrastive_weight <= 0 and mim_weight <= 0:
        problems.append(
            "pretrain.mim_contrastive.contrastive_weight and pretrain.mim_contrastive.mim_weight are both 0: nothing to learn; set one > 0"
        )
    if temperature <= 0:
        problems.append(f"`pretrain.mim_contrastive.temperature` = {temperature}: must be > 0, e.g. 0.2")
    if positives not in POSITIVES:
        problems.append(
            f"`pretrain.mim_contrastive.halves_positives` = {positives!r}: use one of {', '.join(POSITIVES)}"
        )
    if problems:
        raise ConfigError(problems, "pretrain")
    return grid


SPEC = MethodSpec(
    MIMContrastive, MIMContrastiveSettings, min_batch=2, min_batch_reason="the other halves in the batch are InfoNCE's negatives"
)
