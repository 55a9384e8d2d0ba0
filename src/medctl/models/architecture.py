"""Which encoder a checkpoint needs, read from the checkpoint: ``model.encoder = "auto"``.

``model.encoder = "auto"`` (the default) builds whatever encoder ``model.checkpoint`` (or a sweep entry's
file) was saved from, so a lab's V-JEPA 2 files of different widths and position schemes need no
per-checkpoint settings. What is read, in this order:

- **medctl checkpoints** (``encoder.ckpt``, ``best.ckpt``) record their encoder (``model.name`` and
  ``model.args``): it is rebuilt as recorded; so is a file that carries ``medctl_model`` (medctl's
  V-JEPA 2-layout export, :func:`medctl.pretrain.jepa.vjepa2_layout`);
- **anything else** is read from its state dict, after the entry and wrapper prefix the loader would
  pick (``target_encoder``, ``encoder``, ``context_encoder``, ... and ``module.backbone.`` etc.):

  * the family by key patterns: ``vit3d`` (``patch_embed.proj`` + ``blocks.N.attn.qkv``), ``mt3``
    (``plane_type``), ``unet2d`` (``down.N.block``), ``convnext`` (``stem.0`` + ``stages.N``), ``resnet``
    (``conv1`` + ``layer1``);
  * a ViT's width (the patch embedding's output channels), input channels, tubelet ``t`` and patch ``p``
    (its kernel), depth (the number of blocks), MLP ratio (``fc1`` rows / width) and qkv bias; its
    position scheme: a ``pos_embed`` of N positions is sin-cos, its grid read from its values
    (:func:`medctl.models.encoders.vit3d.sincos_grid`), and no ``pos_embed`` is RoPE (so is an all-zero
    one: a placeholder some RoPE files carry, which no sin-cos model would train with). A sin-cos table in
    a V-JEPA training file is a guess, warned in one line and marked in :func:`describe_encoder`: upstream's
    training code (app/vjepa/train.py, c2963a4 and before) saves no table for RoPE, yet its released RoPE
    files carry one, unused; ``encoder_args = {pos_embed = "rope"}`` settles it;
  * V-JEPA 2.1's layout (``norms_block.N``, ``video_mod_embed``): RoPE with interleaved frequencies at
    positions interpolated to its 16-patch pretraining grid (its hub's ``interpolate_rope``), the video
    modality embedding, the last ``norms_block`` as the final norm
    (:func:`medctl.models.encoders.vit3d.read_vjepa21_layout`);
  * a ViT's head count, which no state dict stores: V-JEPA 2's sizes decide (:data:`VJEPA2_HEADS`; 1408 wide is
    the released ViT-g with 22 heads, ``vit_giant_xformers`` there, though V-JEPA 2's ``vit_giant`` has 16;
    1664 wide the 2.1 ViT-G with 26, though ``vit_gigantic`` has 16); else the heads of a registered variant
    with the same shapes (``vit3d_test``: 2); else 64-channel heads (width / 64), else 32-channel ones, else
    one head. ``model.encoder_args = {num_heads = N}`` overrides the guess, as any ``encoder_args`` override
    what is read. The registry name is the variant with the same shapes and heads (``vit3d_large``), else
    ``vit3d`` with every argument;
  * the other families: the registered variant whose state dict has the same keys and shapes (the
    stem's input channels aside); other sizes need ``model.encoder`` named.

Input channels: a checkpoint's stem that takes 3 channels serves 1-channel data by summing its filters
(:func:`medctl.models.checkpoints.adapt_input_channels`, noted in the report); any other difference, or
a ViT whose tubelets do not tile the cached size, is refused with the reason: nothing is resized to fit
silently. Before anything is allocated, the model is built on the meta device and refused when its
weights alone exceed the memory free (:func:`check_memory`): a file's shapes cost nothing to declare.
``auto`` with no checkpoint has nothing to read and asks for a named encoder (a sweep's random
baseline takes the first checkpoint's architecture, :mod:`medctl.sweep.entries`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from medctl.config import ModelConfig
from medctl.devices import available_memory
from medctl.errors import CheckpointError, ConfigError
from medctl.models.checkpoints import (
    LoadReport,
    find_prefix,
    plan_encoder_load,
    read_checkpoint,
    refusal,
    select_state_dict,
)
from medctl.models.encoders.base import Encoder
from medctl.models.encoders.vit3d import VisionTransformer3D, sincos_grid
from medctl.models.registry import ENCODERS, build_encoder, get_spec

AUTO = "auto"
# V-JEPA 2's ViT sizes, width -> heads (its src/models/vision_transformer.py): tiny, small, base, large,
# huge; 1408 is the ViT-g whose released checkpoints use 22 heads (`vit_giant_xformers`; its 16-head
# `vit_giant` shares every shape); 1664 the ViT-G whose V-JEPA 2.1 releases use 26 heads (hub:
# `vit_gigantic_xformers`; its 16-head `vit_gigantic` shares every shape).
VJEPA2_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 22, 1664: 26}
FAMILY_KEYS = {  # a family is recognised when every pattern matches some key
    "vit3d": (r"^patch_embed\.proj\.weight$", r"^blocks\.\d+\.attn\.qkv\.weight$"),
    "mt3": (r"^plane_type$", r"^stem\.0\.conv1\.weight$"),
    "unet2d": (r"^down\.0\.block\.0\.weight$", r"^out\.weight$"),
    "convnext": (r"^stem\.0\.weight$", r"^stages\.\d+\."),
    "resnet (MONAI)": (r"^conv1\.weight$", r"^layer1\.0\."),
}


@dataclass
class Architecture:
    """The encoder a checkpoint needs: ``build_encoder(name, in_channels=..., **args)`` rebuilds it."""

    family: str
    name: str  # registry name
    args: dict[str, Any]  # encoder args besides in_channels and input_size
    in_channels: int  # what the checkpoint's stem takes
    source: str  # how it was found: recorded in the file, or read from the state dict
    key: str = ""  # the checkpoint entry read ("" for a bare state dict)
    prefix: str = ""  # the wrapper prefix stripped
    facts: list[str] = field(default_factory=list)  # what the state dict showed, for `check checkpoint`
    notes: list[str] = field(default_factory=list)  # guesses made (head counts) and overrides applied
    layout: str = ""  # a foreign ViT's: "V-JEPA 2" or "V-JEPA 2.1"
    positions_guessed: bool = False  # a sin-cos scheme read from a table that may sit unused beside RoPE
    warnings: list[str] = field(default_factory=list)  # one line each, printed by check / finetune / sweep

    def setting(self) -> str:
        """The config that names this encoder: ``model.encoder = "vit3d_large"`` (+ encoder_args)."""
        shown = ", ".join(f"{k} = {_toml(v)}" for k, v in self.args.items())
        return f'model.encoder = "{self.name}"' + (f", model.encoder_args = {{{shown}}}" if shown else "")

    def lines(self) -> list[str]:
        entry = f", entry `{self.key}`" if self.key else ""
        prefix = f", prefix `{self.prefix}` stripped" if self.prefix else ""
        out = [f"architecture: {self.family} `{self.name}` ({self.source}{entry}{prefix})"]
        out += [f"  {fact}" for fact in self.facts]
        out += [f"  note: {note}" for note in self.notes]
        out += [f"warning: {warning}" for warning in self.warnings]
        return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


# ------------------------------------------------------------------------------------ the registry
@cache
def registered_layout(name: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """``(key -> shape, num_heads)`` of a registered encoder with its defaults and one input channel, built
    on the meta device (no memory); ``num_heads`` is 0 for encoders without one."""
    spec = ENCODERS[name]
    with torch.device("meta"):
        encoder = spec.builder(in_channels=1, input_size=spec.default_input_size)
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    return shapes, int(getattr(encoder, "num_heads", 0))


@cache
def known_keys() -> frozenset[str]:
    """Every state-dict key of every registered encoder: what wrapper prefixes are found against."""
    return frozenset(k for name in ENCODERS for k in registered_layout(name)[0])


def stem_key(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The first convolution: the first key of a weight with 3 or more dims, ``pos_embed`` aside."""
    return next(k for k, s in shapes.items() if len(s) >= 3 and k != "pos_embed")


def same_layout(state: Mapping[str, torch.Tensor], name: str, skip: Sequence[str] = ()) -> bool:
    """Does ``state`` have the keys and shapes of registered ``name`` (its stem's channels aside)?"""
    shapes, _ = registered_layout(name)
    keys = set(shapes) - set(skip)
    if keys != set(state) - set(skip):
        return False
    stem = stem_key(shapes)
    for key in keys:
        got, want = tuple(state[key].shape), shapes[key]
        if key == stem:
            got, want = got[:1] + got[2:], want[:1] + want[2:]
        if got != want:
            return False
    return True


# ------------------------------------------------------------------------------------------ reading
def read_architecture(path: str | Path, key: str = "", ckpt: Mapping[str, Any] | None = None) -> Architecture:
    """The encoder ``path`` needs (see the module docstring); ``ckpt`` when already read."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    recorded = _recorded_model(ckpt)
    if recorded is not None:
        name, args = recorded
        in_channels = int(args.pop("in_channels", 1))
        args.pop("input_size", None)
        spec = get_spec(name)
        how = "recorded in the medctl checkpoint" if isinstance(ckpt.get("medctl"), dict) else "recorded in the file"
        return Architecture(spec.family, name, args, in_channels, how)
    tensors, _, entry = select_state_dict(ckpt, path, key)
    prefix = find_prefix(list(tensors), set(known_keys()))
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    family = next(
        (f for f, patterns in FAMILY_KEYS.items() if all(any(re.search(p, k) for k in state) for p in patterns)),
        None,
    )
    if family is None:
        shown = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"{path}: cannot tell the architecture from its keys ({shown}, ...); name the encoder with "
            "model.encoder (`medctl list models`)"
        )
    if family == "vit3d":
        arch = _vit_architecture(state, path, training_file=prefix.endswith("backbone.") or "predictor" in ckpt)
    else:
        arch = _registered_architecture(state, family, path)
    arch.key, arch.prefix = entry, prefix
    return arch


def _recorded_model(ckpt: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    model = ckpt.get("model") if isinstance(ckpt.get("medctl"), dict) else ckpt.get("medctl_model")
    if isinstance(model, Mapping) and isinstance(model.get("name"), str) and model["name"] in ENCODERS:
        return model["name"], dict(model.get("args") or {})
    return None


def _registered_architecture(state: Mapping[str, torch.Tensor], family: str, path: str | Path) -> Architecture:
    for name, spec in ENCODERS.items():
        if spec.family == family and same_layout(state, name):
            stem = stem_key(registered_layout(name)[0])
            channels = int(state[stem].shape[1])
            facts = [f"{spec.description}; stem `{stem}` takes {channels} channel(s)"]
            return Architecture(family, name, {}, channels, "read from the state dict", facts=facts)
    raise CheckpointError(
        f"{path}: a {family} checkpoint of a size no registered encoder has; name it with model.encoder and "
        "model.encoder_args (`medctl list models`)"
    )


def _vit_architecture(state: Mapping[str, torch.Tensor], path: str | Path, training_file: bool = False) -> Architecture:
    proj = state["patch_embed.proj.weight"]
    if proj.ndim != 5 or proj.shape[3] != proj.shape[4]:
        raise CheckpointError(
            f"{path}: its patch embedding is {list(proj.shape)}, not a 3D tubelet embedding (C_out, C_in, t, p, p); "
            "medctl's ViT reads volumes: name a 2D encoder with model.encoder"
        )
    width, channels, tubelet, patch = (int(proj.shape[i]) for i in (0, 1, 2, 3))
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    depth, first = blocks[-1] + 1, f"blocks.{blocks[0]}."
    fc1 = state.get(f"{first}mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError(f"{path}: a ViT without `{first}mlp.fc1.weight`; name the encoder with model.encoder")
    hidden = int(fc1.shape[0])
    mlp_ratio = hidden / width if int(width * (hidden / width)) == hidden else (hidden + 0.5) / width
    args: dict[str, Any] = {"patch_size": patch, "tubelet_size": tubelet}
    facts = [f"{width} wide, {depth} deep, MLP {hidden} ({hidden / width:.3g} x width), {tubelet}x{patch}x{patch} tubelets"]
    table = state.get("pos_embed")
    warnings = []
    if table is None or not table.any():
        args["pos_embed"] = "rope"
        facts.append("positions: RoPE (" + ("no pos_embed in the file)" if table is None else "its pos_embed is all zeros)"))
    else:
        args["pos_embed"] = "sincos"
        found = sincos_grid(table) if table.ndim == 3 else None
        if found is None:
            facts.append(f"positions: a learned pos_embed of {table.shape[1]} positions (not sin-cos)")
        else:
            grid, uniform = found
            if uniform:
                args["uniform_power"] = True
            split = "uniform_power = true: equal thirds" if uniform else "uniform_power = false: halves and quarters"
            facts.append(f"positions: sin-cos pos_embed for the grid {list(grid)} ({table.shape[1]} positions; {split})")
            if training_file:
                warnings.append(
                    f"{path}: read as sin-cos positions from its pos_embed table; the weights cannot tell a model "
                    "trained with it from a RoPE model that saved it unused (V-JEPA 2's released files do, its hub "
                    'loader drops it); if this one was trained with RoPE, set model.encoder_args = {pos_embed = "rope"} '
                    '(pos_embed = "sincos" confirms the reading and silences this)'
                )
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"norms_block\.(\d+)\.", k))})
    layout = "V-JEPA 2.1" if levels else "V-JEPA 2"
    if not levels:
        facts.append("layout: V-JEPA 2 (final `norm`" + ("; RoPE with tiled frequencies)" if args["pos_embed"] == "rope" else ")"))
    else:
        # V-JEPA 2.1 (app/vjepa_2_1): final norm = last of norms_block, a video-modality vector, RoPE with
        # interleaved frequencies at positions interpolated to its pretraining grid (its hub's interpolate_rope:
        # 256 px / 16-pixel patches, 252 / 14)
        rope_grid = {16: 16, 14: 18}.get(patch, 0)
        args.update(rope_frequencies="interleaved", rope_grid=rope_grid, modality_embedding="video_mod_embed" in state)
        mod = "a video modality embedding" if "video_mod_embed" in state else "no modality embedding"
        where = (f"positions interpolated to a {rope_grid}-patch grid as its hub loads releases (rope_grid = {rope_grid})"
                 if rope_grid else "integer positions (no interpolation is defined for this patch size)")  # fmt: skip
        facts.append(
            f"layout: V-JEPA 2.1 (norms_block.0-{levels[-1]}, the last the final norm; {mod}; RoPE with "
            f"interleaved frequencies, {where})"
        )
    if f"{first}attn.qkv.bias" not in state:
        args["qkv_bias"] = False
    facts.append(f"stem `patch_embed.proj` takes {channels} channel(s)")

    twins = [
        n for n, spec in ENCODERS.items()
        if spec.family == "vit3d" and n != "vit3d" and same_layout(state, n, skip=("pos_embed", "patch_embed.proj.weight"))
    ]  # fmt: skip
    heads, why = vit_heads(width, [registered_layout(n)[1] for n in twins])
    match = next((n for n in twins if registered_layout(n)[1] == heads), None)
    name = match or "vit3d"
    if match is None:
        args = {"embed_dim": width, "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio, **args}
    arch = Architecture("vit3d", name, args, channels, "read from the state dict", facts=facts, layout=layout)
    arch.facts.insert(1, f"{heads} heads ({why})")
    arch.positions_guessed, arch.warnings = bool(warnings), warnings
    return arch


def vit_heads(width: int, registered: Sequence[int]) -> tuple[int, str]:
    """The head count of a ViT ``width`` wide (no state dict stores it) and why; see the module docstring."""
    if width in VJEPA2_HEADS:
        heads = VJEPA2_HEADS[width]
        if width in (1408, 1664):  # upstream defines both a 16-head and a wider-head ("xformers") variant
            size, name = ("ViT-g", "vit_giant") if width == 1408 else ("ViT-G (V-JEPA 2.1)", "vit_gigantic")
            return heads, (
                f"{width} wide: the released {size} has {heads} heads ({name}_xformers); set model.encoder_args = "
                f"{{num_heads = 16}} for its 16-head {name}"
            )
        return heads, f"V-JEPA 2's {width}-wide ViT has {heads}"
    if registered:
        return registered[0], "the registered variant of these shapes has as many"
    for head_dim in (64, 32):
        if width % head_dim == 0:
            return width // head_dim, (
                f"not stored in a checkpoint: {head_dim}-channel heads assumed; set model.encoder_args = "
                "{num_heads = N} if it was trained otherwise"
            )
    return 1, "not stored in a checkpoint: one head assumed; set model.encoder_args = {num_heads = N}"


# ----------------------------------------------------------------------------------------- building
@dataclass
class EncoderChoice:
    """What to build for ``model`` and data of some channels: a registry name, its args and channels."""

    name: str
    args: dict[str, Any]
    in_channels: int
    architecture: Architecture | None  # what the checkpoint holds (None without one)
    notes: list[str] = field(default_factory=list)


def choose_encoder(
    model: ModelConfig, *, in_channels: int, ckpt: Mapping[str, Any] | None = None
) -> EncoderChoice:
    """The encoder ``model`` asks for, given data of ``in_channels`` channels and the read ``ckpt`` of
    ``model.checkpoint``. ``auto`` takes the checkpoint's architecture with ``model.encoder_args`` on top and
    refuses a stem whose channels the data cannot feed (3 -> 1 is summed); a named encoder is built as named,
    for the data's channels."""
    if model.encoder != AUTO:
        arch = None
        if model.checkpoint:
            try:  # only to name what fits when the load is refused
                arch = read_architecture(model.checkpoint, model.checkpoint_key, ckpt)
            except CheckpointError:
                arch = None
        return EncoderChoice(model.encoder, dict(model.encoder_args), in_channels, arch)
    arch = None
    if model.checkpoint:
        arch = read_architecture(model.checkpoint, model.checkpoint_key, ckpt)
    elif model.architecture_from:
        arch = read_architecture(model.architecture_from, model.checkpoint_key)
        arch.notes.append(f"random initialisation of the architecture of {model.architecture_from}")
    if arch is None:
        raise ConfigError(
            [
                '`model.encoder` = "auto" reads the architecture from model.checkpoint, which is empty; name an '
                'encoder for a random initialisation (`medctl list models`), e.g. model.encoder = "vit3d_small"'
            ],
            "model.encoder",
        )
    if "pos_embed" in model.encoder_args:  # the user named the scheme: nothing is guessed
        arch.positions_guessed, arch.warnings = False, []
    notes = [f"model.encoder_args: {k} = {_toml(v)} instead of the checkpoint's {_toml(arch.args[k])}"
             for k, v in model.encoder_args.items() if k in arch.args and arch.args[k] != v]  # fmt: skip
    channels = arch.in_channels
    if channels != in_channels:
        if in_channels != 1:
            raise CheckpointError(
                f"{model.checkpoint or model.architecture_from}: its encoder takes {channels}-channel input but the data has {in_channels} "
                "channel(s); inputs are never resized to fit: use a checkpoint made for them, or preprocess them to "
                f"{channels} channel(s)"
            )
        channels = 1
        notes.append(f"the checkpoint's {arch.in_channels}-channel stem is summed into 1 channel for this data")
    return EncoderChoice(arch.name, {**arch.args, **model.encoder_args}, channels, arch, notes)


def check_fits(choice: EncoderChoice, input_size: Sequence[int], spatial_dims: int, path: str) -> None:
    """Refuse an encoder for other dims than the data's, or a checkpoint's tubelets that do not tile it."""
    spec = get_spec(choice.name)
    if spec.spatial_dims != spatial_dims:
        raise ConfigError(
            [
                f"`model.encoder` = {choice.name!r} is a {spec.spatial_dims}D encoder but the cache holds {spatial_dims}D "
                f"images of size {list(input_size)}; pick a {spatial_dims}D encoder (`medctl list models`)"
            ],
            "model.encoder",
        )
    if spec.family == "vit3d" and {"tubelet_size", "patch_size"} <= set(choice.args):
        unit = (choice.args["tubelet_size"], choice.args["patch_size"], choice.args["patch_size"])
        if any(s < m or s % m for s, m in zip(input_size, unit, strict=True)):
            tubelet = "x".join(map(str, unit))
            raise CheckpointError(
                f"{path}: its {tubelet} tubelets do not tile the data's size {list(input_size)}; inputs are never "
                "resized to fit: set data.preprocess.spatial_size to multiples of them, or leave this checkpoint out"
            )


def check_memory(choice: EncoderChoice, input_size: Sequence[int], path: str) -> None:
    """Refuse an encoder whose weights alone would not fit the memory free now, before allocating them.

    The shapes a file declares cost nothing to read (a 9 kB file of expanded tensors can declare a
    65,536-wide ViT); the model is built on the meta device to count its parameters and buffers.
    """
    with torch.device("meta"):
        encoder = build_encoder(choice.name, in_channels=choice.in_channels, input_size=input_size, **choice.args)
    tensors = [*encoder.parameters(), *encoder.buffers()]
    need, available = sum(t.numel() * t.element_size() for t in tensors), available_memory()
    if need > available:
        count = sum(p.numel() for p in encoder.parameters())
        raise CheckpointError(
            f"{path}: builds {describe_encoder(encoder)} of {count:,} parameters, {need / 1e9:.1f} GB of weights, "
            f"more than the {available / 1e9:.1f} GB of memory free; if the file's shapes are right it needs a "
            "bigger machine, else it is not the checkpoint you meant"
        )


@dataclass
class PretrainedEncoder:
    """An encoder built as ``model`` says, with ``model.checkpoint`` loaded (report and architecture kept)."""

    encoder: Encoder
    choice: EncoderChoice
    report: LoadReport | None = None  # None for a random initialisation


def plan_model_encoder(
    model: ModelConfig, *, in_channels: int, input_size: Sequence[int], spatial_dims: int
) -> tuple[PretrainedEncoder, dict[str, torch.Tensor], str]:
    """Build ``model``'s encoder and plan its load: ``(built, tensors to load, refusal or "")``; loads nothing.

    A named encoder the checkpoint does not fit gets a refusal naming the setting that fits it.
    """
    ckpt = read_checkpoint(model.checkpoint) if model.checkpoint else None
    choice = choose_encoder(model, in_channels=in_channels, ckpt=ckpt)
    check_fits(choice, input_size, spatial_dims, model.checkpoint or model.architecture_from)
    check_memory(choice, input_size, model.checkpoint or model.architecture_from or f"model.encoder = {model.encoder}")
    encoder = build_encoder(choice.name, in_channels=choice.in_channels, input_size=input_size, **choice.args)
    if choice.architecture is not None and choice.architecture.positions_guessed and model.encoder == AUTO:
        encoder.positions_guessed = True  # marked in describe_encoder: a leaderboard row says so
    if ckpt is None:
        return PretrainedEncoder(encoder, choice), {}, ""
    report, to_load = plan_encoder_load(encoder, model.checkpoint, key=model.checkpoint_key, ckpt=ckpt)
    reason = refusal(report, model.allow_partial_load)
    arch = choice.architecture
    if reason and arch is not None and model.encoder != AUTO:
        fits = f'set {arch.setting()} (or model.encoder = "auto")'
        if arch.family != get_spec(model.encoder).family:
            reason = f"{model.checkpoint}: holds a `{arch.name}` encoder but model.encoder = `{model.encoder}`; {fits}"
        elif not report.conflicts:
            reason += f"; the file holds {arch.family} `{arch.name}`: {fits}"
    return PretrainedEncoder(encoder, choice, report), to_load, reason


def pretrained_encoder(
    model: ModelConfig, *, in_channels: int, input_size: Sequence[int], spatial_dims: int
) -> PretrainedEncoder:
    """:func:`plan_model_encoder`, then the load; a refusal is a CheckpointError."""
    built, to_load, reason = plan_model_encoder(
        model, in_channels=in_channels, input_size=input_size, spatial_dims=spatial_dims
    )
    if reason:
        raise CheckpointError(reason)
    if built.report is not None:
        built.encoder.load_state_dict(to_load, strict=False)
    return built


def describe_encoder(encoder: Encoder) -> str:
    """One line for a leaderboard row: ``vit3d_large (1024 wide, 24 deep, 16 heads, RoPE, 2x16x16, 1 ch)``."""
    parts = [f"{encoder.embed_dim} wide"]
    if isinstance(encoder, VisionTransformer3D):
        t, p = encoder.tubelet_size, encoder.patch_size
        scheme = "RoPE" if encoder.pos_embed_kind == "rope" else "sin-cos"
        if encoder.positions_guessed:
            scheme += " (guessed from its table)"
        if encoder.rope_frequencies == "interleaved":
            scheme += " (V-JEPA 2.1)"
        parts += [f"{len(encoder.blocks)} deep", f"{encoder.num_heads} heads", scheme, f"{t}x{p}x{p}"]
    parts.append(f"{encoder.in_channels} ch")
    return f"{getattr(encoder, 'name', type(encoder).__name__)} ({', '.join(parts)})"
