"""BYOL with optional reconstruction, rotation and jigsaw heads, for 3D volumes and 2D images.

Paper: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. Auxiliary pretext heads after Gidaris et al., "Unsupervised Representation Learning by
Predicting Image Rotations" (ICLR 2018), Noroozi and Favaro, "Unsupervised Learning of Visual
Representations by Solving Jigsaw Puzzles" (ECCV 2016) and their 3D versions in Taleb et al., "3D
Self-Supervised Methods for Medical Imaging" (NeurIPS 2020); reconstruction as in Zhou et al., "Models
Genesis" (MICCAI 2019).

One step on a batch x (B, C, *S):

1. two random views v1, v2 (crop-resize, flips, intensity jitter, blur, noise: ``views.byol_views``);
2. online: encoder -> projector -> predictor gives p1, p2; target (an EMA copy of encoder and
   projector, no gradient) gives z1, z2; ``loss_byol = (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1))``;
3. ``decorrelation`` (weight > 0): the mean squared off-diagonal correlation of the online encoder's
   embeddings over the 2B views (``ssl_losses.decorrelation_loss``, Barlow Twins' redundancy term within a
   batch). BYOL alone keeps the projections apart through the projector's BatchNorm, but an encoder with no
   batch statistics of its own (``mt3``: GroupNorm, LayerNorm) can let all but a few of its embedding's
   directions go (a dimensional collapse, from its CNN stem on); this term makes those directions cost;
4. ``reconstruction`` (weight > 0): a light decoder maps each view's pooled embedding back to the view
   (Linear to a coarse grid, transposed convs up to the input size), MSE;
5. ``rotation``: a pretext view rotated by k * 90 degrees in ``rotation_plane``; a linear head on the
   pooled embedding predicts k (cross-entropy);
6. ``jigsaw`` (3D only): the pretext view's 2x2x2 blocks shuffled by one of K fixed, far-apart
   permutations; a linear head predicts which one.

The pretext view is a BYOL view without flips (crop-resize and photometric jitter only), whose linear
intensity trend is replaced by a random one (``pretext_reorient``): otherwise a smooth bias field that is
brighter on one side in every scan tells the rotation and the block order by itself, and the heads learn
that instead of anatomy (``views.reorient_intensity``). The BYOL views
flip every axis with probability ``view_flip_prob``, and flips destroy both labels: a 180 degree rotation
is the double flip of its plane (and 90 equals 270 after it), so a rotation of a flipped view has at most
two tell-apart classes out of four; a flip also swaps the blocks along its axis, so a shuffled flipped
volume is another permutation of the unflipped one. Rotations and block orders only mean something
relative to the data's own orientation, which the pretext view keeps.

``loss = loss_byol + w_dec * loss_decorrelation + w_rec * loss_reconstruction + w_rot * loss_rotation
+ w_jig * loss_jigsaw``. The caller moves the target after each optimizer step with ``update_target(momentum)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medctl.config import Section
from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder
from medctl.pretrain.spec import MethodSpec, ShareRange
from medctl.pretrain.views import (
    PLANES,
    ViewSettings,
    byol_view,
    byol_views,
    jigsaw_permutations,
    random_jigsaw,
    random_rotation,
    reorient_intensity,
)
from medctl.training.ema import ema_update
from medctl.training.ssl_losses import byol_symmetric_loss, decorrelation_loss

JIGSAW_SEED = 0  # the permutation set is part of the task: fixed, so resumed and repeated runs agree


class ByolSettings(Section):
    """``[pretrain.byol]``."""

    projector_dim: int = Field(default=128, ge=1)
    projector_hidden: int = Field(default=512, ge=1)
    # the predictor's learning rate as a multiple of pretrain.lr (SimSiam and DirectPred keep the predictor
    # learning faster than the encoder, against collapse); 1 trains everything at one rate
    predictor_lr_scale: float = Field(default=1.0, gt=0)
    # auxiliary heads; a weight of 0 switches the head off
    reconstruction_weight: float = Field(default=1.0, ge=0)
    # the encoder's embeddings' mean squared off-diagonal correlation in each batch, against a dimensional
    # collapse (training.ssl_losses.decorrelation_loss): at 5, mt3 at batch 8 on the count family keeps
    # 0.49-0.78x of its untrained effective rank where plain BYOL keeps 0.04-0.05x (3 seeds, RESULTS.md); 0: off
    decorrelation_weight: float = Field(default=5.0, ge=0)
    rotation_weight: float = Field(default=0.5, ge=0)
    jigsaw_weight: float = Field(default=0.5, ge=0)
    jigsaw_permutations: int = Field(default=24, ge=2, le=40320)
    rotation_plane: Literal["axial", "coronal", "sagittal"] = "axial"  # 2D inputs rotate in their only plane
    # the pretext view's own linear intensity trend is replaced by a random one up to this slope (x its std),
    # so that a bias field's orientation does not give rotations or block orders away; 0 keeps it
    pretext_reorient: float = Field(default=1.0, ge=0)
    # views: random crop-resize, flips, then photometric jitter, blur and noise
    view_crop_scale: ShareRange = [0.5, 1.0]  # share of the volume a crop keeps before resizing back
    view_flip_prob: float = Field(default=0.5, ge=0, le=1)  # per spatial axis
    view_intensity_jitter: float = Field(default=0.2, ge=0)  # scale in [1-j, 1+j], shift in [-j, j] (z-scored)
    view_noise_std: float = Field(default=0.05, ge=0)
    view_blur_prob: float = Field(default=0.2, ge=0, le=1)
    view_blur_sigma: float = Field(default=1.0, ge=0)  # voxels
    # a random smooth multiplicative field per view, exp(quadratic), coefficients up to this; 0: none
    view_bias_field: float = Field(default=0.0, ge=0)

    def views(self) -> ViewSettings:
        """The ``view_*`` keys as the one object the view functions take."""
        low, high = self.view_crop_scale
        return ViewSettings(
            crop_scale=(low, high),
            flip_prob=self.view_flip_prob,
            intensity_jitter=self.view_intensity_jitter,
            noise_std=self.view_noise_std,
            blur_prob=self.view_blur_prob,
            blur_sigma=self.view_blur_sigma,
            bias_field=self.view_bias_field,
        )


# ----------------------------------------------------------------------------------------- blocks
def projection_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL/SimCLR projector: Linear -> BatchNorm -> ReLU -> Linear, (B, in_dim) -> (B, out_dim)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradient: the EMA target of ``module``."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


class EmbeddingDecoder(nn.Module):
    """Pooled embedding (B, D) -> an image (B, C, *input_size): Linear to a coarse grid, then transposed
    convs that double it; a final resize fixes sizes that are not a power-of-two multiple of the grid."""

    def __init__(self, embed_dim: int, out_channels: int, input_size: Sequence[int], width: int = 64):
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        dims = len(self.input_size)
        self.n_up = max(0, min(5, int(math.log2(max(1, min(self.input_size) // 2)))))  # coarse side >= 2
        self.coarse = tuple(max(1, math.ceil(s / 2**self.n_up)) for s in self.input_size)
        channels = [max(8, width // 2**i) for i in range(self.n_up + 1)]
        conv_t = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.fc = nn.Linear(embed_dim, channels[0] * math.prod(self.coarse))
        self.ups = nn.ModuleList(
            nn.Sequential(
                conv_t(channels[i], channels[i + 1], 2, stride=2), nn.GroupNorm(1, channels[i + 1]), nn.GELU()
            )
            for i in range(self.n_up)
        )
        self.out = conv(channels[-1], out_channels, 3, padding=1)
        self.channels0 = channels[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).reshape(z.shape[0], self.channels0, *self.coarse)  # (B, C0, *coarse)
        for up in self.ups:
            x = up(x)  # (B, C_i, *2 x size)
        x = self.out(x)  # (B, C, *coarse * 2**n_up)
        if tuple(x.shape[2:]) != self.input_size:
            mode = "trilinear" if x.ndim == 5 else "bilinear"
            x = F.interpolate(x, size=self.input_size, mode=mode, align_corners=False)
        return x  # (B, C, *input_size)


# ------------------------------------------------------------------------------------------ model
class BYOL(nn.Module):
    """Online encoder + projector + predictor, EMA target encoder + projector, optional pretext heads."""

    def __init__(self, encoder: Encoder, settings: ByolSettings):
        super().__init__()
        size = tuple(encoder.input_size)  # (D, H, W) or (H, W)
        _check_settings(encoder.spatial_dims, size, settings)
        dim = encoder.embed_dim
        self.encoder = encoder
        self.projector = projection_mlp(dim, settings.projector_hidden, settings.projector_dim)
        self.predictor = projection_mlp(settings.projector_dim, settings.projector_hidden, settings.projector_dim)
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)
        self.lr_scales = {"predictor": settings.predictor_lr_scale}  # submodule -> multiple of pretrain.lr
        self.weights = {
            "reconstruction": settings.reconstruction_weight,
            "decorrelation": settings.decorrelation_weight,
            "rotation": settings.rotation_weight,
            "jigsaw": settings.jigsaw_weight,
        }
        self.decoder = EmbeddingDecoder(dim, encoder.in_channels, size) if self.weights["reconstruction"] > 0 else None
        self.rotation_plane = settings.rotation_plane if encoder.spatial_dims == 3 else "axial"
        self.pretext_reorient = settings.pretext_reorient
        self.rotation_head = nn.Linear(dim, 4) if self.weights["rotation"] > 0 else None
        self.jigsaw_head = nn.Linear(dim, settings.jigsaw_permutations) if self.weights["jigsaw"] > 0 else None
        if self.jigsaw_head is not None:
            self.register_buffer(
                "permutations", jigsaw_permutations_table(settings.jigsaw_permutations), persistent=False
            )
        self.views = settings.views()
        self.pretext_views = replace(self.views, flip_prob=0.0)  # orientation kept: see the module docstring

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, *S) -> {"loss", "loss_byol", and per active head "loss_<head>", "acc_<head>"}."""
        batch = x.shape[0]
        v1, v2 = byol_views(x, self.views)  # (B, C, *S) each
        views = torch.cat([v1, v2])  # (2B, C, *S)
        y = self.encoder(views)  # (2B, D)
        p1, p2 = (self.predictor(self.projector(half)) for half in y.split(batch))  # (B, P) each
        with torch.no_grad():
            y_target = self.target_encoder(views)  # (2B, D)
            z1, z2 = (self.target_projector(half) for half in y_target.split(batch))  # (B, P) each
        out = {"loss_byol": byol_symmetric_loss(p1, p2, z1, z2)}
        loss = out["loss_byol"]

        if self.weights["decorrelation"] > 0:
            out["loss_decorrelation"] = decorrelation_loss(y)
            loss = loss + self.weights["decorrelation"] * out["loss_decorrelation"]
        if self.decoder is not None:
            out["loss_reconstruction"] = F.mse_loss(self.decoder(y).float(), views.float())
            loss = loss + self.weights["reconstruction"] * out["loss_reconstruction"]
        if self.rotation_head is not None or self.jigsaw_head is not None:
            pretext = byol_view(x, self.pretext_views)  # (B, C, *S), orientation kept
            if self.pretext_reorient > 0:  # the anatomy's orientation kept, the intensity gradient's randomised
                pretext = reorient_intensity(pretext, self.pretext_reorient)
        if self.rotation_head is not None:
            rotated, labels = random_rotation(pretext, plane=self.rotation_plane)  # (B, C, *S), (B,) in 0..3
            logits = self.rotation_head(self.encoder(rotated))  # (B, 4)
            out["loss_rotation"] = F.cross_entropy(logits.float(), labels)
            out["acc_rotation"] = (logits.argmax(1) == labels).float().mean()
            loss = loss + self.weights["rotation"] * out["loss_rotation"]
        if self.jigsaw_head is not None:
            shuffled, labels = random_jigsaw(pretext, self.permutations)  # (B, C, D, H, W), (B,) in 0..K-1
            logits = self.jigsaw_head(self.encoder(shuffled))  # (B, K)
            out["loss_jigsaw"] = F.cross_entropy(logits.float(), labels)
            out["acc_jigsaw"] = (logits.argmax(1) == labels).float().mean()
            loss = loss + self.weights["jigsaw"] * out["loss_jigsaw"]
        return {"loss": loss, **out}

    @torch.no_grad()
    def chance_losses(self) -> dict[str, float]:
        """Each active classification head's loss at chance, a uniform guess: ``ln 4`` for rotation, ``ln K``
        for jigsaw's K permutations; pretrain sets the final losses beside them."""
        chance = {}
        if self.rotation_head is not None:
            chance["loss_rotation"] = math.log(self.rotation_head.out_features)
        if self.jigsaw_head is not None:
            chance["loss_jigsaw"] = math.log(self.jigsaw_head.out_features)
        return chance

    def update_target(self, momentum: float) -> None:
        """target = momentum * target + (1 - momentum) * online, for the encoder and the projector."""
        ema_update(self.target_encoder, self.encoder, momentum)
        ema_update(self.target_projector, self.projector, momentum)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The online encoder's pooled embedding (B, D): what finetuning starts from."""
        return self.encoder(x)

    def reconstruct(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Original, mask (none: the whole input is reconstructed) and reconstruction; None without a decoder."""
        if self.decoder is None:
            return None
        return {
            "original": x,
            "mask": torch.zeros_like(x[:, :1]),
            "reconstruction": self.decoder(self.encoder(x)),
        }


def jigsaw_permutations_table(k: int) -> torch.Tensor:
    """The K fixed permutations (K, 8) the jigsaw head classifies."""
    return jigsaw_permutations(k, JIGSAW_SEED)


def _check_settings(spatial_dims: int, size: tuple[int, ...], settings: ByolSettings) -> None:
    """Reject pretext tasks the input cannot support, every problem at once."""
    rotation_weight, plane, jigsaw_weight = settings.rotation_weight, settings.rotation_plane, settings.jigsaw_weight
    problems = []
    if rotation_weight > 0:
        dims = PLANES[plane] if spatial_dims == 3 else (-2, -1)
        a, b = size[dims[0]], size[dims[1]]
        where = f"plane {plane}" if spatial_dims == 3 else "(H, W)"
        if a != b:
            problems.append(
                f"`pretrain.byol.rotation_weight` = {rotation_weight}: rotations by 90 degrees need equal sizes in {where}, "
                f"but the input is {list(size)}; make them equal in data.preprocess.spatial_size, pick another "
                "pretrain.byol.rotation_plane, or set pretrain.byol.rotation_weight = 0"
            )
    if jigsaw_weight > 0:
        if spatial_dims != 3:
            problems.append(
                f"`pretrain.byol.jigsaw_weight` = {jigsaw_weight}: the jigsaw shuffles the 2x2x2 blocks of a volume and "
                "these inputs are 2D; set pretrain.byol.jigsaw_weight = 0"
            )
        elif any(s % 2 for s in size):
            problems.append(
                f"`pretrain.byol.jigsaw_weight` = {jigsaw_weight}: the 2x2x2 jigsaw needs even D, H, W, but the input is "
                f"{list(size)}; use even sizes in data.preprocess.spatial_size or set pretrain.byol.jigsaw_weight = 0"
            )
    if problems:
        raise ConfigError(problems, "pretrain")


SPEC = MethodSpec(BYOL, ByolSettings, min_batch=2, min_batch_reason="BatchNorm in the projector")
