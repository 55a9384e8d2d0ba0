"""3D Vision Transformer whose state dict is interchangeable with V-JEPA 2's video ViT.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021); Bardes et al., "Revisiting
Feature Prediction for Learning Visual Representations from Video" (V-JEPA, 2024); Assran et al.,
"V-JEPA 2: Self-Supervised Video Models Enable Understanding, Prediction and Planning" (2025); Su et
al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021).

A volume ``(B, C, D, H, W)`` is cut into tubelets of ``tubelet_size x patch_size x patch_size``
(depth plays the role of video time) by a Conv3d, giving ``N = D/t * H/p * W/p`` tokens in (d, h, w)
order. There is no class token; the pooled embedding is the mean of the normalised tokens.

Parameter names and shapes follow V-JEPA 2 (``patch_embed.proj``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``; LayerNorm eps 1e-6, qkv bias),
so its checkpoints load without renaming and give the same features. Two position schemes:

- ``pos_embed="sincos"``: a fixed 3D sin-cos table ``pos_embed`` (1, N, C) added to the tokens; it is
  a persistent buffer (same state-dict key as V-JEPA 2's frozen parameter, but never trainable, even
  after ``requires_grad_(True)``). Another input size uses V-JEPA 2's rule: the same (h, w) grid with
  fewer depth steps takes the first rows, anything else is resized trilinearly.
- ``pos_embed="rope"``: rotary positions inside attention. Each head's first ``3 * 2*((head_dim//3)//2)``
  channels are split into depth, height and width parts rotated by the token's integer grid position;
  the rest pass through. As in V-JEPA 2 the cos/sin tables are built by *tiling* the ``dim/2``
  frequencies (``[f0..fn, f0..fn]``) while channels are rotated in *adjacent* pairs ``(x0, x1)``, so
  a pair's two channels use different frequencies. This is V-JEPA 2's documented quirk (its
  ``rotate_queries_or_keys``); it is kept so that released weights give the same features. The tables
  are computed in the dtype of the queries, as there.

Loading (:meth:`VisionTransformer3D.adapt_state_dict`) is strict about positions: a sin-cos table is read for
the grid it was made for and resized from that grid, never accepted because its count matches; a RoPE
checkpoint (no ``pos_embed``) into a sin-cos model is refused with the setting that fits. V-JEPA 2's own RoPE
models hold no ``pos_embed``, though its hub loader notes that some released files carry an unused one: an
all-zero table is taken for such a placeholder and dropped; a RoPE model (``pos_embed="rope"``, the user's
word) drops a sin-cos table with a note, and a learned one needs ``model.allow_partial_load = true`` to be
dropped.

V-JEPA 2.1 (``app/vjepa_2_1`` upstream) is this model with three settings: ``rope_frequencies =
"interleaved"`` (each rotated pair shares one frequency, ``repeat_interleave``), ``rope_grid = 16`` (height
and width positions interpolated to its 16-patch pretraining grid, the hub's ``interpolate_rope``) and
``modality_embedding`` (a learned ``video_mod_embed`` added to every token). Its files name the final norm
``norms_block.3`` (the last of four); :func:`read_vjepa21_layout` maps them onto this model.

Head counts: V-JEPA 2's released ViT-g uses 22 heads (``vit_giant_xformers`` there), so ``vit3d_giant``
has 22 heads and ``vit3d_giant_h16`` the 16-head variant (``vit_giant``). The head count changes no
parameter shape, only how channels are split, so pick the one your checkpoint was trained with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from medctl.errors import ConfigError
from medctl.models.encoders.base import Encoder, check_input_size

Grid = tuple[int, int, int]


# ------------------------------------------------------------------------------ position embeddings
def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (dim/2))``: (M,) -> (M, dim), float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d_at(ids: torch.Tensor, grid: Grid, embed_dim: int, uniform_power: bool = False) -> torch.Tensor:
    """V-JEPA's 3D sin-cos rows for token indices ``ids`` of a (t, h, w) grid: (M,) -> (M, embed_dim).

    Channels are [depth | height | width]: halves and quarters of ``embed_dim``, or three equal parts
    of ``2 * ceil(embed_dim / 6)`` (cut back to ``embed_dim``) with ``uniform_power``.
    """
    _, h, w = grid
    d_pos, rest = ids // (h * w), ids % (h * w)
    h_pos, w_pos = rest // w, rest % w
    if uniform_power:
        d_dim = h_dim = w_dim = int(math.ceil(embed_dim / 6) * 2)
    else:
        d_dim, h_dim, w_dim = embed_dim // 2, embed_dim // 4, embed_dim // 4
    table = torch.cat([sincos_1d(d_dim, d_pos), sincos_1d(h_dim, h_pos), sincos_1d(w_dim, w_pos)], dim=1)
    return table[:, :embed_dim].float()


def sincos_3d(grid: Grid, embed_dim: int, uniform_power: bool = False) -> torch.Tensor:
    """The full table for a (t, h, w) grid: (1, t*h*w, embed_dim), on the CPU (also under a meta device)."""
    ids = torch.arange(math.prod(grid), device="cpu")
    return sincos_3d_at(ids, grid, embed_dim, uniform_power)[None]


def resize_pos_embed(pos_embed: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """Resize a (1, N, C) table from grid ``src`` to ``dst`` with V-JEPA 2's rule (see module doc)."""
    if tuple(src) == tuple(dst):
        return pos_embed
    if tuple(src[1:]) == tuple(dst[1:]) and dst[0] < src[0]:
        return pos_embed[:, : math.prod(dst)]  # fewer depth steps: the first rows
    dim = pos_embed.shape[-1]
    volume = pos_embed.reshape(1, *src, dim).permute(0, 4, 1, 2, 3)  # (1, C, t, h, w)
    scale = tuple(d / s for d, s in zip(dst, src, strict=True))
    resized = F.interpolate(volume, scale_factor=scale, mode="trilinear")
    if tuple(resized.shape[2:]) != tuple(dst):  # floor(s * d/s) fell one short
        resized = F.interpolate(volume, size=tuple(dst), mode="trilinear")
    return resized.permute(0, 2, 3, 4, 1).reshape(1, -1, dim)


class RotaryPositions:
    """(depth, height, width) positions of the tokens a forward pass keeps, shared by all blocks.

    ``ids`` are token indices into the (t, h, w) grid: (N,) for all tokens or (B, K) after masking.
    ``frequencies``: ``"tiled"`` (V-JEPA 2: ``[f0..fn, f0..fn]``) or ``"interleaved"`` (V-JEPA 2.1:
    ``[f0, f0, f1, f1, ...]``, so each rotated pair shares one frequency). ``rope_grid`` > 0 maps height and
    width positions onto a ``rope_grid``-patch span (V-JEPA 2.1's ``interpolate_rope``: ``i * (g - 1) / (n - 1)``
    for n patches), 0 keeps integer positions. Rotation tables are built once per dtype.
    """

    def __init__(self, ids: torch.Tensor, grid: Grid, frequencies: str = "tiled", rope_grid: int = 0):
        _, h, w = grid
        rest = ids % (h * w)
        self.positions = (ids // (h * w), rest // w, rest % w)  # each (N,) or (B, K)
        if rope_grid:  # float32 first, in upstream's order of operations
            d_pos, h_pos, w_pos = (p.float() for p in self.positions)
            self.positions = (d_pos, h_pos * (rope_grid - 1) / (h - 1), w_pos * (rope_grid - 1) / (w - 1))
        self.frequencies = frequencies
        self._tables: dict[tuple[int, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def tables(self, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, sin) per axis, each broadcastable to (B, heads, N, dim)."""
        key = (dim, dtype)
        if key not in self._tables:
            omega = torch.arange(dim // 2, dtype=dtype, device=self.positions[0].device)
            omega = 1.0 / 10000 ** (omega / (dim / 2.0))  # (dim/2,)
            out = []
            for pos in self.positions:
                freqs = pos.to(dtype)[..., None] * omega  # (..., N, dim/2)
                if self.frequencies == "interleaved":
                    freqs = freqs.repeat_interleave(2, dim=-1)  # V-JEPA 2.1
                else:
                    freqs = torch.cat([freqs, freqs], dim=-1)  # tiled, not interleaved: V-JEPA 2's quirk
                if freqs.ndim == 3:  # masked: (B, K, dim) -> (B, 1, K, dim)
                    freqs = freqs[:, None]
                out += [freqs.cos(), freqs.sin()]
            self._tables[key] = tuple(out)
        return self._tables[key]


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., dim/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: RotaryPositions, axis_dim: int) -> torch.Tensor:
    """Rotate the depth, height and width parts of q or k (B, heads, N, head_dim); keep the rest."""
    cos_d, sin_d, cos_h, sin_h, cos_w, sin_w = rope.tables(axis_dim, x.dtype)
    parts = []
    for i, (cos, sin) in enumerate(((cos_d, sin_d), (cos_h, sin_h), (cos_w, sin_w))):
        part = x[..., i * axis_dim : (i + 1) * axis_dim]
        parts.append(part * cos + rotate_pairs(part) * sin)
    parts.append(x[..., 3 * axis_dim :])
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------- blocks
class PatchEmbed3D(nn.Module):
    """Tubelets of t x p x p voxels -> tokens: (B, C, D, H, W) -> (B, N, embed_dim)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, tubelet_size: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch SDPA, with optional 3D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError([f"embed_dim {dim} is not divisible by num_heads {num_heads}; change one"], "model.encoder_args")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rope_dim = 2 * ((self.head_dim // 3) // 2)  # channels per axis that RoPE rotates
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: RotaryPositions | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope, self.rope_dim), apply_rope(k, rope, self.rope_dim)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, heads, N, head_dim)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, rope: RotaryPositions | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------ model
class VisionTransformer3D(Encoder):
    """ViT over 3D tubelets; ``forward_features(x, masks)`` -> normalised tokens (B, N, C)."""

    feature_layout = "tokens"
    spatial_dims = 3
    positions_guessed = False  # set by model.encoder = "auto" when a sin-cos scheme was read from a file's table

    def __init__(
        self,
        *,
        in_channels: int = 1,
        input_size: Sequence[int] = (16, 224, 224),
        patch_size: int = 16,
        tubelet_size: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: Literal["sincos", "rope"] = "sincos",
        uniform_power: bool = False,
        rope_frequencies: Literal["tiled", "interleaved"] = "tiled",
        rope_grid: int = 0,
        modality_embedding: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_std: float = 0.02,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "rope"):
            raise ConfigError([f"pos_embed = {pos_embed!r}: use \"sincos\" or \"rope\""], "model.encoder_args")
        if rope_frequencies not in ("tiled", "interleaved"):
            raise ConfigError([f"rope_frequencies = {rope_frequencies!r}: use \"tiled\" or \"interleaved\""], "model.encoder_args")
        if pos_embed == "sincos" and embed_dim % 8:
            raise ConfigError([f"sincos positions need embed_dim divisible by 8, got {embed_dim}"], "model.encoder_args")
        self.in_channels, self.embed_dim, self.num_heads = in_channels, embed_dim, num_heads
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.input_size = check_input_size("vit3d", input_size, 3, (tubelet_size, patch_size, patch_size))
        self.grid: Grid = self.token_grid(self.input_size)
        self.pos_embed_kind, self.uniform_power = pos_embed, uniform_power
        self.rope_frequencies, self.rope_grid = rope_frequencies, rope_grid
        self.activation_checkpointing = activation_checkpointing

        self.patch_embed = PatchEmbed3D(in_channels, embed_dim, patch_size, tubelet_size)
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_3d(self.grid, embed_dim, uniform_power))  # (1, N, C)
        else:
            self.pos_embed = None
        if modality_embedding:  # V-JEPA 2.1's video-modality vector, added to every token
            self.video_mod_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))  # (1, 1, C)
        else:
            self.video_mod_embed = None
        drop_paths = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dp) for dp in drop_paths
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.video_mod_embed is not None:
            nn.init.normal_(self.video_mod_embed, std=1e-6)  # as V-JEPA 2.1
        with torch.no_grad():  # residual branches shrink with depth, as in V-JEPA 2
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def token_grid(self, spatial_size: Sequence[int]) -> Grid:
        d, h, w = spatial_size
        return (d // self.tubelet_size, h // self.patch_size, w // self.patch_size)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.norm

    def forward_features(
        self, x: torch.Tensor, masks: torch.Tensor | list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Normalised tokens (B, N, C); with ``masks`` only the given token indices are kept.

        ``masks``: a LongTensor (B, K) of token indices to keep, or a list of them with one K; as in
        V-JEPA each mask selects from every sample and the results are concatenated along the batch,
        giving (B * len(masks), K, C) (call once per K for masks of different sizes). Positions are
        added (sincos) or taken (RoPE) before tokens are dropped.
        """
        grid = self.token_grid(x.shape[2:])
        unit = (self.tubelet_size, self.patch_size, self.patch_size)
        if any(s % m for s, m in zip(x.shape[2:], unit, strict=True)):
            tubelet = "x".join(map(str, unit))
            raise ConfigError(
                [f"input {list(x.shape[2:])} is not a multiple of the {tubelet} tubelet; change data.preprocess.spatial_size"],
                "data.preprocess.spatial_size",
            )
        tokens = self.patch_embed(x)  # (B, N, C)
        if self.video_mod_embed is not None:
            tokens = tokens + self.video_mod_embed
        if self.pos_embed is not None:
            # added in the wider dtype, then cast back (what V-JEPA 2's in-place add does under autocast)
            tokens = (tokens + resize_pos_embed(self.pos_embed, self.grid, grid)).to(tokens.dtype)
        ids = torch.arange(tokens.shape[1], device=x.device)  # (N,)
        if masks is not None:
            masks = masks if isinstance(masks, list | tuple) else [masks]
            if len({m.shape for m in masks}) > 1:
                raise ValueError(f"masks in one call must all be (B, K) of one K, got {[tuple(m.shape) for m in masks]}")
            tokens = torch.cat([keep_tokens(tokens, m) for m in masks], dim=0)  # (B * M, K, C)
            ids = torch.cat(list(masks), dim=0)  # (B * M, K)
        rope = None
        if self.pos_embed_kind == "rope":
            if self.rope_grid and min(grid[1:]) < 2:
                raise ConfigError(
                    [f"input {list(x.shape[2:])} gives one patch along height or width, where V-JEPA 2.1's "
                     "interpolated RoPE divides by zero; use a larger data.preprocess.spatial_size, or set "
                     "model.encoder_args = {rope_grid = 0}"],
                    "data.preprocess.spatial_size",
                )  # fmt: skip
            rope = RotaryPositions(ids, grid, self.rope_frequencies, self.rope_grid)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                tokens = checkpoint(block, tokens, rope, use_reentrant=False)
            else:
                tokens = block(tokens, rope)
        return self.norm(tokens)

    # --------------------------------------------------------------------------- weight adaptation
    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Match a checkpoint's layout, position scheme and grid to this model, in place: ``(notes, conflicts)``.

        A V-JEPA 2.1 file is read by :func:`read_vjepa21_layout`; its interleaved RoPE is a setting this
        model must share (a conflict otherwise). Positions are matched by grid, never by count: a sin-cos
        table is read for the (t, h, w) grid it was made for (:func:`sincos_grid`) and resized from that grid
        to this model's, even when the two hold the same number of positions; a RoPE model drops a sin-cos
        table with a note (it was asked for RoPE: ``pos_embed = "rope"``). A conflict is a setting the
        checkpoint contradicts (a 2.1 file for a 2.0 model, no table for a sin-cos model, a learned table
        for a RoPE model, a table of no readable grid); the loader refuses it unless
        ``model.allow_partial_load``.
        """
        notes, conflicts = read_vjepa21_layout(state_dict, self.rope_frequencies)
        more_notes, more_conflicts = self._adapt_positions(state_dict)
        return notes + more_notes, conflicts + more_conflicts

    def _adapt_positions(self, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        table = state_dict.get("pos_embed")
        if self.pos_embed is None:
            if table is None:
                return [], []
            del state_dict["pos_embed"]
            if not table.any():
                return ["pos_embed is all zeros: an unused placeholder beside RoPE, dropped"], []
            found = sincos_grid(table, self.grid) if table.ndim == 3 else None
            if found is not None:
                return [
                    f"pos_embed: a sin-cos table for the grid {list(found[0])} dropped: this model uses RoPE "
                    '(pos_embed = "rope"), as a V-JEPA 2 file that saved an unused table beside RoPE needs'
                ], []
            return [], [
                f"the checkpoint carries a learned pos_embed of {table.shape[1]} positions (not sin-cos): this "
                'model uses RoPE and would lose it; set model.encoder_args = {pos_embed = "sincos"} (or '
                'model.encoder = "auto"), or model.allow_partial_load = true to drop it'
            ]
        if table is None:
            return [], [
                "the checkpoint has no pos_embed: it was trained with RoPE, this model adds sin-cos positions; "
                'set model.encoder_args = {pos_embed = "rope"} (or model.encoder = "auto")'
            ]
        if table.ndim != 3 or table.shape[-1] != self.embed_dim:
            return [], []  # left as a mis-shaped key
        found = sincos_grid(table, self.grid)
        if found is None:
            if table.shape == self.pos_embed.shape:
                return [f"pos_embed is not a sin-cos table; taken as made for this model's grid {list(self.grid)}"], []
            return [], [
                f"pos_embed: {table.shape[1]} positions that are no sin-cos table of any grid, so they cannot be "
                f"matched to the grid {list(self.grid)}; set model.allow_partial_load = true to keep this model's own"
            ]
        src = found[0]
        if src == self.grid:
            return [], []
        state_dict["pos_embed"] = resize_pos_embed(table.float(), src, self.grid).to(table.dtype)
        return [f"pos_embed resized from grid {list(src)} to {list(self.grid)}"], []

VJEPA21_UNUSED = ("img_mod_embed", "patch_embed_img.")  # 2.1's image branch: single frames, never a volume


def read_vjepa21_layout(state_dict: dict[str, torch.Tensor], rope_frequencies: str) -> tuple[list[str], list[str]]:
    """V-JEPA 2.1's keys onto this model's, in place: ``(notes, conflicts)``; nothing for other files.

    2.1 has no ``norm``: its final norm is the last of ``norms_block.*`` (the others normalise intermediate
    layers for distillation), read as ``norm``. Its image branch (``img_mod_embed``, ``patch_embed_img``,
    used for single frames) is dropped; ``video_mod_embed`` stays for the model's modality embedding. Its
    RoPE interleaves frequencies, so a model with V-JEPA 2's tiled ones is a conflict.
    """
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"norms_block\.(\d+)\.", k))})
    if not levels:
        return [], []
    last = levels[-1]
    for key in [k for k in state_dict if k.startswith("norms_block.")]:
        value = state_dict.pop(key)
        level, name = key.removeprefix("norms_block.").split(".", 1)
        if int(level) == last:
            state_dict[f"norm.{name}"] = value
    dropped = [k for k in state_dict if k.startswith(VJEPA21_UNUSED)]
    for key in dropped:
        del state_dict[key]
    unused = [f"norms_block.{i}" for i in levels[:-1]] + sorted({k.split(".")[0] for k in dropped})
    dropped_text = f"; {', '.join(unused)} not used for volumes (intermediate-layer norms, image branch): dropped"
    notes = [f"V-JEPA 2.1 layout: norms_block.{last} read as the final norm" + (dropped_text if unused else "")]
    conflicts = []
    if rope_frequencies != "interleaved":
        conflicts.append(
            "the checkpoint is in V-JEPA 2.1's layout (norms_block), whose RoPE interleaves its frequencies, but "
            'this model tiles them as V-JEPA 2 does; set model.encoder = "auto" (or model.encoder_args = '
            '{rope_frequencies = "interleaved", modality_embedding = true, rope_grid = 16})'
        )
    return notes, conflicts


def keep_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, C) and (B, K) indices -> (B, K, C)."""
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def grid_candidates(n: int, prefer: Grid | None = None) -> list[Grid]:
    """Every (t, h, w) with t * h * w = n: ``prefer`` first, then grids with its (h, w), then square
    (h = w) grids as V-JEPA builds them (fewest depth steps first), then the rest."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    every = [(n // (h * w), h, w) for h in divisors for w in divisors if (n // h) % w == 0]

    def order(grid: Grid) -> tuple[int, ...]:
        t, h, w = grid
        return (
            grid != prefer,
            prefer is None or (h, w) != tuple(prefer[1:]),
            h != w,
            abs(h - w),
            t,
        )

    return sorted(every, key=order)


def sincos_grid(table: torch.Tensor, prefer: Grid | None = None) -> tuple[Grid, bool] | None:
    """The (t, h, w) grid and ``uniform_power`` a (1, N, C) sin-cos table was made for, or None.

    Sampled rows are regenerated for each candidate grid (:func:`grid_candidates`) in both channel
    splits and compared; a learned (not sin-cos) table matches none.
    """
    n, dim = table.shape[1], table.shape[2]
    ids = torch.unique(torch.linspace(0, n - 1, 97).long())
    rows = table[0, ids].double()
    atol = 1e-4 if table.dtype in (torch.float32, torch.float64) else 2e-2
    for grid in grid_candidates(n, prefer):
        for uniform in (False, True):
            if torch.allclose(sincos_3d_at(ids, grid, dim, uniform).double(), rows, atol=atol):
                return grid, uniform
    return None


# ----------------------------------------------------------------------------------------- builders
def vit3d(**kwargs) -> VisionTransformer3D:
    """Any width, depth and head count through its arguments: what ``model.encoder = "auto"`` builds for a
    ViT that matches no named size."""
    return VisionTransformer3D(**kwargs)


def vit3d_test(**kwargs) -> VisionTransformer3D:
    """64 wide, 2 deep, 2 heads, 2x8x8 tubelets: for tests."""
    return VisionTransformer3D(**{"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, **kwargs})


def vit3d_tiny(**kwargs) -> VisionTransformer3D:
    return VisionTransformer3D(embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit3d_small(**kwargs) -> VisionTransformer3D:
    return VisionTransformer3D(embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit3d_base(**kwargs) -> VisionTransformer3D:
    return VisionTransformer3D(embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit3d_large(**kwargs) -> VisionTransformer3D:
    return VisionTransformer3D(embed_dim=1024, depth=24, num_heads=16, **kwargs)


def vit3d_huge(**kwargs) -> VisionTransformer3D:
    return VisionTransformer3D(embed_dim=1280, depth=32, num_heads=16, **kwargs)


def vit3d_giant(**kwargs) -> VisionTransformer3D:
    """V-JEPA 2's released ViT-g: 1408 wide, 40 deep, 22 heads, MLP ratio 48/11."""
    return VisionTransformer3D(embed_dim=1408, depth=40, num_heads=22, mlp_ratio=48 / 11, **kwargs)


def vit3d_giant_h16(**kwargs) -> VisionTransformer3D:
    """ViT-g with 16 heads (V-JEPA 2's ``vit_giant``); same parameter shapes as ``vit3d_giant``."""
    return VisionTransformer3D(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, **kwargs)
